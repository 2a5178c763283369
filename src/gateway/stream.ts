// The gateway's side of an update stream (docs/gateway-api.md, "The update stream"): a connection
// upgraded to `blockfork-updates/1` after the usual checks (authentication, route, identity
// headers), then BATCH frames in and ACK frames out (frames.ts).
//
// Notes on the design
// - Why a stream at all: through Node's HTTP server every 64 KiB of a request body is copied out of
//   the parser into a fresh Buffer and then into the body buffer, and every batch pays a request and
//   a response. Here a plain socket is re-opened with `onread`: frame headers and small bodies are
//   read into a reusable receive buffer (small bodies copied out of it), and the rest of a large
//   body is read by the kernel straight into the body's own pooled buffer. One copy per byte, the
//   kernel's. TLS streams use 'data' events (one more copy, as before).
// - A batch is handled exactly as POST .../updates handles its body: the whole body is parsed and
//   checked before anything is applied, applied under the source's serialization, and answered with
//   the same JSON and the same status (200, 400, 500, 503, 507), in an ACK carrying the batch id.
//   Batches are applied one after the other, in arrival order; reading goes on meanwhile, up to
//   MAX_QUEUED batches or MAX_QUEUED_BYTES, then the socket is paused (a fast proxy cannot make the
//   gateway buffer without bound).
// - A frame that cannot be decoded (bad magic, reserved bits, empty or oversized body) leaves no
//   way to find the next one: the gateway answers an ACK with status 400 ERR_MALFORMED and ends
//   the stream once the batches before it are answered. A bad record inside a well-framed body only
//   fails that batch (400), as a bad POST body does.
// - Faults (faults.ts) strike per batch: down -> 503 ACK and the stream ends; drop -> the connection
//   is destroyed; slow -> the batch waits; error -> 500 ACK.
// - stop() (gateway shutdown): no more batches are read; the ones already read are applied and
//   answered, then the stream ends.

import type { Duplex } from "node:stream";
import type { Logger } from "../log.js";
import { acquire, release } from "../util/buffer-pool.js";
import { reopenWithOnread } from "../util/onread.js";
import { FaultSwitch } from "./faults.js";
import { BATCH_HEADER, decodeBatchHeader, encodeAck, type BatchHeader } from "./frames.js";
import type { Gateway, Identity } from "./gateway.js";
import { errorBody, HttpError } from "./http.js";
import { parseUpdates, RecordError } from "./records.js";

/** Receive buffer for frame headers and small bodies. */
const RX_SIZE = 256 * 1024;
/** Bodies with at least this much left to read are read straight into their own buffer. */
const DIRECT_MIN = 64 * 1024;
/** Batches read but not yet answered before the socket is paused. */
const MAX_QUEUED = 16;
const MAX_QUEUED_BYTES = 128 * 1024 * 1024;

export interface StreamSessionOptions {
  gateway: Gateway;
  /** The proxy's identity (floor comes with each batch). */
  id: Identity;
  size: number;
  faults: FaultSwitch;
  log: Logger;
  /** Called once, when the connection has closed. */
  onClose: () => void;
  /** A frame begun and not finished with no byte for this long ends the connection (ms). */
  stallMs?: number;
}

/**
 * A frame stalled this long (no byte arrives with a header or body part-read) ends the stream:
 * its body buffer (up to 64 MiB) would otherwise stay reserved for as long as the connection
 * lives. A proxy gives up on an unanswered batch after 10 s; between frames a stream may idle.
 */
const STALL_MS = 60_000;

/** One upgraded connection. */
export class StreamSession {
  private readonly sock: Duplex;
  private readonly rx = Buffer.allocUnsafe(RX_SIZE);
  private readonly hdr = Buffer.allocUnsafe(BATCH_HEADER);
  private hdrFill = 0;
  private frame: BatchHeader | null = null;
  private bodyPooled: Buffer | null = null;
  private body: Buffer | null = null;
  private bodyFill = 0;
  /** The last read went into the body (onread mode). */
  private readIntoBody = false;
  private queued = 0;
  private queuedBytes = 0;
  private chain: Promise<void> = Promise.resolve();
  /** No more frames are taken (a malformed frame, an outage fault, shutdown). */
  private ending = false;
  private closed = false;
  private paused = false;
  /** When the last byte arrived, and the check for a stalled frame. */
  private lastByteAt = performance.now();
  private readonly stallTimer: NodeJS.Timeout;

