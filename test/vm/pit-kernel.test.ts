// Snapshots through the real Linux kernel NBD client (../shared/vm/vm-nbd-client.sh): the host
// writes phases through nbdcopy and nbdsh, records reference points (time, sha256 of the primary,
// and a copy of the primary as the reference image), bookmarks one, and writes more. The guest
// attaches snap@<time> read-only (nbd-client -R) and snap@<bookmark> over two connections (no -R:
// the kernel must take the export's READ_ONLY flag), reads /dev/nbd0 whole and a region, and tries
// a write. The checksums the guest prints must be the host's reference ones, the device must be
// read-only, the write refused, and the primary untouched by the guest. Then the default guest
// script (mkfs.ext4, which discards the whole device, mount, write, compare, e2fsck) on a 1 GiB --pit
// volume: it must pass, snapshots from before and after it must be exact, and the one after it
// must hold a clean ext4.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { existsSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { VM_SCRIPT, scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { run, SYSTEM_PATH } from "../helpers/run.js";
import {
  exportSha,
  mark,
  MiB,
  pastBoundary,
  py,
  recordPoint,
  snapUri,
  type PitPoint,
} from "../helpers/pit.js";

const VM_TIMEOUT_S = 540;
const SIZE = 64 * MiB;
/** The region the guest also checksums: 4 KiB blocks [REGION_SKIP, REGION_SKIP + REGION_COUNT). */
const REGION_SKIP = 1000;
const REGION_COUNT = 2000;

const cleanups: (() => Promise<unknown> | void)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

interface VmRun {
  code: number | null;
  stdout: string;
  stderr: string;
  guest: string;
}

/**
 * Run the VM script against `srv` (export `exportName`, guest `script`, or the default guest script
 * when undefined). If the server dies meanwhile, the VM is stopped at once instead of waiting for
 * its timeout; a run directory the script keeps is removed.
 */
function runVm(
  dir: string,
  srv: ServerHandle,
  exportName: string,
  script: string | undefined,
  extra: string[],
): Promise<VmRun> {
  const logFile = join(
    dir,
    `guest-${createHash("sha1")
      .update(exportName + String(script))
      .digest("hex")
      .slice(0, 8)}.log`,
  );
  const args = ["-q", "-l", logFile, "-t", String(VM_TIMEOUT_S), ...extra, srv.sock, exportName];
  if (script !== undefined) args.push(script);
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
    const backstop = setTimeout(kill, (VM_TIMEOUT_S + 30) * 1000);
    const serverDied = (): void => {
      stderr += "\n[test] the server exited during the VM run; stopping the VM\n";
      kill();
    };
    srv.proc.once("exit", serverDied);
    p.on("error", reject);
    p.on("close", (code) => {
      clearTimeout(backstop);
      srv.proc.off("exit", serverDied);
      for (const m of (stdout + stderr).matchAll(/run directory kept: (\/tmp\/vm-nbd-run\.[A-Za-z0-9]+)/g)) {
        rmSync(m[1], { recursive: true, force: true });
      }
      const guest = existsSync(logFile) ? readFileSync(logFile, "utf8") : "(no guest log)";
      resolvePromise({ code, stdout, stderr, guest });
    });
  });
}

function explain(vm: VmRun, srv: ServerHandle): string {
  return (
    `vm-nbd-client.sh exited ${vm.code}\nstdout:\n${vm.stdout}\nstderr:\n${vm.stderr}\n` +
    `guest log (tail):\n${vm.guest.split("\n").slice(-60).join("\n")}\nserver log (tail):\n${srv.log().slice(-4000)}`
  );
}

const GUEST_SCRIPT = `
dev=$NBD_DEV
echo "GUEST-EXPORT $NBD_EXPORT size $NBD_SIZE connections $NBD_CONNECTIONS"
echo "GUEST-RO $(cat /sys/block/nbd0/ro)"
echo "GUEST-SHA $(sha256sum < "$dev" | cut -d' ' -f1)"
echo "GUEST-REGION $(dd if="$dev" bs=4096 skip=${REGION_SKIP} count=${REGION_COUNT} 2>/dev/null | sha256sum | cut -d' ' -f1)"
if dd if=/dev/zero of="$dev" bs=4096 count=1 seek=10 conv=fsync 2>/tmp/err; then
  echo "GUEST-WRITE-ACCEPTED"
else
  echo "GUEST-WRITE-REFUSED $(tr "\\n" " " < /tmp/err)"
fi
# Read again after the attempt, with the caches dropped: still the snapshot.
echo 3 > /proc/sys/vm/drop_caches
echo "GUEST-SHA-AGAIN $(sha256sum < "$dev" | cut -d' ' -f1)"
`;

const sha256 = (b: Uint8Array): string => createHash("sha256").update(b).digest("hex");

