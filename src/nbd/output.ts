// The reply side of a connection: slabs that replies are built in, and an ordered queue of ready
// replies sent with as few socket writes as possible (after undici's reuse of buffers in client-h1.js).
//
// Notes on the design
// - A small read reply is built in place: header and data are reserved together in a slab and the
//   volume reads straight into it, so a 4 KiB read costs no allocation and no copy in JS.
// - Replies become ready out of order (async completions). `commit` appends a ready range to the
//   queue, extending the previous range when they touch (the common case: a burst of cached reads
//   completes in order), and `flush` writes runs of ranges with one write, or a corked writev.
// - Zero-copy file segments (`pushFile`): a reply whose data is sent with sendfile(2) straight
//   from the page cache. It must reach the socket exactly where it stands in the queue, so it is
//   sent only when every earlier byte has left libuv's write queue; later segments wait behind it.
//   When the socket fills up mid-send, the rest of that reply is read from the (cached) file and
//   written the ordinary way, still ahead of everything queued after it. sendfile leaves the
//   kernel holding references to the file's pages until the client has read them, so a write to
//   those blocks in between reaches the client: fine for a plain export (the read and the write
//   were both in flight, either order is a correct answer), not for a snapshot.
// - A lent read (`pushLease`, a snapshot's pieces of several files) is sent in one addon call:
//   pieces the lender marks (`copyFd`) are copied into the socket during the call (from a
//   read-only mapping of their file, or read into the addon's buffer first), the others go by
//   sendfile. When the socket fills up, a 32 KiB copy is written through libuv and the
//   addon resumes once it has gone (the lease stays valid until then). If its lender copied it
//   meanwhile (`lease.data`), the copy is sent instead. Leases still queued when the connection
//   ends are released by discard().
// - Both kinds read their data only while they send it, after the reply's header has gone, so a
//   read error can come up mid-reply. With structured replies the header is an OFFSET_DATA chunk
//   without DONE and `tail` ends the reply: a NONE chunk with DONE once the data has gone, or, on
//   a read error, the rest of the chunk as zeroes and then an ERROR chunk with DONE (proto.md: a
//   chunk once begun is completed, and a chunk may be final only when no error can follow). A
//   simple reply cannot report an error after its header: the connection is closed instead.
// - Direct sends: when libuv has nothing queued for the socket, a run of replies is sent with one
//   non-blocking send(2) from here, skipping the stream's write request and callback (a few µs per
//   reply at queue depth 1); what the socket does not take is written through libuv, in order.
//   The room this frees is reported through takeSentDirect(), not onSpace.
// - A slab is reused only when nothing in it is pending (`refs` counts regions reserved but not
//   yet written out). When every slab is busy, reserve() fails and the connection stops reading
//   requests until writes complete (`onSpace`): a client that does not read its replies stalls
//   itself, never the server's memory.

import type { Duplex } from "node:stream";
import { acquire, release } from "../util/buffer-pool.js";
import { readFullySync, readPiecesSync, sendHeaderAndFile, sendNow, sendPieces } from "../blockio/index.js";
import type { PieceLease } from "../volume/volume.js";
import { nbdErrorOf } from "./errors.js";
import {
  encodeErrorChunk,
  REPLY_FLAG_DONE,
  REPLY_TYPE,
  STRUCTURED_REPLY_SIZE,
  writeStructuredHeader,
} from "./wire.js";

/** A reusable reply buffer. */
export class Slab {
  readonly buf: Buffer;
  used = 0;
  refs = 0;
  retired = false;
  constructor(size: number) {
    this.buf = Buffer.allocUnsafe(size);
  }
}

interface Segment {
  buf: Buffer;
  start: number;
  end: number;
  slab: Slab | null;
  count: number;
  /** A pooled buffer to give back once written. */
  pooled: Buffer | null;
  /** For a zero-copy segment: `buf` is the header, then `length` bytes of `fd` at `offset`. */
  fd: number;
  offset: number;
  length: number;
  /** For a lent read: `buf` is the header, then the lease's pieces (`length` bytes). */
  lease?: PieceLease;
  /** Bytes of a lent read (header included) already sent. */
  sent?: number;
  /** Structured replies: what ends the reply once the data has gone, or fails it (see above). */
  tail?: ReplyTail;
}

/** The end of a structured read reply whose data is read while it is sent. */
export interface ReplyTail {
  cookieHi: number;
  cookieLo: number;
}

/** A NONE chunk with DONE: the end of a reply whose last chunk could not be marked final. */
function doneChunk(t: ReplyTail): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_SIZE);
  writeStructuredHeader(b, 0, REPLY_FLAG_DONE, REPLY_TYPE.NONE, t.cookieHi, t.cookieLo, 0);
  return b;
}

