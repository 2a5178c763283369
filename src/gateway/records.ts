// The binary update records of the gateway API (docs/gateway-api.md, "POST .../updates"): pure
// encode and parse on Buffer, no I/O. The proxy's link writes each record with encodeHeader()
// straight into its batch slabs (encodeUpdates() builds a whole body, for tests and tools); the
// gateway parses them with parseUpdates(), which checks the whole body before anything is applied.
//
// Record layout (big-endian):
//   0  u32 magic 0x42465550 ("BFUP")    24 u64 offset in bytes
//   4  u8  kind (1 WRITE, 2 ZERO, 3 TRIM) 32 u32 length in bytes (> 0)
//   5  u8  flags (bit 0 RESYNC)         36 u32 reserved (0)
//   6  u16 reserved (0)                 40 data (WRITE only: `length` bytes)
//   8  u64 seq                          16 u64 period
//
// 64-bit fields are read as two u32 halves: a value of 2^53 or more is refused, so every number a
// caller sees is exact. Parsed WRITE data are views (subarray) into the body: no copy.

export const RECORD_MAGIC = 0x42465550;
export const RECORD_HEADER = 40;

/** Record kinds. */
export const KIND = { WRITE: 1, ZERO: 2, TRIM: 3 } as const;
export type UpdateKind = (typeof KIND)[keyof typeof KIND];

const KIND_NAMES = ["", "WRITE", "ZERO", "TRIM"];

/**
 * Record flags. RESYNC: the update belongs to a resync (a copy of a dirty block, or a client write
 * sent before the resync finished), so applying it may leave the secondary between two write
 * orders: the gateway records the secondary as inconsistent before it applies one. Other bits are
 * refused.
 */
export const FLAG_RESYNC = 1;
const KNOWN_FLAGS = FLAG_RESYNC;

/** One update: a WRITE carries `data` (length bytes); ZERO and TRIM carry none. */
export interface UpdateRecord {
  kind: UpdateKind;
  seq: number;
  period: number;
  offset: number;
  length: number;
  data: Buffer | null;
  /** FLAG_RESYNC or 0 (0 when not given). */
  flags?: number;
}

/** Why a body was refused: `code` is the API error code (ERR_MALFORMED or ERR_RANGE). */
export class RecordError extends Error {
  readonly code: "ERR_MALFORMED" | "ERR_RANGE";
  constructor(code: "ERR_MALFORMED" | "ERR_RANGE", message: string) {
    super(message);
    this.name = "RecordError";
    this.code = code;
  }
}

/** Name of a record kind, for logs and messages. */
export function kindName(kind: number): string {
  return KIND_NAMES[kind] ?? `kind ${kind}`;
}

const HI = 2 ** 32;
/** The high half of a u64 must stay below this for the value to be below 2^53. */
const SAFE_HI = 2 ** 21;

/** A u32, big-endian, by bytes: the caller has checked the value and the room. */
function putU32(buf: Buffer, at: number, v: number): void {
  buf[at] = v >>> 24;
  buf[at + 1] = (v >>> 16) & 0xff;
  buf[at + 2] = (v >>> 8) & 0xff;
  buf[at + 3] = v & 0xff;
}

/** A u64 below 2^53, big-endian (the caller has checked the value and the room). */
function putU64(buf: Buffer, at: number, v: number): void {
  putU32(buf, at, Math.floor(v / HI));
  putU32(buf, at + 4, v >>> 0); // the low 32 bits: exact for any integer below 2^53
}

/** Size in bytes of the encoded records. */
export function encodedSize(records: readonly UpdateRecord[]): number {
  let n = 0;
  for (const r of records) n += RECORD_HEADER + (r.kind === KIND.WRITE ? r.length : 0);
  return n;
}

/**
 * Write one record's 40-byte header at `at` (the proxy's side; the data, for a WRITE, follows it).
 * Throws RangeError on a field it cannot encode.
 */
export function encodeHeader(
  out: Buffer,
  at: number,
  kind: UpdateKind,
  seq: number,
  period: number,
  offset: number,
  length: number,
  flags = 0,
): void {
  if (!Number.isSafeInteger(seq) || seq < 0)
    throw new RangeError(`record seq ${seq} is not a u64 below 2^53`);
  if (!Number.isSafeInteger(period) || period < 0)
    throw new RangeError(`record period ${period} is not a u64 below 2^53`);
  if (!Number.isSafeInteger(offset) || offset < 0)
    throw new RangeError(`record offset ${offset} is not a u64 below 2^53`);
  if (!Number.isInteger(length) || length < 0 || length > 0xffffffff) {
    throw new RangeError(`record length ${length} is not a u32`);
  }
  if (!Number.isInteger(at) || at < 0 || at + RECORD_HEADER > out.length) {
    throw new RangeError(`no room for a record header at ${at} of a ${out.length}-byte buffer`);
  }
  // Byte stores (this runs once per forwarded write): Buffer's writeUInt32BE checks again what
  // is checked above.
  putU32(out, at, RECORD_MAGIC);
  out[at + 4] = kind;
  out[at + 5] = flags & KNOWN_FLAGS;
  out[at + 6] = 0;
  out[at + 7] = 0;
  putU64(out, at + 8, seq);
  putU64(out, at + 16, period);
  putU64(out, at + 24, offset);
  putU32(out, at + 32, length);
  putU32(out, at + 36, 0);
}

