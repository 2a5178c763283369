// The journal's on-disk records (docs/pit-journal.md): pure encoders and decoders, no I/O.
//
// A segment file starts with a 4 KiB header, then records back to back. A record is a 48-byte
// header, a table of entries (24 bytes each), then the before-image data of the entries that carry
// data, each `blockSize` bytes, in table order. A CRC32C covers the header (with the CRC field
// zeroed) and the payload, so a torn or partial record at the end of a crashed segment is found
// and ignored.

import { crc32c } from "../blockio/index.js";

export const SEGMENT_MAGIC = Buffer.from("BFJSEG01", "latin1");
export const SEGMENT_HEADER = 4096;
export const JOURNAL_FORMAT = 1;
export const RECORD_MAGIC = 0x42464a52; // "BFJR"
export const RECORD_HEADER = 48;
export const ENTRY_SIZE = 24;

/** Record types. */
export const REC = {
  /** Before-images of blocks. */
  IMAGES: 1,
  /** More sources wrote blocks already imaged in their merge window. */
  MERGES: 2,
} as const;

/** Entry flags. */
export const ENTRY_ZERO = 1; // the before-image is all zeroes: no data stored

/** What a segment header says. */
export interface SegmentHeader {
  segment: number;
  journalId: string;
  blockSize: number;
  windowMs: number;
  created: number;
}

/** One journal entry: the before-image of `block` taken at `ts`. */
export interface EntryInfo {
  block: number;
  ts: number;
  sources: number;
  flags: number;
}

/** A decoded record. */
export interface RecordInfo {
  type: number;
  count: number;
  payloadLength: number;
  tsFirst: number;
  tsLast: number;
  recordSeq: number;
  entries: EntryInfo[];
  /** Offset of the first data byte relative to the record start. */
  dataStart: number;
  /** Total bytes of the record. */
  size: number;
}

function writeU64(b: Buffer, at: number, v: number): void {
  b.writeUInt32LE(v >>> 0, at);
  b.writeUInt32LE(Math.floor(v / 0x100000000), at + 4);
}

function readU64(b: Buffer, at: number): number {
  return b.readUInt32LE(at) + b.readUInt32LE(at + 4) * 0x100000000;
}

/** Encode a segment header (4 KiB). */
export function encodeSegmentHeader(h: SegmentHeader): Buffer {
  const b = Buffer.alloc(SEGMENT_HEADER);
  SEGMENT_MAGIC.copy(b, 0);
  b.writeUInt32LE(JOURNAL_FORMAT, 8);
  b.writeUInt32LE(h.blockSize, 12);
  writeU64(b, 16, h.segment);
  Buffer.from(h.journalId, "hex").copy(b, 24, 0, 8);
  b.writeDoubleLE(h.created, 32);
  b.writeDoubleLE(h.windowMs, 40);
  b.writeUInt32LE(crc32c(b.subarray(0, 48)), 48);
  return b;
}

/** Decode a segment header; null when it is not a valid one. */
export function decodeSegmentHeader(b: Buffer): SegmentHeader | null {
  if (b.length < 52 || !b.subarray(0, 8).equals(SEGMENT_MAGIC)) return null;
  if (b.readUInt32LE(48) !== crc32c(b.subarray(0, 48))) return null;
  if (b.readUInt32LE(8) !== JOURNAL_FORMAT) return null;
  return {
    blockSize: b.readUInt32LE(12),
    segment: readU64(b, 16),
    journalId: b.subarray(24, 32).toString("hex"),
    created: b.readDoubleLE(32),
    windowMs: b.readDoubleLE(40),
  };
}

/** An entry to encode, with its data (null for zero images and merge notes). */
export interface EntryToWrite extends EntryInfo {
  data: Buffer | null;
}

/** Bytes of an encoded record. */
export function recordSize(entries: readonly EntryToWrite[], blockSize: number): number {
  let data = 0;
  for (const e of entries) if (e.data !== null) data += blockSize;
  return RECORD_HEADER + ENTRY_SIZE * entries.length + data;
}

