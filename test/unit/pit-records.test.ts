// src/pit/records.ts, the journal's on-disk records, byte for byte: the 4 KiB segment header and
// the record (48-byte header, 24-byte entries, block data in table order, CRC32C over the header
// with its CRC field zeroed and then the payload). The expected bytes are built here by hand from
// the layout, and the CRC by a table-driven CRC32C written here too, so the tests check the
// encoder (and the addon's crc32c) rather than restate them. A torn record (every prefix), a flipped
// byte anywhere, a wrong magic and a size that does not match the entry table all decode to null.

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import {
  decodeRecord,
  decodeSegmentHeader,
  encodeRecord,
  encodeSegmentHeader,
  ENTRY_SIZE,
  ENTRY_ZERO,
  peekRecord,
  REC,
  RECORD_HEADER,
  RECORD_MAGIC,
  recordSize,
  SEGMENT_HEADER,
  type EntryToWrite,
} from "../../src/pit/records.js";
import { crc32c } from "../../src/blockio/index.js";

// ---- an independent CRC32C (Castagnoli, reflected polynomial 0x82F63B78)

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function refCrc32c(...parts: Uint8Array[]): number {
  let c = 0xffffffff;
  for (const p of parts) for (const b of p) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function u64le(v: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v));
  return b;
}
function u32le(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v >>> 0);
  return b;
}
function u16le(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16LE(v);
  return b;
}
function f64le(v: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeDoubleLE(v);
  return b;
}

/** The record as the format describes it, assembled field by field. */
function expectedRecord(type: number, seq: number, entries: EntryToWrite[], blockSize: number): Buffer {
  const table = Buffer.concat(
    entries.map((e) =>
      Buffer.concat([
        u64le(e.block),
        f64le(e.ts),
        u32le(e.sources),
        u32le(e.data === null ? e.flags | ENTRY_ZERO : e.flags & ~ENTRY_ZERO),
      ]),
    ),
  );
  const data = Buffer.concat(
    entries.filter((e) => e.data !== null).map((e) => e.data!.subarray(0, blockSize)),
  );
  const payload = Buffer.concat([table, data]);
  const header = Buffer.concat([
    u32le(0x42464a52),
    u16le(type),
    u16le(0),
    u32le(entries.length),
    u32le(payload.length),
    f64le(entries.length ? entries[0].ts : 0),
    f64le(entries.length ? entries[entries.length - 1].ts : 0),
    u64le(seq),
    u32le(0), // CRC, zero while it is computed
    u32le(0),
  ]);
  assert.equal(header.length, 48);
  header.writeUInt32LE(refCrc32c(header, payload), 40);
  return Buffer.concat([header, payload]);
}

const BS = 4096;

function sampleEntries(): EntryToWrite[] {
  return [
    { block: 0, ts: 1_700_000_000_000.125, sources: 1, flags: 0, data: randomBytes(BS) },
    { block: 7, ts: 1_700_000_000_000.5, sources: 1 << 31, flags: 0, data: null },
    { block: 2 ** 40 + 3, ts: 1_700_000_000_001.001, sources: 0b1010, flags: 0, data: randomBytes(BS) },
    // A data entry whose caller set the zero flag by mistake: the data decides, the flag is cleared.
    { block: 12345, ts: 1_700_000_000_002, sources: 4, flags: ENTRY_ZERO, data: randomBytes(BS) },
  ];
}

void describe("CRC32C", () => {
  void test("the reference CRC32C and the addon agree with the standard check value", () => {
    assert.equal(refCrc32c(Buffer.from("123456789")), 0xe3069283);
    assert.equal(crc32c(Buffer.from("123456789")), 0xe3069283);
  });
  void test("the addon's seed continues a CRC over concatenated buffers", () => {
    for (let i = 0; i < 50; i++) {
      const a = randomBytes(1 + ((i * 37) % 300));
      const b = randomBytes(1 + ((i * 91) % 5000));
      assert.equal(crc32c(b, crc32c(a)), refCrc32c(a, b));
    }
  });
});

