// The transmission phase: the request loop of one connection (after nbdkit server/protocol.c and
// libnbd generator/states-reply*.c).
//
// Notes on the design
// - Parse, validate, dispatch, reply. Requests are parsed straight out of each received chunk; a
//   WRITE payload wholly inside the chunk is passed to the volume as a view (no copy), one that
//   spans chunks is assembled. A rejected WRITE has its payload drained so the stream stays in step.
// - Two grades of error: a bad request gets an error reply (EINVAL, EPERM, ENOSPC, ...) and the
//   connection carries on; a protocol violation (bad magic) ends the connection, after the requests
//   already in flight have completed.
// - Many requests in flight, replies in completion order. A volume call that finished synchronously
//   (it returned DONE: a page-cache hit) is answered inline, with no promise reaction; the replies
//   of one received chunk leave in one socket write (OutputQueue).
// - Backpressure: at most MAX_INFLIGHT requests wait on the volume, and reply slabs are bounded;
//   WRITE payloads waiting on the volume are bounded too (MAX_WRITE_BYTES); past any limit the
//   connection stops reading until requests complete and replies drain.
// - Structured replies (when negotiated): OFFSET_DATA for reads, with holes as OFFSET_HOLE for large
//   reads without DF; errors as NBD_REPLY_TYPE_ERROR chunks carrying a message; BLOCK_STATUS.
// - DISC: stop reading, finish what is in flight, send the replies, close (TLS close_notify via end).

import type { Socket } from "node:net";
import type { Duplex } from "node:stream";
import type { Logger } from "../log.js";
import { errnoName, BlockforkError } from "../errors.js";
import { allFinished, DONE } from "../util/done.js";
import { acquire, release } from "../util/buffer-pool.js";
import type { Extent, Volume } from "../volume/volume.js";
import { isCached, setSendBuffer } from "../blockio/index.js";
import { RequestReceiver, type PayloadHold, type RequestSink } from "./receiver.js";
import { plainSocketFd } from "../util/onread.js";
import { commandName } from "./commands.js";
import { nbdErrorOf } from "./errors.js";
import { OutputQueue, type ReplyTail } from "./output.js";
import { validateRequest, type Rejection, type ValidationContext } from "./validate.js";
import { BASE_ALLOCATION_ID } from "./handshake.js";
import { statusDescriptors } from "./status.js";
import {
  CMD,
  CMD_FLAG,
  encodeErrorChunk,
  NBD_ERR,
  REPLY_FLAG_DONE,
  REPLY_TYPE,
  SIMPLE_REPLY_SIZE,
  STATE_ZERO,
  STRUCTURED_REPLY_SIZE,
  writeSimpleReply,
  writeStructuredHeader,
  writeU64,
  type Request,
} from "./wire.js";

const MAX_INFLIGHT = 512;
/**
 * Stop reading requests while WRITE payloads of more than this wait on the volume: each is up to
 * 32 MiB, so 512 of them on a stalled volume would hold 16 GiB (nbdkit is bounded by its threads,
 * qemu-nbd by 16 requests a client).
 */
const MAX_WRITE_BYTES = 64 * 1024 * 1024;
/** Reads up to this size are built in a reply slab; larger ones get their own buffer. */
const MAX_SLAB_READ = 64 * 1024;
/** Structured reads at least this large look for holes to send as OFFSET_HOLE. */
const SPARSE_READ_MIN = 64 * 1024;
/** Holes smaller than this are sent as data (a chunk header is not worth it). */
const MIN_HOLE = 4096;
/**
 * Stop reading requests while this much read data is in flight or waiting in the socket. Besides
 * bounding memory, this keeps the working set of reply buffers small enough to stay in the CPU
 * caches: with 64 MiB of 256 KiB reads in flight every copy went through DRAM and cost 50% more.
 */
const MAX_QUEUED_BYTES = Number(process.env.BF_MAX_QUEUED ?? 2 * 1024 * 1024);
/**
 * The send buffer asked for on unix-socket connections (see the constructor). The kernel doubles
 * it for its bookkeeping: room for about two 1 MiB replies and their overhead. With a client that
 * stops reading, a connection holds up to that much kernel memory plus MAX_QUEUED_BYTES.
 */
