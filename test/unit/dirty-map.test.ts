// src/tracking/dirty-map.ts: marking and clearing across block and region boundaries, per-region
// timestamps, runs and extents (coalescing, limits, the short last block), nextDirty at the edges
// of 32-bit words and of the volume, the chunk encoding round trip (also with regions that
// straddle chunks), geometry checks, and memory: a 1 TiB map with every block dirty must stay small.

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { CHUNK_BLOCKS, DirtyMap, type DirtyGeometry } from "../../src/tracking/dirty-map.js";

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;
const G = 64 * KiB; // the default granularity
const R = 4 * MiB; // the default region

function map(volumeSize: number, granularity = G, regionSize = R): DirtyMap {
  return new DirtyMap({ volumeSize, granularity, regionSize });
}

/** Indices of the dirty blocks, by brute force over isDirty. */
function dirtyList(m: DirtyMap): number[] {
  const out: number[] = [];
  for (let b = 0; b < m.blocks; b++) if (m.isDirty(b)) out.push(b);
  return out;
}

/** Runs computed by brute force from isDirty. */
function bruteRuns(m: DirtyMap, from = 0): { start: number; count: number }[] {
  const out: { start: number; count: number }[] = [];
  for (let b = from; b < m.blocks; b++) {
    if (!m.isDirty(b)) continue;
    const start = b;
    while (b < m.blocks && m.isDirty(b)) b++;
    out.push({ start, count: b - start });
  }
  return out;
}

void describe("DirtyMap geometry", () => {
  void test("derived sizes: blocks, regions, chunks (rounded up)", () => {
    const m = map(10 * GiB + 5);
    assert.equal(m.blocks, Math.ceil((10 * GiB + 5) / G));
    assert.equal(m.blocksPerRegion, R / G);
    assert.equal(m.regions, Math.ceil(m.blocks / (R / G)));
    assert.equal(m.chunks, Math.ceil(m.blocks / CHUNK_BLOCKS));
    assert.equal(m.dirtyBlocks, 0);
    assert.equal(m.dirtyBytes, 0);
    assert.deepEqual(m.timeSpan(), [0, 0]);
  });

  void test("bad geometry is a RangeError", () => {
    const bad: DirtyGeometry[] = [
      { volumeSize: 0, granularity: G, regionSize: R },
      { volumeSize: 1.5, granularity: G, regionSize: R },
      { volumeSize: -4096, granularity: G, regionSize: R },
      { volumeSize: GiB, granularity: 2048, regionSize: R },
      { volumeSize: GiB, granularity: 3 * 4096, regionSize: 3 * 4096 },
      { volumeSize: GiB, granularity: G, regionSize: G / 2 },
      { volumeSize: GiB, granularity: G, regionSize: G + 4096 },
    ];
    for (const g of bad) assert.throws(() => new DirtyMap(g), RangeError, JSON.stringify(g));
  });
});

