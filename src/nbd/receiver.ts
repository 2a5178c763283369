// The receive side of a connection in transmission: bytes in, requests (and WRITE payloads) out.
//
// Notes on the design
// - Plain sockets (TCP or unix, no TLS) are re-opened on a duplicate of their descriptor with
//   Node's documented `onread` option, so the kernel reads straight into buffers we choose: a
//   reusable receive buffer for request headers and small payloads, and, for the rest of a large
//   WRITE payload, the payload's own buffer (one copy, as nbdkit's recv into its request buffer).
//   This also skips the Readable-stream machinery and the 64 KiB allocation per read of 'data'
//   events. TLS streams (and anything else) use ordinary 'data' events.
// - A receive buffer is reused only when nothing refers into it: a WRITE payload handed to the
//   volume as a view holds a reference until its call settles (PayloadHold.release()), and so does
//   a stash of unparsed bytes while the connection is blocked. A busy buffer is swapped for a
//   spare one before the next read.
// - Backpressure: before each request the sink is asked mustWait(); if so, the rest of the bytes
//   are stashed and the socket paused until resume().

import type { Duplex } from "node:stream";
import { recvNowait } from "../blockio/index.js";
import { reopenWithOnread } from "../util/onread.js";
import { acquire, release } from "../util/buffer-pool.js";
import type { Rejection } from "./validate.js";
import type { WriteHold } from "../volume/volume.js";
import { CMD, decodeRequest, REQUEST_SIZE, type Request } from "./wire.js";

/** Size of a receive buffer. */
const RX_SIZE = 256 * 1024;
/** Receive buffers per connection before the connection pauses (each busy one is held by a write). */
const RX_MAX = 32;
/** WRITE payloads at least this large are read directly into their own buffer. */
const DIRECT_MIN = 64 * 1024;
/** Read size after a large WRITE: a request header and a little more. */
const SMALL_READ = 4096;

/**
 * Keeps a WRITE payload's memory valid until released (exactly once, plus once per successful
 * retain()). Only a payload in a buffer of its own can be retained: a view into a receive buffer
 * would hold the whole buffer (and the connection reads into a bounded number of them).
 */
export type PayloadHold = WriteHold;

/** Where requests go. */
export interface RequestSink {
  /** A request without payload (not WRITE). */
  request(req: Request): void;
  /** Check a WRITE before its payload is read; a rejection means the payload is discarded. */
  checkWrite(req: Request): Rejection | null;
  rejected(req: Request, r: Rejection): void;
  /** A WRITE and its payload; `hold.release()` when the payload is no longer needed. */
  write(req: Request, data: Buffer, hold: PayloadHold): void;
  /** Bad request magic: the connection must end. */
  violation(message: string): void;
  /** True while the connection must not take more requests. */
  mustWait(): boolean;
  /** The end of a burst of input: a good moment to send replies. */
  flush(): void;
}

const NO_HOLD: PayloadHold = { retain: () => false, release() {} };

class RxBuffer implements PayloadHold {
  readonly buf = Buffer.allocUnsafe(RX_SIZE);
  refs = 0;
  constructor(private readonly owner: RequestReceiver) {}
  retain(): boolean {
    return false;
  }
  release(): void {
    if (--this.refs === 0) this.owner.recycle(this);
  }
}

/** A payload in a pooled buffer of its own: back to the pool when the last hold is released. */
class PooledHold implements PayloadHold {
  private refs = 1;
  constructor(private readonly pooled: Buffer) {}
  retain(): boolean {
    this.refs++;
    return true;
  }
  release(): void {
    if (--this.refs === 0) release(this.pooled);
  }
}

/** Parses requests from a stream and hands them to a sink. */
export class RequestReceiver {
  /** The stream replies must be written to (a new socket when the descriptor was re-opened). */
  readonly stream: Duplex;
  /** True when reads go straight into our buffers (onread). */
  readonly direct: boolean;

  private readonly hdr = Buffer.allocUnsafe(REQUEST_SIZE);
  private hdrFill = 0;
  private payloadReq: Request | null = null;
  private payloadBuf: Buffer | null = null;
  private payloadPooled: Buffer | null = null;
  private payloadFill = 0;
  /** The rest of the current payload is read directly into payloadBuf. */
  private payloadDirect = false;
  private drainLeft = 0;
  private drainReq: Request | null = null;
  private drainRejection: Rejection | null = null;
  private stash: { rx: RxBuffer | null; data: Buffer; pos: number } | null = null;
  private stopped = false;
  private cur: RxBuffer;
  private readonly spare: RxBuffer[] = [];
  private rxCount = 1;
  /** What the last read was made into: the current rx buffer, or the payload (null). */
  private target: RxBuffer | null;