const UNIX_SEND_BUFFER = Number(process.env.BF_UNIX_SNDBUF ?? 2 * 1024 * 1024);
/** After DISC or shutdown, how long the peer gets to close before we destroy the socket. */
const CLOSE_GRACE_MS = 5000;

interface Piece {
  offset: number;
  length: number;
  hole: boolean;
}

/** Cut [offset, offset+length) into data and hole pieces; holes under MIN_HOLE count as data. */
function piecesOf(extents: Extent[], offset: number, length: number): Piece[] {
  const end = offset + length;
  const pieces: Piece[] = [];
  let pos = offset;
  for (const e of extents) {
    if (pos >= end) break;
    const n = Math.min(e.length, end - pos);
    const hole = (e.flags & STATE_ZERO) !== 0 && n >= MIN_HOLE;
    const last = pieces[pieces.length - 1];
    if (last !== undefined && last.hole === hole) last.length += n;
    else pieces.push({ offset: pos, length: n, hole });
    pos += n;
  }
  if (pos < end) {
    const last = pieces[pieces.length - 1];
    if (last !== undefined && !last.hole) last.length += end - pos;
    else pieces.push({ offset: pos, length: end - pos, hole: false });
  }
  return pieces;
}

/** What a transmission needs to know about its negotiated session. */
export interface TransmissionSettings {
  volume: Volume;
  flags: number;
  structured: boolean;
  blockStatus: boolean;
  minBlock: number;
  maxBlock: number;
  log: Logger;
  /** Send large cached reads with sendfile when the stream is a plain socket (default true). */
  zeroCopy?: boolean;
  /** Read plain sockets straight into our buffers (onread) (default true). */
  directInput?: boolean;
}

/** Counters kept per connection (for logs and status). */
export interface TransmissionStats {
  requests: number;
  errors: number;
  bytesRead: number;
  bytesWritten: number;
}

type State = "open" | "closing" | "closed";

/** The request loop of one connection. */
export class Transmission implements RequestSink {
  readonly stats: TransmissionStats = { requests: 0, errors: 0, bytesRead: 0, bytesWritten: 0 };
  /** Settles when the connection is closed and nothing is in flight. */
  readonly finished: Promise<void>;

  private readonly vol: Volume;
  private readonly ctx: ValidationContext;
  private readonly structured: boolean;
  private readonly sparseReads: boolean;
  /** The socket's file descriptor for zero-copy sends, or -1 (TLS, disabled, unknown). */
  private readonly zeroCopyFd: number;
  private readonly out: OutputQueue;
  private readonly log: Logger;
  private readonly receiver: RequestReceiver;
  private readonly stream: Duplex;
  private inflight = 0;
  /** Bytes of READ replies dispatched whose data is not yet handed to the socket. */
  private readBytes = 0;
  /** WRITE payload bytes waiting on the volume. */
  private writeBytes = 0;
  private blocked = false;
  private flushScheduled = false;
  private state: State = "open";
  private shuttingDown = false;
  private closeReason = "";
  private peerGone = false;
  private resolveFinished!: () => void;
  private quiesceWaiters: (() => void)[] = [];
  private graceTimer: NodeJS.Timeout | null = null;