  constructor(
    source: Duplex,
    head: Buffer,
    /** The 101 reply, written once the socket is ours. */
    greeting: string,
    private readonly o: StreamSessionOptions,
  ) {
    const reopened = reopenWithOnread(source, head, { buffer: this.nextBuffer, callback: this.onRead });
    let leftover = head;
    if (reopened !== null) {
      this.sock = reopened.socket;
      leftover = reopened.leftover;
    } else {
      this.sock = source;
      source.on("data", (chunk: Buffer) => this.feed(chunk));
    }
    this.sock.write(greeting);
    const stallMs = o.stallMs ?? STALL_MS;
    this.stallTimer = setInterval(
      () => {
        const partial = this.body !== null || this.hdrFill > 0;
        if (partial && !this.paused && performance.now() - this.lastByteAt > stallMs) {
          this.o.log.warn(
            `update stream of source ${this.o.id.source}: a frame got no byte for ${stallMs / 1000} s; ` +
              "closing the connection",
          );
          this.sock.destroy();
        }
      },
      Math.min(10_000, stallMs / 2),
    );
    this.stallTimer.unref();
    this.sock.on("error", (e: Error & { code?: string }) => {
      if (e.code !== "ECONNRESET" && e.code !== "EPIPE") this.o.log.info(`update stream: ${e.message}`);
    });
    this.sock.on("close", () => this.onClosed());
    this.sock.on("end", () => {
      // The proxy is done sending: answer what was read, then close our side.
      this.ending = true;
      this.maybeEnd();
    });
    if (leftover.length > 0) this.feed(leftover);
    if (!this.paused) this.sock.resume(); // (paused: the bytes that came with the upgrade filled the read-ahead)
  }

  /** Take no more batches; answer the ones read, then end the stream. */
  stop(): void {
    this.ending = true;
    this.maybeEnd();
  }

  /** Drop the connection now. */
  destroy(): void {
    this.sock.destroy();
  }

  // ---- reading

  private readonly nextBuffer = (): Buffer => {
    if (!this.ending && this.body !== null && this.body.length - this.bodyFill >= DIRECT_MIN) {
      this.readIntoBody = true;
      return this.body.subarray(this.bodyFill);
    }
    this.readIntoBody = false;
    return this.rx;
  };

  private readonly onRead = (nread: number, buf: Buffer): boolean => {
    this.lastByteAt = performance.now();
    if (this.ending) return true; // after the end: read (to see the proxy's FIN) and drop
    if (this.readIntoBody) {
      this.bodyFill += nread;
      if (this.bodyFill === this.body!.length) this.bodyDone();
    } else this.feed(buf.subarray(0, nread));
    return true;
  };

  /** Parse bytes: frame headers, body bytes (copied into the body buffer). */
  private feed(bytes: Buffer): void {
    this.lastByteAt = performance.now();
    let at = 0;
    while (at < bytes.length && !this.ending) {
      if (this.body === null) {
        const n = Math.min(BATCH_HEADER - this.hdrFill, bytes.length - at);
        bytes.copy(this.hdr, this.hdrFill, at, at + n);
        this.hdrFill += n;
        at += n;
        if (this.hdrFill < BATCH_HEADER) break;
        this.hdrFill = 0;
        const h = decodeBatchHeader(this.hdr, 0);
        if (typeof h === "string") {
          this.malformed(this.hdr.readUInt32BE(4), h);
          return;
        }
        this.frame = h;
        this.bodyPooled = acquire(h.length);
        this.body = this.bodyPooled.subarray(0, h.length);
        this.bodyFill = 0;
        continue;
      }
      const n = Math.min(this.body.length - this.bodyFill, bytes.length - at);
      bytes.copy(this.body, this.bodyFill, at, at + n);
      this.bodyFill += n;
      at += n;
      if (this.bodyFill === this.body.length) this.bodyDone();
    }
  }