void describe("DirtyMap mark and clear", () => {
  void test("a range marks exactly the blocks it touches (block boundaries)", () => {
    const m = map(64 * MiB);
    m.mark(G - 1, 2, 1000); // the last byte of block 0 and the first of block 1
    assert.deepEqual(dirtyList(m), [0, 1]);
    m.mark(5 * G, G, 1000); // exactly block 5
    assert.deepEqual(dirtyList(m), [0, 1, 5]);
    m.mark(7 * G + 100, 1, 1000); // one byte inside block 7
    assert.deepEqual(dirtyList(m), [0, 1, 5, 7]);
    m.mark(9 * G, 2 * G + 1, 1000); // blocks 9, 10 and one byte of 11
    assert.deepEqual(dirtyList(m), [0, 1, 5, 7, 9, 10, 11]);
    assert.equal(m.dirtyBlocks, 7);
    assert.equal(m.dirtyBytes, 7 * G);
    assert.deepEqual(m.blockRange(G - 1, 2), [0, 1]);
    assert.deepEqual(m.blockRange(5 * G, G), [5, 5]);
  });

  void test("marking twice counts once; the region's last time moves, its first time stays", () => {
    const m = map(64 * MiB);
    m.mark(0, 4096, 1000);
    m.mark(0, 4096, 3000);
    m.mark(G, 4096, 2000); // same region, another block
    assert.equal(m.dirtyBlocks, 2);
    assert.deepEqual(m.regionTimes(0), [1000, 3000]);
    m.mark(2 * G, 1, 500); // an older clock does not move times backwards
    assert.deepEqual(m.regionTimes(0), [1000, 3000]);
    assert.equal(m.regionDirty(0), 3);
  });

  void test("a range across a region boundary dirties both regions with their own times", () => {
    const m = map(64 * MiB);
    m.mark(R - G, 2 * G, 7000); // last block of region 0, first of region 1
    assert.deepEqual(dirtyList(m), [R / G - 1, R / G]);
    assert.equal(m.regionDirty(0), 1);
    assert.equal(m.regionDirty(1), 1);
    assert.deepEqual(m.regionTimes(0), [7000, 7000]);
    assert.deepEqual(m.regionTimes(1), [7000, 7000]);
    m.mark(R + 3 * G, 1, 9000);
    assert.deepEqual(m.regionTimes(1), [7000, 9000]);
    assert.deepEqual(m.regionTimes(0), [7000, 7000]);
    assert.deepEqual(m.timeSpan(), [7000, 9000]);
  });

  void test("clearing the last dirty block of a region resets its times; others keep theirs", () => {
    const m = map(64 * MiB);
    m.mark(0, 3 * G, 100);
    m.mark(R, G, 200);
    m.clearBlock(1);
    assert.deepEqual(m.regionTimes(0), [100, 100]);
    m.clearBlocks(0, 3);
    assert.deepEqual(m.regionTimes(0), [0, 0]);
    assert.equal(m.regionDirty(0), 0);
    assert.deepEqual(m.regionTimes(1), [200, 200]);
    assert.deepEqual(m.timeSpan(), [200, 200]);
    // Dirtied again later: "first" is the new time, not the old one.
    m.mark(0, 1, 300);
    assert.deepEqual(m.regionTimes(0), [300, 300]);
    // Clearing a clean block changes nothing.
    const before = m.dirtyBlocks;
    m.clearBlock(40);
    assert.equal(m.dirtyBlocks, before);
    assert.deepEqual(dirtyList(m), [0, R / G]);
  });

  void test("marks past the end are clamped; the short last block counts its real bytes", () => {
    const size = 10 * G + 1000; // 11 blocks, the last one 1000 bytes long
    const m = map(size, G, 2 * G);
    assert.equal(m.blocks, 11);
    m.mark(size - 1, 1, 1);
    assert.deepEqual(dirtyList(m), [10]);
    assert.equal(m.dirtyBytes, 1000);
    m.markBlocks(8, 100, 1); // clamped to the volume
    assert.deepEqual(dirtyList(m), [8, 9, 10]);
    assert.equal(m.dirtyBytes, 2 * G + 1000);
    m.markAll(2);
    assert.equal(m.dirtyBlocks, 11);
    assert.equal(m.dirtyBytes, size);
    m.clearBlocks(0, 1000);
    assert.equal(m.dirtyBlocks, 0);
    assert.equal(m.dirtyBytes, 0);
  });

  void test("the changed-chunk set records the chunks a mark or clear touched", () => {
    const m = map(3 * CHUNK_BLOCKS * 4096, 4096, 4 * MiB);
    assert.equal(m.chunks, 3);
    m.mark(CHUNK_BLOCKS * 4096 - 4096, 8192, 5); // last block of chunk 0, first of chunk 1
    assert.deepEqual([...m.changed].sort(), [0, 1]);
    m.changed.clear();
    m.clearBlock(2 * CHUNK_BLOCKS + 7); // clean: no change
    assert.equal(m.changed.size, 0);
    m.clearBlock(CHUNK_BLOCKS);
    assert.deepEqual([...m.changed], [1]);
  });
});

