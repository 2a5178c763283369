#!/usr/bin/env bash
# nbd-bench target: blockfork with a gateway. Usage: fork.sh SOCK FILE DIR [serve options...]
# The gateway gets a copy of FILE as its secondary (so --assume-clean is true), listens on a free
# loopback port, and runs in the background; serve then replaces this shell, so both belong to the
# process the benchmark stops.
set -euo pipefail
SOCK=$1 FILE=$2 DIR=$3
shift 3
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cp --sparse=always "$FILE" "$DIR/secondary.img"
# Write the copy back and drop it from the page cache before the run: otherwise the run measures
# the write-back of this 1 GiB setup copy, and the gateway's 4K writes land in the large folios
# cp left behind (ext4 walks every buffer head of a folio on each partial write: 20-50 us of CPU
# per 4K write, measured; a secondary not just bulk-copied has no such folios).
sync "$DIR/secondary.img"
dd if="$DIR/secondary.img" iflag=nocache count=0 status=none
node "$ROOT/bin/blockfork.js" gateway --volume "$DIR/secondary.img" --listen 127.0.0.1:0 \
  --state-dir "$DIR/gateway" --log-level warn > "$DIR/gateway.out" 2> "$DIR/gateway.log" &
for _ in $(seq 100); do
  url=$(grep -o 'http://127.0.0.1:[0-9]*' "$DIR/gateway.out" | head -1 || true)
  [ -n "$url" ] && break
  sleep 0.05
done
[ -n "$url" ] || { echo "fork.sh: the gateway did not start" >&2; cat "$DIR/gateway.log" >&2; exit 1; }
# The proxy's warnings (a link that falls behind: queue over -> tracking -> resync) go to
# $BF_FORK_LOG when set, so that the benchmark can say whether the gateway kept up.
exec node "$ROOT/bin/blockfork.js" serve --volume "$FILE" --socket "$SOCK" --listen none --log-level warn \
  --gateway "$url" --state-dir "$DIR/state" --assume-clean "$@" 2>> "${BF_FORK_LOG:-/dev/stderr}"
