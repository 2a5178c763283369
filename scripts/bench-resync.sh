#!/usr/bin/env bash
# Resync of a fully dirty volume vs nbdcopy of the same volume (issue: forked writes, "resync >=
# 0.8x nbdcopy"). Usage: bench-resync.sh OUTDIR. Environment: RESYNC_SIZE (default 1G), ROUNDS (3).
#  resync:  a 1 GiB primary of random data, a new tracking log (everything dirty), an empty
#           secondary behind a gateway: the time the proxy's resync takes (from its log).
#  nbdcopy: the same primary served by blockfork, copied with nbdcopy --connections=4 --flush into
#           an empty file served by nbdkit (the same data movement: primary -> a server -> a file,
#           and durable at the end, as a resync is only done once the gateway has made it durable).
#           The time without --flush is reported too.
#  memory:  each timed copy starts right after 5 GiB were written to and deleted from /dev/shm
#           (warm_memory). On this VM the guest hands free memory back to the host (free page
#           reporting) and the first touch of such a page costs a host fault: a buffered write of
#           1 GiB into a new file ran at 475-508 MiB/s on memory not recently used and at
#           2.6-4.7 GB/s on memory just freed. Without this step each row measured whether its
#           1 GiB of page cache landed on returned memory (resync rounds of 1.0 s and 3.9 s on the
#           same code); with it, both copies start from the same state. 5 GiB, not 2: the resync
#           starts half a second after this step (the proxy starting up) and runs longer than
#           nbdcopy, and freed memory goes back to the host after about 2 s; with 2 GiB resync rounds
#           still took 0.8-3.6 s (median 2.0 s) against 0.9-1.3 s with 5 GiB, while nbdcopy took
#           0.9-1.2 s either way. docs/BENCHMARKS.md has the numbers.
set -euo pipefail
OUT=$1
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
B="node $ROOT/bin/blockfork.js"
SIZE=${RESYNC_SIZE:-1G}
ROUNDS=${ROUNDS:-3}
W=$(mktemp -d "${TMPDIR:-/tmp}/blockfork-bench-resync.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$W" /dev/shm/blockfork-bench-warm.$$; }
trap cleanup EXIT
head -c "$SIZE" /dev/urandom > "$W/primary.img"
bytes=$(stat -c %s "$W/primary.img")
wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; return 1; }
stop() { kill -TERM "$1"; wait "$1" 2>/dev/null || true; }
warm_memory() {
  head -c 5G /dev/zero > /dev/shm/blockfork-bench-warm.$$ 2> /dev/null ||
    echo "bench-resync: could not write 5 GiB to /dev/shm (full?); this round may measure the host's memory" >&2
  rm -f /dev/shm/blockfork-bench-warm.$$
}

resync_times=()
copy_times=()
nf_times=()
for r in $(seq "$ROUNDS"); do
  rm -rf "$W/state" "$W/gw" "$W/secondary.img" "$W/copy.img" "$W"/*.sock "$W"/*.log "$W"/*.out
  $B gateway --volume "$W/secondary.img" --size "$bytes" --listen 127.0.0.1:0 --state-dir "$W/gw" --log-level warn > "$W/gw.out" 2> "$W/gw.log" &
  gp=$!; PIDS+=("$gp")
  for _ in $(seq 100); do url=$(grep -o 'http://127.0.0.1:[0-9]*' "$W/gw.out" | head -1 || true); [ -n "$url" ] && break; sleep 0.05; done
  warm_memory
  $B serve --volume "$W/primary.img" --socket "$W/p.sock" --listen none --gateway "$url" --state-dir "$W/state" > /dev/null 2> "$W/px.log" &
  pp=$!; PIDS+=("$pp")
  for _ in $(seq 1200); do grep -q "resync: done" "$W/px.log" && break; sleep 0.1; done
  t=$(grep -o 'resync: done, [0-9]* bytes in [0-9.]* s' "$W/px.log" | awk '{print $(NF-1)}')
  [ -n "$t" ] || { echo "resync did not finish" >&2; cat "$W/px.log" >&2; exit 1; }
  resync_times+=("$t")
  stop "$pp"; stop "$gp"
  cmp -s "$W/primary.img" "$W/secondary.img" || { echo "bench-resync: secondary differs from primary after resync" >&2; exit 1; }

  truncate -s "$bytes" "$W/copy.img"
  $B serve --volume "$W/primary.img" --socket "$W/p.sock" --listen none --log-level warn > /dev/null 2>&1 &
  pp=$!; PIDS+=("$pp")
  nbdkit -f -U "$W/k.sock" file "$W/copy.img" &
  kp=$!; PIDS+=("$kp")
  wait_sock "$W/p.sock"; wait_sock "$W/k.sock"
  warm_memory
  s=$(date +%s.%N)
  nbdcopy --connections=4 --flush "nbd+unix:///?socket=$W/p.sock" "nbd+unix:///?socket=$W/k.sock"
  e=$(date +%s.%N)
  copy_times+=("$(echo "$e - $s" | bc -l)")
  stop "$kp"
  rm -f "$W/copy.img" "$W/k.sock"; truncate -s "$bytes" "$W/copy.img"
  nbdkit -f -U "$W/k.sock" file "$W/copy.img" &
  kp=$!; PIDS+=("$kp")
  wait_sock "$W/k.sock"
  warm_memory
  s=$(date +%s.%N)
  nbdcopy --connections=4 "nbd+unix:///?socket=$W/p.sock" "nbd+unix:///?socket=$W/k.sock"
  e=$(date +%s.%N)
  nf_times+=("$(echo "$e - $s" | bc -l)")
  stop "$pp"; stop "$kp"
  echo "round $r: resync ${resync_times[-1]} s, nbdcopy --flush ${copy_times[-1]} s, nbdcopy ${nf_times[-1]} s"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
mr=$(median "${resync_times[@]}")
mc=$(median "${copy_times[@]}")
mn=$(median "${nf_times[@]}")
ratio=$(printf "%.2f" "$(echo "$mc / $mr" | bc -l)")
{
  echo "Resync of a fully dirty $SIZE volume (random data) vs nbdcopy of it, median of $ROUNDS rounds:"
  echo
  echo "| | time (s) | MiB/s | vs nbdcopy |"
  echo "|---|---|---|---|"
  printf "| resync (proxy -> gateway) | %.2f | %.0f | %sx |\n" "$mr" "$(echo "$bytes / 1048576 / $mr" | bc -l)" "$ratio"
  printf "| nbdcopy --connections=4 --flush (blockfork -> nbdkit-file) | %.2f | %.0f | 1.00x |\n" "$mc" "$(echo "$bytes / 1048576 / $mc" | bc -l)"
  printf "| nbdcopy --connections=4, no flush (data left in the page cache) | %.2f | %.0f | %sx |\n" "$mn" "$(echo "$bytes / 1048576 / $mn" | bc -l)" "$(printf "%.2f" "$(echo "$mc / $mn" | bc -l)")"
  echo
  echo "A resync is done when the gateway has made everything durable (fdatasync), so the like-for-like"
  echo "comparison is nbdcopy --flush. Rounds: resync ${resync_times[*]} s; nbdcopy --flush ${copy_times[*]} s;"
  echo "nbdcopy ${nf_times[*]} s. The secondary equalled the primary after every resync (cmp). Each timed copy"
  echo "started right after 5 GiB were written to and deleted from /dev/shm, so that neither lands on memory"
  echo "the guest had handed back to the host (see \"This host's memory\" in docs/BENCHMARKS.md)."
} > "$OUT/section.md"
cat "$OUT/section.md"