  constructor(source: Duplex, settings: TransmissionSettings, leftover: Buffer) {
    this.vol = settings.volume;
    this.log = settings.log;
    this.structured = settings.structured;
    this.sparseReads = settings.structured && settings.volume.caps().extents;
    this.ctx = {
      size: settings.volume.size,
      flags: settings.flags,
      blockStatus: settings.blockStatus,
      minBlock: settings.minBlock,
      maxBlock: settings.maxBlock,
    };
    this.receiver = new RequestReceiver(this, source, leftover, settings.directInput !== false);
    const stream = (this.stream = this.receiver.stream);
    this.zeroCopyFd = settings.zeroCopy === false ? -1 : plainSocketFd(stream);
    // A unix socket's send buffer (net.core.wmem_default, ~208 KiB) holds less than one large
    // reply, so a 1 MiB read would go out in pieces, waiting for the client between them: ask for
    // room for several (the kernel caps it at net.core.wmem_max). TCP tunes its own buffer.
    if (this.zeroCopyFd >= 0 && typeof (stream as Socket).remoteAddress !== "string") {
      setSendBuffer(this.zeroCopyFd, UNIX_SEND_BUFFER);
    }
    this.out = new OutputQueue(stream, this.zeroCopyFd);
    this.out.onSpace = this.onSpace;
    this.out.onReadError = (e) => {
      // The request was answered OK as far as its header goes; its data failed on the way.
      this.stats.errors++;
      this.log.limited(
        "error",
        "read failed while sent",
        `READ failed while its reply was sent: ${e instanceof Error ? e.message : String(e)} (NBD error ${errnoName(nbdErrorOf(e))})`,
      );
    };
    this.finished = new Promise<void>((resolve) => (this.resolveFinished = resolve));
    stream.on("end", this.onPeerEnd);
    stream.on("close", this.onPeerClose);
    stream.on("error", this.onStreamError);
    stream.on("drain", this.onSpace);
    this.receiver.start();
  }

  /** The stream replies go to (the connection's socket after the receiver took it over). */
  get socket(): Duplex {
    return this.stream;
  }

  /** Requests accepted but not yet answered. */
  get inFlight(): number {
    return this.inflight;
  }

  /** Server shutdown: answer new requests with ESHUTDOWN; resolves when nothing is in flight. */
  quiesce(): Promise<void> {
    this.shuttingDown = true;
    if (this.quiet()) return Promise.resolve();
    return new Promise<void>((resolve) => this.quiesceWaiters.push(resolve));
  }

  /**
   * Nothing in flight, and no accepted WRITE whose payload is still arriving: that one would reach
   * the volume after the shutdown's final flush (and, with a gateway, after the tracking log
   * closed), answered as if it were durable.
   */
  private quiet(): boolean {
    return this.inflight === 0 && (this.peerGone || !this.receiver.midPayload);
  }

  private wakeQuiesce(): void {
    if (this.quiesceWaiters.length === 0 || !this.quiet()) return;
    const waiters = this.quiesceWaiters;
    this.quiesceWaiters = [];
    for (const w of waiters) w();
  }

  /** Close the connection gracefully (after in-flight requests). */
  close(reason: string): void {
    this.beginClose(reason);
  }

  /** Drop the connection now. */
  destroy(reason: string): void {
    if (!this.closeReason) this.closeReason = reason;
    this.stream.destroy();
  }

  // ---- input (RequestSink: called by the receiver)

  /** A request without payload. */
  request(req: Request): void {
    this.stats.requests++;
    try {
      this.dispatch(req);
    } catch (e) {
      // A volume must answer through its promise; one that throws instead (a bug) fails this
      // request, not the process and every other client with it.
      this.replyFailure(req, e);
    }
  }

  checkWrite(req: Request): Rejection | null {
    this.stats.requests++;
    return this.check(req);
  }

  rejected(req: Request, r: Rejection): void {
    this.reject(req, r);
  }

  violation(message: string): void {
    this.log.warn(`${message}: protocol violation, closing the connection`);
    this.beginClose(`protocol violation (${message})`, true);
  }

  /** End of a burst of input: send the replies it produced. */
  flush(): void {
    this.out.flush();
    // Replies sent synchronously freed room without a write callback: a connection that stopped
    // reading for lack of room must look again (on the next tick: no recursion into the parser).
    if (this.out.takeSentDirect() && this.blocked && !this.spaceTick) {
      this.spaceTick = true;
      process.nextTick(this.spaceCheck);
    }
  }

  private spaceTick = false;
  private readonly spaceCheck = (): void => {
    this.spaceTick = false;
    this.onSpace();
  };

  mustWait(): boolean {
    const wait =
      this.inflight >= MAX_INFLIGHT ||
      !this.out.canReserve(MAX_SLAB_READ + 64) ||
      this.readBytes + this.out.unflushed + this.stream.writableLength > MAX_QUEUED_BYTES ||
      this.writeBytes > MAX_WRITE_BYTES ||
      this.receiver.saturated;
    if (wait) this.blocked = true;
    return wait;
  }

