#!/usr/bin/env bash
# npm run bench: blockfork beside its peers, with ../shared/bench/nbd-bench.sh, one section of
# docs/BENCHMARKS.md per part (between its bench:PART:begin/end markers), with date and machine.
# Speed is measured here, never asserted in tests. The machine is shared and noisy: read the
# ratios of one run, not lone absolute numbers.
#
#   scripts/bench.sh [all|core|fork|pit] [nbd-bench options...]    e.g. core -R 5 -n 1 (default: all)
#     core  blockfork vs nbdkit-file, nbdkit --threads 2, qemu-nbd, nbd-server, ceilings: every workload
#     fork  plain blockfork vs blockfork + gateway (async) vs nbdkit-file: randwrite 4K QD32, seqwrite 1M;
#           then resync of a fully dirty 1 GiB volume vs nbdcopy of the same volume
#     pit   journal off vs on vs on + async fork vs nbdkit-file: randwrite 4K QD32, seqwrite 1M;
#           then snapshot reads vs primary reads, and the time to open snap@T over 1M entries
#   BENCH_NO_DOC=1   do not touch docs/BENCHMARKS.md
#   BENCH_TMPFS=1    backing files, secondaries and journals on /dev/shm: takes this VM's slow disk
#                    (write-back throttling) out, to measure the software; sections PART-tmpfs
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
# The shared tools: ../shared beside the repository, else beside the local repository this clone
# came from (a clone in a scratch directory).
shared_dir() {
  local s=$ROOT/../shared o
  if [ ! -d "$s" ] && o=$(git -C "$ROOT" remote get-url origin 2>/dev/null); then
    o=${o#file://}
    if [ "${o#/}" != "$o" ] && [ -d "$o/../shared" ]; then s=$o/../shared; fi
  fi
  echo "$s"
}
BENCH=${NBD_BENCH:-$(shared_dir)/bench/nbd-bench.sh}
export NBD_BENCH=$BENCH # for bench-snapshot.sh
[ -x "$BENCH" ] || { echo "bench: $BENCH not found (set NBD_BENCH)" >&2; exit 1; }
part=all
case ${1:-} in core|fork|pit|all) part=$1; shift ;; esac
bash scripts/ensure-test-deps.sh
[ -e build/blockio.node ] && [ -e dist/src/cli.js ] || npm run --silent build
SUFFIX=""
TMPFS_NOTE=""
if [ "${BENCH_TMPFS:-0}" = 1 ]; then
  export TMPDIR=/dev/shm
  WORKDIR=$(mktemp -d /dev/shm/blockfork-bench.XXXXXX)
  trap 'rm -rf "$WORKDIR"' EXIT
  set -- --workdir "$WORKDIR" "$@"
  SUFFIX=-tmpfs
  TMPFS_NOTE="Files on tmpfs (/dev/shm; BENCH_TMPFS=1): the disk is out of the picture, this measures the software."
fi
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUTBASE=${BENCH_OUT:-$ROOT/bench-results/$STAMP}
mkdir -p "$OUTBASE"
BF="node $ROOT/bin/blockfork.js serve --volume {FILE} --socket {SOCK} --listen none --log-level warn"

machine() {
  local cpu
  cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
  echo "Run of $(date -u '+%Y-%m-%d %H:%M UTC') on $(nproc) x ${cpu}, $(free -g | awk '/Mem:/{print $2}') GiB RAM,"
  echo "Linux $(uname -r), Node $(node --version), $(nbdkit --version 2>/dev/null | head -1), $(qemu-nbd --version | head -1)."
}

# write_section PART FILE: replace the PART section of docs/BENCHMARKS.md with FILE's contents
write_section() {
  [ "${BENCH_NO_DOC:-0}" = 1 ] && return 0
  local name=$1 body=$2 doc=docs/BENCHMARKS.md
  { echo "<!-- bench:$name:begin (written by scripts/bench.sh $name; do not edit by hand) -->"; echo; cat "$body"; echo; echo "<!-- bench:$name:end -->"; } > "$OUTBASE/$name.section"
  [ -f "$doc" ] || echo "# Benchmarks" > "$doc"
  if grep -q "<!-- bench:$name:begin" "$doc"; then
    awk -v sec="$OUTBASE/$name.section" -v b="<!-- bench:$name:begin" -v e="<!-- bench:$name:end -->" '
      index($0, b) == 1 { while ((getline l < sec) > 0) print l; skip=1; next }
      index($0, e) == 1 { skip=0; next }
      !skip { print }' "$doc" > "$doc.tmp" && mv "$doc.tmp" "$doc"
  else
    { echo; cat "$OUTBASE/$name.section"; } >> "$doc"
  fi
  echo "bench: section $name written to $doc"
}

