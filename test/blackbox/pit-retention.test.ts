// Retention of the PIT journal, black box. Segments are 64 MiB, so each test overwrites a 64 MiB
// volume of data several times (every pass journals 64 MiB of before-images) to seal segments.
// - By age (--pit-retention 3s, --pit-window 200): once the sealed segments are older than 3 s,
//   they are dropped: the earliest available time moves forward, points before it are refused
//   with NBD_REP_ERR_UNKNOWN and a message naming the new range, and the points still inside the
//   window stay exact (sha256 against the reference images).
// - By size (--pit-max-bytes 100M): `blockfork snapshots` shows the journal bounded (at most the
//   limit, in at most two segments) and the earliest point moved; the points left stay exact.
// - By size with a client idling on a snapshot that reads the oldest segment: the size limit still
//   holds (that snapshot is revoked: its next read fails with EIO, the log says why); without
//   revocation the journal grew past the limit for as long as the client stayed connected.

import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { spawn } from "node:child_process";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { run, SYSTEM_PATH } from "../helpers/run.js";
import {
  blockfork,
  exportSha,
  goReply,
  MiB,
  pastBoundary,
  recordPoint,
  REP_ERR_UNKNOWN,
  sleep,
  snapshots,
  snapUri,
  type PitPoint,
  type SnapshotsReport,
} from "../helpers/pit.js";

const cleanups: (() => Promise<unknown>)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

async function serverWith(args: string[]): Promise<{ srv: ServerHandle; dir: string; stateDir: string }> {
  const dir = scratchDir("blockfork-pit-ret-");
  cleanups.push(() => Promise.resolve(rmSync(dir, { recursive: true, force: true })));
  const stateDir = join(dir, "state");
  const srv = await startServer({ dir, size: "64M", args: ["--pit", "--state-dir", stateDir, ...args] });
  cleanups.push(async () => {
    const r = await srv.stop();
    assert.deepEqual(r, { code: 0, signal: null }, `server exit:\n${srv.log()}`);
  });
  return { srv, dir, stateDir };
}

/** Write a fresh 64 MiB of random data over the whole volume with nbdcopy. */
async function overwrite(srv: ServerHandle, dir: string, k: number): Promise<void> {
  const file = join(dir, `pass${k}.bin`);
  writeFileSync(file, randomBytes(64 * MiB));
  await run("nbdcopy", [file, srv.uri], { timeoutMs: 60_000 });
  rmSync(file);
}

/** The available range as the refusal of `name` states it; asserts the refusal. */
async function refusedRange(srv: ServerHandle, name: string): Promise<{ earliest: string; latest: string }> {
  const r = await goReply(srv.sock, name);
  assert.equal(r.type, REP_ERR_UNKNOWN, `${name} was not refused: 0x${r.type.toString(16)} ${r.message}`);
  const m = /is outside the journal's window; available: (\S+Z) to (\S+Z) \(in steps of (\d+) ms\)$/.exec(
    r.message,
  );
  assert.ok(m, `${name}: the refusal does not name the range: "${r.message}"`);
  return { earliest: m[1], latest: m[2] };
}

/** Poll `blockfork snapshots --json` until `pred` holds. */
async function waitForSnapshots(
  stateDir: string,
  pred: (s: SnapshotsReport) => boolean,
  what: string,
  timeoutMs = 15_000,
): Promise<SnapshotsReport> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = await snapshots(stateDir);
    if (pred(s)) return s;
    if (Date.now() > deadline) throw new Error(`${what}: not after ${timeoutMs} ms: ${JSON.stringify(s)}`);
    await sleep(250);
  }
}