  private readonly onSpace = (): void => {
    if (this.state === "closed") this.endWhenSent();
    if (!this.blocked || this.state !== "open") return;
    if (this.mustWait()) return;
    this.blocked = false;
    this.receiver.resume();
  };

  private check(req: Request): Rejection | null {
    if (this.shuttingDown) return { error: NBD_ERR.ESHUTDOWN, message: "the server is shutting down" };
    return validateRequest(req, this.ctx);
  }

  // ---- dispatch

  private dispatch(req: Request): void {
    if (req.type === CMD.DISC) {
      this.beginClose("client sent DISC");
      return;
    }
    const rejection = this.check(req);
    if (rejection !== null) {
      this.reject(req, rejection);
      return;
    }
    const fua = (req.flags & CMD_FLAG.FUA) !== 0;
    switch (req.type) {
      case CMD.READ:
        this.read(req);
        return;
      case CMD.FLUSH:
        this.complete(req, this.vol.flush());
        return;
      case CMD.TRIM:
        this.complete(req, this.vol.trim(req.offset, req.length, fua));
        return;
      case CMD.WRITE_ZEROES:
        this.complete(
          req,
          this.vol.zero(req.offset, req.length, {
            fua,
            mayTrim: (req.flags & CMD_FLAG.NO_HOLE) === 0,
            fast: (req.flags & CMD_FLAG.FAST_ZERO) !== 0,
          }),
        );
        return;
      case CMD.CACHE:
        this.complete(req, this.vol.cache(req.offset, req.length));
        return;
      case CMD.BLOCK_STATUS:
        this.blockStatus(req);
        return;
    }
  }

  /** A WRITE with its payload; `hold` keeps the payload's memory until the volume is done with it. */
  write(req: Request, data: Buffer, hold: PayloadHold): void {
    this.stats.bytesWritten += data.length;
    let p: Promise<void>;
    try {
      p = this.vol.write(data, req.offset, (req.flags & CMD_FLAG.FUA) !== 0, hold);
    } catch (e) {
      p = Promise.reject(e); // see request()
    }
    if (p === DONE) {
      hold.release();
      this.replyOk(req);
      this.wakeQuiesce();
      return;
    }
    this.inflight++;
    this.writeBytes += data.length;
    p.then(
      () => {
        hold.release();
        this.writeBytes -= data.length;
        this.replyOk(req);
        this.settled();
      },
      (e: unknown) => {
        hold.release();
        this.writeBytes -= data.length;
        this.replyFailure(req, e);
        this.settled();
      },
    );
  }

  /** Answer a request without payload when `p` settles (inline when it is DONE). */
  private complete(req: Request, p: Promise<void>): void {
    if (p === DONE) {
      this.replyOk(req);
      return;
    }
    this.inflight++;
    p.then(
      () => {
        this.replyOk(req);
        this.settled();
      },
      (e: unknown) => {
        this.replyFailure(req, e);
        this.settled();
      },
    );
  }

  private read(req: Request): void {
    const len = req.length;
    this.stats.bytesRead += len;
    if (
      len > MAX_SLAB_READ ||
      (this.sparseReads && len >= SPARSE_READ_MIN && (req.flags & CMD_FLAG.DF) === 0)
    ) {
      this.inflight++;
      this.readBytes += len;
      this.largeRead(req).then(
        () => {
          this.readBytes -= len;
          this.settled();
        },
        (e: unknown) => {
          this.readBytes -= len;
          this.replyFailure(req, e);
          this.settled();
        },
      );
      return;
    }
    // Small read: header and data built in place in a reply slab.
    const hdr = this.structured ? STRUCTURED_REPLY_SIZE + 8 : SIMPLE_REPLY_SIZE;
    const out = this.out;
    const at = out.reserve(hdr + len); // room was checked by mustWait()
    const slab = out.cur;
    const buf = slab.buf;
    const p = this.vol.read(buf.subarray(at + hdr, at + hdr + len), req.offset);
    if (p === DONE) {
      this.readHeader(buf, at, req);
      out.commit(slab, at, at + hdr + len);
      return;
    }
    this.inflight++;
    p.then(
      () => {
        this.readHeader(buf, at, req);
        out.commit(slab, at, at + hdr + len);
        this.settled();
      },
      (e: unknown) => {
        out.cancel(slab);
        this.replyFailure(req, e);
        this.settled();
      },
    );
  }

