#!/usr/bin/env bash
# Install the system packages the tests drive (real NBD clients, qemu tools, fio, nbdfuse, the
# kernel-client VM's tools) when they are missing. Needs root for apt-get; otherwise it says what
# to install and exits 1. Safe to run repeatedly: it only installs what is missing.
set -euo pipefail

# package -> a file it provides
declare -A PKGS=(
  [libnbd-bin]=/usr/bin/nbdinfo
  [python3-libnbd]=/usr/lib/python3/dist-packages/nbd.py
  [nbdkit]=/usr/sbin/nbdkit
  [nbdfuse]=/usr/bin/nbdfuse
  [qemu-utils]=/usr/bin/qemu-img
  [fio]=/usr/bin/fio
  [nbd-client]=/usr/sbin/nbd-client
  [nbd-server]=/usr/bin/nbd-server
  [e2fsprogs]=/usr/sbin/mkfs.ext4
  [jq]=/usr/bin/jq
  [fuse3]=/usr/bin/fusermount3
  [socat]=/usr/bin/socat
  [openssl]=/usr/bin/openssl
  [util-linux]=/usr/sbin/losetup
  [qemu-system-x86]=/usr/bin/qemu-system-x86_64
  [busybox-static]=/bin/busybox
  [iproute2]=/usr/bin/ss
  [libfaketime]=/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1
)
# nbdkit is /usr/sbin/nbdkit on some releases, /usr/bin/nbdkit on others
have() { [ -e "$1" ] || { [ "$1" = /usr/sbin/nbdkit ] && [ -e /usr/bin/nbdkit ]; }; }

missing=()
for p in "${!PKGS[@]}"; do have "${PKGS[$p]}" || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ]; then
  echo "ensure-test-deps: missing packages: ${missing[*]}" >&2
  echo "ensure-test-deps: install them as root: apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "ensure-test-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
for p in "${missing[@]}"; do
  have "${PKGS[$p]}" || { echo "ensure-test-deps: $p installed but ${PKGS[$p]} is still missing" >&2; exit 1; }
done
