// src/tracking/log.ts, the persistent dirty map in LevelDB with its activity log (AL): a new log
// marks everything dirty; a clean close and reopen keeps bits and timestamps and bumps the
// generation; crashes are real (a child process opens the log, marks and activates the way the fork
// filter does, then ends with process.exit or SIGKILL and never closes): the reopened log takes every
// AL region as dirty and says it crashed; regions evicted from a full AL keep their bits; geometry
// mismatches and a second opener are usage errors (ERR_USAGE).

import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Level } from "level";
import {
  TrackingLog,
  DEFAULT_GRANULARITY,
  DEFAULT_REGION,
  FULL_RESYNC_FILE,
  readFullResyncMark,
} from "../../src/tracking/log.js";
import { Logger } from "../../src/log.js";
import { DONE } from "../../src/util/done.js";

const MiB = 1024 * 1024;
const G = DEFAULT_GRANULARITY;
const R = DEFAULT_REGION;
const BPR = R / G;
const SIZE = 64 * MiB; // 16 regions, 1024 blocks
const GW = "http://127.0.0.1:7070";
const log = Logger.create("error", () => {});

const dirs: string[] = [];
function scratch(): string {
  const d = mkdtempSync(join(tmpdir(), "bf-tracking-"));
  dirs.push(d);
  return d;
}
after(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

function open(
  dir: string,
  extra: Partial<Parameters<typeof TrackingLog.open>[0]> = {},
): Promise<TrackingLog> {
  return TrackingLog.open({ dir, volumeSize: SIZE, gateway: GW, log, ...extra });
}

/** A log with every block clean, closed cleanly (the baseline for crash tests). */
async function cleanLog(): Promise<string> {
  const dir = scratch();
  const t = await open(dir);
  t.map.clearBlocks(0, t.map.blocks);
  await t.close();
  return dir;
}

function dirtyList(t: TrackingLog): number[] {
  const out: number[] = [];
  for (const r of t.map.runs()) for (let b = r.start; b < r.start + r.count; b++) out.push(b);
  return out;
}

function range(start: number, count: number): number[] {
  return Array.from({ length: count }, (_, i) => start + i);
}

/** A step of the child: mark then activate, as the fork filter does for one write. */
type Step =
  | { op: "write"; offset: number; length: number; time: number }
  | { op: "markOnly"; offset: number; length: number; time: number }
  | { op: "persist" }
  /** Several writes into different regions in the same tick (concurrent client requests). */
  | { op: "concurrent"; offsets: number[]; time: number }
  /** Start activating `first` (a region that evicts `victim`), and while that AL write is in
   * flight, write into the victim region (which still counts as active). */
  | { op: "evictionRace"; first: number; victimWrite: number; time: number };

interface ChildResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  report: Record<string, unknown>;
  stderr: string;
}

const LOG_URL = new URL("../../src/tracking/log.js", import.meta.url).href;
const LOGGER_URL = new URL("../../src/log.js", import.meta.url).href;
const DONE_URL = new URL("../../src/util/done.js", import.meta.url).href;

const CHILD = `
import { TrackingLog } from ${JSON.stringify(LOG_URL)};
import { Logger } from ${JSON.stringify(LOGGER_URL)};
import { DONE } from ${JSON.stringify(DONE_URL)};
const a = JSON.parse(process.env.BF_ARGS);
const t = await TrackingLog.open({ dir: a.dir, volumeSize: a.size, gateway: a.gateway,
  alExtents: a.al, log: Logger.create("error", () => {}) });
const report = { generation: t.meta.generation };
for (const s of a.steps) {
  if (s.op === "write") {
    t.map.mark(s.offset, s.length, s.time);
    await t.activate(s.offset, s.length);
  } else if (s.op === "markOnly") {
    t.map.mark(s.offset, s.length, s.time);
  } else if (s.op === "concurrent") {
    const ps = [];
    for (const off of s.offsets) {
      t.map.mark(off, 4096, s.time);
      ps.push(t.activate(off, 4096));
    }
    await Promise.all(ps);
  } else if (s.op === "persist") {
    await t.persist(true);
  } else if (s.op === "evictionRace") {
    t.map.mark(s.first, 4096, s.time);
    const p = t.activate(s.first, 4096);
    // The AL transaction starts on the next turn (setImmediate); after it, the batch is on its way.
    await new Promise((r) => setImmediate(r));
    t.map.mark(s.victimWrite, 4096, s.time);
    const q = t.activate(s.victimWrite, 4096);
    report.victimActivationWasImmediate = q === DONE;
    await q;
    await p;
  }
}
report.activeRegions = t.activeRegions;
process.stdout.write(JSON.stringify(report) + "\\n");
if (a.end === "exit") process.exit(0);
else if (a.end === "kill") process.kill(process.pid, "SIGKILL");
else setInterval(() => {}, 1000);
`;

