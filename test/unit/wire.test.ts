// src/nbd/wire.ts byte for byte: every encoder against hand-written expected bytes (from
// doc/proto.md of NetworkBlockDevice/nbd), request decode/encode, and the u64 helpers.

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import {
  decodeRequest,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContext,
  encodeOptionReply,
  encodeRequest,
  encodeServerReplyData,
  INFO,
  readU64,
  writeSimpleReply,
  writeStructuredHeader,
  writeU64,
  type Request,
} from "../../src/nbd/wire.js";

/** Bytes from a hex string with optional spaces. */
function hex(s: string): Buffer {
  return Buffer.from(s.replace(/\s+/g, ""), "hex");
}

const OPT_REPLY_MAGIC = "0003e889045565a9";

void describe("handshake encoders", () => {
  void test("greeting: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES", () => {
    assert.deepEqual(encodeGreeting(), hex("4e42444d41474943 49484156454f5054 0003"));
  });

  void test("option reply without data", () => {
    assert.deepEqual(encodeOptionReply(7, 1), hex(`${OPT_REPLY_MAGIC} 00000007 00000001 00000000`));
  });

  void test("option reply with data and an error type", () => {
    const b = encodeOptionReply(6, 0x80000006, Buffer.from("no"));
    assert.deepEqual(b, hex(`${OPT_REPLY_MAGIC} 00000006 80000006 00000002 6e6f`));
  });

  void test("option reply echoes an option code above 2^31", () => {
    const b = encodeOptionReply(0xfffffffe, 0x80000001);
    assert.deepEqual(b, hex(`${OPT_REPLY_MAGIC} fffffffe 80000001 00000000`));
  });

  void test("NBD_REP_SERVER data with and without a description", () => {
    assert.deepEqual(encodeServerReplyData("ab", "desc"), hex("00000002 6162 64657363"));
    assert.deepEqual(encodeServerReplyData("ab"), hex("00000002 6162"));
    assert.deepEqual(encodeServerReplyData(""), hex("00000000"));
    // The length is in bytes, not characters.
    assert.deepEqual(encodeServerReplyData("é"), hex("00000002 c3a9"));
  });

  void test("NBD_INFO_EXPORT: type 0, u64 size, u16 flags", () => {
    assert.deepEqual(encodeInfoExport(0x123456789, 0x1234), hex("0000 0000000123456789 1234"));
    assert.deepEqual(encodeInfoExport(64 * 1024 * 1024, 0x0d6d), hex("0000 0000000004000000 0d6d"));
  });

  void test("NBD_INFO_NAME and NBD_INFO_DESCRIPTION", () => {
    assert.deepEqual(encodeInfoString(INFO.NAME, "disk"), hex("0001 6469736b"));
    assert.deepEqual(encodeInfoString(INFO.DESCRIPTION, "a b"), hex("0002 612062"));
    assert.deepEqual(encodeInfoString(INFO.NAME, ""), hex("0001"));
  });

  void test("NBD_INFO_BLOCK_SIZE: type 3, min, preferred, max", () => {
    assert.deepEqual(encodeInfoBlockSize(512, 4096, 33554432), hex("0003 00000200 00001000 02000000"));
    assert.deepEqual(encodeInfoBlockSize(1, 4096, 0xffffffff), hex("0003 00000001 00001000 ffffffff"));
  });

  void test("NBD_REP_META_CONTEXT data: id, name", () => {
    assert.deepEqual(
      encodeMetaContext(1, "base:allocation"),
      Buffer.concat([hex("00000001"), Buffer.from("base:allocation", "ascii")]),
    );
    assert.deepEqual(encodeMetaContext(0xdeadbeef, "x:y"), hex("deadbeef 783a79"));
  });

  void test("EXPORT_NAME reply with NO_ZEROES: size and flags only", () => {
    assert.deepEqual(encodeExportNameReply(0x10000000, 0x0003, true), hex("0000000010000000 0003"));
  });

  void test("EXPORT_NAME reply without NO_ZEROES: 124 zero bytes follow", () => {
    const b = encodeExportNameReply(0x10000000, 0x0003, false);
    assert.equal(b.length, 134);
    assert.deepEqual(b.subarray(0, 10), hex("0000000010000000 0003"));
    assert.deepEqual(b.subarray(10), Buffer.alloc(124));
  });
});

