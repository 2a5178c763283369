// A seeded, time-bounded fuzzer for the NBD server (in-process, MemoryVolume exports): random and
// mutated handshakes, request streams (valid requests with bit flips, truncation, random lengths,
// random commands and flags, garbage), and raw garbage, over many concurrent connections.
//
// What must hold:
// - the process never throws (uncaughtException / unhandledRejection fail the test), and the
//   server logs no error (an error line means an unexpected exception in a connection);
// - every connection answers and ends: the replies are well-formed and answer exactly the
//   requests the server could frame (computed here from the bytes sent, the way the protocol
//   frames them), and once the client half-closes, the server closes;
// - afterwards no connection is left open, and a well-behaved client does a verified write/read.
//
// BLOCKFORK_FUZZ_SECONDS (default 25) bounds the run; BLOCKFORK_FUZZ_SEED replays a run (the
// inputs of case i depend only on the seed and i); BLOCKFORK_FUZZ_CASE runs one case alone.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { randomInt } from "node:crypto";
import { MemoryVolume } from "../../src/volume/memory.js";
import { readOnly } from "../../src/volume/readonly.js";
import {
  infoRequestData,
  metaContextData,
  optionBytes,
  requestBytes,
  startTestServer,
  type RawClient,
  type RawRequest,
  type TestServer,
} from "../helpers/raw-client.js";

const SECONDS = Number(process.env.BLOCKFORK_FUZZ_SECONDS ?? 25);
const SEED =
  process.env.BLOCKFORK_FUZZ_SEED !== undefined
    ? Number(process.env.BLOCKFORK_FUZZ_SEED)
    : randomInt(2 ** 31);
const ONLY_CASE =
  process.env.BLOCKFORK_FUZZ_CASE !== undefined ? Number(process.env.BLOCKFORK_FUZZ_CASE) : undefined;
const LOG_LEVEL = process.env.BLOCKFORK_FUZZ_LOG === "debug" ? "debug" : "error";
const WORKERS = ONLY_CASE === undefined ? 8 : 1;
const CASE_TIMEOUT_MS = 15_000;

const EXPORTS = [
  { name: "mem", size: 4 * 1024 * 1024 },
  { name: "ro", size: 1024 * 1024 },
  { name: "blk", size: 2 * 1024 * 1024 },
];
const NBD_ERRORS = new Set([1, 5, 12, 22, 28, 75, 95, 108]);
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_MAGIC = 0x67446698;
const STRUCTURED_MAGIC = 0x668e33ef;
const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;

// ---- deterministic randomness

/** mulberry32: small, fast, good enough for test inputs. */
class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  next(): number {
    let t = (this.s = (this.s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)];
  }
  u32(): number {
    return (this.int(0x10000) * 0x10000 + this.int(0x10000)) >>> 0;
  }
  u64(): bigint {
    return (BigInt(this.u32()) << 32n) | BigInt(this.u32());
  }
  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) b[i] = this.int(256);
    return b;
  }
}

function caseSeed(seed: number, index: number): number {
  let h = (seed ^ Math.imul(index + 1, 0x9e3779b1)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b) >>> 0;
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35) >>> 0;
  return (h ^ (h >>> 16)) >>> 0;
}

/** Damage a byte stream a little: bit flips, byte overwrites, truncation, insertion. */
function mutate(rng: Rng, b: Buffer): Buffer {
  let out: Buffer = Buffer.from(b);
  const n = rng.range(1, 4);
  for (let i = 0; i < n && out.length > 0; i++) {
    switch (rng.int(5)) {
      case 0: {
        const at = rng.int(out.length);
        out[at] = out[at] ^ (1 << rng.int(8));
        break;
      }
      case 1:
        out[rng.int(out.length)] = rng.int(256);
        break;
      case 2:
        out = out.subarray(0, rng.int(out.length));
        break;
      case 3: {
        const at = rng.int(out.length + 1);
        out = Buffer.concat([out.subarray(0, at), rng.bytes(rng.range(1, 40)), out.subarray(at)]);
        break;
      }
      default: {
        // Overwrite a 32-bit field at a 4-byte boundary with an edge value.
        if (out.length >= 4) {
          const at = rng.int(Math.floor(out.length / 4)) * 4;
          out.writeUInt32BE(
            rng.pick([0, 1, 0x7fffffff, 0x80000000, 0xffffffff, 65536, 65537, 16 * 1024 * 1024 + 1]),
            at,
          );
        }
      }
    }
  }
  return out;
}