/** Builds and sends replies for one connection. */
export class OutputQueue {
  /** The slab reserve() allocates from; read it right after reserve(). */
  cur: Slab;
  /** Called after a socket write completed (room may have become available). */
  onSpace: (() => void) | null = null;
  /** Called when a reply's data could not be read while it was sent (see readFailed). */
  onReadError: ((e: unknown) => void) | null = null;
  /** Bytes of external buffers and file segments queued but not yet handed to the socket. */
  unflushed = 0;
  /** Bytes sent with sendfile (for stats). */
  zeroCopyBytes = 0;
  private readonly free: Slab[] = [];
  private slabs = 1;
  private segments: Segment[] = [];
  private writes = 0;
  private flushing = false;
  /** A reply was sent synchronously since the last takeSentDirect() (room may have come free). */
  private sentDirect = false;

  constructor(
    private readonly stream: Duplex,
    /** The socket's descriptor for zero-copy segments (-1: none will be queued). */
    private readonly sockFd = -1,
    private readonly slabSize = 256 * 1024,
    private readonly maxSlabs = 16,
  ) {
    this.cur = new Slab(slabSize);
  }

  /** True (once) when replies were sent synchronously, freeing room without an onSpace call. */
  takeSentDirect(): boolean {
    const r = this.sentDirect;
    this.sentDirect = false;
    return r;
  }

  /** Socket writes not yet completed. */
  get pendingWrites(): number {
    return this.writes;
  }

  /** True when reserve(n) would succeed now. */
  canReserve(n: number): boolean {
    const s = this.cur;
    if (s.refs === 0 || s.used + n <= s.buf.length) return true;
    return this.free.length > 0 || this.slabs < this.maxSlabs;
  }

  /** Reserve n (<= slab size) bytes in `cur`; returns the offset, or -1 when every slab is busy. */
  reserve(n: number): number {
    let s = this.cur;
    if (s.refs === 0) s.used = 0; // everything in it was written out: start again at the top
    if (s.used + n > s.buf.length) {
      let next = this.free.pop();
      if (next === undefined) {
        if (this.slabs >= this.maxSlabs) return -1;
        this.slabs++;
        next = new Slab(this.slabSize);
      }
      s.retired = true;
      next.used = 0;
      next.retired = false;
      this.cur = s = next;
    }
    const at = s.used;
    s.used += n;
    s.refs++;
    return at;
  }

  /** Queue [start, end) of `slab` (a reserved region, now filled) for sending. */
  commit(slab: Slab, start: number, end: number): void {
    const last = this.segments[this.segments.length - 1];
    if (last !== undefined && last.slab === slab && last.end === start) {
      last.end = end;
      last.count++;
      return;
    }
    this.segments.push({
      buf: slab.buf,
      start,
      end,
      slab,
      count: 1,
      pooled: null,
      fd: -1,
      offset: 0,
      length: 0,
    });
  }

  /** Give back a reserved region without sending it. */
  cancel(slab: Slab): void {
    this.unref(slab, 1);
  }

  /**
   * Queue a buffer that lives outside the slabs (large reads, variable-size replies). With
   * `pooled` (from util/buffer-pool acquire()), that buffer is released once `buf` is written.
   */
  pushExternal(buf: Buffer, pooled: Buffer | null = null): void {
    this.segments.push(externalSegment(buf, pooled));
    this.unflushed += buf.length;
  }

  /** Queue a small reply: in a slab when there is room, else in its own buffer. */
  pushSmall(bytes: Buffer): void {
    const at = this.reserve(bytes.length);
    if (at < 0) {
      this.pushExternal(Buffer.from(bytes));
      return;
    }
    bytes.copy(this.cur.buf, at);
    this.commit(this.cur, at, at + bytes.length);
  }

  /** Queue `header` followed by `length` bytes of file `fd` at `offset`, sent with sendfile. */
  pushFile(header: Buffer, fd: number, offset: number, length: number, tail?: ReplyTail): void {
    this.pushZeroCopy(header, fd, offset, length, undefined, tail);
  }

  /** Queue `header` followed by a lent read, sent piece by piece (see PieceLease.copyFd). */
  pushLease(header: Buffer, lease: PieceLease, tail?: ReplyTail): void {
    this.pushZeroCopy(header, -1, 0, lease.length, lease, tail);
  }

  private pushZeroCopy(
    header: Buffer,
    fd: number,
    offset: number,
    length: number,
    lease: PieceLease | undefined,
    tail: ReplyTail | undefined,
  ): void {
    if (this.sockFd < 0) throw new Error("zero-copy segment on a connection without a socket descriptor");
    const s: Segment = {
      buf: header,
      start: 0,
      end: header.length,
      slab: null,
      count: 0,
      pooled: null,
      fd,
      offset,
      length,
    };
    if (lease !== undefined) s.lease = lease;
    if (tail !== undefined) s.tail = tail;
    this.segments.push(s);
    this.unflushed += header.length + length;
  }