void describe("transmission encoders", () => {
  void test("simple reply at an offset, neighbours untouched", () => {
    const b = Buffer.alloc(20, 0xaa);
    writeSimpleReply(b, 2, 28, 0x01020304, 0x05060708);
    assert.deepEqual(b, hex("aaaa 67446698 0000001c 01020304 05060708 aaaa"));
  });

  void test("structured reply header", () => {
    const b = Buffer.alloc(22, 0x55);
    writeStructuredHeader(b, 1, 1, 2, 0xfffffffe, 0x80000000, 0x10000c);
    assert.deepEqual(b, hex("55 668e33ef 0001 0002 fffffffe 80000000 0010000c 55"));
  });

  void test("error chunk: DONE, type 0x8001, error, message", () => {
    const b = encodeErrorChunk(0, 7, 22, "bad");
    assert.deepEqual(b, hex("668e33ef 0001 8001 00000000 00000007 00000009 00000016 0003 626164"));
  });

  void test("error chunk with an empty message", () => {
    assert.deepEqual(
      encodeErrorChunk(1, 2, 5, ""),
      hex("668e33ef 0001 8001 00000001 00000002 00000006 00000005 0000"),
    );
  });

  void test("error chunk message is capped at 4096 bytes", () => {
    const b = encodeErrorChunk(0, 1, 5, "x".repeat(10000));
    assert.equal(b.readUInt16BE(24), 4096);
    assert.equal(b.readUInt32BE(16), 6 + 4096);
    assert.equal(b.length, 20 + 6 + 4096);
  });

  void test("error chunk message stays valid UTF-8 when capped", () => {
    // proto.md: strings are UTF-8 and at most 4096 bytes. 1 + 2*4095 bytes must be cut at a
    // character boundary, not in the middle of a two-byte character.
    const b = encodeErrorChunk(0, 1, 5, "a" + "é".repeat(4095));
    const len = b.readUInt16BE(24);
    assert.ok(len <= 4096);
    assert.equal(b.readUInt32BE(16), 6 + len);
    assert.equal(b.length, 26 + len);
    const text = new TextDecoder("utf-8", { fatal: true }).decode(b.subarray(26));
    assert.ok(text.startsWith("aé"));
  });
});

void describe("requests", () => {
  const header = hex("25609513 0001 0001 01020304 05060708 0000000100000200 00001000");

  void test("decodeRequest reads every field", () => {
    assert.deepEqual(decodeRequest(header, 0), {
      flags: 1,
      type: 1,
      cookieHi: 0x01020304,
      cookieLo: 0x05060708,
      offset: 0x100000200,
      length: 0x1000,
    });
  });

  void test("decodeRequest at an offset inside a larger buffer", () => {
    const b = Buffer.concat([Buffer.alloc(5, 0xff), header, Buffer.alloc(3, 0xff)]);
    assert.equal(decodeRequest(b, 5)?.offset, 0x100000200);
  });

  void test("decodeRequest returns null on a wrong magic", () => {
    for (const magic of ["25609512", "67446698", "00000000", "95136025"]) {
      const b = Buffer.from(header);
      hex(magic).copy(b, 0);
      assert.equal(decodeRequest(b, 0), null, magic);
    }
  });

  void test("encodeRequest produces the expected bytes", () => {
    const r: Request = {
      flags: 1,
      type: 1,
      cookieHi: 0x01020304,
      cookieLo: 0x05060708,
      offset: 0x100000200,
      length: 0x1000,
    };
    assert.deepEqual(encodeRequest(r), header);
  });

  void test("encode/decode round trips at the edges of every field", () => {
    const cases: Request[] = [
      { flags: 0, type: 0, cookieHi: 0, cookieLo: 0, offset: 0, length: 0 },
      {
        flags: 0xffff,
        type: 0xffff,
        cookieHi: 0xffffffff,
        cookieLo: 0xffffffff,
        offset: 2 ** 53 - 1,
        length: 0xffffffff,
      },
      { flags: 0x10, type: 7, cookieHi: 0x80000000, cookieLo: 1, offset: 2 ** 32, length: 2 ** 31 },
      { flags: 8, type: 6, cookieHi: 1, cookieLo: 0x80000000, offset: 2 ** 32 - 1, length: 1 },
    ];
    for (const r of cases) assert.deepEqual(decodeRequest(encodeRequest(r), 0), r);
  });

  void test("an offset of 2^64-1 decodes to an unsafe number (validation refuses it)", () => {
    const b = Buffer.from(header);
    b.fill(0xff, 16, 24);
    const r = decodeRequest(b, 0)!;
    assert.ok(r.offset > Number.MAX_SAFE_INTEGER);
    assert.ok(!Number.isSafeInteger(r.offset));
  });
});

void describe("u64 helpers", () => {
  const cases: [number, string][] = [
    [0, "0000000000000000"],
    [1, "0000000000000001"],
    [2 ** 32 - 1, "00000000ffffffff"],
    [2 ** 32, "0000000100000000"],
    [2 ** 32 + 1, "0000000100000001"],
    [2 ** 53 - 1, "001fffffffffffff"],
    [2 ** 53 - 2 ** 32, "001fffff00000000"],
  ];
  for (const [v, h] of cases) {
    void test(`writeU64/readU64 ${v}`, () => {
      const b = Buffer.alloc(10, 0xcc);
      writeU64(b, 1, v);
      assert.deepEqual(b, Buffer.concat([hex("cc"), hex(h), hex("cc")]));
      assert.equal(readU64(b, 1), v);
      assert.equal(b.readBigUInt64BE(1), BigInt(v));
    });
  }

  void test("readU64 above 2^53 rounds to the nearest double", () => {
    assert.equal(readU64(hex("0020000000000000"), 0), 2 ** 53);
    // 2^64-1 is not representable; the nearest double is 2^64.
    assert.equal(readU64(hex("ffffffffffffffff"), 0), 2 ** 64);
  });
});