// ---- case generators

const NAMES = ["", "mem", "ro", "blk", "nope", "mem\0", "é".repeat(3)];

function randomOption(rng: Rng): Buffer {
  const name = rng.pick(NAMES);
  switch (rng.int(12)) {
    case 0:
      return optionBytes(3); // LIST
    case 1:
      return optionBytes(8); // STRUCTURED_REPLY
    case 2:
    case 3:
      return optionBytes(
        rng.pick([6, 7]),
        infoRequestData(
          name,
          Array.from({ length: rng.int(4) }, () => rng.int(5)),
        ),
      );
    case 4:
    case 5: {
      const queries = Array.from({ length: rng.int(3) }, () =>
        rng.pick(["base:allocation", "base:", "x-a:b", "nocolon", "", "qemu:dirty-bitmap:x"]),
      );
      return optionBytes(rng.pick([9, 10]), metaContextData(name, queries));
    }
    case 6:
      return optionBytes(5); // STARTTLS
    case 7:
      return optionBytes(rng.pick([4, 11, 12, 99, rng.u32()]), rng.bytes(rng.int(20)));
    case 8:
      return optionBytes(2); // ABORT
    case 9:
      return optionBytes(1, Buffer.from(name)); // EXPORT_NAME
    case 10:
      return optionBytes(rng.pick([3, 7, 9]), Buffer.alloc(rng.pick([64 * 1024 + 1, 70000, 1])));
    default:
      return optionBytes(rng.u32(), Buffer.alloc(0), rng.pick([0, 5, 100]));
  }
}

/** Client flags and options, maybe mutated. */
function handshakeBytes(rng: Rng): Buffer {
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(rng.chance(0.85) ? 3 : rng.pick([0, 1, 2, 4, rng.u32()]));
  const parts: Buffer[] = [flags];
  const n = rng.range(0, rng.chance(0.05) ? 300 : 6);
  for (let i = 0; i < n; i++) parts.push(randomOption(rng));
  if (rng.chance(0.4)) parts.push(optionBytes(7, infoRequestData(rng.pick(NAMES))));
  if (rng.chance(0.3)) parts.push(rng.bytes(rng.int(200)));
  const b = Buffer.concat(parts);
  return rng.chance(0.5) ? mutate(rng, b) : b;
}

function randomRequest(rng: Rng, size: number, cookie: bigint): [RawRequest, Buffer | null] {
  const type = rng.chance(0.9)
    ? rng.pick([0, 0, 1, 1, 1, 3, 4, 5, 6, 7])
    : rng.pick([2, 8, 9, 100, rng.int(0x10000)]);
  const flags = rng.chance(0.7) ? rng.pick([0, 0, 0, 1, 2, 4, 8, 16, 17, 3]) : rng.int(0x10000);
  let offset: number | bigint;
  let length: number;
  if (rng.chance(0.85)) {
    length = rng.chance(0.8) ? rng.range(1, 8192) : rng.range(1, 300 * 1024);
    if (rng.chance(0.5)) length = Math.max(512, length - (length % 512));
    offset = rng.int(Math.max(1, size - length));
    if (rng.chance(0.5)) offset -= offset % 512;
  } else {
    length = rng.pick([0, 1, 0xffffffff, 33 * 1024 * 1024, rng.u32()]);
    offset = rng.pick<number | bigint>([size, size - 1, 2 ** 53, 2n ** 64n - 1n, rng.u64()]);
  }
  if (type === 3 && rng.chance(0.8)) {
    offset = 0;
    length = 0;
  }
  const req: RawRequest = { type, flags, cookie, offset, length };
  // The header announces `length`; a payload follows only for WRITE, and never more than 300 KiB
  // here (a header announcing more is a truncated request).
  const payload = type === 1 ? rng.bytes(Math.min(length, 300 * 1024)) : null;
  return [req, payload];
}

/** A request stream for one session, maybe mutated. */
function requestStream(rng: Rng, size: number): Buffer {
  const parts: Buffer[] = [];
  const n = rng.range(1, 60);
  for (let i = 0; i < n; i++) {
    const [req, payload] = randomRequest(rng, size, rng.u64());
    parts.push(requestBytes(req));
    if (payload) parts.push(payload);
  }
  if (rng.chance(0.2)) parts.push(requestBytes({ type: 2, cookie: rng.u64() }));
  if (rng.chance(0.1)) parts.push(rng.bytes(rng.int(100)));
  const b = Buffer.concat(parts);
  return rng.chance(0.5) ? mutate(rng, b) : b;
}