void describe("segment header", () => {
  const h = {
    segment: 2 ** 33 + 17,
    journalId: "0123456789abcdef",
    blockSize: 4096,
    windowMs: 250,
    created: 1_763_000_000_123.456,
  };

  void test("encodes to 4 KiB in the documented layout", () => {
    const b = encodeSegmentHeader(h);
    assert.equal(b.length, SEGMENT_HEADER);
    assert.equal(SEGMENT_HEADER, 4096);
    const want = Buffer.concat([
      Buffer.from("BFJSEG01", "latin1"),
      u32le(1), // format
      u32le(4096),
      u64le(h.segment),
      Buffer.from(h.journalId, "hex"),
      f64le(h.created),
      f64le(h.windowMs),
    ]);
    assert.equal(want.length, 48);
    assert.deepEqual(b.subarray(0, 48), want);
    assert.equal(b.readUInt32LE(48), refCrc32c(want));
    assert.ok(
      b.subarray(52).every((x) => x === 0),
      "the rest of the header is zero",
    );
  });

  void test("decodes what it encodes", () => {
    assert.deepEqual(decodeSegmentHeader(encodeSegmentHeader(h)), h);
  });

  void test("a damaged, foreign, short or newer-format header decodes to null", () => {
    const good = encodeSegmentHeader(h);
    for (const at of [0, 7, 8, 12, 16, 24, 31, 32, 40, 47, 48, 51]) {
      const b = Buffer.from(good);
      b[at] ^= 0x01;
      assert.equal(decodeSegmentHeader(b), null, `byte ${at} flipped`);
    }
    assert.equal(decodeSegmentHeader(good.subarray(0, 51)), null);
    assert.equal(decodeSegmentHeader(Buffer.alloc(4096)), null);
    // Format 2 with a correct CRC: still refused.
    const v2 = Buffer.from(good);
    v2.writeUInt32LE(2, 8);
    v2.writeUInt32LE(refCrc32c(v2.subarray(0, 48)), 48);
    assert.equal(decodeSegmentHeader(v2), null);
    // Bytes after the CRC are not covered: the header still decodes.
    const tail = Buffer.from(good);
    tail[100] = 0xff;
    assert.deepEqual(decodeSegmentHeader(tail), h);
  });
});

