// src/gateway/gateway.ts and state.ts without HTTP: batches applied to a MemoryVolume (higher seq
// wins in the data, zero/trim, stale generations), a failing volume (507 for ENOSPC, 500 for EIO,
// nothing committed, a retry applies), flushes sharing one fdatasync on a FileVolume with
// durableThrough persisted in sources.json and read back, state files that are refused, and
// checksums over every way blocks and read windows can split.

import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { constants, tmpdir } from "node:os";
import { join } from "node:path";
import { Gateway, MAX_SOURCES, type Identity } from "../../src/gateway/gateway.js";
import { HttpError } from "../../src/gateway/http.js";
import { FLAG_RESYNC, KIND, type UpdateRecord } from "../../src/gateway/records.js";
import { loadSecondary, loadSources, StateWriter, STATE_FILE } from "../../src/gateway/state.js";
import { IoError, UsageError } from "../../src/errors.js";
import { Logger } from "../../src/log.js";
import { MemoryVolume } from "../../src/volume/memory.js";
import { FileVolume } from "../../src/volume/file.js";
import type { Volume } from "../../src/volume/volume.js";

const E = constants.errno;
const log = Logger.create("error", () => {});
const dirs: string[] = [];
function scratch(): string {
  const d = mkdtempSync(join(tmpdir(), "bf-gw-apply-"));
  dirs.push(d);
  return d;
}
after(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

const ID: Identity = { source: "ab12", generation: 1, floor: null };

function w(seq: number, offset: number, data: Buffer): UpdateRecord {
  return { kind: KIND.WRITE, seq, period: 1, offset, length: data.length, data };
}

async function readBack(v: Volume, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length);
  await v.read(b, offset);
  return b;
}

/** A MemoryVolume whose writes fail with `errno` while `failing` is set. */
class FailingVolume extends MemoryVolume {
  failing: number | null = null;
  override write(buf: Buffer, offset: number, fua: boolean): Promise<void> {
    if (this.failing !== null && offset >= 65536) {
      return Promise.reject(new IoError(this.failing, "pwrite", `offset ${offset}`));
    }
    return super.write(buf, offset, fua);
  }
}

