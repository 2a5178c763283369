// validateRequest (src/nbd/validate.ts): one case per rule, each with a passing twin so that a
// rule that refused everything would fail too.

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { validateRequest, type ValidationContext } from "../../src/nbd/validate.js";
import type { Request } from "../../src/nbd/wire.js";

// Numbers from doc/proto.md, written out so the test does not trust wire.ts's tables.
const READ = 0,
  WRITE = 1,
  FLUSH = 3,
  TRIM = 4,
  CACHE = 5,
  WRITE_ZEROES = 6,
  BLOCK_STATUS = 7;
const F_FUA = 1,
  F_NO_HOLE = 2,
  F_DF = 4,
  F_REQ_ONE = 8,
  F_FAST_ZERO = 16,
  F_PAYLOAD_LEN = 32;
const TF_HAS_FLAGS = 1,
  TF_READ_ONLY = 2,
  TF_SEND_FLUSH = 4,
  TF_SEND_FUA = 8,
  TF_SEND_TRIM = 32,
  TF_SEND_WRITE_ZEROES = 64,
  TF_SEND_DF = 128,
  TF_SEND_CACHE = 1024,
  TF_SEND_FAST_ZERO = 2048;
const EPERM = 1,
  EINVAL = 22,
  ENOSPC = 28;

const ALL =
  TF_HAS_FLAGS |
  TF_SEND_FLUSH |
  TF_SEND_FUA |
  TF_SEND_TRIM |
  TF_SEND_WRITE_ZEROES |
  TF_SEND_DF |
  TF_SEND_CACHE |
  TF_SEND_FAST_ZERO;
const SIZE = 1024 * 1024;

function ctx(over: Partial<ValidationContext> = {}): ValidationContext {
  return { size: SIZE, flags: ALL, blockStatus: true, minBlock: 1, maxBlock: 65536, ...over };
}

function req(type: number, over: Partial<Request> = {}): Request {
  const ranged = type !== FLUSH;
  return { flags: 0, type, cookieHi: 0, cookieLo: 1, offset: 0, length: ranged ? 4096 : 0, ...over };
}

/** The NBD error validateRequest answers with, or 0 for valid. */
function verdict(r: Request, c: ValidationContext = ctx()): number {
  const v = validateRequest(r, c);
  if (v !== null) {
    assert.equal(typeof v.message, "string");
    assert.ok(v.message.length > 0, "a rejection carries a message");
  }
  return v === null ? 0 : v.error;
}