// ---- oracles: frame what was sent the way the server must, then check what came back

interface Framed {
  type: number;
  flags: number;
  cookie: bigint;
  offset: bigint;
  length: number;
  /** A WRITE whose payload did not fully arrive: it may or may not be answered. */
  incomplete: boolean;
}

/**
 * The requests the server can frame from `b`: up to a bad magic, DISC, or the end. `closes`: the
 * server ends the connection before reading everything (so it may close while we still send).
 */
function frameRequests(b: Buffer): { requests: Framed[]; closes: boolean; end: string } {
  const out: Framed[] = [];
  let pos = 0;
  let closes = false;
  let end = "the client's close";
  while (pos + 28 <= b.length) {
    if (b.readUInt32BE(pos) !== REQUEST_MAGIC) {
      closes = true;
      end = "a bad request magic";
      break;
    }
    const r: Framed = {
      flags: b.readUInt16BE(pos + 4),
      type: b.readUInt16BE(pos + 6),
      cookie: b.readBigUInt64BE(pos + 8),
      offset: b.readBigUInt64BE(pos + 16),
      length: b.readUInt32BE(pos + 24),
      incomplete: false,
    };
    pos += 28;
    if (r.type === 2) {
      closes = true; // DISC: nothing after it is read
      end = "DISC";
      break;
    }
    if (r.type === 1) {
      if (pos + r.length > b.length) r.incomplete = true;
      pos += r.length;
    }
    out.push(r);
  }
  if (pos < b.length && pos + 28 > b.length && b.length - pos >= 4 && b.readUInt32BE(pos) !== REQUEST_MAGIC) {
    closes = true; // a partial header with a bad magic: the server may not wait for the rest
    end = "a bad request magic";
  }
  return { requests: out, closes, end };
}

/**
 * Check the reply stream `got` against the framed requests; failure message or null. With
 * `complete` false (the server closed while we were still sending, and Node dropped what it had
 * not read yet) `got` may be any prefix of the replies: only what arrived is checked.
 */