  /** The connection is gone: give back the leases of replies that will never be sent. */
  discard(): void {
    for (const s of this.segments) s.lease?.release();
    this.segments = [];
    this.unflushed = 0;
  }

  /** Write everything queued (zero-copy segments as soon as what precedes them has left). */
  flush(): void {
    if (this.flushing) return;
    this.flushing = true;
    try {
      this.pump();
    } finally {
      this.flushing = false;
    }
  }

  private pump(): void {
    const segs = this.segments;
    let i = 0;
    while (i < segs.length) {
      if (segs[i].fd >= 0 || segs[i].lease !== undefined) {
        // A zero-copy segment: only when nothing sits in libuv's queue ahead of it.
        if (this.writes > 0 || this.stream.writableLength > 0) break;
        if (segs[i].lease !== undefined) {
          if (!this.sendLeaseSegment(segs[i])) break; // waits for its bridge write
        } else this.sendFileSegment(segs[i]);
        if (this.stream.destroyed) return; // fail(): nothing more goes out on this connection
        i++;
        continue;
      }
      let j = i;
      while (j < segs.length && segs[j].fd < 0 && segs[j].lease === undefined) j++;
      const many = j - i > 1;
      if (many) this.stream.cork();
      for (let k = i; k < j; k++) this.write(segs[k], !many);
      if (many) this.stream.uncork();
      i = j;
    }
    if (i === segs.length) this.segments = [];
    else this.segments = segs.slice(i);
    this.unflushed = 0;
    for (const s of this.segments) if (s.slab === null) this.unflushed += s.end - s.start + s.length;
  }

  private write(s: Segment, direct = false): void {
    let view = s.start === 0 && s.end === s.buf.length ? s.buf : s.buf.subarray(s.start, s.end);
    if (direct && this.sockFd >= 0 && this.writes === 0 && this.stream.writableLength === 0) {
      // Nothing queued in libuv ahead of it: send it ourselves, now (one send(2), no write request,
      // no callback). Whatever the socket does not take goes through libuv, still in order.
      const sent = sendNow(this.sockFd, view);
      if (sent === view.length) {
        if (s.slab !== null) this.unref(s.slab, s.count);
        if (s.pooled !== null) release(s.pooled);
        this.sentDirect = true;
        return;
      }
      if (sent > 0) view = view.subarray(sent);
      // sent < 0: the connection failed; the stream's own write reports it (error/close).
    }
    this.writes++;
    this.stream.write(view, () => this.written(s));
  }

  /**
   * Half of a reply is on the wire and the rest cannot be read (a disk error after the page cache
   * dropped the pages): the reply cannot be completed nor replaced by an error, so this connection
   * ends (the stream reports the error and closes; the others go on).
   */
  private fail(e: unknown): void {
    for (const s of this.segments) s.lease?.release();
    this.segments = [];
    this.unflushed = 0;
    this.stream.destroy(e instanceof Error ? e : new Error(String(e)));
  }

  /** Write a buffer of its own through libuv (`pooled` goes back to the pool once written). */
  private writeBuffer(buf: Buffer, pooled: Buffer | null): void {
    this.write(externalSegment(buf, pooled));
  }

  private sendFileSegment(s: Segment): void {
    const hlen = s.buf.length;
    const total = hlen + s.length;
    const sent = sendHeaderAndFile(this.sockFd, s.buf, s.fd, s.offset, s.length);
    if (sent < 0) {
      // The connection failed; the stream reports it (error/close). Nothing more to send here.
      return;
    }
    this.zeroCopyBytes += Math.max(0, sent - hlen);
    if (sent === total) {
      this.endReply(s);
      return;
    }
    // The socket filled up: the rest of this reply goes through libuv, ahead of everything after it.
    const rest = total - sent;
    const pooled = acquire(rest);
    const buf = pooled.subarray(0, rest);
    let at = 0;
    if (sent < hlen) {
      s.buf.copy(buf, 0, sent);
      at = hlen - sent;
    }
    const dataStart = Math.max(0, sent - hlen);
    try {
      readFullySync(s.fd, buf.subarray(at), s.offset + dataStart);
    } catch (e) {
      this.readFailed(s, buf, at, pooled, e);
      return;
    }
    this.writeBuffer(buf, pooled);
    this.endReply(s);
  }

  /** A structured reply whose data has all gone: its NONE chunk with DONE (see the notes above). */
  private endReply(s: Segment): void {
    if (s.tail) this.writeBuffer(doneChunk(s.tail), null);
  }