  /**
   * A large read: zero runs as OFFSET_HOLE chunks (structured, no DF); else straight from the page
   * cache to the socket (zero-copy) when the volume is a plain file range that is fully cached;
   * else read into a pooled buffer.
   */
  private async largeRead(req: Request): Promise<void> {
    if (this.sparseReads && req.length >= SPARSE_READ_MIN && (req.flags & CMD_FLAG.DF) === 0) {
      const pieces = piecesOf(await this.vol.extents(req.offset, req.length), req.offset, req.length);
      if (pieces.length > 1 || pieces[0].hole) {
        await this.sparseRead(req, pieces);
        return;
      }
    }
    if (this.zeroCopyFd >= 0 && this.zeroCopy(req)) return;
    if (this.zeroCopyFd >= 0 && this.lentRead(req)) return;
    if (this.zeroCopyFd >= 0) {
      // Refused for pieces not in the page cache? Read just those, then lend after all.
      const warming = this.vol.warmPieces?.(req.offset, req.length);
      if (warming) {
        await warming;
        if (this.lentRead(req)) return;
      }
    }
    const hdr = this.structured ? STRUCTURED_REPLY_SIZE + 8 : SIMPLE_REPLY_SIZE;
    const pooled = acquire(hdr + req.length);
    const buf = pooled.subarray(0, hdr + req.length);
    try {
      const p = this.vol.read(buf.subarray(hdr), req.offset);
      if (p !== DONE) await p;
    } catch (e) {
      release(pooled);
      throw e;
    }
    this.readHeader(buf, 0, req);
    this.out.pushExternal(buf, pooled);
  }

  /** Queue the reply as header + file range for sendfile; false when that cannot be done. */
  private zeroCopy(req: Request): boolean {
    const range = this.vol.fileRange?.(req.offset, req.length);
    if (!range || !isCached(range.fd, range.offset, req.length)) return false;
    const header = Buffer.allocUnsafe(this.structured ? STRUCTURED_REPLY_SIZE + 8 : SIMPLE_REPLY_SIZE);
    // Not final: the data is read while it is sent, and an error may come up (output.ts).
    this.readHeader(header, 0, req, 0);
    this.out.pushFile(header, range.fd, range.offset, req.length, this.tailOf(req));
    return true;
  }

  /** Queue the reply as header + pieces lent by the volume (a snapshot); false when it lends none. */
  private lentRead(req: Request): boolean {
    const lease = this.vol.lendPieces?.(req.offset, req.length);
    if (!lease) return false;
    const header = Buffer.allocUnsafe(this.structured ? STRUCTURED_REPLY_SIZE + 8 : SIMPLE_REPLY_SIZE);
    this.readHeader(header, 0, req, 0);
    this.out.pushLease(header, lease, this.tailOf(req));
    return true;
  }

  /** How a structured reply whose data is read while it is sent ends (see output.ts). */
  private tailOf(req: Request): ReplyTail | undefined {
    return this.structured ? { cookieHi: req.cookieHi, cookieLo: req.cookieLo } : undefined;
  }

  private readHeader(buf: Buffer, at: number, req: Request, flags = REPLY_FLAG_DONE): void {
    if (this.structured) {
      writeStructuredHeader(
        buf,
        at,
        flags,
        REPLY_TYPE.OFFSET_DATA,
        req.cookieHi,
        req.cookieLo,
        8 + req.length,
      );
      writeU64(buf, at + STRUCTURED_REPLY_SIZE, req.offset);
    } else {
      writeSimpleReply(buf, at, 0, req.cookieHi, req.cookieLo);
    }
  }

