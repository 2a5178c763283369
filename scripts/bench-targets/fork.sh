#!/usr/bin/env bash
# nbd-bench target: blockfork with a gateway.
# Usage: fork.sh SOCK FILE DIR [--secondary-on-shm] [serve options...]
# --secondary-on-shm puts the secondary in /dev/shm instead of beside the primary: its writes then
# never reach the primary's disk, as with a gateway at another site (the gateway process still
# runs on this machine's CPUs). Without it the secondary shares the primary's disk, and every
# cache flush of that disk (the journal's commits, FLUSH) also waits for the secondary's write-back.
# The gateway gets a copy of FILE as its secondary (so --assume-clean is true), listens on a free
# loopback port, and runs in the background; serve then replaces this shell, so both belong to the
# process the benchmark stops.
set -euo pipefail
SOCK=$1 FILE=$2 DIR=$3
shift 3
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SEC=$DIR/secondary.img
SHM=""
if [ "${1:-}" = --secondary-on-shm ]; then
  shift
  SHM=$(mktemp -d /dev/shm/blockfork-bench-secondary.XXXXXX)
  SEC=$SHM/secondary.img
  trap 'rm -rf "$SHM"' EXIT
fi
cp --sparse=always "$FILE" "$SEC"
# Write the copy back and drop it from the page cache before the run: otherwise the run measures
# the write-back of this 1 GiB setup copy, and the gateway's 4K writes land in the large folios
# cp left behind (ext4 walks every buffer head of a folio on each partial write: 20-50 us of CPU
# per 4K write, measured; a secondary not just bulk-copied has no such folios).
sync "$SEC"
dd if="$SEC" iflag=nocache count=0 status=none
node "$ROOT/bin/blockfork.js" gateway --volume "$SEC" --listen 127.0.0.1:0 \
  --state-dir "$DIR/gateway" --log-level warn > "$DIR/gateway.out" 2> "$DIR/gateway.log" &
gateway=$!
for _ in $(seq 100); do
  url=$(grep -o 'http://127.0.0.1:[0-9]*' "$DIR/gateway.out" | head -1 || true)
  [ -n "$url" ] && break
  sleep 0.05
done
[ -n "$url" ] || { echo "fork.sh: the gateway did not start" >&2; cat "$DIR/gateway.log" >&2; exit 1; }
# The proxy's warnings (a link that falls behind: queue over -> tracking -> resync) go to
# $BF_FORK_LOG when set, so that the benchmark can say whether the gateway kept up.
ARGS=(serve --volume "$FILE" --socket "$SOCK" --listen none --log-level warn --gateway "$url"
  --state-dir "$DIR/state" --assume-clean "$@")
if [ -n "$SHM" ]; then
  # Stay as the parent to remove the secondary from memory once the benchmark stops us.
  node "$ROOT/bin/blockfork.js" "${ARGS[@]}" 2>> "${BF_FORK_LOG:-/dev/stderr}" &
  proxy=$!
  trap 'kill -TERM $proxy $gateway 2>/dev/null || true; wait || true; rm -rf "$SHM"' EXIT
  trap 'exit 0' TERM INT
  wait $proxy
  exit
fi
exec node "$ROOT/bin/blockfork.js" "${ARGS[@]}" 2>> "${BF_FORK_LOG:-/dev/stderr}"