void describe("Gateway.applyBatch", () => {
  void test("applies, answers the watermarks, and the higher seq wins in the data", async () => {
    const v = new MemoryVolume(1 << 20);
    const gw = new Gateway(v, log);
    const A = Buffer.alloc(4096, 0xaa);
    const B = Buffer.alloc(4096, 0xbb);
    let r = await gw.applyBatch(ID, [w(2, 0, B)]);
    assert.deepEqual(r, { applied: 1, duplicates: 0, appliedThrough: 0, durableThrough: 0 });
    r = await gw.applyBatch(ID, [w(1, 0, A), w(3, 8192, A)]);
    assert.deepEqual(r, { applied: 2, duplicates: 0, appliedThrough: 3, durableThrough: 0 });
    assert.deepEqual(await readBack(v, 0, 4096), B, "seq 2 must survive the late seq 1");
    r = await gw.applyBatch(ID, [w(1, 0, A)]);
    assert.deepEqual(r, { applied: 0, duplicates: 1, appliedThrough: 3, durableThrough: 0 });
    assert.deepEqual(await readBack(v, 0, 4096), B);
    assert.deepEqual(gw.counters, {
      updates: 3,
      bytes: 12288,
      duplicates: 1,
      stale: 0,
      flushes: 0,
      errors: 0,
    });
  });

  void test("ZERO and TRIM read back as zeroes; a partly covered ZERO spares the newer bytes", async () => {
    const v = new MemoryVolume(1 << 20);
    const gw = new Gateway(v, log);
    await gw.applyBatch(ID, [w(1, 0, randomBytes(65536)), w(3, 4096, Buffer.alloc(4096, 3))]);
    await gw.applyBatch(ID, [
      { kind: KIND.ZERO, seq: 2, period: 1, offset: 0, length: 16384, data: null },
      { kind: KIND.TRIM, seq: 4, period: 1, offset: 32768, length: 8192, data: null },
    ]);
    const b = await readBack(v, 0, 65536);
    assert.ok(b.subarray(0, 4096).every((x) => x === 0));
    assert.ok(
      b.subarray(4096, 8192).every((x) => x === 3),
      "seq 3 is newer than the ZERO",
    );
    assert.ok(b.subarray(8192, 16384).every((x) => x === 0));
    assert.ok(b.subarray(32768, 40960).every((x) => x === 0));
  });

  void test("a stale generation is answered as duplicates and applies nothing", async () => {
    const v = new MemoryVolume(1 << 20);
    const gw = new Gateway(v, log);
    await gw.applyBatch({ ...ID, generation: 5 }, [w(1, 0, Buffer.alloc(512, 5))]);
    const r = await gw.applyBatch({ ...ID, generation: 4 }, [
      w(1, 0, Buffer.alloc(512, 4)),
      w(2, 0, Buffer.alloc(1)),
    ]);
    assert.deepEqual(r, {
      applied: 0,
      duplicates: 2,
      appliedThrough: 0,
      durableThrough: 0,
      stale: true,
      generation: 5,
    });
    assert.equal((await readBack(v, 0, 1))[0], 5);
    assert.equal(gw.counters.stale, 2);
    assert.deepEqual(await gw.flush({ ...ID, generation: 4 }), {
      durableThrough: 0,
      secondary: "unknown",
      stale: true,
      generation: 5,
    });
    assert.deepEqual(await gw.flush({ ...ID, generation: 5 }), { durableThrough: 1, secondary: "unknown" });
    // A newer generation starts over at seq 1.
    const n = await gw.applyBatch({ ...ID, generation: 6 }, [w(1, 0, Buffer.alloc(512, 6))]);
    assert.equal(n.applied, 1);
    assert.equal((await readBack(v, 0, 1))[0], 6);
  });

  void test("the floor header counts abandoned seqs as done", async () => {
    const gw = new Gateway(new MemoryVolume(1 << 20), log);
    const r = await gw.applyBatch({ ...ID, floor: 10 }, [
      w(3, 0, Buffer.alloc(1)),
      w(10, 0, Buffer.alloc(1)),
    ]);
    assert.deepEqual(r, { applied: 1, duplicates: 1, appliedThrough: 10, durableThrough: 0 });
  });

  void test("state is kept for at most MAX_SOURCES sources; one more is refused with 503, known ones go on", async () => {
    const v = new MemoryVolume(1 << 20);
    const gw = new Gateway(v, log);
    for (let i = 0; i < MAX_SOURCES; i++) {
      await gw.applyBatch({ ...ID, source: i.toString(16).padStart(4, "0"), takeover: true }, [
        w(1, 0, Buffer.alloc(1, i)),
      ]);
    }
    await assert.rejects(
      () => gw.applyBatch({ ...ID, source: "ffffff", takeover: true }, [w(1, 512, Buffer.alloc(1, 7))]),
      (e: unknown) => e instanceof HttpError && e.status === 503 && /1024 sources/.test(e.message),
    );
    await assert.rejects(() => gw.flush({ ...ID, source: "ffffff" }), HttpError);
    assert.equal((await readBack(v, 512, 1))[0], 0, "the refused source's write was applied");
    assert.equal([...gw.snapshots()].length, MAX_SOURCES);
    const r = await gw.applyBatch({ ...ID, source: "0001", takeover: true }, [
      w(2, 4096, Buffer.alloc(1, 9)),
    ]);
    assert.equal(r.applied, 1);
  });

  for (const [errno, status, code] of [
    [E.ENOSPC, 507, "ERR_NO_SPACE"],
    [E.EIO, 500, "ERR_IO"],
  ] as const) {
    void test(`a write failing with ${errno === E.ENOSPC ? "ENOSPC" : "EIO"}: ${status} ${code}, nothing acknowledged`, async () => {
      const v = new FailingVolume(1 << 20);
      const gw = new Gateway(v, log);
      await gw.applyBatch(ID, [w(1, 0, Buffer.alloc(512, 1))]);
      v.failing = errno;
      await assert.rejects(
        gw.applyBatch(ID, [w(2, 0, Buffer.alloc(512, 2)), w(3, 65536, Buffer.alloc(512, 3))]),
        (e: unknown) => e instanceof HttpError && e.status === status && e.code === code,
      );
      assert.equal(gw.sourceStatus()[0].appliedThrough, 1, "nothing of the failed batch is committed");
      assert.equal(
        (await readBack(v, 0, 1))[0],
        2,
        "but seq 2's write reached the secondary (seq 3's did not)",
      );
      assert.equal(gw.secondary.state, "inconsistent", "a batch that failed part-way");
      assert.match(gw.secondary.reason, /failed part-way/);
      assert.equal(gw.counters.errors, 1);
      assert.equal(gw.health().ok, false);
      v.failing = null;
      const r = await gw.applyBatch(ID, [w(2, 0, Buffer.alloc(512, 2)), w(3, 65536, Buffer.alloc(512, 3))]);
      assert.equal(r.applied, 2, "the retried batch applies");
      assert.equal(r.appliedThrough, 3);
      assert.equal(gw.health().ok, true);
    });
  }
});