  /** A structured read sent as OFFSET_DATA and OFFSET_HOLE chunks, in order, DONE on the last. */
  private async sparseRead(req: Request, pieces: Piece[]): Promise<void> {
    let size = 0;
    for (const p of pieces)
      size += p.hole ? STRUCTURED_REPLY_SIZE + 12 : STRUCTURED_REPLY_SIZE + 8 + p.length;
    const pooled = acquire(size);
    const buf = pooled.subarray(0, size);
    const reads: Promise<void>[] = [];
    let at = 0;
    for (let i = 0; i < pieces.length; i++) {
      const p = pieces[i];
      const flags = i === pieces.length - 1 ? REPLY_FLAG_DONE : 0;
      if (p.hole) {
        writeStructuredHeader(buf, at, flags, REPLY_TYPE.OFFSET_HOLE, req.cookieHi, req.cookieLo, 12);
        writeU64(buf, at + STRUCTURED_REPLY_SIZE, p.offset);
        buf.writeUInt32BE(p.length, at + STRUCTURED_REPLY_SIZE + 8);
        at += STRUCTURED_REPLY_SIZE + 12;
      } else {
        writeStructuredHeader(
          buf,
          at,
          flags,
          REPLY_TYPE.OFFSET_DATA,
          req.cookieHi,
          req.cookieLo,
          8 + p.length,
        );
        writeU64(buf, at + STRUCTURED_REPLY_SIZE, p.offset);
        const data = buf.subarray(at + STRUCTURED_REPLY_SIZE + 8, at + STRUCTURED_REPLY_SIZE + 8 + p.length);
        const r = this.vol.read(data, p.offset);
        if (r !== DONE) reads.push(r);
        at += STRUCTURED_REPLY_SIZE + 8 + p.length;
      }
    }
    try {
      // Every read must have finished before the buffer goes back to the pool, failed or not: a
      // read still running would write into memory the pool has handed to someone else.
      if (reads.length > 0) await allFinished(reads);
    } catch (e) {
      release(pooled);
      throw e;
    }
    this.out.pushExternal(buf, pooled);
  }

  private blockStatus(req: Request): void {
    this.inflight++;
    this.vol.extents(req.offset, req.length).then(
      (extents) => {
        const one = (req.flags & CMD_FLAG.REQ_ONE) !== 0;
        const pairs = statusDescriptors(extents, req.offset, req.length, this.ctx.minBlock, one);
        const n = pairs.length / 2;
        const buf = Buffer.allocUnsafe(STRUCTURED_REPLY_SIZE + 4 + 8 * n);
        writeStructuredHeader(
          buf,
          0,
          REPLY_FLAG_DONE,
          REPLY_TYPE.BLOCK_STATUS,
          req.cookieHi,
          req.cookieLo,
          4 + 8 * n,
        );
        buf.writeUInt32BE(BASE_ALLOCATION_ID, STRUCTURED_REPLY_SIZE);
        for (let i = 0; i < n; i++) {
          buf.writeUInt32BE(pairs[2 * i], STRUCTURED_REPLY_SIZE + 4 + 8 * i);
          buf.writeUInt32BE(pairs[2 * i + 1], STRUCTURED_REPLY_SIZE + 8 + 8 * i);
        }
        this.out.pushExternal(buf);
        this.settled();
      },
      (e: unknown) => {
        this.replyFailure(req, e);
        this.settled();
      },
    );
  }

  // ---- replies

  private replyOk(req: Request): void {
    const out = this.out;
    const at = out.reserve(SIMPLE_REPLY_SIZE);
    if (at < 0) {
      const b = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
      writeSimpleReply(b, 0, 0, req.cookieHi, req.cookieLo);
      out.pushExternal(b);
      return;
    }
    writeSimpleReply(out.cur.buf, at, 0, req.cookieHi, req.cookieLo);
    out.commit(out.cur, at, at + SIMPLE_REPLY_SIZE);
  }

  private replyError(req: Request, error: number, message: string): void {
    this.stats.errors++;
    if (this.structured) {
      this.out.pushSmall(encodeErrorChunk(req.cookieHi, req.cookieLo, error, message));
    } else {
      const b = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
      writeSimpleReply(b, 0, error, req.cookieHi, req.cookieLo);
      this.out.pushSmall(b);
    }
  }