void describe("records", () => {
  void test("constants match the format", () => {
    assert.equal(RECORD_MAGIC, 0x42464a52);
    assert.equal(Buffer.from(u32le(RECORD_MAGIC)).toString("latin1"), "RJFB"); // "BFJR" as a LE u32
    assert.equal(RECORD_HEADER, 48);
    assert.equal(ENTRY_SIZE, 24);
    assert.equal(REC.IMAGES, 1);
    assert.equal(REC.MERGES, 2);
    assert.equal(ENTRY_ZERO, 1);
  });

  void test("an images record encodes byte for byte", () => {
    const entries = sampleEntries();
    const size = recordSize(entries, BS);
    assert.equal(size, 48 + 24 * 4 + 3 * BS);
    const out = Buffer.alloc(size + 100, 0xee);
    assert.equal(encodeRecord(out, 50, REC.IMAGES, 2 ** 35 + 9, entries, BS), size);
    assert.deepEqual(out.subarray(50, 50 + size), expectedRecord(REC.IMAGES, 2 ** 35 + 9, entries, BS));
    assert.ok(
      out.subarray(0, 50).every((x) => x === 0xee),
      "bytes before the record untouched",
    );
    assert.ok(
      out.subarray(50 + size).every((x) => x === 0xee),
      "bytes after the record untouched",
    );
  });

  void test("a merges record (no data) and an empty record encode byte for byte", () => {
    const merges: EntryToWrite[] = [
      { block: 3, ts: 10.5, sources: 2, flags: ENTRY_ZERO, data: null },
      { block: 9, ts: 11.25, sources: 1 << 5, flags: 0, data: null },
    ];
    const out = Buffer.alloc(recordSize(merges, BS));
    assert.equal(out.length, 48 + 48);
    encodeRecord(out, 0, REC.MERGES, 1, merges, BS);
    assert.deepEqual(out, expectedRecord(REC.MERGES, 1, merges, BS));
    const empty = Buffer.alloc(recordSize([], BS));
    assert.equal(empty.length, 48);
    encodeRecord(empty, 0, REC.IMAGES, 5, [], BS);
    assert.deepEqual(empty, expectedRecord(REC.IMAGES, 5, [], BS));
  });

  void test("only blockSize bytes of each data buffer are stored (other block sizes too)", () => {
    for (const bs of [512, 4096, 65536]) {
      const long = randomBytes(bs + 1000);
      const entries: EntryToWrite[] = [{ block: 1, ts: 1, sources: 1, flags: 0, data: long }];
      const out = Buffer.alloc(recordSize(entries, bs));
      assert.equal(out.length, 48 + 24 + bs);
      encodeRecord(out, 0, REC.IMAGES, 1, entries, bs);
      assert.deepEqual(out.subarray(72), long.subarray(0, bs));
      const info = decodeRecord(out, 0, bs);
      assert.ok(info);
      assert.equal(info.size, out.length);
    }
  });

  void test("decodes what it encodes, at any offset in a buffer", () => {
    const entries = sampleEntries();
    const size = recordSize(entries, BS);
    const buf = Buffer.alloc(3 + size + 4096);
    encodeRecord(buf, 3, REC.IMAGES, 77, entries, BS);
    const info = decodeRecord(buf, 3, BS);
    assert.ok(info, "decodeRecord refused a good record");
    assert.equal(info.type, REC.IMAGES);
    assert.equal(info.count, 4);
    assert.equal(info.size, size);
    assert.equal(info.payloadLength, size - 48);
    assert.equal(info.recordSeq, 77);
    assert.equal(info.tsFirst, entries[0].ts);
    assert.equal(info.tsLast, entries[3].ts);
    assert.equal(info.dataStart, 48 + 24 * 4);
    assert.deepEqual(
      info.entries,
      entries.map((e) => ({
        block: e.block,
        ts: e.ts,
        sources: e.sources >>> 0,
        flags: e.data === null ? ENTRY_ZERO : 0,
      })),
    );
    // The data of the entries that carry it, in table order.
    let d = 3 + info.dataStart;
    for (const e of entries) {
      if (e.data === null) continue;
      assert.deepEqual(buf.subarray(d, d + BS), e.data);
      d += BS;
    }
    // Two records back to back: the second decodes at the first one's end.
    const two = Buffer.alloc(2 * size);
    encodeRecord(two, 0, REC.IMAGES, 1, entries, BS);
    encodeRecord(two, size, REC.IMAGES, 2, entries.slice(1), BS);
    assert.equal(decodeRecord(two, size, BS)?.recordSeq, 2);
  });

  void test("a torn record (every prefix of it) decodes to null", () => {
    const entries = sampleEntries().slice(0, 2);
    const size = recordSize(entries, BS);
    const full = Buffer.alloc(size);
    encodeRecord(full, 0, REC.IMAGES, 3, entries, BS);
    assert.ok(decodeRecord(full, 0, BS));
    for (let n = 0; n < size; n++) {
      assert.equal(decodeRecord(full.subarray(0, n), 0, BS), null, `prefix of ${n} bytes`);
    }
    // A prefix followed by zeroes (a pre-allocated segment file whose write was cut short).
    for (const n of [48, 60, 72, 100, 2048, size - 1]) {
      const b = Buffer.alloc(size + 4096);
      full.copy(b, 0, 0, n);
      assert.equal(decodeRecord(b, 0, BS), null, `prefix of ${n} bytes then zeroes`);
    }
  });

  void test("a flipped bit anywhere in the record is a CRC mismatch (null)", () => {
    const entries = sampleEntries();
    const size = recordSize(entries, BS);
    const good = Buffer.alloc(size);
    encodeRecord(good, 0, REC.IMAGES, 3, entries, BS);
    // Every header byte, every table byte, and a spread of data bytes.
    const positions = [...Array(48 + 24 * 4).keys()];
    for (let p = 48 + 24 * 4; p < size; p += 509) positions.push(p);
    positions.push(size - 1);
    for (const p of positions) {
      const b = Buffer.from(good);
      b[p] ^= 1 << (p % 8);
      assert.equal(decodeRecord(b, 0, BS), null, `bit flipped at byte ${p}`);
    }
  });

  void test("a record with a good CRC but a size that does not fit its table decodes to null", () => {
    // One zero-image entry whose payload claims a data block it does not announce in the table.
    const entries: EntryToWrite[] = [{ block: 1, ts: 1, sources: 1, flags: 0, data: null }];
    const b = Buffer.alloc(48 + 24 + BS);
    encodeRecord(b, 0, REC.IMAGES, 1, entries, BS);
    b.writeUInt32LE(24 + BS, 12); // payload length now includes one block
    b.writeUInt32LE(0, 40);
    b.writeUInt32LE(refCrc32c(b.subarray(0, 48), b.subarray(48)), 40);
    assert.equal(decodeRecord(b, 0, BS), null);
  });

  void test("peekRecord reads type, count and size without checking the CRC; wrong magic is null", () => {
    const entries = sampleEntries();
    const size = recordSize(entries, BS);
    const b = Buffer.alloc(size);
    encodeRecord(b, 0, REC.IMAGES, 3, entries, BS);
    b[size - 1] ^= 0xff; // damaged data: peek does not care
    assert.deepEqual(peekRecord(b, 0), { type: REC.IMAGES, count: 4, size });
    assert.equal(decodeRecord(b, 0, BS), null);
    const bad = Buffer.from(b);
    bad[0] ^= 1;
    assert.equal(peekRecord(bad, 0), null);
    assert.equal(peekRecord(b.subarray(0, 47), 0), null);
    assert.equal(
      peekRecord(Buffer.alloc(4096), 0),
      null,
      "zeroes (unwritten segment space) are not a record",
    );
  });
});
