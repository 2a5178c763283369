// The real Linux kernel NBD client (nbd.ko + nbd-client in a small qemu guest, through
// ../shared/vm/vm-nbd-client.sh) against `blockfork serve` on a unix socket: the default guest
// script (mkfs.ext4, mount, write, remount, compare, e2fsck) over one and over four connections,
// and a custom guest script whose writes to /dev/nbd0 the host then finds in the volume file.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { closeSync, existsSync, openSync, readFileSync, readSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { VM_SCRIPT, scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { SYSTEM_PATH } from "../helpers/run.js";

const MiB = 1024 * 1024;
const VM_TIMEOUT_S = 540;

const cleanups: (() => Promise<void> | void)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

interface VmRun {
  code: number | null;
  stdout: string;
  stderr: string;
  /** The guest console log (-l). */
  guest: string;
}

/** Run the VM script against `sock`; resolves when it ends (it has its own wall-clock limit). */
function runVm(dir: string, sock: string, opts: { connections: number; script?: string }): Promise<VmRun> {
  const logFile = join(dir, `guest-C${opts.connections}.log`);
  const args = ["-q", "-l", logFile, "-C", String(opts.connections), "-t", String(VM_TIMEOUT_S), sock];
  if (opts.script !== undefined) args.push("", opts.script);
  return new Promise((resolvePromise, reject) => {
    const p = spawn(VM_SCRIPT, args, {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, PATH: SYSTEM_PATH },
    });
    let stdout = "";
    let stderr = "";
    p.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    p.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const kill = (): void => {
      if (p.exitCode === null && p.signalCode === null) p.kill("SIGTERM");
    };
    cleanups.push(kill);
    // The script enforces -t itself; this is only a backstop.
    const backstop = setTimeout(kill, (VM_TIMEOUT_S + 30) * 1000);
    p.on("error", reject);
    p.on("close", (code) => {
      clearTimeout(backstop);
      const guest = existsSync(logFile) ? readFileSync(logFile, "utf8") : "(no guest log)";
      resolvePromise({ code, stdout, stderr, guest });
    });
  });
}

function explain(vm: VmRun, srv: ServerHandle): string {
  return (
    `vm-nbd-client.sh exited ${vm.code}\nstdout:\n${vm.stdout}\nstderr:\n${vm.stderr}\n` +
    `guest log (tail):\n${vm.guest.split("\n").slice(-60).join("\n")}\nserver log:\n${srv.log()}`
  );
}

async function serverFor(): Promise<{ srv: ServerHandle; dir: string }> {
  const dir = scratchDir("blockfork-vm-");
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const srv = await startServer({ dir, size: "512M" });
  cleanups.push(async () => {
    await srv.stop("SIGKILL");
  });
  return { srv, dir };
}

/** The connections the server logged: one "export" line when each reached transmission. */
function connectionLines(srv: ServerHandle): { opened: number; closed: string[] } {
  const log = srv.log();
  return {
    opened: (log.match(/\] export "disk" \(536870912 bytes/g) ?? []).length,
    closed: log.split("\n").filter((l) => /\] closed: /.test(l)),
  };
}

function checkConnections(srv: ServerHandle, n: number): void {
  const c = connectionLines(srv);
  assert.equal(c.opened, n, `the server saw ${c.opened} kernel connections, want ${n}:\n${srv.log()}`);
  assert.equal(c.closed.length, n, `the server logged ${c.closed.length} closed connections:\n${srv.log()}`);
  for (const l of c.closed) assert.match(l, / 0 errors,/, `a connection had errors: ${l}`);
  const written = c.closed.reduce((a, l) => a + Number(/ (\d+) bytes written\)/.exec(l)?.[1] ?? 0), 0);
  assert.ok(written > 4 * MiB, `only ${written} bytes were written by the guest`);
}

async function defaultGuestTest(connections: number): Promise<void> {
  assert.ok(existsSync(VM_SCRIPT), `${VM_SCRIPT} is missing`);
  const { srv, dir } = await serverFor();
  const vm = await runVm(dir, srv.sock, { connections });
  assert.equal(vm.code, 0, explain(vm, srv));
  assert.match(vm.stdout + vm.stderr, /PASS/, explain(vm, srv));
  assert.match(vm.guest, /guest: read back OK/, explain(vm, srv));
  const stopped = await srv.stop();
  assert.equal(stopped.code, 0, `server exit ${stopped.code ?? stopped.signal}\n${srv.log()}`);
  checkConnections(srv, connections);
}

void test(
  "kernel client, 1 connection: default guest script (ext4, remount, compare, e2fsck)",
  { timeout: 600_000 },
  () => defaultGuestTest(1),
);