  private reject(req: Request, r: Rejection): void {
    this.log.limited(
      r.error === NBD_ERR.ESHUTDOWN ? "debug" : "warn",
      "rejected request",
      `${commandName(req.type)} offset=${req.offset} length=${req.length} flags=0x${req.flags.toString(16)}: ${r.message}`,
    );
    this.replyError(req, r.error, r.message);
  }

  private replyFailure(req: Request, e: unknown): void {
    const error = nbdErrorOf(e);
    const message = e instanceof Error ? e.message : String(e);
    const expected =
      e instanceof BlockforkError && (e.code === "ERR_READ_ONLY" || e.code === "ERR_NOT_SUPPORTED");
    this.log.limited(
      expected ? "debug" : "error",
      "request failed",
      `${commandName(req.type)} offset=${req.offset} length=${req.length} failed: ${message} (NBD error ${errnoName(error)})`,
    );
    this.replyError(req, error, message);
  }

  /** An asynchronous request finished: flush soon, maybe unblock, maybe finish closing. */
  private settled(): void {
    this.inflight--;
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      process.nextTick(this.flushNow);
    }
    this.wakeQuiesce();
    if (this.blocked) this.onSpace();
  }

  private readonly flushNow = (): void => {
    this.flushScheduled = false;
    if (!this.peerGone) {
      this.out.flush();
      // Zero-copy sends finish inside flush() without a write callback: re-check the brakes here.
      if (this.blocked) this.onSpace();
    }
    this.maybeFinish();
  };

  // ---- closing

  private beginClose(reason: string, hard = false): void {
    if (this.state !== "open") return;
    this.state = "closing";
    this.closeReason = reason;
    this.hardClose = hard;
    this.receiver.stop();
    this.maybeFinish();
  }

  private hardClose = false;

  private maybeFinish(): void {
    if (this.inflight > 0) return;
    if (this.state === "closing") {
      this.state = "closed";
      if (this.peerGone) {
        this.done();
        return;
      }
      // The replies already owed are delivered even after a protocol violation; a peer that never
      // reads them is dropped after the grace period.
      this.graceTimer = setTimeout(() => this.stream.destroy(), this.hardClose ? 1000 : CLOSE_GRACE_MS);
      this.graceTimer.unref();
      this.endWhenSent();
    } else if (this.state === "closed" && this.peerGone) {
      this.done();
    }
  }

  private ended = false;

  /**
   * end() (what libuv holds, then FIN; TLS close_notify first) once the output queue has handed
   * everything to the stream. Zero-copy segments wait in the queue until libuv's writes ahead of
   * them complete, and the rest of one the socket did not take is written through the stream:
   * ending the stream before that would cut the reply off (write after end).
   */
  private endWhenSent(): void {
    if (this.ended || this.peerGone) return;
    this.out.flush();
    if (!this.out.handedOver) return; // out.onSpace (a write completed) calls this again
    this.ended = true;
    this.stream.end();
  }

  private readonly onPeerEnd = (): void => {
    // The client half-closed: no more requests; answer what is in flight, then close.
    if (this.state === "open") this.beginClose(this.closeReason || "client closed the connection");
  };

  private readonly onStreamError = (e: Error): void => {
    this.log.debug(`connection error: ${e.message}`);
  };

  private readonly onPeerClose = (): void => {
    this.peerGone = true;
    if (this.graceTimer) clearTimeout(this.graceTimer);
    if (this.state === "open") {
      this.state = "closing";
      this.closeReason = this.closeReason || "connection closed";
    }
    if (this.state === "closing") this.state = "closed";
    if (this.inflight === 0) this.done();
    this.wakeQuiesce();
  };

  private finishedOnce = false;

  private done(): void {
    if (this.finishedOnce) return;
    this.finishedOnce = true;
    this.out.discard();
    this.resolveFinished();
  }

  /** Why the connection closed (for the log). */
  get reason(): string {
    return this.closeReason;
  }
}