void describe("PIT retention", () => {
  void test(
    "by age (--pit-retention 3s): the window's start moves, old points are refused, the rest exact",
    { timeout: 120_000 },
    async () => {
      const W = 200;
      const { srv, dir, stateDir } = await serverWith(["--pit-retention", "3s", "--pit-window", String(W)]);
      await pastBoundary(W, 100);
      const points: PitPoint[] = [];
      const s0 = await snapshots(stateDir);
      assert.equal(s0.windowMs, W);
      points.push(await recordPoint(srv, "empty", W));
      assert.ok(s0.earliest !== null && Date.parse(s0.earliest) <= points[0].ms, JSON.stringify(s0));
      for (let k = 1; k <= 3; k++) {
        await overwrite(srv, dir, k);
        const p = await recordPoint(srv, `pass${k}`, W);
        points.push(p);
        // Every point is exact while it lasts (checked at once: retention is 3 s).
        assert.equal(await exportSha(snapUri(srv, p.iso)), p.sha, `snap@${p.iso} (${p.label})`);
      }
      const s1 = await snapshots(stateDir);
      assert.ok(s1.segments >= 2, `${s1.segments} segments after writing 128 MiB of images`);

      // The sealed segments age out (retention runs every 2 s) until only the active one is left,
      // and the window's start moves past pass1. Nothing writes any more: that state is stable.
      const s2 = await waitForSnapshots(stateDir, (x) => x.segments === 1, "the sealed segments aging out");
      const earliest = s2.earliest!;
      assert.ok(Date.parse(earliest) > points[1].ms, `earliest ${earliest} is not after pass1`);
      assert.ok(Date.parse(earliest) % W === 0, `earliest ${earliest} is not a window boundary`);
      assert.ok(Date.parse(earliest) <= points[3].ms, `earliest ${earliest} is after the last point`);
      assert.ok(s2.journalBytes < s1.journalBytes);
      for (const p of points.slice(0, 2)) {
        const range = await refusedRange(srv, `snap@${p.iso}`);
        assert.equal(range.earliest, earliest, `the refusal of ${p.label} states another range`);
      }
      assert.match(srv.log(), /journal: dropped segment 1; points in time from /);
      // Points at or after the new start are served, exactly.
      for (const p of points.filter((x) => Math.floor(x.ms / W) * W >= Date.parse(earliest))) {
        assert.equal(
          await exportSha(snapUri(srv, p.iso)),
          p.sha,
          `snap@${p.iso} (${p.label}) after retention`,
        );
      }
      assert.equal((await goReply(srv.sock, `snap@${earliest}`)).type, 1, "snap@<earliest> is refused");
    },
  );

  void test(
    "by size, with a client idling on a snapshot of the oldest segment: it is revoked (EIO), the journal stays bounded",
    { timeout: 120_000 },
    async () => {
      const W = 200;
      const { srv, dir, stateDir } = await serverWith(["--pit-max-bytes", "100M", "--pit-window", String(W)]);
      await pastBoundary(W, 100);
      const p0 = await recordPoint(srv, "empty", W);
      await overwrite(srv, dir, 1);
      // The client: reads once, idles until told, reads again and says how that went.
      const go = join(dir, "go");
      const holder = spawn(
        "/usr/bin/python3",
        [
          "-c",
          [
            "import nbd, os, sys, time",
            "h = nbd.NBD()",
            "h.connect_uri(sys.argv[1])",
            "h.pread(1 << 20, 0)",
            "print('open', flush=True)",
            "while not os.path.exists(sys.argv[2]): time.sleep(0.1)",
            "try:",
            "    h.pread(1 << 20, 0)",
            "    print('read ok', flush=True)",
            "except nbd.Error as e:",
            "    print('read failed', e.errno, flush=True)",
          ].join("\n"),
          snapUri(srv, p0.iso),
          go,
        ],
        { env: { ...process.env, PATH: SYSTEM_PATH }, stdio: ["ignore", "pipe", "pipe"] },
      );
      let out = "";
      holder.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
      holder.stderr.setEncoding("utf8").on("data", (d: string) => (out += d));
      const exited = new Promise<void>((r) => holder.once("close", () => r()));
      cleanups.push(async () => {
        holder.kill("SIGKILL");
        await exited;
      });
      const deadline = Date.now() + 15_000;
      while (!out.includes("open") && Date.now() < deadline) await sleep(100);
      assert.match(out, /open/, "the client did not open snap@ the first point");
      for (let k = 2; k <= 3; k++) await overwrite(srv, dir, k);
      const s = await waitForSnapshots(
        stateDir,
        (x) => x.journalBytes <= 100 * MiB,
        "the journal within 100M",
      );
      assert.ok(Date.parse(s.earliest!) > p0.ms, `earliest ${s.earliest}`);
      assert.match(srv.log(), /revoking snapshot \S+, which holds the oldest segment/);
      writeFileSync(go, "");
      await exited;
      assert.match(out, /read failed EIO/, out);
      // The server goes on: a point still in the window opens and reads exactly.
      const p3 = await recordPoint(srv, "pass3", W);
      assert.equal(await exportSha(snapUri(srv, p3.iso)), p3.sha);
    },
  );

  void test(
    "by size (--pit-max-bytes 100M): blockfork snapshots shows the journal bounded",
    { timeout: 120_000 },
    async () => {
      const W = 200;
      const { srv, dir, stateDir } = await serverWith(["--pit-max-bytes", "100M", "--pit-window", String(W)]);
      await pastBoundary(W, 100);
      const points: PitPoint[] = [];
      points.push(await recordPoint(srv, "empty", W));
      for (let k = 1; k <= 4; k++) {
        await overwrite(srv, dir, k);
        points.push(await recordPoint(srv, `pass${k}`, W));
        // Once retention has settled (no writes now), every point still in the window is exact.
        const now = await waitForSnapshots(stateDir, (x) => x.journalBytes <= 100 * MiB, `after pass${k}`);
        for (const p of points.filter((x) => Math.floor(x.ms / W) * W >= Date.parse(now.earliest!))) {
          assert.equal(
            await exportSha(snapUri(srv, p.iso)),
            p.sha,
            `snap@${p.iso} (${p.label}) after pass${k}`,
          );
        }
      }
      // Retention runs every 2 s; nothing writes any more, so once bounded it stays so.
      const s = await waitForSnapshots(
        stateDir,
        (x) => x.journalBytes <= 100 * MiB,
        "the journal within 100M",
      );
      const earliest = s.earliest!;
      assert.ok(Date.parse(earliest) > points[1].ms, `earliest ${earliest} is not after pass1`);
      assert.ok(
        s.journalBytes <= 100 * MiB,
        `the journal holds ${s.journalBytes} bytes, over --pit-max-bytes 100M`,
      );
      // Segments of 6 MiB (a sixteenth of the limit): retention drops a little at a time, so
      // the journal stays near its limit instead of falling by a whole 64 MiB segment.
      assert.ok(s.segments > 8, `${s.segments} segments: a 100M limit makes segments of 6 MiB`);
      assert.ok(s.journalBytes > 64 * MiB, `the journal was cut to ${s.journalBytes} bytes`);
      const text = await blockfork(["snapshots", "--state-dir", stateDir]);
      assert.equal(text.code, 0);
      assert.match(text.stdout, new RegExp(`^window {4}${earliest.replace(/\./g, "\\.")} \\.\\. \\S+Z`, "m"));
      const mib = /^journal {3}([\d.]+) MiB in (\d+) segments, (\d+) before-images$/m.exec(text.stdout);
      assert.ok(mib, text.stdout);
      assert.ok(Number(mib[1]) <= 100, text.stdout);
      assert.equal(Number(mib[2]), s.segments);
      await refusedRange(srv, `snap@${points[0].iso}`);
      for (const p of points.filter((x) => Math.floor(x.ms / W) * W >= Date.parse(earliest))) {
        assert.equal(
          await exportSha(snapUri(srv, p.iso)),
          p.sha,
          `snap@${p.iso} (${p.label}) after retention`,
        );
      }
      assert.ok(
        points.some((x) => Math.floor(x.ms / W) * W >= Date.parse(earliest)),
        "no recorded point is left to check",
      );
    },
  );
});