void describe("flush and the state file", () => {
  void test("after a failed fdatasync nothing is ever called durable again, for any source, until a restart", async () => {
    // Linux reports a write-back error to one fdatasync and may drop the failed pages; the next
    // fdatasync then succeeds without them. A flush after that must not advance durableThrough.
    const v = new MemoryVolume(1 << 20);
    let failSync = false;
    v.flush = () =>
      failSync ? Promise.reject(new IoError(constants.errno.EIO, "fdatasync")) : Promise.resolve();
    const gw = new Gateway(v, log);
    const other = { ...ID, source: "cd", takeover: true };
    await gw.applyBatch(ID, [w(1, 0, Buffer.alloc(4096, 1))]);
    assert.equal((await gw.flush(ID)).durableThrough, 1);
    await gw.applyBatch(ID, [w(2, 0, Buffer.alloc(4096, 2))]);
    failSync = true;
    await assert.rejects(gw.flush(other), (e: unknown) => e instanceof HttpError && e.status === 500);
    failSync = false; // the next fdatasync would succeed: the failed pages are gone
    await assert.rejects(
      gw.flush(ID),
      (e: unknown) => e instanceof HttpError && e.status === 500 && /restart/.test(e.message),
      "a flush after the failure called seq 2 durable",
    );
    assert.equal(gw.sourceStatus().find((x) => x.source === ID.source)?.durableThrough, 1);
    assert.equal(gw.health().ok, false);
    assert.match(gw.health().reason ?? "", /fdatasync of the secondary failed.*restart the gateway/);
    await assert.rejects(
      gw.applyBatch(ID, [w(3, 0, Buffer.alloc(4096, 3))]),
      (e: unknown) => e instanceof HttpError && e.status === 500,
    );
  });

  void test("concurrent flushes share fdatasyncs; durableThrough persisted and loaded back", async () => {
    const dir = scratch();
    const v = FileVolume.open(join(dir, "sec.img"), { create: true, size: 1 << 20 });
    let syncs = 0;
    const sync = v.file.sync.bind(v.file);
    v.file.sync = (full?: boolean) => {
      syncs++;
      return sync(full);
    };
    const gw = new Gateway(v, log);
    const ident = { name: "sec", size: 1 << 20 };
    gw.attachState(new StateWriter(dir, ident, () => gw.snapshots()));
    await gw.applyBatch(ID, [w(1, 0, Buffer.alloc(4096, 1)), w(2, 4096, Buffer.alloc(4096, 2))]);
    await gw.applyBatch({ ...ID, source: "cd", takeover: true }, [w(1, 0, Buffer.alloc(1))]);
    // ID takes the secondary back (one writer at a time; both keep their idempotency state).
    await gw.applyBatch({ ...ID, takeover: true }, []);
    const results = await Promise.all(Array.from({ length: 20 }, () => gw.flush(ID)));
    assert.ok(results.every((r) => r.durableThrough === 2));
    assert.ok(syncs <= 2, `20 concurrent flushes took ${syncs} fdatasyncs`);
    const doc = JSON.parse(readFileSync(join(dir, STATE_FILE), "utf8")) as { sources: unknown[] };
    assert.deepEqual(doc.sources, [
      { source: "ab12", generation: 1, durableThrough: 2, floor: 0 },
      { source: "cd", generation: 1, durableThrough: 1, floor: 0 },
    ]);
    await v.close();

    const loaded = loadSources(dir, ident);
    assert.deepEqual(loaded.get("ab12"), { generation: 1, durableThrough: 2, floor: 0 });
    const again = new Gateway(new MemoryVolume(1 << 20), log, loaded);
    const r = await again.applyBatch(ID, [w(2, 0, Buffer.alloc(1)), w(3, 0, Buffer.alloc(1))]);
    assert.deepEqual(r, { applied: 1, duplicates: 1, appliedThrough: 3, durableThrough: 2 });
  });

  void test("state files that are refused (exit 2 with what to do)", () => {
    const dir = scratch();
    const ident = { name: "sec", size: 4096 };
    assert.equal(loadSources(dir, ident).size, 0, "no file: empty state");
    for (const text of [
      "{",
      "[]",
      '{"version": 2, "sources": []}',
      '{"version": 1, "volume": {"size": 8192}, "sources": []}',
      '{"version": 1, "volume": {"size": 4096}, "sources": [{"source": "ab", "generation": -1, "durableThrough": 0, "floor": 0}]}',
    ]) {
      writeFileSync(join(dir, STATE_FILE), text);
      assert.throws(() => loadSources(dir, ident), UsageError, text);
    }
  });
});