void test("kernel client, 4 connections: default guest script", { timeout: 600_000 }, () =>
  defaultGuestTest(4),
);

/** The deterministic pattern the custom guest script writes: numbered lines. */
const PATTERN_LINES = 1_000_000;
const PATTERN_OFFSET = 3 * MiB + 4096 * 5;
const RANDOM_OFFSET = 64 * MiB;
const RANDOM_MIB = 16;

function pattern(): Buffer {
  const parts: string[] = [];
  for (let i = 0; i < PATTERN_LINES; i++) parts.push(`blockfork-vm-line-${String(i).padStart(10, "0")}\n`);
  return Buffer.from(parts.join(""), "latin1");
}

const GUEST_SCRIPT = `
set -e
dev=$NBD_DEV
awk 'BEGIN { for (i = 0; i < ${PATTERN_LINES}; i++) printf "blockfork-vm-line-%010d\\n", i }' > /tmp/pattern
echo "GUEST-PATTERN-BYTES $(wc -c < /tmp/pattern)"
dd if=/tmp/pattern of="$dev" bs=4096 seek=${PATTERN_OFFSET / 4096} conv=fsync 2>/dev/null
dd if=/dev/urandom of=/tmp/random bs=1M count=${RANDOM_MIB} 2>/dev/null
dd if=/tmp/random of="$dev" bs=1M seek=${RANDOM_OFFSET / MiB} conv=fsync 2>/dev/null
sync
echo "GUEST-RANDOM-SHA256 $(sha256sum < /tmp/random | cut -d' ' -f1)"
# Read both back through the kernel client with the caches dropped.
blockdev --flushbufs "$dev"
echo 3 > /proc/sys/vm/drop_caches
dd if="$dev" bs=4096 skip=${PATTERN_OFFSET / 4096} count=$(( ($(wc -c < /tmp/pattern) + 4095) / 4096 )) 2>/dev/null \\
  | head -c "$(wc -c < /tmp/pattern)" > /tmp/pattern.back
cmp /tmp/pattern /tmp/pattern.back
dd if="$dev" bs=1M skip=${RANDOM_OFFSET / MiB} count=${RANDOM_MIB} 2>/dev/null > /tmp/random.back
cmp /tmp/random /tmp/random.back
echo "GUEST-READBACK-OK"
`;

void test(
  "kernel client writes with dd reach the volume file (host checks the bytes)",
  { timeout: 600_000 },
  async () => {
    assert.ok(existsSync(VM_SCRIPT), `${VM_SCRIPT} is missing`);
    const { srv, dir } = await serverFor();
    const script = join(dir, "guest.sh");
    writeFileSync(script, GUEST_SCRIPT);
    const vm = await runVm(dir, srv.sock, { connections: 1, script });
    assert.equal(vm.code, 0, explain(vm, srv));
    assert.match(vm.guest, /GUEST-READBACK-OK/, explain(vm, srv));
    const stopped = await srv.stop();
    assert.equal(stopped.code, 0, `server exit ${stopped.code ?? stopped.signal}\n${srv.log()}`);
    checkConnections(srv, 1);

    const expected = pattern();
    const bytes = /GUEST-PATTERN-BYTES (\d+)/.exec(vm.guest)?.[1];
    assert.equal(Number(bytes), expected.length, "the guest's pattern is not the one the host expects");
    const guestSha = /GUEST-RANDOM-SHA256 ([0-9a-f]{64})/.exec(vm.guest)?.[1];
    assert.ok(guestSha, `the guest printed no checksum:\n${vm.guest}`);

    const fd = openSync(srv.volume, "r");
    try {
      const got = Buffer.alloc(expected.length);
      assert.equal(readSync(fd, got, 0, got.length, PATTERN_OFFSET), got.length);
      assert.ok(got.equals(expected), "the volume file does not hold the guest's pattern");
      const random = Buffer.alloc(RANDOM_MIB * MiB);
      assert.equal(readSync(fd, random, 0, random.length, RANDOM_OFFSET), random.length);
      assert.equal(
        createHash("sha256").update(random).digest("hex"),
        guestSha,
        "the volume file does not hold the guest's random data",
      );
      // Nothing else was written: the bytes around both regions are still zero.
      const before = Buffer.alloc(PATTERN_OFFSET);
      readSync(fd, before, 0, before.length, 0);
      assert.ok(
        before.every((b) => b === 0),
        "bytes before the pattern were written",
      );
      const gap = Buffer.alloc(RANDOM_OFFSET - (PATTERN_OFFSET + expected.length));
      readSync(fd, gap, 0, gap.length, PATTERN_OFFSET + expected.length);
      assert.ok(
        gap.every((b) => b === 0),
        "bytes between the regions were written",
      );
    } finally {
      closeSync(fd);
    }
  },
);
