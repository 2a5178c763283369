// Black-box tests of `blockfork serve` under fio's nbd engine (libnbd): random 4 KiB writes at
// queue depth 32 with crc32c verification, verified again on a new connection and after a server
// restart; mixed unaligned sizes; sequential 1 MiB at QD8; four jobs on four connections. A
// corrupted block behind the server must make verification fail, so the checks are not vacuous.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { closeSync, openSync, rmSync, writeSync } from "node:fs";
import { join } from "node:path";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { run } from "../helpers/run.js";

const MiB = 1024 * 1024;

/** Stop a server and fail unless it exited cleanly (status 0): a crash during the tests shows up here. */
async function stopClean(srv: ServerHandle): Promise<void> {
  const r = await srv.stop();
  assert.deepEqual(r, { code: 0, signal: null }, `the server did not exit cleanly; its log:\n${srv.log()}`);
}

interface FioJob {
  jobname: string;
  error: number;
  read: { io_bytes: number; total_ios: number };
  write: { io_bytes: number; total_ios: number };
}

interface FioResult {
  code: number | null;
  jobs: FioJob[];
  stderr: string;
}

/** Run fio with the nbd engine on `uri`; returns its exit status and the JSON report's jobs. */
async function fio(uri: string, cwd: string, args: string[]): Promise<FioResult> {
  const r = await run("fio", ["--ioengine=nbd", `--uri=${uri}`, "--output-format=json", ...args], {
    cwd,
    allowFailure: true,
    timeoutMs: 60_000,
  });
  // The nbd engine prints "fio: connected to NBD server" on stdout before the report.
  const start = r.stdout.indexOf("\n{");
  const json = r.stdout.startsWith("{") ? r.stdout : r.stdout.slice(start + 1);
  assert.ok(json.startsWith("{"), `no JSON report from fio (exit ${r.code}):\n${r.stdout}\n${r.stderr}`);
  const report = JSON.parse(json) as { jobs: FioJob[] };
  return { code: r.code, jobs: report.jobs, stderr: r.stderr };
}

/** fio exited 0 and every job reports error 0 (a verify failure is EILSEQ, 84). */
function assertClean(r: FioResult): void {
  const errors = r.jobs.map((j) => `${j.jobname}: ${j.error}`);
  assert.equal(r.code, 0, `fio exited ${r.code}; job errors ${errors.join(", ")}\n${r.stderr}`);
  for (const j of r.jobs) assert.equal(j.error, 0, `job ${j.jobname} error ${j.error}\n${r.stderr}`);
}

void describe("fio (nbd engine) against blockfork", () => {
  let srv: ServerHandle;
  let dir: string;
  const volume = (): string => join(dir, "disk.img");

  before(async () => {
    dir = scratchDir();
    srv = await startServer({ dir, size: "256M" });
  });
  after(async () => {
    try {
      await stopClean(srv);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  // Random 4 KiB writes over [0, 64M): the same job with verify_only regenerates the same offsets
  // (fio's default randrepeat) and checks every block's crc32c header.
  const randJob = [
    "--name=rand4k",
    "--rw=randwrite",
    "--bs=4k",
    "--iodepth=32",
    "--offset=0",
    "--size=64M",
    "--verify=crc32c",
    "--do_verify=1",
  ];

  void test("randwrite 4k QD32 with crc32c verify", async () => {
    const r = await fio(srv.uri, dir, randJob);
    assertClean(r);
    assert.equal(r.jobs[0].write.io_bytes, 64 * MiB);
    assert.equal(r.jobs[0].read.io_bytes, 64 * MiB, "verification did not read everything back");
  });

  void test("verify_only on a new connection finds every block intact", async () => {
    const r = await fio(srv.uri, dir, [...randJob, "--verify_only=1"]);
    assertClean(r);
    assert.equal(r.jobs[0].read.io_bytes, 64 * MiB);
  });

  void test("verify_only after a server restart finds every block intact", async () => {
    await stopClean(srv);
    srv = await startServer({ dir, volume: volume(), size: null });
    const r = await fio(srv.uri, dir, [...randJob, "--verify_only=1"]);
    assertClean(r);
    assert.equal(r.jobs[0].read.io_bytes, 64 * MiB);
  });

  void test("mixed unaligned sizes (bsrange 512-128k, bs_unaligned) with verify", async () => {
    const r = await fio(srv.uri, dir, [
      "--name=mixed",
      "--rw=randwrite",
      "--bsrange=512-128k",
      "--bs_unaligned=1",
      "--iodepth=16",
      "--offset=64M",
      "--size=64M",
      "--verify=crc32c",
      "--do_verify=1",
    ]);
    assertClean(r);
    const j = r.jobs[0];
    assert.ok(j.write.io_bytes > 60 * MiB, `only ${j.write.io_bytes} bytes written`);
    assert.equal(j.read.io_bytes, j.write.io_bytes, "verification did not read back what was written");
    // Mixed sizes: more requests than 128 KiB ones would need, and byte-granular (fio's seed is fixed).
    assert.ok(j.write.total_ios > (64 * MiB) / (128 * 1024), `only ${j.write.total_ios} writes`);
    assert.notEqual(j.write.io_bytes % 512, 0, "every write was a multiple of 512 bytes");
  });

  void test("sequential 1M writes at QD8 with verify", async () => {
    const r = await fio(srv.uri, dir, [
      "--name=seq1m",
      "--rw=write",
      "--bs=1M",
      "--iodepth=8",
      "--offset=128M",
      "--size=96M",
      "--verify=crc32c",
      "--do_verify=1",
    ]);
    assertClean(r);
    assert.equal(r.jobs[0].write.io_bytes, 96 * MiB);
    assert.equal(r.jobs[0].read.io_bytes, 96 * MiB);
  });

  void test("four jobs on four connections, each in its own area, verify", async () => {
    const r = await fio(srv.uri, dir, [
      "--name=multi",
      "--numjobs=4",
      "--rw=randwrite",
      "--bs=16k",
      "--iodepth=16",
      "--offset=224M",
      "--size=8M",
      "--offset_increment=8M",
      "--verify=crc32c",
      "--do_verify=1",
    ]);
    assertClean(r);
    assert.equal(r.jobs.length, 4);
    for (const j of r.jobs) assert.equal(j.read.io_bytes, 8 * MiB);
  });

  void test("a block corrupted behind the server makes verify_only fail (the checks can fail)", async () => {
    const fd = openSync(volume(), "r+");
    writeSync(fd, randomBytes(4096), 0, 4096, 1000 * 4096);
    closeSync(fd);
    const r = await fio(srv.uri, dir, [...randJob, "--verify_only=1"]);
    assert.notEqual(r.code, 0, "fio did not notice the corrupted block");
    assert.equal(r.jobs[0].error, 84, "expected EILSEQ (84), fio's verify failure");
  });
});
