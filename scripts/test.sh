#!/usr/bin/env bash
# The test command (npm test): system packages, lint and format checks, build, then the suites.
#   scripts/test.sh            everything: lint, unit, blackbox, vm
#   scripts/test.sh unit|blackbox|vm|lint   one part
# Suites are node:test files compiled to dist/test/<suite>/. The vm suite boots a Linux guest whose
# kernel nbd-client attaches the server (../shared/vm/vm-nbd-client.sh); it needs root and qemu.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}

bash scripts/ensure-test-deps.sh

if [ "$what" = all ] || [ "$what" = lint ]; then
  echo "== lint (eslint, prettier, cargo fmt, clippy)"
  npm run --silent lint
fi
[ "$what" = lint ] && exit 0

echo "== build"
npm run --silent build >/dev/null

suites=()
case $what in
  all) suites=(unit blackbox vm) ;;
  unit|blackbox|vm) suites=("$what") ;;
  *) echo "usage: scripts/test.sh [all|lint|unit|blackbox|vm]" >&2; exit 2 ;;
esac
for s in "${suites[@]}"; do
  echo "== $s tests"
  # One file at a time: black-box tests start servers and real clients and measure nothing,
  # but they share two cores; running them serially keeps timeouts meaningful.
  node --test --test-concurrency=1 "dist/test/$s/"
done
