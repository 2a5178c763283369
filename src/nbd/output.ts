// The reply side of a connection: slabs that replies are built in, and a queue of ready ranges
// sent with as few socket writes as possible (after undici's reuse of buffers in client-h1.js).
//
// Notes on the design
// - A read reply is built in place: the header and the data are reserved together in a slab and
//   the volume reads straight into it, so a 4 KiB read costs no allocation and no copy in JS.
// - Replies become ready out of order (async completions). `commit` appends a ready range to the
//   send queue, extending the previous range when they touch (the common case: a burst of cached
//   reads completes in order), and `flush` writes the queue with one write, or a corked writev.
// - A slab is reused only when nothing in it is pending (`refs` counts regions reserved but not
//   yet written out). When every slab is busy, reserve() fails and the connection stops reading
//   requests until writes complete (`onSpace`): a client that does not read its replies stalls
//   itself, never the server's memory.

import type { Duplex } from "node:stream";
import { release } from "../util/buffer-pool.js";

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
}

/** Builds and sends replies for one connection. */
export class OutputQueue {
  /** The slab reserve() allocates from; read it right after reserve(). */
  cur: Slab;
  /** Called after a socket write completed (room may have become available). */
  onSpace: (() => void) | null = null;
  private readonly free: Slab[] = [];
  private slabs = 1;
  private segments: Segment[] = [];
  private writes = 0;
  /** Bytes of external buffers queued but not yet handed to the socket. */
  unflushed = 0;

  constructor(
    private readonly stream: Duplex,
    private readonly slabSize = 256 * 1024,
    private readonly maxSlabs = 16,
  ) {
    this.cur = new Slab(slabSize);
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
    this.segments.push({ buf: slab.buf, start, end, slab, count: 1, pooled: null });
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
    this.segments.push({ buf, start: 0, end: buf.length, slab: null, count: 0, pooled });
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

  /** Write everything queued. */
  flush(): void {
    const segs = this.segments;
    if (segs.length === 0) return;
    this.segments = [];
    this.unflushed = 0;
    const many = segs.length > 1;
    if (many) this.stream.cork();
    for (const s of segs) {
      this.writes++;
      const view = s.start === 0 && s.end === s.buf.length ? s.buf : s.buf.subarray(s.start, s.end);
      this.stream.write(view, () => this.written(s));
    }
    if (many) this.stream.uncork();
  }

  /** Nothing queued and no write in flight. */
  get idle(): boolean {
    return this.segments.length === 0 && this.writes === 0;
  }

  private written(s: Segment): void {
    this.writes--;
    if (s.slab !== null) this.unref(s.slab, s.count);
    if (s.pooled !== null) release(s.pooled);
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