# CPU steal: time the hypervisor gave these vCPUs to other guests (/proc/stat). On this shared
# machine it ranged from 10% to 45% under benchmark load, minute to minute. Each section says how
# much its nbd-bench run had: absolute numbers move with it, and so do ratios between a
# single-threaded bottleneck and work spread over several processes.
STEAL0=""
steal_begin() { STEAL0=$(head -1 /proc/stat); }
steal_note() {
  local now
  now=$(head -1 /proc/stat)
  awk -v a="$STEAL0" -v b="$now" 'BEGIN {
    n = split(a, x, " "); split(b, y, " "); t = 0
    for (i = 2; i <= n && i <= 9; i++) t += y[i] - x[i]
    if (t > 0) printf "CPU steal during the run (time the hypervisor gave these vCPUs to others): %.0f%%.\n", 100 * (y[9] - x[9]) / t
  }'
}

table_section() { # OUT ARGS...
  local out=$1; shift
  { machine; echo "Command: \`npm run bench -- $part $*\`. Ratios against nbdkit-file in the same run (>1 is faster). $TMPFS_NOTE"; steal_note; echo; echo '```'; cat "$out/table.txt"; echo '```'; } > "$out/section.md"
}

run_core() {
  local out=$OUTBASE/core
  local targets=(-t "blockfork=$BF")
  for p in ${BENCH_PEERS:-nbdkit-file nbdkit-file-threads qemu-nbd nbd-server nbdkit-memory raw-file}; do targets+=(-t "$p"); done
  steal_begin
  "$BENCH" "${targets[@]}" -o "$out" "$@" | tee "$out.log"
  table_section "$out" "$@"
  write_section "core$SUFFIX" "$out/section.md"
}

# Whether the gateway link kept up during a section's runs (its proxies' warnings in $1): an async
# queue over its bound sends the link to tracking, and while it tracks fio's numbers do not include
# the gateway's work. Other transitions are listed too: at the end of each run the benchmark stops
# the gateway and the proxy together, and a proxy that outlives its gateway by a moment says so.
link_note() {
  local n m
  n=$(grep -- '-> tracking' "$1" 2>/dev/null | grep -c -E 'queue over|too slow' || true)
  m=$(grep -- '-> tracking' "$1" 2>/dev/null | grep -c -v -E 'queue over|too slow' || true)
  if [ "${n:-0}" -eq 0 ]; then
    echo "The gateway link kept up through every run (no async queue overflow to tracking)."
  else
    echo "The gateway link fell behind $n time(s) (async queue over its bound -> tracking -> resync); while it"
    echo "tracks the gateway gets no updates, so those runs measure less than the full fork."
  fi
  if [ "${m:-0}" -gt 0 ]; then
    echo "Other transitions to tracking ($m; the benchmark stops gateway and proxy together after each run):"
  fi
  if [ "$(grep -c -- '-> tracking' "$1" 2>/dev/null || true)" -gt 0 ]; then
    echo; echo '```'; grep -m 20 -- '-> tracking' "$1"; echo '```'
  fi
}

run_fork() {
  local out=$OUTBASE/fork
  export BF_FORK_LOG=$OUTBASE/fork-serve.log
  : > "$BF_FORK_LOG"
  steal_begin
  "$BENCH" -t "blockfork=$BF" -t "blockfork-gateway=$ROOT/scripts/bench-targets/fork.sh {SOCK} {FILE} {DIR}" -t nbdkit-file \
    -w randwrite-qd32,seqwrite -o "$out" "$@" | tee "$out.log"
  table_section "$out" "$@"
  bash scripts/bench-resync.sh "$OUTBASE/resync" | tee "$OUTBASE/resync.log"
  { cat "$out/section.md"; echo; link_note "$BF_FORK_LOG"; echo; cat "$OUTBASE/resync/section.md"; } > "$OUTBASE/fork.md"
  write_section "fork$SUFFIX" "$OUTBASE/fork.md"
}

run_pit() {
  local out=$OUTBASE/pit
  export BF_FORK_LOG=$OUTBASE/pit-serve.log
  : > "$BF_FORK_LOG"
  steal_begin
  "$BENCH" -t "blockfork=$BF" -t "blockfork-pit=$BF --pit --state-dir {DIR}/state" \
    -t "blockfork-pit-gateway=$ROOT/scripts/bench-targets/fork.sh {SOCK} {FILE} {DIR} --pit" \
    -t "blockfork-pit-gw-shm=$ROOT/scripts/bench-targets/fork.sh {SOCK} {FILE} {DIR} --secondary-on-shm --pit" \
    -t nbdkit-file \
    -w randwrite-qd32,seqwrite -o "$out" "$@" | tee "$out.log"
  table_section "$out" "$@"
  bash scripts/bench-snapshot.sh "$OUTBASE/snapshot" | tee "$OUTBASE/snapshot.log"
  { cat "$out/section.md"; echo; link_note "$BF_FORK_LOG"; echo; cat "$OUTBASE/snapshot/section.md"; } > "$OUTBASE/pit.md"
  write_section "pit$SUFFIX" "$OUTBASE/pit.md"
}

case $part in
  core) run_core "$@" ;;
  fork) run_fork "$@" ;;
  pit) run_pit "$@" ;;
  all) run_core "$@"; run_fork "$@"; run_pit "$@" ;;
esac
echo "bench: results in $OUTBASE"
