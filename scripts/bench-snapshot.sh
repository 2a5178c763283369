#!/usr/bin/env bash
# Snapshot reads vs primary reads, and the time to open snap@T over about 1M journal entries
# (issue: PIT journal). Usage: bench-snapshot.sh OUTDIR. Environment: SNAP_SIZE (default 1G).
#  reads: a random-data primary with --pit; bookmark "base"; then random 4 KiB writes over a quarter
#         of the volume, so snap@base reads about that much from the journal. nbd-bench compares the
#         two exports (read workloads only) in one run.
#  open:  a sparse volume overwritten whole 4 times in separate merge windows (4 x 262144 entries
#         for 1 GiB): nbdinfo on snap@T before the first overwrite builds the pointer map over all
#         of them; its time minus nbdinfo on the primary is the open time.
set -euo pipefail
OUT=$1
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
B="node $ROOT/bin/blockfork.js"
BENCH=${NBD_BENCH:-$ROOT/../shared/bench/nbd-bench.sh}
SIZE=${SNAP_SIZE:-1G}
W=$(mktemp -d "${TMPDIR:-/tmp}/blockfork-bench-snap.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT
wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; return 1; }

head -c "$SIZE" /dev/urandom > "$W/primary.img"
$B serve --volume "$W/primary.img" --socket "$W/s.sock" --listen none --pit --state-dir "$W/state" --log-level warn > /dev/null 2>&1 &
PIDS+=($!)
wait_sock "$W/s.sock"
sleep 1.1
$B mark base --state-dir "$W/state"
fio --name=dirty --ioengine=nbd --uri="nbd+unix:///?socket=$W/s.sock" --rw=randwrite --bs=4k --iodepth=32 \
  --size="$SIZE" --io_size=$(( $(stat -c %s "$W/primary.img") / 4 )) --output-format=terse > /dev/null
sleep 1.1
$B snapshots --state-dir "$W/state" | tee "$OUT/snapshots.txt"
"$BENCH" -t "primary=nbd+unix:///?socket=$W/s.sock" -t "snapshot=nbd+unix:///snap@base?socket=$W/s.sock" \
  --ref primary -w seqread,randread-qd1,randread-qd32,nbdcopy -R "${SNAP_RUNTIME:-5}" -n 2 -o "$OUT/nbd"
kill -TERM "${PIDS[0]}"; wait "${PIDS[0]}" || true; PIDS=()

# Open time over ~1M entries.
rm -rf "$W/state2" "$W/sparse.img" "$W/s.sock"
$B serve --volume "$W/sparse.img" --size "$SIZE" --socket "$W/s.sock" --listen none --pit --state-dir "$W/state2" --log-level warn > /dev/null 2>&1 &
PIDS+=($!)
wait_sock "$W/s.sock"
sleep 1.1
T0=$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)
sleep 1.1
for i in 1 2 3 4; do
  nbdcopy --connections=4 "$W/primary.img" "nbd+unix:///?socket=$W/s.sock"
  sleep 1.1
done
entries=$($B snapshots --state-dir "$W/state2" --json | jq .entries)
t_primary=()
t_snap=()
for r in 1 2 3; do
  s=$(date +%s.%N); nbdinfo --size "nbd+unix:///?socket=$W/s.sock" > /dev/null; e=$(date +%s.%N)
  t_primary+=("$(echo "$e - $s" | bc -l)")
  s=$(date +%s.%N); nbdinfo --size "nbd+unix:///snap@$T0?socket=$W/s.sock" > /dev/null; e=$(date +%s.%N)
  t_snap+=("$(echo "$e - $s" | bc -l)")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
mp=$(median "${t_primary[@]}"); ms=$(median "${t_snap[@]}")
open=$(echo "$ms - $mp" | bc -l)
{
  echo "Snapshot reads vs primary reads (snap@base, a quarter of the volume rewritten since, so about that much"
  echo "reads from the journal), one nbd-bench run, ratios against the primary:"
  echo
  echo '```'
  cat "$OUT/nbd/table.txt"
  echo '```'
  echo
  printf 'Opening snap@T over %s journal entries: nbdinfo takes %.3f s on the snapshot vs %.3f s on the primary,\n' "$entries" "$ms" "$mp"
  printf 'so building the pointer map costs about %.3f s (median of 3; goal < 1 s).\n' "$open"
} > "$OUT/section.md"
cat "$OUT/section.md"