  /**
   * The rest of a reply's data (`buf` from `at` on, pooled, and `more` bytes after it) could not
   * be read. Structured: the chunk is completed with zeroes and the read fails with an ERROR
   * chunk; simple: the connection ends (the client has the header, and a simple reply has no
   * way to take it back).
   */
  private readFailed(s: Segment, buf: Buffer, at: number, pooled: Buffer, e: unknown, more = 0): void {
    s.lease?.release();
    this.onReadError?.(e);
    if (!s.tail) {
      release(pooled);
      this.fail(e);
      return;
    }
    buf.fill(0, at);
    this.writeBuffer(buf, pooled);
    if (more > 0) this.writeBuffer(Buffer.alloc(more), null);
    const why = e instanceof Error ? e.message : String(e);
    this.writeBuffer(
      encodeErrorChunk(
        s.tail.cookieHi,
        s.tail.cookieLo,
        nbdErrorOf(e),
        `read failed while it was sent: ${why}`,
      ),
      null,
    );
  }

  /**
   * Send a lent read from where it stands (`s.sent`). When the socket fills up, the next
   * LEASE_BRIDGE bytes are copied and written through libuv, whose completion says there is room
   * again; the segment stays at the head of the queue until the rest has gone (false).
   */
  private sendLeaseSegment(s: Segment): boolean {
    const lease = s.lease!;
    const hlen = s.buf.length;
    const total = hlen + lease.length;
    let sent = s.sent ?? 0;
    if (lease.data !== null) {
      // The lender copied it (the primary was about to change): send the rest from the copy.
      lease.release();
      const data = lease.data.subarray(Math.max(0, sent - hlen));
      const buf = sent < hlen ? Buffer.concat([s.buf.subarray(sent), data]) : data;
      this.writeBuffer(buf, null);
      this.endReply(s);
      return true;
    }
    const r = sendPieces(
      this.sockFd,
      sent < hlen ? s.buf.subarray(sent) : NO_BYTES,
      lease.pieces,
      Math.max(0, sent - hlen),
      lease.copyFd,
    );
    if (r < 0) {
      lease.release(); // the connection failed; the stream reports it (error/close)
      return true;
    }
    if (lease.copyFd === -1) this.zeroCopyBytes += Math.max(0, sent + r - Math.max(sent, hlen));
    sent += r;
    if (sent === total) {
      lease.release();
      this.endReply(s);
      return true;
    }
    // The socket is full: a copied bridge through libuv (still consistent: nothing can change the
    // pieces within this call), ahead of everything queued after it.
    const n = Math.min(LEASE_BRIDGE, total - sent);
    const pooled = acquire(n);
    const buf = pooled.subarray(0, n);
    let at = 0;
    if (sent < hlen) {
      at = s.buf.copy(buf, 0, sent);
    }
    try {
      readPiecesSync(lease.pieces, Math.max(0, sent - hlen), buf.subarray(at));
    } catch (e) {
      // The chunk must be completed: the rest of the lease after this bridge goes as zeroes too.
      this.readFailed(s, buf, at, pooled, e, total - sent - n);
      return true;
    }
    sent += n;
    s.sent = sent;
    const finished = sent === total;
    if (finished) lease.release();
    this.writeBuffer(buf, pooled);
    if (finished) this.endReply(s);
    return finished;
  }

  /** Everything queued was handed to the stream (writes may still be in flight). */
  get handedOver(): boolean {
    return this.segments.length === 0;
  }

  /** Nothing queued and no write in flight. */
  get idle(): boolean {
    return this.segments.length === 0 && this.writes === 0;
  }

  private written(s: Segment): void {
    this.writes--;
    if (s.slab !== null) this.unref(s.slab, s.count);
    if (s.pooled !== null) release(s.pooled);
    // A zero-copy segment may be waiting for the queue ahead of it to empty.
    const next = this.segments[0];
    if (this.writes === 0 && next !== undefined && (next.fd >= 0 || next.lease !== undefined)) this.flush();
    this.onSpace?.();
  }

  private unref(slab: Slab, n: number): void {
    slab.refs -= n;
    if (slab.refs === 0 && slab.retired) {
      slab.retired = false;
      this.free.push(slab);
    }
  }
}

/** Bytes of a lent read copied per bridge write when the socket is full. */
const LEASE_BRIDGE = 32 * 1024;
const NO_BYTES = Buffer.alloc(0);

/** A segment for a buffer of its own (`pooled` goes back to the pool once it is written). */
function externalSegment(buf: Buffer, pooled: Buffer | null): Segment {
  return { buf, start: 0, end: buf.length, slab: null, count: 0, pooled, fd: -1, offset: 0, length: 0 };
}
