#!/usr/bin/env bash
# npm run bench: blockfork beside its peers in one run of ../shared/bench/nbd-bench.sh, then the
# table goes into docs/BENCHMARKS.md (between the bench:begin/bench:end markers) with the date and
# the machine. Speed is measured here, never asserted in tests. The machine is shared and noisy:
# read the ratios of one run, not lone absolute numbers.
#
#   scripts/bench.sh [nbd-bench options...]     e.g. -R 5 -n 1 -w seqread,nbdcopy
#   BENCH_NO_DOC=1 scripts/bench.sh ...         do not touch docs/BENCHMARKS.md
#   BENCH_PEERS="nbdkit-file qemu-nbd"          override the peer list
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BENCH=${NBD_BENCH:-$ROOT/../shared/bench/nbd-bench.sh}
[ -x "$BENCH" ] || { echo "bench: $BENCH not found (set NBD_BENCH)" >&2; exit 1; }
bash scripts/ensure-test-deps.sh
[ -e build/blockio.node ] && [ -e dist/src/cli.js ] || npm run --silent build

OUT=${BENCH_OUT:-$ROOT/bench-results/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
peers=(${BENCH_PEERS:-nbdkit-file nbdkit-file-threads qemu-nbd nbd-server nbdkit-memory raw-file})
targets=(-t "blockfork=node $ROOT/bin/blockfork.js serve --volume {FILE} --socket {SOCK} --listen none --log-level warn")
for p in "${peers[@]}"; do targets+=(-t "$p"); done

"$BENCH" "${targets[@]}" -o "$OUT/nbd" "$@" | tee "$OUT/bench.log"

[ "${BENCH_NO_DOC:-0}" = 1 ] && exit 0
table="$OUT/nbd/table.txt"
[ -s "$table" ] || { echo "bench: no table at $table" >&2; exit 1; }
doc=docs/BENCHMARKS.md
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
{
  echo "<!-- bench:begin (written by scripts/bench.sh; do not edit by hand) -->"
  echo
  echo "Run of $(date -u '+%Y-%m-%d %H:%M UTC') on $(nproc) x ${cpu}, $(free -g | awk '/Mem:/{print $2}') GiB RAM,"
  echo "Linux $(uname -r), Node $(node --version), $(nbdkit --version 2>/dev/null | head -1), $(qemu-nbd --version | head -1)."
  echo "Command: \`npm run bench -- $*\`. Ratios are against nbdkit-file in the same run (>1 is faster)."
  echo
  echo '```'
  cat "$table"
  echo '```'
  echo
  echo "<!-- bench:end -->"
} > "$OUT/section.md"
if [ -f "$doc" ] && grep -q '<!-- bench:begin' "$doc"; then
  awk -v sec="$OUT/section.md" '
    /<!-- bench:begin/ { while ((getline l < sec) > 0) print l; skip=1; next }
    /<!-- bench:end -->/ { skip=0; next }
    !skip { print }' "$doc" > "$doc.tmp" && mv "$doc.tmp" "$doc"
else
  { echo "# Benchmarks"; echo; cat "$OUT/section.md"; } > "$doc"
fi
echo "bench: results in $OUT; table written to $doc"