function checkReplies(got: Buffer, framed: Framed[], structured: boolean, complete: boolean): string | null {
  const pending = new Map<bigint, Framed[]>();
  for (const r of framed) {
    const list = pending.get(r.cookie) ?? [];
    list.push(r);
    pending.set(r.cookie, list);
  }
  const chunksOf = new Map<bigint, number>();
  let pos = 0;
  const take = (cookie: bigint): Framed | undefined => {
    const list = pending.get(cookie);
    const r = list?.shift();
    if (list && list.length === 0) pending.delete(cookie);
    return r;
  };
  const peekReq = (cookie: bigint): Framed | undefined => pending.get(cookie)?.[0];
  while (pos < got.length) {
    if (pos + 4 > got.length) return complete ? `truncated reply at ${pos}` : null;
    const magic = got.readUInt32BE(pos);
    if (magic === SIMPLE_MAGIC) {
      if (pos + 16 > got.length) return complete ? `truncated simple reply at ${pos}` : null;
      const error = got.readUInt32BE(pos + 4);
      const cookie = got.readBigUInt64BE(pos + 8);
      pos += 16;
      const req = take(cookie);
      if (!req) return `simple reply for unexpected cookie ${cookie}`;
      if (error !== 0 && !NBD_ERRORS.has(error)) return `unknown NBD error ${error}`;
      if (structured && req.type === 0) return "simple reply to READ with structured replies";
      if (req.type === 7 && error === 0) return "successful BLOCK_STATUS as a simple reply";
      if (req.type === 0 && error === 0) {
        if (pos + req.length > got.length)
          return complete ? `READ data truncated for cookie ${cookie}` : null;
        pos += req.length;
      }
    } else if (magic === STRUCTURED_MAGIC) {
      if (!structured) return "structured reply without negotiation";
      if (pos + 20 > got.length) return complete ? `truncated chunk header at ${pos}` : null;
      const flags = got.readUInt16BE(pos + 4);
      const type = got.readUInt16BE(pos + 6);
      const cookie = got.readBigUInt64BE(pos + 8);
      const len = got.readUInt32BE(pos + 16);
      pos += 20;
      if (pos + len > got.length) return complete ? `chunk payload truncated for cookie ${cookie}` : null;
      const p = got.subarray(pos, pos + len);
      pos += len;
      const req = peekReq(cookie);
      if (!req) return `chunk for unexpected cookie ${cookie} (type ${type})`;
      const reqEnd = req.offset + BigInt(req.length);
      if (type === 1 || type === 2) {
        if (req.type !== 0) return `read chunk for command ${req.type}`;
        const at = p.length >= 8 ? p.readBigUInt64BE(0) : -1n;
        const n = type === 1 ? BigInt(p.length - 8) : p.length === 12 ? BigInt(p.readUInt32BE(8)) : -1n;
        if (n <= 0n || at < req.offset || at + n > reqEnd)
          return `read chunk outside the request (type ${type})`;
        chunksOf.set(cookie, (chunksOf.get(cookie) ?? 0) + Number(n));
      } else if (type === 5) {
        if (req.type !== 7) return "BLOCK_STATUS chunk for another command";
        if (p.length < 12 || (p.length - 4) % 8 !== 0) return `BLOCK_STATUS payload of ${p.length} bytes`;
        if (req.flags & 8 && p.length !== 12) return "REQ_ONE with more than one descriptor";
        let sum = 0;
        for (let i = 4; i < p.length; i += 8) sum += p.readUInt32BE(i);
        if (sum === 0 || sum > req.length) return `BLOCK_STATUS lengths sum to ${sum} for ${req.length}`;
      } else if (type === 0x8001 || type === 0x8002) {
        if (p.length < 6) return "short error chunk";
        const error = p.readUInt32BE(0);
        const mlen = p.readUInt16BE(4);
        if (!NBD_ERRORS.has(error)) return `unknown NBD error ${error} in a chunk`;
        if (p.length !== 6 + mlen + (type === 0x8002 ? 8 : 0)) return "error chunk length mismatch";
      } else if (type !== 0) {
        return `unknown chunk type ${type}`;
      }
      if (flags & 1) {
        const r = take(cookie)!;
        if (r.type === 0 && !(type & 0x8000)) {
          const covered = chunksOf.get(cookie) ?? 0;
          if (covered !== r.length) return `READ chunks cover ${covered} of ${r.length} bytes`;
        }
        chunksOf.delete(cookie);
      }
    } else {
      return `bad reply magic 0x${magic.toString(16)} at ${pos}`;
    }
  }
  if (!complete) return null;
  for (const list of pending.values()) {
    for (const r of list) {
      if (!r.incomplete) return `no reply for cookie ${r.cookie} (command ${r.type})`;
    }
  }
  return null;
}

interface FramedOption {
  code: number;
  complete: boolean;
}

/** The options the server can frame after the greeting; `transmission` when a later phase may start. */
function frameOptions(b: Buffer): {
  flagsOk: boolean;
  fixed: boolean;
  options: FramedOption[];
  closes: boolean;
} {
  if (b.length < 4) return { flagsOk: true, fixed: true, options: [], closes: false };
  const flags = b.readUInt32BE(0);
  if (flags & ~3) return { flagsOk: false, fixed: false, options: [], closes: true };
  const options: FramedOption[] = [];
  let pos = 4;
  let closes = false;
  while (pos + 8 <= b.length) {
    if (options.length === 256 || b.toString("latin1", pos, pos + 8) !== "IHAVEOPT") {
      closes = true;
      break;
    }
    if (pos + 16 > b.length) break;
    const code = b.readUInt32BE(pos + 8);
    const len = b.readUInt32BE(pos + 12);
    if (len > 16 * 1024 * 1024) {
      closes = true;
      break;
    }
    const complete = pos + 16 + len <= b.length;
    options.push({ code, complete });
    if (!complete) break;
    pos += 16 + len;
    // EXPORT_NAME, ABORT and GO may end the handshake; whatever follows is not read as options.
    if (code === 1 || code === 2 || code === 7 || (flags & 1) === 0) {
      closes = true;
      break;
    }
  }
  return { flagsOk: true, fixed: (flags & 1) !== 0, options, closes };
}

/**
 * Check the option replies after the greeting; failure message or null. `writeFailed`: the server
 * closed while we were still sending, so `got` may be cut short (allowed only where the framing
 * says the server stops reading).
 */