/** Run the child to its end (exit or SIGKILL); the log is never closed. */
function child(dir: string, steps: Step[], end: "exit" | "kill", al = 1024): Promise<ChildResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, ["--input-type=module", "-e", CHILD], {
      env: { ...process.env, BF_ARGS: JSON.stringify({ dir, size: SIZE, gateway: GW, al, steps, end }) },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    let err = "";
    p.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
    p.stderr.setEncoding("utf8").on("data", (d: string) => (err += d));
    const timer = setTimeout(() => p.kill("SIGKILL"), 30_000);
    p.on("error", reject);
    p.on("close", (code, signal) => {
      clearTimeout(timer);
      const line = out.split("\n").find((l) => l.startsWith("{"));
      if (!line) {
        reject(new Error(`the child reported nothing (${code ?? signal})\n${err}`));
        return;
      }
      resolve({ code, signal, report: JSON.parse(line) as Record<string, unknown>, stderr: err });
    });
  });
}

void describe("TrackingLog: new, clean close, reopen", () => {
  void test("a new log marks every block dirty, generation 1, a fresh hex source", async () => {
    const dir = scratch();
    const before = Date.now();
    const t = await open(dir);
    try {
      assert.deepEqual(t.recovery, {
        newLog: true,
        crashed: false,
        alRegions: 0,
        gatewayChanged: false,
        gatewayMoved: null,
        fullResync: null,
      });
      assert.equal(t.map.dirtyBytes, SIZE);
      assert.equal(t.map.dirtyBlocks, SIZE / G);
      assert.equal(t.meta.generation, 1);
      assert.equal(t.meta.volumeSize, SIZE);
      assert.equal(t.meta.granularity, G);
      assert.equal(t.meta.regionSize, R);
      assert.match(t.meta.source, /^[0-9a-f]{16}$/);
      const [first, last] = t.map.timeSpan();
      assert.ok(first >= before && last <= Date.now(), `times ${first}..${last} not in this open`);
    } finally {
      await t.close();
    }
    // Another new log gets another source.
    const u = await open(scratch());
    const v = await open(dir);
    try {
      assert.notEqual(u.meta.source, v.meta.source);
    } finally {
      await u.close();
      await v.close();
    }
  });

  void test("clean close and reopen: same bits, same times, same source, generation + 1", async () => {
    const dir = scratch();
    const t = await open(dir);
    const source = t.meta.source;
    t.map.clearBlocks(0, t.map.blocks);
    t.map.mark(3 * G + 10, 100, 1_600_000_000_000);
    t.map.mark(R - G, 2 * G, 1_600_000_000_500); // across regions 0 and 1
    t.map.mark(SIZE - 1, 1, 1_600_000_009_000); // the last block
    const bits = dirtyList(t);
    const times = range(0, t.map.regions).map((r) => t.map.regionTimes(r));
    await t.close();

    const u = await open(dir);
    try {
      assert.deepEqual(u.recovery, {
        newLog: false,
        crashed: false,
        alRegions: 0,
        gatewayChanged: false,
        gatewayMoved: null,
        fullResync: null,
      });
      assert.equal(u.meta.generation, 2);
      assert.equal(u.meta.source, source);
      assert.deepEqual(dirtyList(u), bits);
      assert.deepEqual(
        range(0, u.map.regions).map((r) => u.map.regionTimes(r)),
        times,
      );
      assert.deepEqual(u.map.regionTimes(0), [1_600_000_000_000, 1_600_000_000_500]);
    } finally {
      await u.close();
    }
    const w = await open(dir);
    assert.equal(w.meta.generation, 3);
    await w.close();
  });

  void test("a read-only open bumps nothing and writes nothing", async () => {
    const dir = await cleanLog(); // generation 1, closed
    const ro = await open(dir, { readOnly: true });
    assert.equal(ro.meta.generation, 1);
    ro.map.mark(0, 1, 5);
    await ro.persist(true);
    await ro.close();
    const t = await open(dir);
    try {
      assert.equal(t.meta.generation, 2);
      assert.equal(t.map.dirtyBlocks, 0, "a read-only open must not store its marks");
      assert.equal(t.recovery.crashed, false);
    } finally {
      await t.close();
    }
  });

  void test("the gateway's URL changed where the log knows the secondary's id: nothing marked, the link decides", async () => {
    const dir = scratch();
    const first = await open(dir);
    first.map.clearBlocks(0, first.map.blocks);
    await first.updateMeta({ secondary: "00112233aabbccdd" }, false);
    await first.close();
    const t = await open(dir, { gateway: "http://localhost:7070" });
    try {
      assert.equal(t.recovery.gatewayChanged, false);
      assert.deepEqual(t.recovery.gatewayMoved, { from: "http://127.0.0.1:7070" });
      assert.equal(t.map.dirtyBytes, 0);
      assert.equal(t.meta.gateway, "http://localhost:7070");
      assert.equal(t.meta.secondary, "00112233aabbccdd");
    } finally {
      await t.close();
    }
  });

  void test("another gateway: everything is dirty again and the report says why", async () => {
    const dir = await cleanLog();
    const t = await open(dir, { gateway: "http://127.0.0.1:7171" });
    try {
      assert.equal(t.recovery.gatewayChanged, true);
      assert.equal(t.map.dirtyBytes, SIZE);
      assert.equal(t.meta.gateway, "http://127.0.0.1:7171");
    } finally {
      await t.close();
    }
  });

  void test("a full-resync mark (a run that could not write the log): everything dirty, then the mark is cleared", async () => {
    const dir = await cleanLog();
    const file = join(dir, FULL_RESYNC_FILE);
    assert.equal(readFileSync(file).length, 4096, "every open leaves the mark's file allocated");
    assert.equal(readFullResyncMark(dir), null);
    const mark = { since: "2026-11-23T23:00:00.000Z", reason: "IO error: No space left on device" };
    const b = Buffer.alloc(4096);
    b.write("blockfork full-resync 1\n" + JSON.stringify(mark) + "\n", "utf8");
    writeFileSync(file, b);
    assert.deepEqual(readFullResyncMark(dir), mark);
    const t = await open(dir);
    try {
      assert.deepEqual(t.recovery.fullResync, mark);
      assert.equal(
        t.map.dirtyBytes,
        SIZE,
        "a clean stored map does not count: the mark says it is incomplete",
      );
      assert.equal(readFullResyncMark(dir), null, "cleared once the all-dirty map is stored");
      assert.deepEqual(readFileSync(file), Buffer.alloc(4096));
    } finally {
      await t.close();
    }
    const t2 = await open(dir);
    try {
      assert.equal(t2.recovery.fullResync, null);
      assert.equal(t2.map.dirtyBytes, SIZE, "the dirty bits were stored before the mark was cleared");
    } finally {
      await t2.close();
    }
  });
});