void describe("DirtyMap nextDirty, runs and extents", () => {
  void test("nextDirty at bit 31, across words, from inside a word, at the end", () => {
    const m = map(200 * G, G, G);
    assert.equal(m.blocks, 200);
    assert.equal(m.nextDirty(0), -1);
    m.markBlocks(31, 1, 1); // the sign bit of word 0
    assert.equal(m.nextDirty(0), 31);
    assert.equal(m.nextDirty(31), 31);
    assert.equal(m.nextDirty(32), -1);
    m.markBlocks(32, 1, 1); // bit 0 of word 1
    assert.equal(m.nextDirty(32), 32);
    m.markBlocks(63, 1, 1); // the sign bit of word 1
    assert.equal(m.nextDirty(33), 63);
    m.markBlocks(130, 1, 1); // two whole empty words further on
    assert.equal(m.nextDirty(64), 130);
    assert.equal(m.nextDirty(131), -1);
    assert.equal(m.nextDirty(200), -1);
    assert.equal(m.nextDirty(5000), -1);
    assert.deepEqual(
      [...m.runs()],
      [
        { start: 31, count: 2 },
        { start: 63, count: 1 },
        { start: 130, count: 1 },
      ],
    );
  });

  void test("nextDirty in the last, partial word: the final block is found, nothing beyond", () => {
    // 70 blocks: word 2 holds blocks 64..69 only; the volume's last block is short too.
    const m = map(69 * G + 4096, G, G);
    assert.equal(m.blocks, 70);
    m.markBlocks(69, 1, 1);
    assert.equal(m.nextDirty(0), 69);
    assert.equal(m.nextDirty(69), 69);
    assert.equal(m.nextDirty(70), -1);
    assert.deepEqual([...m.runs()], [{ start: 69, count: 1 }]);
    const { extents } = m.extents();
    assert.deepEqual(
      extents.map((e) => [e.offset, e.length]),
      [[69 * G, 4096]],
    );
    assert.equal(m.dirtyBytes, 4096);
    // A full last word whose last bit is the sign bit (blocks 64..95).
    const n = map(96 * G, G, G);
    n.markBlocks(95, 1, 1);
    assert.equal(n.nextDirty(64), 95);
    assert.equal(n.nextDirty(96), -1);
  });

  void test("runs across word boundaries, split at maxCount, started in the middle of a run", () => {
    const m = map(300 * G, G, 8 * G);
    m.markBlocks(20, 50, 1); // crosses words 0, 1, 2
    m.markBlocks(100, 3, 1);
    m.markBlocks(299, 1, 1);
    assert.deepEqual([...m.runs()], bruteRuns(m));
    assert.deepEqual(
      [...m.runs(0, 16)],
      [
        { start: 20, count: 16 },
        { start: 36, count: 16 },
        { start: 52, count: 16 },
        { start: 68, count: 2 },
        { start: 100, count: 3 },
        { start: 299, count: 1 },
      ],
    );
    assert.deepEqual([...m.runs(40)], bruteRuns(m, 40));
    assert.deepEqual([...m.runs(40)][0], { start: 40, count: 30 });
  });

  void test("runs agree with brute force on a seeded random map", () => {
    let seed = 12345;
    const rand = (n: number): number => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % n;
    };
    const m = map(997 * G + 333, G, 4 * G);
    for (let i = 0; i < 200; i++) m.markBlocks(rand(m.blocks), 1 + rand(9), 1 + i);
    for (let i = 0; i < 80; i++) m.clearBlocks(rand(m.blocks), 1 + rand(5));
    assert.deepEqual([...m.runs()], bruteRuns(m));
    for (const from of [0, 1, 31, 32, 33, 500, m.blocks - 1]) {
      assert.deepEqual([...m.runs(from)], bruteRuns(m, from), `from ${from}`);
    }
    assert.equal(dirtyList(m).length, m.dirtyBlocks);
    let sum = 0;
    for (const e of m.extents().extents) sum += e.length;
    assert.equal(sum, m.dirtyBytes);
  });

  void test("extents coalesce runs across regions with the earliest first and latest last time", () => {
    const m = map(64 * MiB);
    const bpr = R / G;
    m.markBlocks(bpr - 2, 2, 1000); // end of region 0
    m.markBlocks(bpr, 3, 2000); // start of region 1: one run with the above
    m.markBlocks(bpr + 10, 1, 2500); // region 1, apart
    m.markBlocks(3 * bpr, 1, 5000); // region 3
    const { extents, truncated } = m.extents();
    assert.equal(truncated, false);
    assert.deepEqual(extents, [
      // Times are per region: region 1's (2000 to 2500) cover both of its runs.
      { offset: (bpr - 2) * G, length: 5 * G, firstDirtied: 1000, lastDirtied: 2500 },
      { offset: (bpr + 10) * G, length: G, firstDirtied: 2000, lastDirtied: 2500 },
      { offset: 3 * R, length: G, firstDirtied: 5000, lastDirtied: 5000 },
    ]);
    const limited = m.extents(2);
    assert.equal(limited.truncated, true);
    assert.deepEqual(limited.extents, extents.slice(0, 2));
    assert.deepEqual(m.extents(3), { extents, truncated: false });
  });
});

