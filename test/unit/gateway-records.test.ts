// src/gateway/records.ts byte for byte: the encoder against hand-written bytes (docs/gateway-api.md,
// the record table), the parser's round trip and views, and every malformed or out-of-range body.

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import {
  encodeUpdates,
  encodedSize,
  FLAG_RESYNC,
  KIND,
  parseUpdates,
  RecordError,
  type UpdateRecord,
} from "../../src/gateway/records.js";

/** Bytes from a hex string with optional spaces. */
function hex(s: string): Buffer {
  return Buffer.from(s.replace(/\s+/g, ""), "hex");
}

const SIZE = 1 << 20;

function write(seq: number, offset: number, data: Buffer, period = 0): UpdateRecord {
  return { kind: KIND.WRITE, seq, period, offset, length: data.length, data };
}

/** Expect parseUpdates to refuse `buf` with `code` and a message matching `msg`. */
function refuses(buf: Buffer, code: "ERR_MALFORMED" | "ERR_RANGE", msg: RegExp, size = SIZE): void {
  assert.throws(
    () => parseUpdates(buf, size),
    (e: unknown) => {
      assert.ok(e instanceof RecordError, `not a RecordError: ${String(e)}`);
      assert.equal(e.code, code);
      assert.match(e.message, msg);
      return true;
    },
  );
}

void describe("encodeUpdates", () => {
  void test("WRITE: header fields big-endian, then the data", () => {
    const b = encodeUpdates([write(0x0102030405, 0x1000, Buffer.from("abc"), 7)]);
    assert.deepEqual(
      b,
      hex(
        "42465550 01 00 0000" + // magic, kind, flags, reserved
          "0000000102030405" + // seq
          "0000000000000007" + // period
          "0000000000001000" + // offset
          "00000003 00000000" + // length, reserved
          "616263",
      ),
    );
  });

  void test("ZERO and TRIM carry no data; 2^53 - 1 encodes exactly", () => {
    const max = Number.MAX_SAFE_INTEGER; // 0x1fffffffffffff
    const b = encodeUpdates([
      { kind: KIND.ZERO, seq: max, period: 1, offset: 4096, length: 65536, data: null },
      { kind: KIND.TRIM, seq: 2, period: 0, offset: 0, length: 0xffffffff, data: null },
    ]);
    assert.deepEqual(
      b,
      hex(
        "42465550 02 00 0000 001fffffffffffff 0000000000000001 0000000000001000 00010000 00000000" +
          "42465550 03 00 0000 0000000000000002 0000000000000000 0000000000000000 ffffffff 00000000",
      ),
    );
    assert.equal(encodedSize([{ kind: KIND.TRIM, seq: 1, period: 0, offset: 0, length: 9, data: null }]), 40);
  });

  void test("refuses what it cannot encode", () => {
    assert.throws(() => encodeUpdates([write(2 ** 53, 0, Buffer.alloc(1))]), RangeError);
    assert.throws(() => encodeUpdates([write(1, -1, Buffer.alloc(1))]), RangeError);
    assert.throws(
      () =>
        encodeUpdates([{ kind: KIND.WRITE, seq: 1, period: 0, offset: 0, length: 4, data: Buffer.alloc(3) }]),
      RangeError,
    );
  });
});