void describe("TrackingLog: crashes (a child process that never closes the log)", () => {
  for (const end of ["exit", "kill"] as const) {
    void test(`${end === "exit" ? "process.exit" : "SIGKILL"} after writes: every AL region is dirty, crashed`, async () => {
      const dir = await cleanLog();
      const T = 1_650_000_000_000;
      const r = await child(
        dir,
        [
          { op: "write", offset: 2 * R + 5 * G, length: 4096, time: T },
          { op: "write", offset: 5 * R + 1, length: 3 * G, time: T + 10 },
          { op: "write", offset: 2 * R + 9 * G, length: 4096, time: T + 20 },
        ],
        end,
      );
      assert.equal(r.report.activeRegions, 2, r.stderr);
      if (end === "kill") assert.equal(r.signal, "SIGKILL");
      else assert.equal(r.code, 0);

      const reopened = Date.now();
      const t = await open(dir);
      try {
        assert.equal(t.recovery.crashed, true);
        assert.equal(t.recovery.alRegions, 2);
        assert.equal(t.recovery.newLog, false);
        // Last dirtied: later writes (T + 20 into region 2) were not recorded, so the recovery's
        // time (an upper bound), not the region's first time.
        for (const region of [2, 5]) assert.ok(t.map.regionTimes(region)[1] >= reopened, `region ${region}`);
        assert.equal(t.meta.generation, 3, "the child's open was generation 2");
        // Whole regions 2 and 5, nothing else.
        assert.deepEqual(dirtyList(t), [...range(2 * BPR, BPR), ...range(5 * BPR, BPR)]);
        // Their times come from the activity log (the time each region was first dirtied).
        assert.equal(t.map.regionTimes(2)[0], T);
        assert.equal(t.map.regionTimes(5)[0], T + 10);
      } finally {
        await t.close();
      }
      // That recovery is itself durable: after a clean close, the bits stay and the crash is over.
      const u = await open(dir);
      try {
        assert.equal(u.recovery.crashed, false);
        assert.equal(u.map.dirtyBlocks, 2 * BPR);
      } finally {
        await u.close();
      }
    });
  }

  void test("a full AL evicts the least recently used region and its bits stay durable", async () => {
    const dir = await cleanLog();
    const T = 1_650_000_100_000;
    const r = await child(
      dir,
      [
        { op: "write", offset: 1 * R + 3 * G, length: 4096, time: T }, // region 1 enters the AL
        { op: "write", offset: 2 * R + 4 * G, length: 4096, time: T + 1 }, // region 2 enters
        { op: "write", offset: 1 * R + 7 * G, length: 4096, time: T + 2 }, // region 1 is hot: memory only
        { op: "write", offset: 3 * R, length: 4096, time: T + 3 }, // evicts region 2 (LRU)
        { op: "write", offset: 4 * R, length: 4096, time: T + 4 }, // evicts region 1
      ],
      "kill",
      2,
    );
    assert.equal(r.report.activeRegions, 2, r.stderr);
    const t = await open(dir);
    try {
      assert.equal(t.recovery.crashed, true);
      assert.equal(t.recovery.alRegions, 2);
      assert.deepEqual(dirtyList(t), [
        BPR + 3,
        BPR + 7, // marked while region 1 was active: only the eviction could have stored it
        2 * BPR + 4,
        ...range(3 * BPR, BPR),
        ...range(4 * BPR, BPR),
      ]);
      assert.deepEqual(t.map.regionTimes(1), [T, T + 2]);
    } finally {
      await t.close();
    }
  });

  void test("concurrent writes into more regions than --al-extents: the stored AL stays within its capacity", async () => {
    // serve --help: "--al-extents N ... after a crash at most N x 4 MiB are resynced". Five writes
    // into five regions arrive together (one AL transaction) with room for two.
    const dir = await cleanLog();
    const r = await child(
      dir,
      [{ op: "concurrent", offsets: [1, 3, 5, 7, 9].map((k) => k * R + 4096), time: 1_650_000_300_000 }],
      "kill",
      2,
    );
    const t = await open(dir);
    try {
      assert.equal(t.recovery.crashed, true);
      // Every written block is dirty after the crash, whatever the AL did ...
      for (const k of [1, 3, 5, 7, 9]) assert.ok(t.map.isDirty(k * BPR), `region ${k}'s block`);
      // ... and the crash costs at most 2 regions of resync beyond them.
      assert.ok(
        t.recovery.alRegions <= 2,
        `the activity log held ${t.recovery.alRegions} regions at the crash with --al-extents 2 ` +
          `(${String(r.report.activeRegions)} active in the child); ${t.map.dirtyBlocks} blocks to resync`,
      );
    } finally {
      await t.close();
    }
  });

  void test("a write into a region that the AL is evicting right now is not lost in a crash", async () => {
    // With room for one region: region 0 is active; a write to region 1 starts an AL transaction
    // that evicts region 0 (its chunk is encoded into the batch now). While that batch is being
    // written, a write into region 0 is marked and activated. Region 0 is still in the in-memory
    // AL, so the activation may finish at once, but the batch being written carries neither that
    // bit nor region 0. If the process dies now, the write was let through (to the primary and
    // the gateway) with no durable trace: the block must still be dirty after the crash.
    const dir = await cleanLog();
    const T = 1_650_000_200_000;
    const r = await child(
      dir,
      [
        { op: "write", offset: 0, length: 4096, time: T },
        { op: "evictionRace", first: 1 * R + 2 * G, victimWrite: 9 * G, time: T + 1 },
      ],
      "kill",
      1,
    );
    assert.equal(r.report.activeRegions, 1, r.stderr);
    const t = await open(dir);
    try {
      assert.equal(t.recovery.crashed, true);
      assert.ok(
        t.map.isDirty(9),
        `block 9 (region 0) was written and its activation completed ` +
          `(${r.report.victimActivationWasImmediate ? "at once, while region 0 was being evicted" : "after an AL write"}), ` +
          `but it is clean after the crash; dirty blocks: ${JSON.stringify(dirtyList(t).slice(0, 20))}...`,
      );
      assert.ok(t.map.isDirty(0), "block 0, evicted with its chunk, stays dirty");
    } finally {
      await t.close();
    }
  });

  void test("a lazy persist in flight lands before a later eviction's batch, never after it", async () => {
    // persist() encodes region 0's chunk (block 3 dirty) and its write is slow; then block 7 of
    // region 0 is marked and region 1 evicts region 0, storing the chunk with both bits. If the
    // older persist landed last, the stored chunk would lose block 7 while the AL no longer covers
    // region 0: a crash would forget it. The db writes must land in the order they were encoded.
    const dir = await cleanLog();
    const t = await open(dir, { alExtents: 1 });
    try {
      t.map.mark(3 * G, 4096);
      await t.activate(3 * G, 4096);
      const db = (t as unknown as { db: Level<string, Buffer> }).db;
      const realBatch = db.batch.bind(db);
      const events: string[] = [];
      let release!: () => void;
      const gate = new Promise<void>((r) => (release = r));
      let n = 0;
      (db as unknown as { batch: () => unknown }).batch = () => {
        const b = realBatch();
        const name = n++ === 0 ? "persist" : "eviction";
        const write = b.write.bind(b);
        (b as unknown as { write: (o: { sync: boolean }) => Promise<void> }).write = async (o) => {
          events.push(`${name} starts`);
          if (name === "persist") await gate;
          await write(o);
          events.push(`${name} done`);
        };
        return b;
      };
      const persisting = t.persist();
      t.map.mark(7 * G, 4096);
      await t.activate(7 * G, 4096); // region 0 is active: no AL write
      const evicting = t.activate(R, 4096); // region 1 evicts region 0
      await new Promise((r) => setTimeout(r, 50));
      release();
      await Promise.all([persisting, evicting]);
      assert.deepEqual(events, ["persist starts", "persist done", "eviction starts", "eviction done"]);
    } finally {
      await t.close();
    }
  });

  void test("an activation spanning more regions than the AL holds, one of them active already, completes", async () => {
    // The write gets all its regions; evicting its own active region to make room would leave it
    // waiting for another round, which would evict another of its regions, and so on forever (a
    // synced batch each time).
    const dir = await cleanLog();
    const t = await open(dir, { alExtents: 2 });
    try {
      await t.activate(0, 4096); // region 0 active
      const spanning = t.activate(R - 4096, 2 * R + 8192); // regions 0 to 3
      let timer: NodeJS.Timeout | undefined;
      const stuck = new Promise<string>((r) => (timer = setTimeout(() => r("stuck"), 3000)));
      const outcome = await Promise.race([spanning.then(() => "done"), stuck]);
      clearTimeout(timer);
      assert.equal(outcome, "done", "the activation did not complete in 3 s");
      assert.equal(t.activate(0, 4 * R), DONE, "regions 0 to 3 are all active");
    } finally {
      await t.close();
    }
  });

  void test("a crash right after open (nothing activated) still reports crashed, with no AL regions", async () => {
    const dir = await cleanLog();
    await child(dir, [], "kill");
    const t = await open(dir);
    try {
      assert.equal(t.recovery.crashed, true);
      assert.equal(t.recovery.alRegions, 0);
      assert.equal(t.map.dirtyBlocks, 0);
    } finally {
      await t.close();
    }
  });

  void test("a batch storing bits cleared outside the AL flushes the primary first; a failed flush sets the full-resync mark", async () => {
    // The gateway made a write durable, but the primary's copy may still be in its page cache: a
    // cleared bit that the AL no longer covers must not be stored before the primary is durable,
    // or a crash of the primary's disk leaves the secondary with a write the primary lost, with
    // nothing dirty (found by a power-cut simulator with --al-extents 1).
    const dir = await cleanLog();
    const t = await open(dir, { alExtents: 1 });
    const events: string[] = [];
    t.primaryFlush = () => {
      events.push("flush");
      return Promise.resolve();
    };
    try {
      t.map.mark(0, 4096);
      await t.activate(0, 4096); // region 0 in
      t.clearBlock(0); // the gateway made it durable: the primary's write may not be yet
      events.length = 0;
      t.map.mark(R, 4096);
      await t.activate(R, 4096); // evicts region 0, storing its cleared bit
      assert.deepEqual(events, ["flush"], "the eviction flushed the primary before its batch");
      events.length = 0;
      t.map.mark(2 * G, 4096); // region 0 again, not active: marked, evicts region 1 when active
      await t.activate(2 * G, 4096);
      events.length = 0;
      t.clearBlock(R / G); // a bit of region 1, which the AL no longer covers
      await t.persist();
      assert.deepEqual(events, ["flush"], "a lazy persist of a bit cleared outside the AL flushes first");
      events.length = 0;
      t.clearBlock(2); // inside the AL: a crash resyncs the region anyway
      await t.persist();
      assert.deepEqual(events, [], "bits cleared inside the AL need no flush");
      events.length = 0;
      t.map.mark(6 * R, 4096);
      await t.activate(6 * R, 4096); // evicts region 0, nothing cleared in it since stored
      assert.deepEqual(events, [], "an eviction that stores no new clear needs no flush");
      t.map.mark(7 * R, 4096);
      await t.activate(7 * R, 4096); // region 7 in (evicts 6)
      t.clearBlock(7 * BPR); // cleared in the AL
      t.primaryFlush = () => Promise.reject(new Error("fdatasync failed: EIO"));
      t.map.mark(5 * R, 4096);
      await t.activate(5 * R, 4096); // evicts region 7 with its clear: its flush fails
      assert.ok(t.degraded !== null, "a failed primary flush leaves the log degraded");
      assert.match(t.degraded.reason, /the primary's flush failed/);
      assert.ok(readFullResyncMark(dir) !== null, "the full-resync mark is set");
    } finally {
      await t.close();
    }
    const u = await open(dir);
    try {
      assert.equal(u.map.dirtyBlocks, u.map.blocks, "the next start resyncs everything");
    } finally {
      await u.close();
    }
  });

  void test("persist(true) makes bits outside the AL survive a crash", async () => {
    const dir = await cleanLog();
    await child(dir, [{ op: "markOnly", offset: 7 * R, length: 1, time: 9 }, { op: "persist" }], "kill");
    const t = await open(dir);
    try {
      assert.deepEqual(dirtyList(t), [7 * BPR]);
      assert.equal(t.recovery.alRegions, 0);
    } finally {
      await t.close();
    }
  });
});

void describe("TrackingLog: refusals", () => {
  void test("another volume size, another granularity, another format: ERR_USAGE, the db is released", async () => {
    const dir = await cleanLog();
    await assert.rejects(open(dir, { volumeSize: 2 * SIZE }), (e: Error & { code?: string }) => {
      assert.equal(e.code, "ERR_USAGE");
      assert.match(e.message, /67108864/);
      return true;
    });
    await assert.rejects(open(dir, { granularity: 2 * G }), { code: "ERR_USAGE" });
    // Same granularity said explicitly is fine.
    const ok = await open(dir, { granularity: G });
    await ok.close();
    // A log of a future format.
    const db = new Level<string, Buffer>(dir, { valueEncoding: "buffer" });
    await db.open();
    const stored: Buffer | undefined = await db.get("meta");
    assert.ok(stored !== undefined, "the log has a meta record");
    const meta = JSON.parse(stored.toString("utf8")) as { format: number };
    meta.format = 99;
    await db.put("meta", Buffer.from(JSON.stringify(meta)));
    await db.close();
    await assert.rejects(open(dir), (e: Error & { code?: string }) => {
      assert.equal(e.code, "ERR_USAGE");
      assert.match(e.message, /format 99/);
      return true;
    });
  });

  void test("a second opener (another process holds the log) gets ERR_USAGE; after that process dies, it opens", async () => {
    const dir = await cleanLog();
    const p = spawn(process.execPath, ["--input-type=module", "-e", CHILD], {
      env: {
        ...process.env,
        BF_ARGS: JSON.stringify({ dir, size: SIZE, gateway: GW, al: 8, steps: [], end: "hold" }),
      },
      stdio: ["ignore", "pipe", "pipe"],
    });
    const exited = new Promise<void>((r) => p.once("exit", () => r()));
    try {
      await new Promise<void>((resolve, reject) => {
        let out = "";
        p.stdout.setEncoding("utf8").on("data", (d: string) => {
          out += d;
          if (out.includes("\n")) resolve();
        });
        p.once("exit", (c) => reject(new Error(`holder exited ${c}`)));
      });
      await assert.rejects(open(dir), (e: Error & { code?: string }) => {
        assert.equal(e.code, "ERR_USAGE");
        assert.match(e.message, /in use/);
        return true;
      });
    } finally {
      p.kill("SIGKILL");
      await exited;
    }
    const t = await open(dir);
    try {
      assert.equal(t.recovery.crashed, true, "the holder never closed the log");
    } finally {
      await t.close();
    }
  });
});