void describe("validateRequest", () => {
  void test("every known command is valid in the plain case", () => {
    for (const t of [READ, WRITE, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS])
      assert.equal(verdict(req(t)), 0, `${t}`);
  });

  void test("unknown commands are EINVAL", () => {
    for (const t of [8, 9, 100, 0xffff]) assert.equal(verdict(req(t)), EINVAL, `${t}`);
  });

  void describe("flags", () => {
    void test("FUA only when SEND_FUA was advertised", () => {
      assert.equal(verdict(req(WRITE, { flags: F_FUA })), 0);
      assert.equal(verdict(req(WRITE, { flags: F_FUA }), ctx({ flags: ALL & ~TF_SEND_FUA })), EINVAL);
      // proto.md: FUA is valid on every command (and ignored where meaningless) once advertised.
      for (const t of [READ, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS]) {
        assert.equal(verdict(req(t, { flags: F_FUA })), 0, `FUA on ${t}`);
        assert.equal(
          verdict(req(t, { flags: F_FUA }), ctx({ flags: ALL & ~TF_SEND_FUA })),
          EINVAL,
          `FUA on ${t}`,
        );
      }
    });

    void test("DF only on READ, and only with SEND_DF", () => {
      assert.equal(verdict(req(READ, { flags: F_DF })), 0);
      assert.equal(verdict(req(READ, { flags: F_DF }), ctx({ flags: ALL & ~TF_SEND_DF })), EINVAL);
      for (const t of [WRITE, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS, FLUSH]) {
        assert.equal(verdict(req(t, { flags: F_DF })), EINVAL, `DF on ${t}`);
      }
    });

    void test("FAST_ZERO only on WRITE_ZEROES, and only with SEND_FAST_ZERO", () => {
      assert.equal(verdict(req(WRITE_ZEROES, { flags: F_FAST_ZERO })), 0);
      assert.equal(verdict(req(WRITE_ZEROES, { flags: F_FAST_ZERO | F_NO_HOLE | F_FUA })), 0);
      assert.equal(
        verdict(req(WRITE_ZEROES, { flags: F_FAST_ZERO }), ctx({ flags: ALL & ~TF_SEND_FAST_ZERO })),
        EINVAL,
      );
      for (const t of [READ, WRITE, TRIM])
        assert.equal(verdict(req(t, { flags: F_FAST_ZERO })), EINVAL, `${t}`);
    });

    void test("NO_HOLE only on WRITE_ZEROES", () => {
      assert.equal(verdict(req(WRITE_ZEROES, { flags: F_NO_HOLE })), 0);
      for (const t of [READ, WRITE, TRIM, CACHE])
        assert.equal(verdict(req(t, { flags: F_NO_HOLE })), EINVAL, `${t}`);
    });

    void test("REQ_ONE only on BLOCK_STATUS", () => {
      assert.equal(verdict(req(BLOCK_STATUS, { flags: F_REQ_ONE })), 0);
      for (const t of [READ, WRITE, TRIM, CACHE, WRITE_ZEROES, FLUSH]) {
        assert.equal(verdict(req(t, { flags: F_REQ_ONE })), EINVAL, `${t}`);
      }
    });

    void test("PAYLOAD_LEN (extended headers, not negotiated) and unknown flags are EINVAL", () => {
      for (const f of [F_PAYLOAD_LEN, 1 << 6, 1 << 10, 0x8000]) {
        assert.equal(verdict(req(READ, { flags: f })), EINVAL, `0x${f.toString(16)}`);
        assert.equal(verdict(req(WRITE, { flags: f })), EINVAL, `0x${f.toString(16)}`);
      }
    });
  });

  void describe("advertised commands", () => {
    const cases: [number, number][] = [
      [FLUSH, TF_SEND_FLUSH],
      [TRIM, TF_SEND_TRIM],
      [CACHE, TF_SEND_CACHE],
      [WRITE_ZEROES, TF_SEND_WRITE_ZEROES],
    ];
    for (const [t, tf] of cases) {
      void test(`command ${t} needs transmission flag 0x${tf.toString(16)}`, () => {
        assert.equal(verdict(req(t)), 0);
        assert.equal(verdict(req(t), ctx({ flags: ALL & ~tf })), EINVAL);
      });
    }

    void test("BLOCK_STATUS without a metadata context is EINVAL", () => {
      assert.equal(verdict(req(BLOCK_STATUS), ctx({ blockStatus: false })), EINVAL);
    });
  });

  void describe("read-only exports", () => {
    // What the handshake advertises for a read-only volume: no FUA, TRIM or WRITE_ZEROES.
    const ro = ctx({ flags: TF_HAS_FLAGS | TF_READ_ONLY | TF_SEND_FLUSH | TF_SEND_DF | TF_SEND_CACHE });

    void test("WRITE, TRIM and WRITE_ZEROES are EPERM", () => {
      for (const t of [WRITE, TRIM, WRITE_ZEROES]) assert.equal(verdict(req(t), ro), EPERM, `${t}`);
    });

    void test("EPERM also when the write-type command was advertised", () => {
      const c = ctx({ flags: ALL | TF_READ_ONLY });
      for (const t of [WRITE, TRIM, WRITE_ZEROES]) assert.equal(verdict(req(t), c), EPERM, `${t}`);
    });

    void test("EPERM also with FUA or FAST_ZERO, flags a read-only export does not advertise (as nbdkit)", () => {
      assert.equal(verdict(req(WRITE, { flags: F_FUA }), ro), EPERM);
      assert.equal(verdict(req(TRIM, { flags: F_FUA }), ro), EPERM);
      assert.equal(verdict(req(WRITE_ZEROES, { flags: F_FUA | F_FAST_ZERO }), ro), EPERM);
    });

    void test("READ, FLUSH, CACHE and BLOCK_STATUS still pass", () => {
      for (const t of [READ, FLUSH, CACHE, BLOCK_STATUS]) assert.equal(verdict(req(t), ro), 0, `${t}`);
    });
  });

  void describe("FLUSH", () => {
    void test("nonzero offset or length is EINVAL", () => {
      assert.equal(verdict(req(FLUSH, { offset: 512 })), EINVAL);
      assert.equal(verdict(req(FLUSH, { length: 512 })), EINVAL);
      assert.equal(verdict(req(FLUSH, { offset: 0, length: 0 })), 0);
    });
  });

  void describe("ranges", () => {
    void test("zero length is EINVAL for every ranged command", () => {
      for (const t of [READ, WRITE, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS]) {
        assert.equal(verdict(req(t, { length: 0 })), EINVAL, `${t}`);
      }
    });

    void test("a range ending exactly at the end is valid", () => {
      for (const t of [READ, WRITE, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS]) {
        assert.equal(verdict(req(t, { offset: SIZE - 4096, length: 4096 })), 0, `${t}`);
      }
    });

    void test("past the end: ENOSPC for WRITE and WRITE_ZEROES, EINVAL for the others (TRIM too)", () => {
      for (const t of [WRITE, WRITE_ZEROES]) {
        assert.equal(verdict(req(t, { offset: SIZE - 4096, length: 4097 })), ENOSPC, `${t}`);
        assert.equal(verdict(req(t, { offset: SIZE, length: 1 })), ENOSPC, `${t}`);
      }
      for (const t of [READ, TRIM, CACHE, BLOCK_STATUS]) {
        assert.equal(verdict(req(t, { offset: SIZE - 4096, length: 4097 })), EINVAL, `${t}`);
        assert.equal(verdict(req(t, { offset: SIZE, length: 1 })), EINVAL, `${t}`);
      }
    });

    void test("offsets at and above 2^53 are refused even on a huge export", () => {
      const huge = ctx({ size: Number.MAX_SAFE_INTEGER });
      assert.equal(verdict(req(READ, { offset: 2 ** 53 - 4097, length: 4096 }), huge), 0);
      assert.equal(verdict(req(READ, { offset: 2 ** 53, length: 4096 }), huge), EINVAL);
      assert.equal(verdict(req(READ, { offset: 2 ** 64, length: 1 }), huge), EINVAL);
      assert.equal(verdict(req(WRITE, { offset: 2 ** 60, length: 1 }), huge), ENOSPC);
      // The end, not only the offset, must stay exact.
      assert.equal(verdict(req(READ, { offset: 2 ** 53 - 2, length: 4 }), huge), EINVAL);
      // An offset no number holds exactly is not printed rounded.
      const m = validateRequest(req(READ, { offset: 2 ** 64 - 1024, length: 1024 }), huge)!.message;
      assert.match(m, /READ \[2\^53 or more, \+1024\)/);
    });

    void test("misalignment to minBlock > 1 is EINVAL", () => {
      const c = ctx({ minBlock: 512 });
      for (const t of [READ, WRITE, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS]) {
        assert.equal(verdict(req(t, { offset: 512, length: 1024 }), c), 0, `${t}`);
        assert.equal(verdict(req(t, { offset: 100, length: 1024 }), c), EINVAL, `${t} offset`);
        assert.equal(verdict(req(t, { offset: 512, length: 1000 }), c), EINVAL, `${t} length`);
      }
      // minBlock 1: any alignment.
      assert.equal(verdict(req(READ, { offset: 3, length: 5 })), 0);
    });

    void test("over maxBlock: EINVAL for READ, WRITE and CACHE only", () => {
      const c = ctx({ maxBlock: 65536 });
      for (const t of [READ, WRITE, CACHE]) {
        assert.equal(verdict(req(t, { length: 65536 }), c), 0, `${t}`);
        assert.equal(verdict(req(t, { length: 65537 }), c), EINVAL, `${t}`);
      }
      for (const t of [TRIM, WRITE_ZEROES, BLOCK_STATUS]) {
        assert.equal(verdict(req(t, { length: SIZE }), c), 0, `${t}`);
      }
    });
  });
});