function checkOptionReplies(got: Buffer, sent: Buffer, writeFailed: boolean): string | null {
  const { flagsOk, fixed, options, closes } = frameOptions(sent);
  if (writeFailed && !closes) return "the server closed the connection while the client was sending options";
  const complete = !writeFailed;
  if (!flagsOk) return got.length === 0 ? null : `${got.length} bytes after bad client flags`;
  let pos = 0;
  for (const o of options) {
    if (o.code === 1 || !fixed) return null; // EXPORT_NAME replies are not option replies
    for (;;) {
      if (pos === got.length) {
        // The server may stop answering only at an option that did not fully arrive.
        return o.complete && complete ? `no reply to option ${o.code}` : null;
      }
      if (pos + 20 > got.length) return complete ? `truncated option reply at ${pos}` : null;
      if (got.readBigUInt64BE(pos) !== OPTION_REPLY_MAGIC) return `bad option reply magic at ${pos}`;
      const option = got.readUInt32BE(pos + 8);
      const type = got.readUInt32BE(pos + 12);
      const len = got.readUInt32BE(pos + 16);
      if (option !== o.code) return `reply for option ${option} while ${o.code} was current`;
      if (pos + 20 + len > got.length) return complete ? "truncated option reply data" : null;
      if (type & 0x80000000 && len > 4096) return `error message of ${len} bytes`;
      pos += 20 + len;
      if (type === 1 || type & 0x80000000) {
        if (!o.complete) return `reply to option ${o.code} before its data arrived`;
        if (o.code === 7 && type === 1) return null; // GO succeeded: transmission follows
        if (o.code === 2) return pos === got.length ? null : "bytes after the ACK of ABORT";
        break;
      }
      if (![2, 3, 4].includes(type)) return `unknown reply type 0x${type.toString(16)}`;
    }
  }
  return null;
}

// ---- running cases

/** Send `b` in random pieces; stops early when the server closes its side. */
async function sendInPieces(rng: Rng, c: RawClient, b: Buffer): Promise<void> {
  let pos = 0;
  while (pos < b.length) {
    const n = Math.min(b.length - pos, rng.chance(0.3) ? rng.range(1, 64) : rng.range(64, 65536));
    if (!(await c.sendUnlessEnded(b.subarray(pos, pos + n)))) return;
    if (rng.chance(0.2)) await new Promise((r) => setImmediate(r));
    pos += n;
  }
}

async function runCase(srv: TestServer, index: number): Promise<void> {
  const rng = new Rng(caseSeed(SEED, index));
  const kind = rng.int(10);
  const c = await srv.connect();
  try {
    if (kind < 3) {
      // Handshake: random and mutated options.
      const greeting = await c.read(18, CASE_TIMEOUT_MS);
      assert.equal(greeting.toString("hex"), "4e42444d4147494349484156454f50540003");
      const sent = handshakeBytes(rng);
      await sendInPieces(rng, c, sent);
      c.end();
      const got = await c.readToEnd(CASE_TIMEOUT_MS);
      const problem = checkOptionReplies(got, sent, c.error !== null);
      if (problem) throw new Error(`handshake: ${problem}\nsent ${sent.toString("hex").slice(0, 400)}`);
    } else if (kind < 9) {
      // Transmission: a good handshake, then a random and mutated request stream.
      const ex = rng.pick(EXPORTS);
      const structured = rng.chance(0.5);
      const meta = structured && rng.chance(0.7);
      await c.handshake({ name: ex.name, structured, ...(meta ? { meta: ["base:allocation"] } : {}) });
      const sent = requestStream(rng, ex.size);
      await sendInPieces(rng, c, sent);
      c.end();
      const got = await c.readToEnd(CASE_TIMEOUT_MS);
      const framed = frameRequests(sent);
      const writeFailed = c.error !== null;
      if (writeFailed && !framed.closes) {
        throw new Error(
          `transmission on ${ex.name}: the server closed while the client was sending (${c.error!.message})`,
        );
      }
      const problem = checkReplies(got, framed.requests, structured, !writeFailed);
      if (problem)
        throw new Error(`transmission on ${ex.name}, stream ending with ${framed.end}: ${problem}`);
    } else {
      // Garbage from the first byte.
      await c.greeting(CASE_TIMEOUT_MS);
      await sendInPieces(rng, c, rng.bytes(rng.range(1, 5000)));
      c.end();
      await c.readToEnd(CASE_TIMEOUT_MS);
    }
  } finally {
    c.destroy();
  }
}