void describe("parseUpdates", () => {
  void test("round trip; data are views into the body", () => {
    const recs: UpdateRecord[] = [
      write(1, 0, Buffer.alloc(4096, 1), 3),
      { kind: KIND.ZERO, seq: 2, period: 3, offset: 8192, length: 4096, data: null, flags: FLAG_RESYNC },
      write(3, SIZE - 512, Buffer.alloc(512, 2), 4),
      { kind: KIND.TRIM, seq: 4, period: 4, offset: 0, length: SIZE, data: null },
    ];
    const body = encodeUpdates(recs);
    const got = parseUpdates(body, SIZE);
    assert.deepEqual(
      got,
      recs.map((r) => ({ ...r, flags: r.flags ?? 0 })),
    );
    assert.equal(got[0].data!.buffer, body.buffer, "WRITE data should be a view, not a copy");
    assert.equal(got[0].data!.byteOffset, body.byteOffset + 40);
  });

  void test("an empty body is an empty batch", () => {
    assert.deepEqual(parseUpdates(Buffer.alloc(0), SIZE), []);
  });

  void test("records in any seq order; large numbers exact", () => {
    const big = 2 ** 53 - 1;
    const recs = [write(big, 0, Buffer.alloc(1)), write(5, 1, Buffer.alloc(1)), write(7, 2, Buffer.alloc(1))];
    const got = parseUpdates(encodeUpdates(recs), SIZE);
    assert.deepEqual(
      got.map((r) => r.seq),
      [big, 5, 7],
    );
  });

  const ok = (): Buffer => encodeUpdates([write(1, 0, Buffer.alloc(16, 9))]);

  void test("bad magic", () => {
    const b = ok();
    b.writeUInt32BE(0x42465551, 0);
    refuses(b, "ERR_MALFORMED", /bad magic 0x42465551/);
    // The second record's magic is checked too.
    const two = Buffer.concat([ok(), encodeUpdates([write(2, 0, Buffer.alloc(1))])]);
    two.writeUInt32BE(0, 56);
    refuses(two, "ERR_MALFORMED", /record at byte 56: bad magic/);
  });

  void test("unknown kind (0, 4, 255)", () => {
    for (const k of [0, 4, 255]) {
      const b = ok();
      b[4] = k;
      refuses(b, "ERR_MALFORMED", new RegExp(`unknown kind ${k}`));
    }
  });

  void test("flags other than RESYNC and reserved fields must be 0", () => {
    for (const bad of [2, 0x80, 0xff]) {
      const f = ok();
      f[5] = bad;
      refuses(f, "ERR_MALFORMED", new RegExp(`unknown flags 0x${bad.toString(16)}`));
    }
    const resync = ok();
    resync[5] = FLAG_RESYNC;
    assert.equal(parseUpdates(resync, 1 << 30)[0].flags, FLAG_RESYNC, "RESYNC is parsed");
    assert.equal(parseUpdates(ok(), 1 << 30)[0].flags, 0);
    const round = encodeUpdates([
      { kind: KIND.ZERO, seq: 7, period: 0, offset: 0, length: 4096, data: null, flags: FLAG_RESYNC },
    ]);
    assert.equal(round[5], FLAG_RESYNC, "encoded");
    const r1 = ok();
    r1[7] = 1;
    refuses(r1, "ERR_MALFORMED", /reserved/);
    const r2 = ok();
    r2[39] = 1;
    refuses(r2, "ERR_MALFORMED", /reserved/);
  });

  void test("length 0", () => {
    const b = encodeUpdates([{ kind: KIND.ZERO, seq: 1, period: 0, offset: 0, length: 0, data: null }]);
    refuses(b, "ERR_MALFORMED", /length 0/);
  });

  void test("seq 0 and a seq twice in one batch", () => {
    refuses(encodeUpdates([write(0, 0, Buffer.alloc(1))]), "ERR_MALFORMED", /seq 0/);
    const dup = encodeUpdates([
      write(3, 0, Buffer.alloc(1)),
      write(1, 0, Buffer.alloc(1)),
      write(3, 8, Buffer.alloc(1)),
    ]);
    refuses(dup, "ERR_MALFORMED", /seq 3 appears twice/);
    const dupInOrder = encodeUpdates([write(1, 0, Buffer.alloc(1)), write(1, 8, Buffer.alloc(1))]);
    refuses(dupInOrder, "ERR_MALFORMED", /seq 1 appears twice/);
  });

  void test("seq or period of 2^53 or more", () => {
    const s = ok();
    s.writeUInt32BE(0x00200000, 8);
    refuses(s, "ERR_MALFORMED", /seq is 2\^53/);
    const p = ok();
    p.writeUInt32BE(0xffffffff, 16);
    refuses(p, "ERR_MALFORMED", /period is 2\^53/);
  });

  void test("truncated header and truncated data", () => {
    const b = ok();
    refuses(b.subarray(0, 39), "ERR_MALFORMED", /truncated header \(39 of 40/);
    refuses(b.subarray(0, 40 + 15), "ERR_MALFORMED", /truncated data \(15 of 16/);
    refuses(Buffer.concat([b, Buffer.alloc(3)]), "ERR_MALFORMED", /byte 56: truncated header/);
  });

  void test("ranges past the end of the volume are ERR_RANGE", () => {
    refuses(encodeUpdates([write(1, SIZE - 1, Buffer.alloc(2))]), "ERR_RANGE", /past the end/);
    refuses(
      encodeUpdates([{ kind: KIND.TRIM, seq: 1, period: 0, offset: SIZE, length: 1, data: null }]),
      "ERR_RANGE",
      /past the end/,
    );
    const huge = encodeUpdates([{ kind: KIND.ZERO, seq: 1, period: 0, offset: 0, length: 1, data: null }]);
    huge.writeUInt32BE(0xffffffff, 24); // offset >= 2^53
    refuses(huge, "ERR_RANGE", /past the end/);
    // Exactly up to the end is fine.
    assert.equal(parseUpdates(encodeUpdates([write(1, SIZE - 2, Buffer.alloc(2))]), SIZE).length, 1);
  });

  void test("a bad record anywhere refuses the whole body", () => {
    const good = encodeUpdates([write(1, 0, Buffer.alloc(8)), write(2, 8, Buffer.alloc(8))]);
    const bad = encodeUpdates([write(3, SIZE, Buffer.alloc(8))]);
    refuses(Buffer.concat([good, bad]), "ERR_RANGE", /seq 3/);
  });
});