/** Encode a record into `out` at `at`; returns its size. Entries must be in timestamp order. */
export function encodeRecord(
  out: Buffer,
  at: number,
  type: number,
  recordSeq: number,
  entries: readonly EntryToWrite[],
  blockSize: number,
): number {
  const size = recordSize(entries, blockSize);
  const payload = size - RECORD_HEADER;
  out.writeUInt32LE(RECORD_MAGIC, at);
  out.writeUInt16LE(type, at + 4);
  out.writeUInt16LE(0, at + 6);
  out.writeUInt32LE(entries.length, at + 8);
  out.writeUInt32LE(payload, at + 12);
  out.writeDoubleLE(entries.length ? entries[0].ts : 0, at + 16);
  out.writeDoubleLE(entries.length ? entries[entries.length - 1].ts : 0, at + 24);
  writeU64(out, at + 32, recordSeq);
  out.writeUInt32LE(0, at + 40);
  out.writeUInt32LE(0, at + 44);
  let e = at + RECORD_HEADER;
  let d = e + ENTRY_SIZE * entries.length;
  for (const x of entries) {
    writeU64(out, e, x.block);
    out.writeDoubleLE(x.ts, e + 8);
    out.writeUInt32LE(x.sources >>> 0, e + 16);
    out.writeUInt32LE(x.data === null ? x.flags | ENTRY_ZERO : x.flags & ~ENTRY_ZERO, e + 20);
    e += ENTRY_SIZE;
    if (x.data !== null) {
      x.data.copy(out, d, 0, blockSize);
      d += blockSize;
    }
  }
  const crc = crc32c(
    out.subarray(at + RECORD_HEADER, at + size),
    crc32c(out.subarray(at, at + RECORD_HEADER)),
  );
  out.writeUInt32LE(crc, at + 40);
  return size;
}

/** Decode the header of a record at `at` (no CRC check): null if the magic is wrong. */
export function peekRecord(b: Buffer, at: number): { type: number; count: number; size: number } | null {
  if (at + RECORD_HEADER > b.length || b.readUInt32LE(at) !== RECORD_MAGIC) return null;
  return {
    type: b.readUInt16LE(at + 4),
    count: b.readUInt32LE(at + 8),
    size: RECORD_HEADER + b.readUInt32LE(at + 12),
  };
}

/**
 * Decode and check a whole record in `b` at `at`. Null when it is not a complete, intact record
 * (the end of the log: a crash may leave a torn record behind the last good one).
 */
export function decodeRecord(b: Buffer, at: number, blockSize: number): RecordInfo | null {
  const head = peekRecord(b, at);
  if (head === null || at + head.size > b.length) return null;
  const stored = b.readUInt32LE(at + 40);
  const header = Buffer.from(b.subarray(at, at + RECORD_HEADER));
  header.writeUInt32LE(0, 40);
  const crc = crc32c(b.subarray(at + RECORD_HEADER, at + head.size), crc32c(header));
  if (crc !== stored) return null;
  const entries: EntryInfo[] = [];
  let withData = 0;
  for (let i = 0; i < head.count; i++) {
    const e = at + RECORD_HEADER + ENTRY_SIZE * i;
    const flags = b.readUInt32LE(e + 20);
    entries.push({ block: readU64(b, e), ts: b.readDoubleLE(e + 8), sources: b.readUInt32LE(e + 16), flags });
    if (!(flags & ENTRY_ZERO)) withData++;
  }
  if (head.size !== RECORD_HEADER + ENTRY_SIZE * head.count + withData * blockSize) return null;
  return {
    type: head.type,
    count: head.count,
    payloadLength: head.size - RECORD_HEADER,
    tsFirst: b.readDoubleLE(at + 16),
    tsLast: b.readDoubleLE(at + 24),
    recordSeq: readU64(b, at + 32),
    entries,
    dataStart: RECORD_HEADER + ENTRY_SIZE * head.count,
    size: head.size,
  };
}