void test(
  "the kernel client reads snap@T and snap@NAME as their reference images, read-only",
  { timeout: 1_300_000 },
  async (t) => {
    assert.ok(existsSync(VM_SCRIPT), `${VM_SCRIPT} is missing`);
    const dir = scratchDir("blockfork-pit-vm-");
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const stateDir = join(dir, "state");
    const srv = await startServer({ dir, size: "64M", args: ["--pit", "--state-dir", stateDir] });
    cleanups.push(() => srv.stop("SIGKILL"));
    await pastBoundary(1000);

    // Phase 1: random data, unaligned writes, zeroes. Reference point 1 with its image.
    const file = join(dir, "random.bin");
    writeFileSync(file, randomBytes(48 * MiB));
    await run("nbdcopy", [file, srv.uri]);
    await py(
      srv.uri,
      `
    h = connect()
    rnd = random.Random(9)
    for i in range(200):
        h.pwrite(os.urandom(rnd.choice([1, 513, 4096, 30000])), rnd.randrange(0, 60 * MiB))
    h.zero(2 * MiB, 10 * MiB, nbd.CMD_FLAG_NO_HOLE)
    h.trim(MiB, 20 * MiB)
    h.shutdown()
    `,
    );
    const p1 = await recordPoint(srv, "phase1", 1000);
    const ref1 = join(dir, "ref1.img");
    await run("nbdcopy", [srv.uri, ref1]);
    assert.equal(sha256(readFileSync(ref1)), p1.sha, "the reference copy of point 1 changed while copying");

    // Phase 2: overwrite a part, trim another; reference point 2, bookmarked.
    await py(
      srv.uri,
      `
    h = connect()
    h.pwrite(os.urandom(8 * MiB), 3 * MiB + 5)
    h.trim(4 * MiB, 40 * MiB)
    h.shutdown()
    `,
    );
    const p2: PitPoint = await recordPoint(srv, "phase2", 1000);
    const ref2 = join(dir, "ref2.img");
    await run("nbdcopy", [srv.uri, ref2]);
    assert.equal(sha256(readFileSync(ref2)), p2.sha);
    await mark(stateDir, "vm");
    assert.notEqual(p1.sha, p2.sha);

    // More writes after both points: the primary is neither image now.
    await py(srv.uri, "h = connect()\nh.pwrite(os.urandom(16 * MiB), 0)\nh.shutdown()\n");
    const primary = await exportSha(srv.uri);
    assert.ok(primary !== p1.sha && primary !== p2.sha);

    const script = join(dir, "guest.sh");
    writeFileSync(script, GUEST_SCRIPT);
    const region = (img: string): string =>
      sha256(readFileSync(img).subarray(REGION_SKIP * 4096, (REGION_SKIP + REGION_COUNT) * 4096));

    const cases = [
      { exportName: `snap@${p1.iso}`, extra: ["-e", "-R"], point: p1, ref: ref1, connections: 1 },
      { exportName: "snap@vm", extra: ["-C", "2"], point: p2, ref: ref2, connections: 2 },
    ];
    for (const c of cases) {
      const vm = await runVm(dir, srv, c.exportName, script, c.extra);
      assert.equal(vm.code, 0, explain(vm, srv));
      const line = (key: string): string => {
        const m = new RegExp(`^${key} (.*)$`, "m").exec(vm.guest);
        assert.ok(m, `the guest printed no ${key}\n${explain(vm, srv)}`);
        return m[1].trim();
      };
      assert.equal(line("GUEST-EXPORT"), `${c.exportName} size ${SIZE} connections ${c.connections}`);
      assert.equal(line("GUEST-RO"), "1", `${c.exportName}: /dev/nbd0 is not read-only in the guest`);
      assert.equal(line("GUEST-SHA"), c.point.sha, `${c.exportName}: the kernel read another image`);
      assert.equal(line("GUEST-REGION"), region(c.ref), `${c.exportName}: region differs`);
      const refused = line("GUEST-WRITE-REFUSED");
      assert.match(refused, /Operation not permitted|Read-only|Permission denied/);
      t.diagnostic(`${c.exportName}: the guest's write: ${refused}`);
      assert.equal(line("GUEST-SHA-AGAIN"), c.point.sha);
      const conns = srv
        .log()
        .split("\n")
        .filter((l) => l.includes(`] export "${c.exportName}"`));
      assert.equal(
        conns.length,
        c.connections,
        `the server saw ${conns.length} kernel connections to ${c.exportName}`,
      );
    }
    assert.equal(await exportSha(srv.uri), primary, "the guest changed the primary");
    const r = await srv.stop();
    assert.deepEqual(r, { code: 0, signal: null }, `server exit:\n${srv.log()}`);
  },
);

void test(
  "the default guest script (mkfs.ext4 with its discard, write, compare, e2fsck) on a 1 GiB --pit volume; snapshots before and after",
  { timeout: 900_000 },
  async () => {
    assert.ok(existsSync(VM_SCRIPT), `${VM_SCRIPT} is missing`);
    const dir = scratchDir("blockfork-pit-vm-");
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const srv = await startServer({ dir, size: "1G", args: ["--pit", "--state-dir", join(dir, "state")] });
    cleanups.push(() => srv.stop("SIGKILL"));
    await pastBoundary(1000);
    const empty = await recordPoint(srv, "empty", 1000);
    const vm = await runVm(dir, srv, "", undefined, []);
    assert.equal(vm.code, 0, explain(vm, srv));
    assert.match(vm.guest, /guest: read back OK/, explain(vm, srv));
    const fsPoint = await recordPoint(srv, "after-guest", 1000);
    // More writes on the host, then both points must still be exact.
    await py(
      srv.uri,
      "h = connect()\nh.pwrite(os.urandom(32 * MiB), 0)\nh.trim(256 * MiB, 512 * MiB)\nh.shutdown()\n",
    );
    assert.equal(await exportSha(snapUri(srv, empty.iso)), empty.sha, "snap@ before the guest ran");
    assert.equal(await exportSha(snapUri(srv, fsPoint.iso)), fsPoint.sha, "snap@ after the guest ran");
    // The snapshot after the guest holds a clean ext4.
    const img = join(dir, "snap.img");
    await run("nbdcopy", [snapUri(srv, fsPoint.iso), img]);
    const fsck = await run("e2fsck", ["-fn", img], { allowFailure: true, timeoutMs: 120_000 });
    assert.equal(fsck.code, 0, `e2fsck -fn on the snapshot: ${fsck.stdout}${fsck.stderr}`);
    const r = await srv.stop();
    assert.deepEqual(r, { code: 0, signal: null }, `server exit:\n${srv.log()}`);
  },
);
