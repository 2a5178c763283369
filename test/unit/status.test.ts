// Block status descriptors: lengths are multiples of the minimum block size (proto.md), a mixed
// minimum block gets the flags all its bytes share, and the request's range is covered exactly.

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { statusDescriptors } from "../../src/nbd/status.js";

const K = 1024;
const HOLE = 3; // hole + zero
const ZERO = 2;

void describe("statusDescriptors", () => {
  void test("minimum block 1: the extents as they are, clipped to the request, equal neighbours merged", () => {
    const ext = [
      { length: 4 * K, flags: 0 },
      { length: 8 * K, flags: HOLE },
      { length: 4 * K, flags: HOLE },
      { length: 100 * K, flags: 0 },
    ];
    assert.deepEqual(statusDescriptors(ext, 0, 64 * K, 1, false), [4 * K, 0, 12 * K, HOLE, 48 * K, 0]);
    assert.deepEqual(statusDescriptors(ext, 0, 64 * K, 1, true), [4 * K, 0]);
  });

  void test("a 64 KiB minimum block: a 4 KiB hole inside a data block is reported as data", () => {
    // The reviewer's case: fallocate -p -o 4096 -l 8192 on a data file, --block-size 65536.
    const ext = [
      { length: 4 * K, flags: 0 },
      { length: 8 * K, flags: HOLE },
      { length: 116 * K + 1000 * K, flags: 0 },
    ];
    const d = statusDescriptors(ext, 0, 128 * K, 64 * K, false);
    assert.deepEqual(d, [128 * K, 0]);
    for (let i = 0; i < d.length; i += 2) assert.equal(d[i] % (64 * K), 0);
  });

  void test("a 64 KiB minimum block: whole hole blocks stay holes, mixed blocks share flags", () => {
    const ext = [
      { length: 60 * K, flags: 0 }, // block 0: data + hole -> 0
      { length: 4 * K + 128 * K, flags: HOLE }, // blocks 1, 2: hole
      { length: 32 * K, flags: ZERO }, // block 3: zero + hole -> zero
      { length: 32 * K, flags: HOLE },
      { length: 64 * K, flags: 0 }, // block 4: data
    ];
    const d = statusDescriptors(ext, 0, 320 * K, 64 * K, false);
    assert.deepEqual(d, [64 * K, 0, 128 * K, HOLE, 64 * K, ZERO, 64 * K, 0]);
  });

  void test("extents covering less than the request: whole blocks only, then the rest left out", () => {
    const ext = [{ length: 100 * K, flags: HOLE }];
    assert.deepEqual(statusDescriptors(ext, 0, 256 * K, 64 * K, false), [64 * K, HOLE, 64 * K, 0]);
    assert.deepEqual(statusDescriptors([], 0, 256 * K, 64 * K, false), [256 * K, 0]);
  });

  void test("REQ_ONE: one descriptor, a multiple of the minimum block, within the request", () => {
    const ext = [
      { length: 4 * K, flags: HOLE },
      { length: 1024 * K, flags: 0 },
    ];
    assert.deepEqual(statusDescriptors(ext, 0, 256 * K, 64 * K, true), [256 * K, 0]);
    assert.deepEqual(statusDescriptors(ext, 0, 256 * K, 4 * K, true), [4 * K, HOLE]);
  });

  void test("random extents: descriptors cover the request exactly, aligned, and never claim a hole or zero wrongly", () => {
    let seed = 7;
    const rnd = (n: number): number => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed % n;
    };
    for (let round = 0; round < 500; round++) {
      const mb = [1, 512, 4096, 65536][rnd(4)];
      const offset = rnd(64) * mb;
      const length = (1 + rnd(64)) * mb;
      const ext: { length: number; flags: number }[] = [];
      let covered = 0;
      const want = length + (rnd(3) === 0 ? -rnd(length) : rnd(4 * mb));
      while (covered < want) {
        const l = 1 + rnd(3 * mb);
        ext.push({ length: l, flags: [0, ZERO, HOLE][rnd(3)] });
        covered += l;
      }
      const flagsAt = (p: number): number => {
        let s = offset;
        for (const e of ext) {
          if (p < s + e.length) return e.flags;
          s += e.length;
        }
        return -1; // not covered
      };
      const d = statusDescriptors(ext, offset, length, mb, false);
      let total = 0;
      for (let i = 0; i < d.length; i += 2) {
        assert.ok(d[i] > 0 && d[i] % mb === 0, `round ${round}: length ${d[i]} not a multiple of ${mb}`);
        if (i > 0) assert.notEqual(d[i + 1], d[i - 1], `round ${round}: equal neighbours not merged`);
        for (let p = offset + total; p < offset + total + d[i]; p += Math.max(1, mb >> 3)) {
          const f = flagsAt(p);
          assert.ok(
            f === -1 ? d[i + 1] === 0 : (d[i + 1] & ~f) === 0,
            `round ${round}: flags ${d[i + 1]} at ${p}`,
          );
        }
        total += d[i];
      }
      assert.ok(total <= length && total > 0, `round ${round}: total ${total} of ${length}`);
    }
  });
});