  constructor(
    private readonly sink: RequestSink,
    source: Duplex,
    leftover: Buffer,
    allowDirect = true,
  ) {
    this.cur = new RxBuffer(this);
    this.target = this.cur;
    const reopened = allowDirect
      ? reopenWithOnread(source, leftover, { buffer: this.nextBuffer, callback: this.onRead })
      : null;
    if (reopened !== null) {
      leftover = reopened.leftover;
      this.fd = reopened.fd;
      this.stream = reopened.socket;
      this.direct = true;
    } else {
      source.on("data", (chunk: Buffer) => this.onChunk(chunk));
      this.stream = source;
      this.direct = false;
    }
    this.leftover = leftover;
  }

  private leftover: Buffer;
  /** The descriptor reads come from in onread mode (owned by this.stream), else -1. */
  private fd = -1;

  /** Parse what arrived with the handshake, then start reading. */
  start(): void {
    const rest = this.leftover;
    this.leftover = Buffer.alloc(0);
    if (rest.length > 0) this.feed(null, rest, 0);
    if (this.stash === null && !this.stopped) this.stream.resume();
  }

  /**
   * Stop parsing (DISC, violation, shutdown): later bytes are read and ignored, so that the
   * client's end of the stream is still seen and the connection can close as soon as it does.
   */
  stop(): void {
    this.stopped = true;
    this.dropStash();
    this.payloadDirect = false;
    this.stream.resume();
  }

  /** Continue after mustWait() turned false. */
  resume(): void {
    if (this.stopped) return;
    const s = this.stash;
    if (s !== null) {
      this.stash = null;
      this.feed(s.rx, s.data, s.pos);
      s.rx?.release();
    }
    if (this.stash === null && !this.stopped) this.stream.resume();
  }

  /** True when bytes are waiting for resume(). */
  get waiting(): boolean {
    return this.stash !== null;
  }

  /** A buffer with no references left: reuse it (or let it go, counted out). */
  recycle(rx: RxBuffer): void {
    if (rx === this.cur) return;
    if (this.spare.length < RX_MAX) this.spare.push(rx);
    else this.rxCount--;
  }

  /** A WRITE accepted and its payload still arriving (it reaches the sink once complete). */
  get midPayload(): boolean {
    return !this.stopped && this.payloadReq !== null;
  }

  /**
   * Too many receive buffers are held by payloads in flight. Counts the busy ones (every buffer
   * but the spares): a count of all buffers ever made would stay over the limit after they are
   * freed, and the connection would never read again.
   */
  get saturated(): boolean {
    return this.rxCount - this.spare.length > RX_MAX;
  }

  // ---- onread mode

  /** onread's buffer generator: where the next read goes. */
  private readonly nextBuffer = (): Buffer => {
    if (this.payloadDirect) {
      this.target = null;
      return this.payloadBuf!.subarray(this.payloadFill);
    }
    if (this.cur.refs > 0) {
      const next = this.spare.pop();
      if (next !== undefined) this.cur = next;
      else {
        this.rxCount++;
        this.cur = new RxBuffer(this);
      }
    }
    this.target = this.cur;
    // Right after a large WRITE, read little: the next request is likely another one, and its
    // payload should land in its own buffer rather than here (and be copied from here).
    return this.afterLarge ? this.cur.buf.subarray(0, SMALL_READ) : this.cur.buf;
  };
  /** The last request was a WRITE whose payload was read directly into its own buffer. */
  private afterLarge = false;

  private readonly onRead = (nread: number, buf: Buffer): boolean => {
    if (this.stopped) return true;
    if (this.stash !== null && this.target !== null) {
      // Paused while this read was already done: keep the bytes behind the stash.
      this.onChunk(Buffer.from(buf.subarray(0, nread)));
      return true;
    }
    if (this.target === null) {
      this.payloadFill += nread;
      if (this.payloadFill === this.payloadBuf!.length) this.completePayload();
      return true;
    }
    const rx = this.target;
    this.feed(rx, rx.buf.subarray(0, nread), 0);
    return true;
  };

  // ---- 'data' mode

