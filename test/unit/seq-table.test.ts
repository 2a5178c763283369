// src/forks/seq-table.ts: per-block seqs and STALE marks of the gateway link. STALE is a bit per
// block, so a volume of more than 2^24 blocks (a Map's limit in V8) can have every block STALE.

import { test } from "node:test";
import assert from "node:assert/strict";
import { SeqTable, STALE } from "../../src/forks/seq-table.js";

void test("seqs and STALE marks: get, set, delete, has, clear", () => {
  const t = new SeqTable(100);
  assert.equal(t.get(7), undefined);
  t.set(7, 42);
  assert.equal(t.get(7), 42);
  t.set(7, STALE);
  assert.equal(t.get(7), STALE, "STALE replaces a seq");
  assert.equal(t.seqCount, 0);
  t.set(7, 43);
  assert.equal(t.get(7), 43, "a whole-block copy's seq replaces STALE");
  t.set(31, STALE);
  t.set(32, STALE);
  t.set(99, 5);
  assert.deepEqual([t.has(30), t.has(31), t.has(32), t.has(33)], [false, true, true, false]);
  assert.deepEqual(
    [...t.seqBlocks()].sort((a, b) => a - b),
    [7, 99],
  );
  t.delete(31);
  assert.equal(t.get(31), undefined);
  assert.equal(t.get(32), STALE, "a neighbour's bit is untouched");
  t.clear();
  for (const b of [7, 32, 99]) assert.equal(t.get(b), undefined);
});

void test("more STALE blocks than a Map can hold (2^24): a 2 TiB volume at 64 KiB blocks", () => {
  const blocks = 2 ** 25;
  const t = new SeqTable(blocks);
  for (let b = 0; b < blocks; b++) t.set(b, STALE);
  assert.equal(t.get(0), STALE);
  assert.equal(t.get(blocks - 1), STALE);
  assert.equal(t.seqCount, 0);
});