/** Encode records into one body. Throws RangeError on a record it cannot encode. */
export function encodeUpdates(records: readonly UpdateRecord[]): Buffer {
  const out = Buffer.allocUnsafe(encodedSize(records));
  let at = 0;
  for (const r of records) {
    encodeHeader(out, at, r.kind, r.seq, r.period, r.offset, r.length, r.flags ?? 0);
    at += RECORD_HEADER;
    if (r.kind === KIND.WRITE) {
      if (!r.data || r.data.length !== r.length) {
        throw new RangeError(`WRITE seq ${r.seq}: data must be exactly length (${r.length}) bytes`);
      }
      out.set(r.data, at);
      at += r.length;
    }
  }
  return out;
}

function malformed(at: number, what: string): RecordError {
  return new RecordError("ERR_MALFORMED", `record at byte ${at}: ${what}; nothing was applied`);
}

/**
 * Parse and check a whole body against a volume of `volumeSize` bytes: magic, kind, flags,
 * reserved fields, length > 0, complete data, seq >= 1 and unique within the batch, and ranges
 * inside the volume. Returns the records in body order; throws RecordError on the first problem.
 */
export function parseUpdates(buf: Buffer, volumeSize: number): UpdateRecord[] {
  const records: UpdateRecord[] = [];
  let seen: Set<number> | null = null;
  let lastSeq = 0;
  let at = 0;
  while (at < buf.length) {
    if (buf.length - at < RECORD_HEADER) {
      throw malformed(at, `truncated header (${buf.length - at} of ${RECORD_HEADER} bytes)`);
    }
    const magic = buf.readUInt32BE(at);
    if (magic !== RECORD_MAGIC) {
      throw malformed(at, `bad magic 0x${magic.toString(16).padStart(8, "0")} (want 0x42465550 "BFUP")`);
    }
    const kind = buf[at + 4];
    if (kind !== KIND.WRITE && kind !== KIND.ZERO && kind !== KIND.TRIM) {
      throw malformed(at, `unknown kind ${kind} (1 WRITE, 2 ZERO, 3 TRIM)`);
    }
    const flags = buf[at + 5];
    if ((flags & ~KNOWN_FLAGS) !== 0) throw malformed(at, `unknown flags 0x${flags.toString(16)} (1 RESYNC)`);
    if (buf.readUInt16BE(at + 6) !== 0 || buf.readUInt32BE(at + 36) !== 0) {
      throw malformed(at, "reserved fields must be 0");
    }
    const seqHi = buf.readUInt32BE(at + 8);
    const periodHi = buf.readUInt32BE(at + 16);
    const offHi = buf.readUInt32BE(at + 24);
    if (seqHi >= SAFE_HI) throw malformed(at, "seq is 2^53 or more");
    if (periodHi >= SAFE_HI) throw malformed(at, "period is 2^53 or more");
    const seq = seqHi * HI + buf.readUInt32BE(at + 12);
    const period = periodHi * HI + buf.readUInt32BE(at + 20);
    const length = buf.readUInt32BE(at + 32);
    if (seq === 0) throw malformed(at, "seq 0 (sequence numbers start at 1)");
    if (length === 0) throw malformed(at, `${kindName(kind)} seq ${seq}: length 0`);
    // Sequence numbers are unique: a batch usually comes in increasing order, so only keep a set
    // once the order breaks.
    if (seen === null && seq <= lastSeq) {
      seen = new Set<number>();
      for (const r of records) seen.add(r.seq);
    }
    if (seen !== null) {
      if (seen.has(seq)) throw malformed(at, `seq ${seq} appears twice in the batch`);
      seen.add(seq);
    }
    lastSeq = seq;
    const offset = offHi >= SAFE_HI ? Infinity : offHi * HI + buf.readUInt32BE(at + 28);
    if (offset > volumeSize || length > volumeSize - offset) {
      throw new RecordError(
        "ERR_RANGE",
        `record at byte ${at}: ${kindName(kind)} seq ${seq} [${offset}, +${length}) ends past the ` +
          `end of the volume (${volumeSize} bytes); nothing was applied`,
      );
    }
    at += RECORD_HEADER;
    let data: Buffer | null = null;
    if (kind === KIND.WRITE) {
      if (buf.length - at < length) {
        throw malformed(
          at - RECORD_HEADER,
          `WRITE seq ${seq}: truncated data (${buf.length - at} of ${length} bytes)`,
        );
      }
      data = buf.subarray(at, at + length);
      at += length;
    }
    records.push({ kind, seq, period, offset, length, data, flags });
  }
  return records;
}
