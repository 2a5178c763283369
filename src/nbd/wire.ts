// NBD wire format: constants, and pure encoders/decoders on Buffer. No sockets here, so every
// byte can be checked in unit tests. Numbers follow doc/proto.md of NetworkBlockDevice/nbd.
// All integers are big-endian. 64-bit offsets are handled as JS numbers (exact below 2^53);
// larger values decode to Infinity-free numbers > Number.MAX_SAFE_INTEGER and fail validation.

// ---- handshake
export const NBDMAGIC = Buffer.from("NBDMAGIC", "latin1");
export const IHAVEOPT = Buffer.from("IHAVEOPT", "latin1");
export const OPTION_REPLY_MAGIC_HI = 0x0003e889;
export const OPTION_REPLY_MAGIC_LO = 0x045565a9;

export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_PLATFORM: 0x80000004,
  ERR_TLS_REQD: 0x80000005,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_BLOCK_SIZE_REQD: 0x80000008,
  ERR_TOO_BIG: 0x80000009,
} as const;

export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

// ---- transmission flags
export const TF = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

// ---- requests
export const REQUEST_MAGIC = 0x25609513;
export const REQUEST_SIZE = 28;

export const CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

export const CMD_FLAG = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
  PAYLOAD_LEN: 1 << 5,
} as const;

// ---- replies
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const SIMPLE_REPLY_SIZE = 16;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const STRUCTURED_REPLY_SIZE = 20;
export const REPLY_FLAG_DONE = 1 << 0;

export const REPLY_TYPE = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 0x8001,
  ERROR_OFFSET: 0x8002,
} as const;

/** Errors that may appear on the wire (proto.md "Error values"). */
export const NBD_ERR = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

export const STATE_HOLE = 1;
export const STATE_ZERO = 2;

/** Longest string (export name, query, message) the protocol allows. */
export const MAX_STRING = 4096;

// ---- encoders

/** The server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags. */
export function encodeGreeting(): Buffer {
  const b = Buffer.alloc(18);
  NBDMAGIC.copy(b, 0);
  IHAVEOPT.copy(b, 8);
  b.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
  return b;
}

/** An option reply: magic, option, reply type, length, data. */
export function encodeOptionReply(option: number, type: number, data?: Buffer): Buffer {
  const len = data ? data.length : 0;
  const b = Buffer.allocUnsafe(20 + len);
  b.writeUInt32BE(OPTION_REPLY_MAGIC_HI, 0);
  b.writeUInt32BE(OPTION_REPLY_MAGIC_LO, 4);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(len, 16);
  if (data) data.copy(b, 20);
  return b;
}

/** NBD_REP_SERVER data: name length, name, optional description. */
export function encodeServerReplyData(name: string, description?: string): Buffer {
  const n = Buffer.from(name, "utf8");
  const d = description ? Buffer.from(description, "utf8") : Buffer.alloc(0);
  const b = Buffer.allocUnsafe(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

/** NBD_INFO_EXPORT: type, size, transmission flags. */
export function encodeInfoExport(size: number, flags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(INFO.EXPORT, 0);
  writeU64(b, 2, size);
  b.writeUInt16BE(flags, 10);
  return b;
}

/** NBD_INFO_NAME or NBD_INFO_DESCRIPTION: type, string. */
export function encodeInfoString(type: number, text: string): Buffer {
  const t = Buffer.from(text, "utf8");
  const b = Buffer.allocUnsafe(2 + t.length);
  b.writeUInt16BE(type, 0);
  t.copy(b, 2);
  return b;
}

/** NBD_INFO_BLOCK_SIZE: type, minimum, preferred, maximum. */
export function encodeInfoBlockSize(min: number, preferred: number, max: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(INFO.BLOCK_SIZE, 0);
  b.writeUInt32BE(min, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(max, 10);
  return b;
}

/** NBD_REP_META_CONTEXT data: context id, name. */
export function encodeMetaContext(id: number, name: string): Buffer {
  const n = Buffer.from(name, "utf8");
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(id, 0);
  n.copy(b, 4);
  return b;
}

/** Reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless NO_ZEROES. */
export function encodeExportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  writeU64(b, 0, size);
  b.writeUInt16BE(flags, 8);
  return b;
}

/** Write a u64 from a non-negative safe integer. */
export function writeU64(b: Buffer, at: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / 0x100000000), at);
  b.writeUInt32BE(v >>> 0, at + 4);
}