let srv: TestServer;
const processErrors: unknown[] = [];
const onProcessError = (e: unknown): void => {
  processErrors.push(e);
};

before(async () => {
  process.on("uncaughtException", onProcessError);
  process.on("unhandledRejection", onProcessError);
  srv = await startTestServer({
    exports: [
      { name: "mem", volume: new MemoryVolume(EXPORTS[0].size) },
      { name: "ro", volume: readOnly(new MemoryVolume(EXPORTS[1].size)) },
      {
        name: "blk",
        volume: new MemoryVolume(EXPORTS[2].size),
        blockSizes: { minimum: 512, preferred: 4096, maximum: 256 * 1024 },
      },
    ],
    handshakeTimeoutMs: 5000,
    logLevel: LOG_LEVEL,
  });
});
after(async () => {
  await srv.stop();
  process.off("uncaughtException", onProcessError);
  process.off("unhandledRejection", onProcessError);
});

void test(
  `fuzz the server for ${SECONDS} s (seed ${SEED})`,
  { timeout: (SECONDS + 120) * 1000 },
  async (t) => {
    console.log(`fuzz: seed ${SEED} (replay with BLOCKFORK_FUZZ_SEED=${SEED}), ${SECONDS} s`);
    t.diagnostic(`seed ${SEED}`);
    const deadline = Date.now() + SECONDS * 1000;
    let next = ONLY_CASE ?? 0;
    let ran = 0;
    // Distinct kinds of failure (the message with numbers blanked) -> first case that showed it.
    // The fuzzer keeps going after a failure so that one known bug does not hide others.
    const failures = new Map<string, string>();
    const worker = async (): Promise<void> => {
      while (failures.size < 20 && Date.now() < deadline) {
        const i = next++;
        if (ONLY_CASE !== undefined && i !== ONLY_CASE) return;
        try {
          let timer: NodeJS.Timeout | undefined;
          const hung = new Promise<never>((_, reject) => {
            timer = setTimeout(
              () => reject(new Error(`no progress for ${2 * CASE_TIMEOUT_MS} ms (hung)`)),
              2 * CASE_TIMEOUT_MS,
            );
          });
          try {
            await Promise.race([runCase(srv, i), hung]);
          } finally {
            clearTimeout(timer);
          }
          ran++;
        } catch (e) {
          const message = (e as Error).message;
          const kind = message
            .split("\n")[0]
            .replace(/ on \w+,/, ",")
            .replace(/\d+/g, "N");
          if (!failures.has(kind)) {
            failures.set(
              kind,
              `case ${i} (replay: BLOCKFORK_FUZZ_SEED=${SEED} BLOCKFORK_FUZZ_CASE=${i}): ${message}`,
            );
          }
        }
      }
    };
    await Promise.all(Array.from({ length: WORKERS }, worker));
    console.log(`fuzz: ${ran} cases passed, ${failures.size} kinds of failure`);
    t.diagnostic(`${ran} cases passed`);
    if (failures.size > 0) {
      if (LOG_LEVEL === "debug") console.log(srv.log.join(""));
      assert.fail(`${failures.size} kinds of failure:\n${[...failures.values()].join("\n")}`);
    }
    assert.ok(ran > 0, "at least one case ran");
    assert.deepEqual(processErrors, [], "no uncaught exception or unhandled rejection");
    const errors = srv.log.filter((l) => / error /.test(l));
    if (LOG_LEVEL === "debug") console.log(srv.log.join(""));
    assert.deepEqual(errors, [], "the server logged no errors");

    // Every connection ended.
    for (let i = 0; i < 100 && srv.server.connectionCount > 0; i++)
      await new Promise((r) => setTimeout(r, 50));
    assert.equal(srv.server.connectionCount, 0, "connections left open");

    // A well-behaved client still works.
    const c = await srv.connect();
    await c.handshake({ name: "mem" });
    const data = Buffer.alloc(65536);
    for (let i = 0; i < data.length; i++) data[i] = (i * 31 + SEED) & 0xff;
    assert.equal(await c.writeAt(1024 * 1024, data, 1n), 0);
    assert.ok((await c.readAt(1024 * 1024, 65536, 2n)).equals(data));
    await c.disconnect();
  },
);