void describe("DirtyMap chunk encoding", () => {
  /** Encode every chunk of `m` and decode into a fresh map of the same geometry. */
  function roundTrip(m: DirtyMap): DirtyMap {
    const copy = new DirtyMap({
      volumeSize: m.volumeSize,
      granularity: m.granularity,
      regionSize: m.regionSize,
    });
    for (let c = 0; c < m.chunks; c++) copy.decodeChunk(c, m.encodeChunk(c));
    return copy;
  }

  function assertSame(a: DirtyMap, b: DirtyMap): void {
    assert.equal(b.dirtyBlocks, a.dirtyBlocks);
    assert.equal(b.dirtyBytes, a.dirtyBytes);
    assert.deepEqual(dirtyList(b), dirtyList(a));
    for (let r = 0; r < a.regions; r++) {
      assert.deepEqual(b.regionTimes(r), a.regionTimes(r), `times of region ${r}`);
      assert.equal(b.regionDirty(r), a.regionDirty(r), `count of region ${r}`);
    }
    assert.deepEqual(b.extents(), a.extents());
  }

  void test("round trip over several chunks, a partial last chunk and a short last block", () => {
    // 4 KiB granularity: a chunk is 128 MiB; 2 full chunks, then 5 MiB and 3 bytes more.
    const m = map(2 * CHUNK_BLOCKS * 4096 + 5 * MiB + 3, 4096, 1 * MiB);
    assert.equal(m.chunks, 3);
    m.markBlocks(0, 1, 1_700_000_000_001);
    m.markBlocks(31, 2, 1_700_000_000_002);
    m.markBlocks(CHUNK_BLOCKS - 1, 2, 1_700_000_000_003); // across chunks 0 and 1
    m.markBlocks(2 * CHUNK_BLOCKS + 100, 50, 1_700_000_000_004);
    m.markBlocks(m.blocks - 1, 1, 1_700_000_000_005); // the 3-byte block
    m.mark(CHUNK_BLOCKS * 4096 + 12 * MiB, 1, 1_700_000_000_006); // two marks in one region
    m.mark(CHUNK_BLOCKS * 4096 + 12 * MiB + 8192, 1, 1_700_000_000_009);
    const copy = roundTrip(m);
    assertSame(m, copy);
    assert.deepEqual(
      copy.regionTimes((CHUNK_BLOCKS * 4096 + 12 * MiB) / MiB),
      [1_700_000_000_006, 1_700_000_000_009],
    );
  });

  void test("round trip with regions that straddle chunk boundaries", () => {
    // 3-block regions: 32768 is not a multiple of 3, so regions cross chunk boundaries.
    const m = map(3 * CHUNK_BLOCKS * 4096, 4096, 3 * 4096);
    const straddling = Math.floor(CHUNK_BLOCKS / 3); // blocks 32766..32768
    assert.deepEqual(m.chunkRegions(0)[1] - 1, straddling);
    assert.equal(m.chunkRegions(1)[0], straddling);
    m.markBlocks(CHUNK_BLOCKS - 2, 1, 2_000); // in chunk 0, region `straddling`
    m.markBlocks(CHUNK_BLOCKS, 1, 3_000); // in chunk 1, the same region
    m.markBlocks(7, 1, 1_000);
    const copy = roundTrip(m);
    assertSame(m, copy);
    assert.deepEqual(copy.regionTimes(straddling), [2_000, 3_000]);
    // Decoding in the other order gives the same map.
    const rev = new DirtyMap({ volumeSize: m.volumeSize, granularity: 4096, regionSize: 3 * 4096 });
    for (let c = m.chunks - 1; c >= 0; c--) rev.decodeChunk(c, m.encodeChunk(c));
    assertSame(m, rev);
  });

  void test("decoding replaces what the chunk held; a chunk of the wrong length is refused", () => {
    const m = map(256 * MiB);
    m.markBlocks(3, 1, 100);
    const enc = m.encodeChunk(0);
    const other = map(256 * MiB);
    other.markBlocks(9, 4, 50);
    other.decodeChunk(0, enc);
    assert.deepEqual(dirtyList(other), [3]);
    assert.equal(other.dirtyBlocks, 1);
    assert.deepEqual(other.regionTimes(0), [100, 100]);
    assert.throws(() => other.decodeChunk(0, enc.subarray(0, enc.length - 1)), /expected/);
    assert.throws(() => other.decodeChunk(0, Buffer.concat([enc, Buffer.alloc(16)])), /expected/);
    // A clean chunk round-trips to a clean chunk.
    const clean = map(256 * MiB);
    clean.decodeChunk(0, map(256 * MiB).encodeChunk(0));
    assert.equal(clean.dirtyBlocks, 0);
    assert.deepEqual(clean.timeSpan(), [0, 0]);
  });
});

void describe("DirtyMap memory", () => {
  void test("1 TiB with every block dirty: RSS grows well under 256 MiB", (t) => {
    setFlagsFromString("--expose-gc");
    const gc = runInNewContext("gc") as () => void;
    gc();
    const before = process.memoryUsage().rss;
    const m = map(TiB);
    m.markAll(1_700_000_000_000);
    const all = m.extents(10);
    let runs = 0;
    for (const r of m.runs(0, 16)) if (r.count === 16) runs++;
    gc();
    const after = process.memoryUsage().rss;
    const growth = (after - before) / MiB;
    assert.equal(m.dirtyBlocks, TiB / G);
    assert.equal(m.dirtyBytes, TiB);
    assert.deepEqual(all.extents, [
      { offset: 0, length: TiB, firstDirtied: 1_700_000_000_000, lastDirtied: 1_700_000_000_000 },
    ]);
    assert.equal(runs, TiB / G / 16);
    assert.ok(growth < 64, `a 1 TiB DirtyMap with every block dirty grew RSS by ${growth.toFixed(1)} MiB`);
    t.diagnostic(`1 TiB DirtyMap, all dirty: RSS growth ${growth.toFixed(1)} MiB`);
  });
});