/** Read a u64 as a number (exact below 2^53). */
export function readU64(b: Buffer, at: number): number {
  return b.readUInt32BE(at) * 0x100000000 + b.readUInt32BE(at + 4);
}

/** A decoded request header. The cookie stays as two 32-bit halves, copied back verbatim. */
export interface Request {
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  offset: number;
  length: number;
}

/** Decode a 28-byte request header at `at`; null when the magic is wrong. */
export function decodeRequest(b: Buffer, at: number): Request | null {
  if (b.readUInt32BE(at) !== REQUEST_MAGIC) return null;
  return {
    flags: b.readUInt16BE(at + 4),
    type: b.readUInt16BE(at + 6),
    cookieHi: b.readUInt32BE(at + 8),
    cookieLo: b.readUInt32BE(at + 12),
    offset: readU64(b, at + 16),
    length: b.readUInt32BE(at + 24),
  };
}

/** Encode a request header (for tests and the fuzzer). */
export function encodeRequest(r: Request): Buffer {
  const b = Buffer.allocUnsafe(REQUEST_SIZE);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeUInt32BE(r.cookieHi >>> 0, 8);
  b.writeUInt32BE(r.cookieLo >>> 0, 12);
  writeU64(b, 16, r.offset);
  b.writeUInt32BE(r.length >>> 0, 24);
  return b;
}

/** Simple reply header at `at`: magic, error, cookie (16 bytes). */
export function writeSimpleReply(
  b: Buffer,
  at: number,
  error: number,
  cookieHi: number,
  cookieLo: number,
): void {
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, at);
  b.writeUInt32BE(error, at + 4);
  b.writeUInt32BE(cookieHi, at + 8);
  b.writeUInt32BE(cookieLo, at + 12);
}

/** Structured reply chunk header at `at`: magic, flags, type, cookie, payload length (20 bytes). */
export function writeStructuredHeader(
  b: Buffer,
  at: number,
  flags: number,
  type: number,
  cookieHi: number,
  cookieLo: number,
  length: number,
): void {
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, at);
  b.writeUInt16BE(flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  b.writeUInt32BE(cookieHi, at + 8);
  b.writeUInt32BE(cookieLo, at + 12);
  b.writeUInt32BE(length, at + 16);
}

/** UTF-8 bytes of `text`, cut to at most `max` bytes at a character boundary. */
export function utf8Capped(text: string, max = MAX_STRING): Buffer {
  // Strings the server sends must not hold NUL (proto.md); a message may quote client input.
  const b = Buffer.from(text.includes("\0") ? text.replaceAll("\0", "\\0") : text, "utf8");
  if (b.length <= max) return b;
  let end = max;
  while (end > 0 && (b[end] & 0xc0) === 0x80) end--; // do not split a multi-byte character
  return b.subarray(0, end);
}

/** A complete NBD_REPLY_TYPE_ERROR chunk (with DONE) carrying a message. */
export function encodeErrorChunk(cookieHi: number, cookieLo: number, error: number, message: string): Buffer {
  const m = utf8Capped(message);
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_SIZE + 6 + m.length);
  writeStructuredHeader(b, 0, REPLY_FLAG_DONE, REPLY_TYPE.ERROR, cookieHi, cookieLo, 6 + m.length);
  b.writeUInt32BE(error, 20);
  b.writeUInt16BE(m.length, 24);
  m.copy(b, 26);
  return b;
}