/** Wait (polling, 5 s at most) until `cond` holds. */
async function until(cond: () => boolean): Promise<void> {
  for (let i = 0; !cond(); i++) {
    if (i > 500) throw new Error("timed out waiting");
    await new Promise((r) => setTimeout(r, 10));
  }
}

void describe("the secondary's consistency", () => {
  // Each takes the secondary over when the other owns it: these tests are about consistency.
  const A: Identity = { source: "aa", generation: 1, floor: 1, takeover: true };
  const B: Identity = { source: "bb", generation: 1, floor: 1, takeover: true };
  const resync = (seq: number, offset: number): UpdateRecord => ({
    ...w(seq, offset, Buffer.alloc(512, seq)),
    flags: FLAG_RESYNC,
  });

  void test("a RESYNC record makes it inconsistent, durably, before the record is applied", async () => {
    const dir = scratch();
    const v = new MemoryVolume(1 << 20);
    const gw = new Gateway(v, log);
    const ident = { name: "sec", size: 1 << 20 };
    let seen: string | null = null;
    // Record what the state file said when the write reached the volume.
    const write = v.write.bind(v);
    v.write = (buf: Buffer, offset: number, fua: boolean) => {
      seen ??= (JSON.parse(readFileSync(join(dir, STATE_FILE), "utf8")) as { secondary: { state: string } })
        .secondary.state;
      return write(buf, offset, fua);
    };
    gw.attachState(
      new StateWriter(
        dir,
        ident,
        () => gw.snapshots(),
        () => ({ running: gw.running, secondary: gw.secondaryToRecord, owner: gw.owner }),
      ),
    );
    await gw.start({ secondary: null, running: null });
    assert.equal(gw.secondary.state, "unknown");
    await gw.applyBatch(A, [w(1, 0, Buffer.alloc(512, 1))]);
    assert.equal(gw.secondary.state, "unknown", "an ordinary update changes nothing");
    await gw.applyBatch(A, [resync(2, 4096)]);
    assert.equal(seen, "unknown");
    assert.equal(gw.secondary.state, "inconsistent");
    assert.match(gw.secondary.reason, /source aa is resyncing/);
    assert.equal(gw.secondary.source, "aa");
    const onDisk = loadSecondary(dir);
    assert.equal(onDisk.secondary?.state, "inconsistent");
    assert.equal(onDisk.running, true);
  });

  // Found by a CI run under load (24 Nov): the gateway said "consistent" (health, status, the
  // flush's answer) before sources.json did, so a crash in between restarted it inconsistent after
  // a failover tool had read consistent. Now the record comes first.
  void test("consistent is recorded before it is told; a RESYNC record meanwhile keeps it inconsistent", async () => {
    const dir = scratch();
    const gw = new Gateway(new MemoryVolume(1 << 20), log);
    const writer = new StateWriter(
      dir,
      { name: "sec", size: 1 << 20 },
      () => gw.snapshots(),
      () => ({ running: gw.running, secondary: gw.secondaryToRecord, owner: gw.owner }),
    );
    // Hold a save that records the consistent state, to look at what is told meanwhile.
    let held: (() => void) | null = null;
    const save = writer.save.bind(writer);
    writer.save = () => {
      if (gw.secondaryToRecord.state !== "consistent" || held !== null) return save();
      return new Promise<void>((resolve) => (held = resolve)).then(save);
    };
    gw.attachState(writer);
    await gw.start({ secondary: null, running: null });
    await gw.applyBatch(A, [resync(1, 0), w(2, 4096, Buffer.alloc(512, 2))]);
    const claim = { seq: 2, boot: gw.boot };
    const flushed = gw.flush(A, claim);
    await until(() => held !== null);
    assert.equal(gw.secondary.state, "inconsistent", "told before it is recorded");
    held!();
    assert.equal((await flushed).secondary, "consistent");
    assert.equal(loadSecondary(dir).secondary?.state, "consistent");

    // Again, with a RESYNC record arriving while the consistent state is being recorded.
    await gw.applyBatch(A, [resync(3, 8192)]);
    await gw.flush(A, { seq: 3, boot: gw.boot });
    held = null;
    await gw.applyBatch(A, [resync(4, 0)]);
    assert.equal(gw.secondary.state, "inconsistent");
    const again = gw.flush(A, { seq: 4, boot: gw.boot });
    await until(() => held !== null);
    const batch = gw.applyBatch(A, [resync(5, 4096)]);
    held!();
    await Promise.all([again, batch]);
    assert.equal(gw.secondary.state, "inconsistent", "a resync copy arrived after the claim");
    assert.equal(loadSecondary(dir).secondary?.state, "inconsistent", "and the record says so");
  });

  void test("a generation reused by another process is refused as stale, nothing applied", async () => {
    const v = new MemoryVolume(1 << 20);
    const gw = new Gateway(v, log);
    const one = { ...A, incarnation: "0001" };
    await gw.applyBatch(one, [w(1, 0, Buffer.alloc(512, 1))]);
    const r = await gw.applyBatch({ ...A, incarnation: "0002" }, [
      w(1, 0, Buffer.alloc(512, 2)),
      w(2, 0, Buffer.alloc(512, 2)),
    ]);
    assert.deepEqual(r, {
      applied: 0,
      duplicates: 2,
      appliedThrough: 0,
      durableThrough: 0,
      stale: true,
      reused: true,
      generation: 1,
    });
    assert.equal((await readBack(v, 0, 1))[0], 1, "nothing of it applied");
    const f = await gw.flush({ ...A, incarnation: "0002" });
    assert.equal(f.reused, true);
    assert.equal(
      (await gw.applyBatch({ ...one, generation: 2, incarnation: "0002" }, [w(1, 0, Buffer.alloc(512, 3))]))
        .applied,
      1,
      "a newer generation is taken",
    );
  });

  void test("a claim makes it consistent only when it holds", async () => {
    const gw = new Gateway(new MemoryVolume(1 << 20), log);
    await gw.start({ secondary: null, running: null });
    await gw.applyBatch(A, [resync(1, 0), w(2, 4096, Buffer.alloc(512, 2))]);
    assert.equal(gw.secondary.state, "inconsistent");
    const claim = (seq: number, boot = gw.boot) => ({ seq, boot });
    // Not durable through the claim yet: seq 4 never arrived.
    assert.equal((await gw.flush(A, claim(4))).secondary, "inconsistent", "durable below the claim");
    assert.equal((await gw.flush(A, claim(2, "0123456789abcdef"))).secondary, "inconsistent", "another boot");
    assert.equal((await gw.flush(B, claim(0))).secondary, "inconsistent", "another source's claim");
    await gw.applyBatch(A, [resync(3, 8192)]);
    assert.equal((await gw.flush(A, claim(2))).secondary, "inconsistent", "a RESYNC record above the claim");
    const r = await gw.flush(A, claim(3));
    assert.equal(r.secondary, "consistent");
    assert.match(gw.secondary.reason, /in sync with source aa through seq 3/);
    // A floor that abandons seqs under applied ones: inconsistent again.
    await gw.applyBatch(A, [w(5, 0, Buffer.alloc(512, 5))]);
    await gw.applyBatch({ ...A, floor: 6 }, [w(6, 0, Buffer.alloc(512, 6))]);
    assert.equal(gw.secondary.state, "inconsistent");
    assert.match(gw.secondary.reason, /abandoned updates after seq 3 that later applied ones came after/);
    assert.equal(
      (await gw.flush(A, claim(6))).secondary,
      "inconsistent",
      "a claim made before the floor moved",
    );
    assert.equal((await gw.flush({ ...A, floor: 6 }, claim(6))).secondary, "consistent");
    // Another source's claim ends it only when that source copied the whole volume.
    await gw.applyBatch(A, [resync(7, 0)]);
    assert.equal((await gw.flush(B, claim(0))).secondary, "inconsistent", "another source's claim");
    assert.equal((await gw.flush(B, { ...claim(0), whole: true })).secondary, "consistent", "a whole copy");
    // A newer generation of the source resets what the claim is checked against.
    await gw.applyBatch({ ...A, generation: 2 }, [resync(1, 0)]);
    assert.equal((await gw.flush({ ...A, generation: 2 }, claim(1))).secondary, "consistent");
  });

  void test("updates applied above a gap: inconsistent while it lasts; a new generation over a gap makes it last", async () => {
    const gw = new Gateway(new MemoryVolume(1 << 20), log);
    await gw.start({ secondary: null, running: null });
    await gw.applyBatch(A, [resync(1, 0)]);
    assert.equal((await gw.flush(A, { seq: 1, boot: gw.boot })).secondary, "consistent");
    await gw.applyBatch(A, [w(3, 0, Buffer.alloc(512, 3))]);
    assert.equal(gw.secondary.state, "inconsistent", "seq 3 applied, 2 missing");
    assert.match(
      gw.secondary.reason,
      /source aa has 1 update\(s\) applied above seq 2, which has not arrived/,
    );
    await gw.applyBatch(A, [w(2, 4096, Buffer.alloc(512, 2))]);
    assert.equal(gw.secondary.state, "consistent", "the gap filled");
    await gw.applyBatch(A, [w(5, 0, Buffer.alloc(512, 5))]);
    await gw.applyBatch({ ...A, generation: 2 }, [w(1, 0, Buffer.alloc(512, 1))]);
    assert.equal(gw.secondary.state, "inconsistent", "seq 4 of generation 1 will never come");
    assert.match(gw.secondary.reason, /abandoned updates after seq 3/);
  });

  void test("an unclean stop makes it inconsistent at the next start, until a claim", async () => {
    const gw = new Gateway(new MemoryVolume(1 << 20), log);
    const since = "2026-01-01T00:00:00.000Z";
    await gw.start({
      secondary: { state: "consistent", since, reason: "in sync", source: "aa" },
      running: true,
    });
    assert.equal(gw.secondary.state, "inconsistent");
    assert.match(gw.secondary.reason, /did not stop cleanly/);
    assert.equal(gw.secondary.source, null, "any source's claim ends it");
    assert.equal((await gw.flush(B, { seq: 0, boot: gw.boot })).secondary, "consistent");
    // A clean stop keeps the state as it was.
    const clean = new Gateway(new MemoryVolume(1 << 20), log);
    await clean.start({
      secondary: { state: "consistent", since, reason: "in sync", source: "aa" },
      running: false,
    });
    assert.deepEqual(clean.secondary, { state: "consistent", since, reason: "in sync", source: "aa" });
  });

  void test("a malformed secondary entry in the state file is refused, saying what to do", () => {
    const dir = scratch();
    writeFileSync(
      join(dir, STATE_FILE),
      '{"version": 1, "volume": {"size": 4096}, "sources": [], "secondary": {"state": "fine"}}',
    );
    assert.throws(() => loadSecondary(dir), /malformed "secondary" entry .*remove that entry/);
    assert.deepEqual(loadSecondary(scratch()), { secondary: null, running: null, owner: null }, "no file");
  });
});

void describe("checksums", () => {
  const SIZE = 3 * 1024 * 1024 + 8192;
  const data = randomBytes(SIZE);
  const v = new MemoryVolume(SIZE);
  void v.write(data, 0, false);
  const gw = new Gateway(v, log);
  const expect = (offset: number, length: number, block: number): string[] => {
    const out: string[] = [];
    for (let at = offset; at < offset + length; at += block) {
      const end = Math.min(at + block, offset + length);
      out.push(createHash("sha256").update(data.subarray(at, end)).digest("hex"));
    }
    return out;
  };
  for (const [offset, length, block] of [
    [0, 8192, 4096],
    [0, SIZE, 4096], // many windows of whole blocks
    [4096, SIZE - 4096, 65536], // short last block
    [0, SIZE, 1536 * 1024], // blocks larger than a window, not a multiple of it
    [0, SIZE, 4 * 1024 * 1024], // one block, the whole volume
    [12288, 4096 * 3 + 100, 4096],
  ]) {
    void test(`offset ${offset}, length ${length}, block ${block}`, async () => {
      assert.deepEqual(await gw.checksums(offset, length, block), expect(offset, length, block));
    });
  }
});