  /** A whole batch was read: queue it for applying. */
  private bodyDone(): void {
    const h = this.frame!;
    const pooled = this.bodyPooled!;
    const body = this.body!;
    this.frame = null;
    this.body = null;
    this.bodyPooled = null;
    this.bodyFill = 0;
    this.queued++;
    this.queuedBytes += body.length;
    if (!this.paused && (this.queued >= MAX_QUEUED || this.queuedBytes >= MAX_QUEUED_BYTES)) {
      this.paused = true;
      this.sock.pause();
    }
    this.chain = this.chain.then(() => this.apply(h, body)).finally(() => this.answered(pooled, body.length));
  }

  private answered(pooled: Buffer, length: number): void {
    release(pooled);
    this.queued--;
    this.queuedBytes -= length;
    if (this.paused && this.queued < MAX_QUEUED / 2 && this.queuedBytes < MAX_QUEUED_BYTES / 2) {
      this.paused = false;
      if (!this.ending) this.sock.resume();
    }
    this.maybeEnd();
  }

  // ---- applying

  private async apply(h: BatchHeader, body: Buffer): Promise<void> {
    if (this.closed) return;
    const o = this.o;
    try {
      const fault = o.faults.current();
      if (fault.mode === "down") {
        this.ack(h.id, 503, errorBody("ERR_FAULT", "injected outage (fault mode down); nothing was applied"));
        this.stop();
        return;
      }
      if (fault.mode === "drop" && FaultSwitch.strikes(fault)) {
        this.sock.destroy();
        return;
      }
      if (fault.mode === "slow") await new Promise((r) => setTimeout(r, fault.delayMs).unref());
      else if (fault.mode === "error" && FaultSwitch.strikes(fault)) {
        throw new HttpError(500, "ERR_FAULT", "injected error (fault mode error); nothing was applied");
      }
      const records = parseUpdates(body, o.size);
      const result = await o.gateway.applyBatch({ ...o.id, floor: h.floor === 0 ? null : h.floor }, records);
      this.ack(h.id, 200, result);
    } catch (e) {
      let err: HttpError;
      if (e instanceof HttpError) err = e;
      else if (e instanceof RecordError) err = new HttpError(400, e.code, e.message);
      else {
        o.log.error(`update stream, batch ${h.id}: ${(e as Error).stack ?? String(e)}`);
        err = new HttpError(500, "ERR_IO", `internal error: ${(e as Error).message}`);
      }
      o.log.limited(
        err.status >= 500 ? "warn" : "info",
        `stream ${err.code}`,
        `update stream, batch ${h.id}: ${err.status} ${err.code}: ${err.message}`,
      );
      this.ack(h.id, err.status, errorBody(err.code, err.message));
    }
  }

  private ack(id: number, status: number, json: unknown): void {
    if (this.closed || this.sock.destroyed || !this.sock.writable) return;
    this.sock.write(encodeAck(id, status, json));
  }

  /** An undecodable frame: answer it after the batches before it, then end the stream. */
  private malformed(id: number, message: string): void {
    this.ending = true;
    this.sock.pause();
    const msg = `${message}; the stream ends here (batches before it were answered)`;
    this.o.log.limited("info", "stream ERR_MALFORMED", `update stream: ${msg}`);
    this.chain = this.chain.then(() => this.ack(id, 400, errorBody("ERR_MALFORMED", msg)));
    void this.chain.then(() => this.maybeEnd());
  }

  private maybeEnd(): void {
    if (!this.ending || this.queued > 0 || this.closed) return;
    void this.chain.then(() => {
      if (this.closed || this.sock.destroyed) return;
      this.sock.end();
      // Read on, dropping the bytes, so that the proxy's end of the connection is seen and the
      // socket closes (a paused socket would stay half-open until the gateway exits).
      this.sock.resume();
    });
  }

  private onClosed(): void {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.stallTimer);
    if (this.bodyPooled !== null) release(this.bodyPooled);
    this.bodyPooled = null;
    this.body = null;
    // Batches still queued run their course (their buffers go back in answered()); their ACKs are dropped.
    void this.chain.then(() => this.o.onClose());
  }
}