  private onChunk(chunk: Buffer): void {
    if (this.stopped) return;
    if (this.stash !== null) {
      // Paused, but a chunk was already on its way: append it to the stash.
      const s = this.stash;
      this.stash = { rx: null, data: Buffer.concat([s.data.subarray(s.pos), chunk]), pos: 0 };
      s.rx?.release();
      return;
    }
    this.feed(null, chunk, 0);
  }

  // ---- parsing

  private feed(rx: RxBuffer | null, data: Buffer, pos: number): void {
    this.parse(rx, data, pos);
    this.sink.flush();
  }

  private parse(rx: RxBuffer | null, data: Buffer, pos: number): void {
    const len = data.length;
    while (pos < len && !this.stopped) {
      if (this.drainLeft > 0) {
        const n = Math.min(this.drainLeft, len - pos);
        this.drainLeft -= n;
        pos += n;
        if (this.drainLeft === 0) this.drained();
        continue;
      }
      if (this.payloadReq !== null) {
        const buf = this.payloadBuf!;
        const n = Math.min(buf.length - this.payloadFill, len - pos);
        data.copy(buf, this.payloadFill, pos, pos + n);
        this.payloadFill += n;
        pos += n;
        if (this.payloadFill === buf.length) this.completePayload();
        continue;
      }
      if (this.sink.mustWait()) {
        if (rx !== null) rx.refs++;
        this.stash = { rx, data, pos };
        this.stream.pause();
        return;
      }
      let req: Request | null;
      if (this.hdrFill > 0 || len - pos < REQUEST_SIZE) {
        const n = Math.min(REQUEST_SIZE - this.hdrFill, len - pos);
        data.copy(this.hdr, this.hdrFill, pos, pos + n);
        this.hdrFill += n;
        pos += n;
        if (this.hdrFill < REQUEST_SIZE) break;
        this.hdrFill = 0;
        req = decodeRequest(this.hdr, 0);
      } else {
        req = decodeRequest(data, pos);
        pos += REQUEST_SIZE;
      }
      if (req === null) {
        this.stop();
        this.sink.violation("bad request magic");
        return;
      }
      if (req.type !== CMD.WRITE) {
        this.afterLarge = false;
        this.sink.request(req);
        continue;
      }
      const rejection = this.sink.checkWrite(req);
      if (rejection !== null) {
        // Answer only after the payload is read: a client (libnbd) counts a command as in flight
        // once its whole payload is sent, and a reply before that is a reply to nothing.
        this.drainLeft = req.length;
        this.drainReq = req;
        this.drainRejection = rejection;
        if (req.length === 0) this.drained();
        continue;
      }
      if (len - pos >= req.length) {
        this.afterLarge = false;
        const view = data.subarray(pos, pos + req.length);
        pos += req.length;
        if (rx !== null) {
          rx.refs++;
          this.sink.write(req, view, rx);
        } else this.sink.write(req, view, NO_HOLD);
        continue;
      }
      // The payload continues beyond these bytes: give it a buffer of its own.
      this.payloadReq = req;
      this.payloadPooled = acquire(req.length);
      this.payloadBuf = this.payloadPooled.subarray(0, req.length);
      const n = len - pos;
      data.copy(this.payloadBuf, 0, pos, len);
      this.payloadFill = n;
      pos = len;
      this.payloadDirect = this.direct && req.length - n >= DIRECT_MIN;
      this.afterLarge = this.payloadDirect;
      if (this.fd >= 0) {
        // The client sends the header and the payload back to back (libnbd: two send calls), so
        // the rest is usually in the socket already: take it now rather than after another trip
        // through epoll. Safe for ordering: these are the newest bytes read from the socket.
        const r = recvNowait(this.fd, this.payloadBuf.subarray(n));
        if (r > 0) {
          this.payloadFill += r;
          if (this.payloadFill === req.length) this.completePayload();
        }
      }
    }
  }

  private drained(): void {
    const req = this.drainReq!;
    const r = this.drainRejection!;
    this.drainReq = null;
    this.drainRejection = null;
    this.sink.rejected(req, r);
  }

  private completePayload(): void {
    const req = this.payloadReq!;
    const buf = this.payloadBuf!;
    const hold = new PooledHold(this.payloadPooled!);
    this.payloadReq = null;
    this.payloadBuf = null;
    this.payloadPooled = null;
    this.payloadDirect = false;
    this.sink.write(req, buf, hold);
    if (this.target === null) this.sink.flush(); // completed by a direct read, outside feed()
  }

  private dropStash(): void {
    const s = this.stash;
    this.stash = null;
    s?.rx?.release();
  }
}
