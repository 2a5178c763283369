// The frames of the update stream (docs/gateway-api.md, "The update stream"): an HTTP/1.1
// connection upgraded to `blockfork-updates/1` carries batches of update records one way and
// acknowledgements the other, without an HTTP request and response per batch. Pure encode and
// decode on Buffer, no I/O.
//
// BATCH (proxy -> gateway), a 24-byte header then the body (records as in POST .../updates):
//   0  u32 magic 0x42464254 ("BFBT")     16 u32 body length (1 .. MAX_STREAM_BODY)
//   4  u32 batch id (echoed in the ACK)  20 u32 reserved (0)
//   8  u64 floor (0: none)
// ACK (gateway -> proxy), a 16-byte header then `length` bytes of JSON (what POST would answer):
//   0  u32 magic 0x4246414b ("BFAK")     10 u16 reserved (0)
//   4  u32 batch id                      12 u32 JSON length
//   8  u16 status (200, or the HTTP status POST would answer)

export const STREAM_PROTOCOL = "blockfork-updates/1";
export const BATCH_MAGIC = 0x42464254;
export const ACK_MAGIC = 0x4246414b;
export const BATCH_HEADER = 24;
export const ACK_HEADER = 16;
/** Largest batch body, as for POST .../updates. */
export const MAX_STREAM_BODY = 64 * 1024 * 1024;
/** Largest ACK JSON a proxy accepts. */
export const MAX_ACK_JSON = 64 * 1024;

const HI = 2 ** 32;

/** A decoded BATCH header. */
export interface BatchHeader {
  id: number;
  /** 0: no floor. */
  floor: number;
  length: number;
}

/** Write a BATCH header at `at` of `out`. */
export function encodeBatchHeader(out: Buffer, at: number, id: number, floor: number, length: number): void {
  if (!Number.isSafeInteger(floor) || floor < 0)
    throw new RangeError(`floor ${floor} is not a u64 below 2^53`);
  out.writeUInt32BE(BATCH_MAGIC, at);
  out.writeUInt32BE(id >>> 0, at + 4);
  out.writeUInt32BE(Math.floor(floor / HI), at + 8);
  out.writeUInt32BE(floor % HI, at + 12);
  out.writeUInt32BE(length, at + 16);
  out.writeUInt32BE(0, at + 20);
}

/** Decode a BATCH header (BATCH_HEADER bytes at `at`); a string says what is wrong with it. */
export function decodeBatchHeader(buf: Buffer, at: number): BatchHeader | string {
  const magic = buf.readUInt32BE(at);
  if (magic !== BATCH_MAGIC) {
    return `bad frame magic 0x${magic.toString(16).padStart(8, "0")} (want 0x42464254 "BFBT")`;
  }
  const id = buf.readUInt32BE(at + 4);
  const floorHi = buf.readUInt32BE(at + 8);
  if (floorHi >= 2 ** 21) return `batch ${id}: floor is 2^53 or more`;
  const floor = floorHi * HI + buf.readUInt32BE(at + 12);
  const length = buf.readUInt32BE(at + 16);
  if (buf.readUInt32BE(at + 20) !== 0) return `batch ${id}: reserved field must be 0`;
  if (length === 0) return `batch ${id}: empty body`;
  if (length > MAX_STREAM_BODY) {
    return `batch ${id}: body of ${length} bytes is over the limit of ${MAX_STREAM_BODY}; send smaller batches`;
  }
  return { id, floor, length };
}

/** An ACK frame: header and JSON in one buffer. */
export function encodeAck(id: number, status: number, json: unknown): Buffer {
  const text = Buffer.from(JSON.stringify(json));
  const out = Buffer.allocUnsafe(ACK_HEADER + text.length);
  out.writeUInt32BE(ACK_MAGIC, 0);
  out.writeUInt32BE(id >>> 0, 4);
  out.writeUInt16BE(status, 8);
  out.writeUInt16BE(0, 10);
  out.writeUInt32BE(text.length, 12);
  text.copy(out, ACK_HEADER);
  return out;
}

/** A decoded ACK. */
export interface Ack {
  id: number;
  status: number;
  json: unknown;
}

/**
 * Splits the gateway's byte stream into ACKs. push() returns the complete ones; a malformed frame
 * throws (the stream cannot be trusted after it).
 */
export class AckParser {
  private pending: Buffer = Buffer.alloc(0);

  push(chunk: Buffer): Ack[] {
    let buf = this.pending.length === 0 ? chunk : Buffer.concat([this.pending, chunk]);
    const out: Ack[] = [];
    for (;;) {
      if (buf.length < ACK_HEADER) break;
      const magic = buf.readUInt32BE(0);
      if (magic !== ACK_MAGIC) {
        throw new Error(`bad acknowledgement magic 0x${magic.toString(16).padStart(8, "0")}`);
      }
      const len = buf.readUInt32BE(12);
      if (len > MAX_ACK_JSON) throw new Error(`acknowledgement of ${len} bytes is over ${MAX_ACK_JSON}`);
      if (buf.length < ACK_HEADER + len) break;
      const text = buf.toString("utf8", ACK_HEADER, ACK_HEADER + len);
      let json: unknown;
      try {
        json = JSON.parse(text) as unknown;
      } catch {
        throw new Error(`acknowledgement of batch ${buf.readUInt32BE(4)} is not JSON`);
      }
      out.push({ id: buf.readUInt32BE(4), status: buf.readUInt16BE(8), json });
      buf = buf.subarray(ACK_HEADER + len);
    }
    this.pending = buf.length === 0 ? Buffer.alloc(0) : Buffer.from(buf);
    return out;
  }
}
