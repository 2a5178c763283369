// GatewayLink: the driver of one gateway link. It performs the actions of the pure state machine
// (link-state.ts): sends updates, probes health, resyncs, mirrors the tracking log.
//
// Notes on the design
// - Sequence numbers: every update gets the next seq of this generation (TrackingLog bumps the
//   generation at each start). `lastSeq` remembers, per dirty block, the seq of the newest update
//   sent for it. A block is cleared only when the gateway says `durableThrough >= lastSeq[block]`:
//   an older update's acknowledgement never clears a block a newer one touched. Nor while a client
//   write to it is in progress (DRBD clears a bit only once the local and the remote write both
//   completed): that write's update may not be sent yet (it waits for the activity log), or its
//   primary write may still fail (poison() marks the blocks again and asks for a resync). The
//   last such write to end clears the block if its newest update is durable by then.
// - Dirty bits are coarser than writes (64 KiB vs 4 KiB). A write to a block that was clean covers
//   all of its dirtiness; a write to a block that was already dirty (an outage, a failure) covers
//   only part: such a block is STALE and only a whole-block resync copy makes it clearable.
// - Updates are batched (up to batchBytes per POST) and pipelined (maxBatches in flight on an undici
//   Pool). A 200 means applied; a periodic flush turns applied into durable and clears blocks.
// - An update is encoded once, when it is submitted: header and data are appended to the current
//   slab (a pooled 1 MiB buffer), so consecutive updates lie back to back and a batch body is a
//   few slices of slabs sent as they are (no second copy, no per-update buffer). Data of 64 KiB or
//   more stays in a buffer of its own, sent after its header: a resync range's pooled buffer, or
//   a client write's payload buffer, which the NBD layer leaves alone until the link releases its
//   WriteHold (no copy; without a hold it is copied into a pooled buffer). A slab goes back to the
//   pool when no queued or in-flight update uses it.
// - Transport: batches go over an update stream (stream-client.ts: one connection upgraded to
//   `blockfork-updates/1`, BATCH frames out, ACKs back, no HTTP request per batch) opened when the
//   gateway is found healthy and closed with the epoch; a gateway that does not switch protocols
//   (an older one) gets POST .../updates on the undici Pool instead, as does `updateStream: false`.
// - Any failure (network, timeout, non-200) is one event for the machine: the link drops to
//   tracking, every queued and in-flight update is forgotten (`epoch` changes, so late answers are
//   ignored) and `lastSeq` is emptied: those blocks stay dirty until a resync copies them again.
//   A batch or flush answered 200 with `stale` (the gateway holds a newer generation of this
//   source: nothing was applied) is such a failure, and so is a flush whose durableThrough is below
//   the highest appliedThrough answered before it was sent: the gateway restarted and lost updates
//   it had acknowledged but not made durable (over POST nothing else tells: undici reconnects).
// - The floor (sent with every request: seqs below it that the gateway has not seen never will
//   come) moves only when seqs are abandoned, i.e. in dropQueue(): at that moment every seq below
//   `seq` is acknowledged or abandoned, and nothing is reserved while the link tracks. It must not
//   move when a resync starts from streaming (`blockfork resync`, verify --repair): the updates
//   queued and in flight then are still coming, and a gateway that raised its floor past them would
//   count them as duplicates, answer 200 and let the proxy clear blocks it never wrote.
// - Resync reads the primary (the bottom of the stack, not this fork) in runs of dirty blocks,
//   skipping blocks a client write is changing right now (they stream on their own and a later seq
//   wins at the gateway), sends holes as ZERO updates, and repeats passes until every dirty block
//   has an update in flight; then the link streams. On a
//   plain-socket update stream, ranges the page cache holds go by sendfile (no read, no copy;
//   see copyRange for why contents newer than the read are fine).
// - Blocks the primary cannot read (a resync copy's read fails with EIO, ENODATA, EILSEQ or
//   EBADMSG: a bad sector) are isolated, as DRBD confines a resync read error to its blocks: the
//   range is read again block by block (tracking granularity), the readable blocks are copied as
//   usual, and the others stay dirty and are remembered as UNREADABLE (in memory: a bitmap, the
//   error and when). The seq reserved for the range is spent on the first readable run (or, when
//   no whole block reads, a readable 4 KiB piece of one: the gateway needs every seq); the other
//   readable blocks are left to the next pass. A resync run does not retry a block that failed in
//   it (`skip`), so the run ends and the link streams; the next run retries them (any run: a
//   failure's, `blockfork resync`, and one every unreadableRetryMs while there are any). An
//   unreadable block is uncovered (no seq) or STALE, never cleared by an update that does not
//   cover it whole; a client write that covers it whole is the exception: it replaces all of the
//   block's dirtiness, so its acknowledgement clears the block (clearIfDurable drops it from the
//   set too). While any is left the secondary is no crash-consistent image: no in-sync claim.
//   Resync progress: bytes found unreadable in a run leave its totalBytes (unreadableBytes says how
//   many), so a run that ends shows 100% and the ETA counts only what can be copied.
// - The secondary's consistency (docs/gateway-api.md; the gateway keeps the state): with a gateway
//   that lists the "consistency" feature, every update sent before a resync has finished (resync
//   copies, and client writes sent meanwhile) is flagged RESYNC, so the gateway records its
//   secondary inconsistent before applying it. When a resync finishes, every dirty block has an
//   update in flight, so the secondary will be a crash-consistent image once every seq up to the
//   last one reserved (`inSync`) is durable: later flushes carry that claim until the gateway
//   confirms it. A failure, an out-of-band mark (verify --repair, resync --full, a failed primary
//   write) or a block left STALE by a write from an earlier epoch voids the claim.
// - Sync mode: a client write completes when the gateway has applied it, or after syncTimeoutMs
//   when the link gives up (the write stays dirty and the link tracks: sync mode degrades, it never
//   fails a write the primary accepted).

import { randomBytes } from "node:crypto";
import { constants } from "node:os";
import { Pool } from "undici";
import type { Logger } from "../log.js";
import type { TrackingLog } from "../tracking/log.js";
import { extentsJson } from "../tracking/dirty-map.js";
import { BlockforkError, errnoOf } from "../errors.js";
import type { Extent, PieceLease, Volume, WriteHold } from "../volume/volume.js";
import { encodeHeader, FLAG_RESYNC, KIND, RECORD_HEADER, type UpdateKind } from "../gateway/records.js";
import { acquire, release, Slab } from "../util/buffer-pool.js";
import { UpdateStream, type BodyPart } from "./stream-client.js";
import { isCached } from "../blockio/index.js";
import { SeqTable, STALE } from "./seq-table.js";
import { BlockBits } from "../util/block-bits.js";
import {
  initialLinkState,
  sends,
  startActions,
  step,
  type LinkAction,
  type LinkEvent,
  type LinkState,
} from "./link-state.js";

/** How a link behaves. */
export interface LinkOptions {
  /** Gateway base URL, e.g. http://127.0.0.1:7070 */
  url: string;
  token?: string;
  ca?: Buffer;
  mode: "async" | "sync";
  /** Async mode: queue bound in bytes before the link drops to tracking. */
  queueBytes: number;
  /** Async mode: age bound of the oldest queued update. */
  queueAgeMs: number;
  /** Sync mode: how long a write waits for the gateway before the link gives up. */
  syncTimeoutMs: number;
  flushIntervalMs: number;
  periodMs: number;
  batchBytes: number;
  maxBatches: number;
  requestTimeoutMs: number;
  resyncConcurrency: number;
  /** Bytes per second for resync (0: unlimited). */
  resyncRate: number;
  resyncChunkBytes: number;
  /**
   * At most this many blocks with a resync update not yet durable (each is an entry of the seq
   * table until the gateway's flush clears it). A hole is copied as a ZERO update of a few dozen
   * bytes, so the queue's byte bound alone let a resync of a large sparse volume reserve every
   * block at once: 16M Map entries (1.4 GB) for 1 TiB, and past 2^24 blocks (2 TiB at 64 KiB) a
   * RangeError from V8 on every attempt.
   */
  resyncPendingBlocks: number;
  /** While blocks of the primary are unreadable, a resync retries them this often (ms). */
  unreadableRetryMs: number;
  /** Send batches over an update stream when the gateway offers one (default true); else POST. */
  updateStream?: boolean;
  /** Base URL of a tracking mirror (a gateway): PUT /v1/tracking/{volumeId}. */
  mirror?: string;
  /** The mirror's bearer token (default: the gateway's). */
  mirrorToken?: string;
  /**
   * Take the gateway's secondary over when another proxy (source) owns it (`--gateway-takeover`):
   * it resyncs the whole volume. Without it such a gateway refuses this proxy (409).
   */
  takeover?: boolean;
  mirrorIntervalMs: number;
  log: Logger;
}

/** Defaults for every option but url, mode and log. */
export const LINK_DEFAULTS = {
  queueBytes: 64 * 1024 * 1024,
  queueAgeMs: 5000,
  syncTimeoutMs: 5000,
  flushIntervalMs: 200,
  periodMs: 1000,
  batchBytes: 4 * 1024 * 1024,
  maxBatches: 4,
  requestTimeoutMs: 10_000,
  resyncConcurrency: 8,
  resyncRate: 0,
  resyncChunkBytes: 4 * 1024 * 1024,
  // 256K entries: about 20 MB of table; 16 GiB of volume at 64 KiB per flush interval.
  resyncPendingBlocks: 256 * 1024,
  unreadableRetryMs: 60_000,
  mirrorIntervalMs: 1000,
};

/** Updates are encoded into slabs of this size (a reference per update queued or in flight in it). */
const SLAB_BYTES = 1024 * 1024;
/** Data from this size on is not copied into a slab. */
const OWN_BUFFER_MIN = 64 * 1024;

interface Pending {
  seq: number;
  /** Enqueue order (the queue is in this order; seqs are not: a resync reserves before it reads). */
  ord: number;
  length: number;
  /** Encoded size (header and data). */
  size: number;
  b0: number;
  b1: number;
  /** When it was queued (ms, monotonic: performance.now()). */
  at: number;
  waiter: (() => void) | null;
  resync: boolean;
  /** Encoded in `slab` at [start, start + size), or else `head` then `data` (own buffers). */
  slab: Slab | null;
  start: number;
  head: Buffer | null;
  data: Buffer | null;
  /** A pooled buffer holding `data`, given back once the update is sent or dropped. */
  pooled: Buffer | null;
  /** Or the client's own buffer holding `data` (a WriteHold retained), released likewise. */
  kept: WriteHold | null;
  /** Or, after `head`, the data as a range of the primary's file, sent from its page cache. */
  file: PieceLease | null;
}

/** A resync range sent from the primary's page cache: nothing to keep valid, nothing to give back. */
function fileLease(fd: number, offset: number, length: number): PieceLease {
  return {
    offset,
    length,
    pieces: new Float64Array([fd, offset, length]),
    copyFd: -1,
    data: null,
    release() {},
  };
}

/** Progress of a resync, for status and the CLI's progress bar. */
export interface ResyncProgress {
  running: boolean;
  pass: number;
  totalBytes: number;
  doneBytes: number;
  /** Of doneBytes, those sent straight from the primary's page cache (sendfile). */
  pageCacheBytes: number;
  /** Bytes this run found unreadable on the primary: taken out of totalBytes (not work left). */
  unreadableBytes: number;
  bytesPerSecond: number;
  etaSeconds: number | null;
  startedAt: string | null;
  finishedAt: string | null;
}

/** Blocks of the primary a resync could not read: dirty, the secondary differs there. */
export interface UnreadableStatus {
  blocks: number;
  bytes: number;
  /** The first few runs of them, in volume order. */
  ranges: { offset: number; length: number }[];
  /** When a read of one first failed since there were none, and when one last failed (ISO). */
  firstErrorAt: string | null;
  lastErrorAt: string | null;
  /** The last read error. */
  error: string;
  /** How often a resync retries them (ms). */
  retryMs: number;
}

/** What `blockfork status` shows about a link. */
export interface LinkStatus {
  gateway: string;
  mode: "async" | "sync";
  state: string;
  since: string;
  reason: string;
  outages: number;
  generation: number;
  seq: number;
  floor: number;
  durableThrough: number;
  queue: { updates: number; bytes: number; oldestMs: number };
  inflightBatches: number;
  /** How batches travel while the link sends: the update stream, POST requests, or null (not sending). */
  transport: "stream" | "post" | null;
  lastError: string;
  /** When lastError happened (ms since the epoch), 0 when there is none. */
  lastErrorAt: number;
  resync: ResyncProgress;
  mirror: string | null;
  /** The tracking mirror's last failure ("" when its last PUT succeeded) and when (ms, 0: none). */
  mirrorError: string;
  mirrorErrorAt: number;
  /**
   * The secondary as the gateway last reported it: "consistent", "inconsistent", "unknown", or
   * null (not reached yet, or a gateway without the "consistency" feature).
   */
  secondary: string | null;
  unreadable: UnreadableStatus;
}

/** Errnos of a read that the medium failed (a bad sector, a checksum mismatch under dm-integrity). */
const MEDIA_ERRNOS = new Set(
  [constants.errno.EIO, constants.errno.ENODATA, constants.errno.EILSEQ, constants.errno.EBADMSG].filter(
    (n) => n !== undefined,
  ),
);

/** A read error of the medium (not a bug, not a shutdown): its blocks are isolated, not fatal. */
function mediaError(e: unknown): boolean {
  const carries =
    e instanceof BlockforkError ||
    (typeof e === "object" && e !== null && typeof (e as { errno?: unknown }).errno === "number");
  return carries && MEDIA_ERRNOS.has(errnoOf(e));
}

/** Piece size for finding a readable part of an unreadable block (a seq must go out). */
const PIECE = 4096;
/** At most this many pieces are tried (each failing read may take the disk seconds). */
const PIECE_TRIES = 64;
/** Runs of unreadable blocks shown by status and the log. */
const SHOW_RANGES = 8;

class HttpError extends Error {
  constructor(
    message: string,
    readonly status: number,
    /** The answer's JSON body, if it had one. */
    readonly body: unknown = null,
  ) {
    super(message);
  }
}

/**
 * The gateway answered but will not take this proxy's updates until someone changes a setting:
 * wrong token (401/403), wrong volume (404), a request it finds malformed (400), another size.
 * Not an outage: said loudly, and retried (a fixed gateway is picked up without a restart).
 */
class RefusedError extends Error {}

function refusal(e: unknown): boolean {
  return (
    e instanceof RefusedError || (e instanceof HttpError && [400, 401, 403, 404, 409].includes(e.status))
  );
}

/** An idle link on POST looks at the gateway's health after this long without an answer (ms). */
const IDLE_CHECK_MS = 5000;

/**
 * An error's message, with what to do where the cause is a TLS mismatch the operator made: https://
 * to a gateway that speaks plain HTTP (OpenSSL's "wrong version number", several lines of it),
 * http:// to one that speaks TLS (it closes the connection), or a certificate not trusted.
 */
export function transportHint(e: unknown, url: string): string {
  const err = e as { message?: string; code?: string; cause?: { code?: string; message?: string } };
  const code = err.code ?? err.cause?.code ?? "";
  const msg = String(err.message ?? e);
  if (/wrong version number/i.test(msg) || code === "ERR_SSL_WRONG_VERSION_NUMBER")
    return `TLS to a gateway that answers in plain HTTP: use http:// instead of https:// (${url})`;
  if (
    /^(UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT(_LOCALLY)?|DEPTH_ZERO_SELF_SIGNED_CERT|SELF_SIGNED_CERT_IN_CHAIN|CERT_HAS_EXPIRED|CERT_NOT_YET_VALID|ERR_TLS_CERT_ALTNAME_INVALID)$/.test(
      code,
    )
  )
    return `the gateway's TLS certificate is not trusted (${code}: ${msg.split("\n")[0]}): give the CA that signed it with --gateway-ca, or check the host name in --gateway`;
  if (url.startsWith("http:") && /other side closed|socket hang up|ECONNRESET/i.test(msg))
    return `${msg.split("\n")[0]} (does the gateway serve https? then use https:// in --gateway)`;
  return msg;
}

/** `writing` counts a covering write as 1 + COVER (at most COVER - 1 writes in progress on a block). */
const COVER = 2 ** 24;

/** What beginWrite() learned, for submit(). */
export interface WriteTicket {
  epoch: number;
  /** The link was sending when the write began (a write that began while it tracked may have
   * raced other, unsent writes into the same blocks: all its blocks become STALE). */
  sending: boolean;
  /** Blocks that were dirty with no update covering them. */
  stale: number[] | null;
  /** The write is counted as covering its blocks in `writing` (until its submit sends nothing, it
   * ends, or the epoch changes). */
  covers: boolean;
  /** Unreadable blocks it would make STALE but covers whole: its update may clear them. */
  whole: number[] | null;
}

/** One gateway link. */
export class GatewayLink {
  private s: LinkState;
  private readonly o: LinkOptions;
  private readonly log: Logger;
  private readonly pool: Pool;
  private readonly controlPool: Pool;
  private readonly mirrorPool: Pool | null;
  private volumeName: string | null = null;
  private seq = 1;
  /** This process, to the gateway (X-Blockfork-Incarnation): a generation is one process's. */
  private readonly incarnation = randomBytes(8).toString("hex");
  /** The gateway's secondary belongs to another source and --gateway-takeover takes it over. */
  private takingOver = false;
  /** This process took the secondary over once: it does not again (two such proxies would fight). */
  private tookOver = false;
  /** A moved gateway (tracking recovery) that reports no secondary id was handled. */
  private movedChecked = false;
  /** When the gateway last answered (monotonic ms): an idle POST link checks it now and then. */
  private lastContact = 0;
  private checking = false;
  private mirrorError = "";
  private mirrorErrorAt = 0;
  /** A change of the tracking log's meta being stored; the link sends nothing before it is. */
  private pendingMeta: Promise<void> = Promise.resolve();
  private floor = 1;
  private period = 1;
  private epoch = 0;
  private queue: Pending[] = [];
  private queued = 0;
  private batches = 0;
  /** Batches sent and not yet answered (their oldest update bounds sync-mode waiting). */
  private readonly sending = new Set<Pending[]>();
  /**
   * Applied but not yet durable, for clearing after a flush: seq, b0, b1 of each update, flat, in
   * answer order (numbers, not an object per update: under steady writes thousands live until the
   * next flush).
   */
  private unflushed: number[] = [];
  private readonly lastSeq: SeqTable;
  /**
   * Blocks a client write is changing right now (resync leaves them alone): per block, the number
   * of such writes plus COVER times the number of them that still cover the block (begun in this
   * epoch; they will be sent in this epoch, or mark the block STALE themselves at submit). A write
   * whose submit sends nothing (the link tracks) no longer covers, nor does any write once the
   * epoch changes (dropQueue zeroes the covering counts), although it is still in progress until
   * its primary write ends. One map for both keeps the write path at one get and one set a block.
   */
  private readonly writing = new Map<number, number>();
  /** Blocks the primary could not read in a resync copy (see the notes at the top): a bitmap. */
  private readonly unreadable: BlockBits;
  /** Of them, those that failed in the resync running now: it does not retry them. */
  private readonly skip: BlockBits;
  private unreadableCount = 0;
  private unreadableBytes = 0;
  private unreadableFirstAt = 0;
  private unreadableLastAt = 0;
  private unreadableError = "";
  /** When a resync last began (monotonic ms): the retry timer counts from it. */
  private resyncBegan = 0;
  /** The next resync run keeps `skip` (the last one failed on a range of which nothing reads). */
  private skipCarry = false;
  /** The last unreadable block left without a resync since: one makes the in-sync claim. */
  private claimWanted = false;
  /**
   * No resync copy goes by sendfile until a resync run ends: one did and its pages could not be
   * read. A read that fails can leave its pages in the page cache, where cachestat counts them,
   * so the next copy would take the same path and fail the stream again (an outage each time);
   * read with pread, the bad blocks are found and isolated instead.
   */
  private zeroCopyOff = false;
  private durableThrough = 0;
  /** The highest appliedThrough the gateway answered in this epoch (a flush must not go below it). */
  private appliedSeen = 0;
  /** The gateway process (its `boot`) that answered first in this epoch, or null. */
  private bootSeen: string | null = null;
  /** The gateway lists the "consistency" feature: flag RESYNC updates, send in-sync claims. */
  private consistency = false;
  /** The in-sync claim (see the notes at the top): every seq up to it; null while there is none. */
  private inSync: number | null = null;
  /** The gateway confirmed the claim (its flush answered `secondary: consistent`). */
  private inSyncConfirmed = false;
  /**
   * A resync of this process began with every block dirty (a new tracking log, another gateway,
   * resync --full): the map has held every difference since, whoever wrote the secondary before,
   * so the claim may end an inconsistency another source left (X-Blockfork-In-Sync-Whole).
   */
  private wholeCopy = false;
  private secondary: string | null = null;
  private flushing: Promise<void> | null = null;
  /** The update stream of this epoch, or null (POST). */
  private stream: UpdateStream | null = null;
  /** The last attempt to open a stream failed with this (logged once per different reason). */
  private streamRefused = "";
  private lastErrorText = "";
  private lastErrorAt = 0;
  private get lastError(): string {
    return this.lastErrorText;
  }
  private set lastError(text: string) {
    this.lastErrorText = text;
    this.lastErrorAt = Date.now();
  }
  private probing = false;
  private probeTimer: NodeJS.Timeout | null = null;
  private timers: NodeJS.Timeout[] = [];
  private resyncRunning = false;
  private resyncToken = 0;
  private progress: ResyncProgress = {
    running: false,
    pass: 0,
    totalBytes: 0,
    doneBytes: 0,
    pageCacheBytes: 0,
    unreadableBytes: 0,
    bytesPerSecond: 0,
    etaSeconds: null,
    startedAt: null,
    finishedAt: null,
  };
  private mirrorDirty = true;
  private mirrorBusy = false;
  private stopped = false;
  /** Updates enqueued so far (the next Pending's ord). */
  private enqueued = 0;
  /** settled() calls waiting: for `left` more answers of updates with ord < `ord` (client updates only: `clientOnly`). */
  private readonly settleWaiters: { ord: number; left: number; clientOnly: boolean; resolve: () => void }[] =
    [];

  constructor(
    private readonly tracking: TrackingLog,
    private readonly primary: Volume,
    opts: LinkOptions,
  ) {
    this.o = opts;
    this.log = opts.log;
    this.lastSeq = new SeqTable(tracking.map.blocks);
    this.unreadable = new BlockBits(tracking.map.blocks);
    this.skip = new BlockBits(tracking.map.blocks);
    this.s = initialLinkState(Date.now());
    const connect = opts.ca ? { ca: opts.ca } : undefined;
    this.pool = new Pool(opts.url, {
      connections: 2,
      pipelining: Math.max(1, opts.maxBatches),
      headersTimeout: opts.requestTimeoutMs,
      bodyTimeout: opts.requestTimeoutMs,
      connectTimeout: Math.min(5000, opts.requestTimeoutMs),
      ...(connect ? { connect } : {}),
    });
    // Flushes (an fdatasync on the gateway, slow on a busy disk) and health checks go on their own
    // connection: pipelined behind a flush, update batches would wait for the secondary's disk.
    this.controlPool = new Pool(opts.url, {
      connections: 1,
      headersTimeout: opts.requestTimeoutMs,
      bodyTimeout: opts.requestTimeoutMs,
      connectTimeout: Math.min(5000, opts.requestTimeoutMs),
      ...(connect ? { connect } : {}),
    });
    this.mirrorPool = opts.mirror
      ? new Pool(opts.mirror, {
          connections: 1,
          headersTimeout: 5000,
          bodyTimeout: 5000,
          connectTimeout: 3000,
        })
      : null;
  }

  /** The machine's state name. */
  get state(): string {
    return this.s.name;
  }

  /** Start probing the gateway and the periodic work. */
  start(): void {
    this.perform(startActions);
    this.timers.push(setInterval(() => this.tick(), Math.min(100, this.o.flushIntervalMs)));
    this.timers.push(setInterval(() => this.period++, this.o.periodMs));
    if (this.mirrorPool) this.timers.push(setInterval(() => void this.mirrorNow(), this.o.mirrorIntervalMs));
    for (const t of this.timers) t.unref();
  }

  /** Sync-mode writes waiting for the link's first health check (see whenStarted). */
  private startWaiters: (() => void)[] = [];

  /**
   * Sync mode: a write that arrives while the link is still starting (its first health check and
   * update stream not done) waits for that, at most --sync-timeout, so that it is sent like any
   * other instead of being acknowledged from the primary alone without a word. Null when the
   * link is not starting. After the timeout the write goes on (its blocks tracked), and that is
   * logged, as a sync timeout is.
   */
  whenStarted(): Promise<void> | null {
    if (this.s.name !== "starting" || this.stopped) return null;
    return new Promise((resolve) => {
      const waiter = (): void => {
        clearTimeout(timer);
        resolve();
      };
      const timer = setTimeout(() => {
        this.startWaiters = this.startWaiters.filter((w) => w !== waiter);
        this.log.limited(
          "warn",
          "sync starting",
          `gateway link: a sync write waited ${this.o.syncTimeoutMs} ms (--sync-timeout) for the link's ` +
            "first health check; acknowledged from the primary alone, its blocks tracked for resync",
        );
        resolve();
      }, this.o.syncTimeoutMs);
      this.startWaiters.push(waiter);
    });
  }

  private dispatch(e: LinkEvent): void {
    const before = this.s.name;
    const [next, actions] = step(this.s, e, Date.now());
    this.s = next;
    if (before === "starting" && next.name !== "starting" && this.startWaiters.length > 0) {
      const waiters = this.startWaiters;
      this.startWaiters = [];
      for (const w of waiters) w();
    }
    // Consecutive outages back the probing off: a gateway that answers health checks but fails
    // every update (a wrong token, a full disk) must not make the link flap in a tight loop. An
    // async queue overflow is no failure of the gateway (it answered everything; the writers
    // outran it): the link probes again after the first step (250 ms) and resyncs, as DRBD
    // resyncs once congestion clears, instead of staying in tracking for up to 30 s.
    if (sends(before) && next.name === "tracking") {
      if (e.type === "overflow") this.failures = 1;
      else this.failures++;
    }
    if (next.name === "streaming") this.failures = 0;
    this.perform(actions);
  }
  private failures = 0;
  private probesDone = 0;
  /** The generation of the probe loop running (see startProbe). */
  private probeGen = 0;
  /** Health checks finished (answered or failed): lets a caller wait for a fresh one. */
  get probes(): number {
    return this.probesDone;
  }

  private perform(actions: LinkAction[]): void {
    for (const a of actions) {
      switch (a.type) {
        case "probe":
          this.startProbe();
          break;
        case "stopProbe":
          this.stopProbe();
          break;
        case "probeNow":
          this.stopProbe();
          this.failures = 0;
          this.startProbe();
          break;
        case "dropQueue":
          this.dropQueue();
          break;
        case "startResync":
          void this.resync();
          break;
        case "stopResync":
          this.resyncToken++;
          this.progress.running = false; // the run given up says so (status showed it running on)
          break;
        case "log":
          if (a.level === "error") this.log.error(a.message);
          else if (a.level === "warn") this.log.warn(a.message);
          else this.log.info(a.message);
          this.mirrorDirty = true;
          break;
      }
    }
  }

  // ---- the fork's side

  /**
   * A client write to [offset, offset+length) begins (call before marking it dirty): resync leaves
   * these blocks alone until endWrite(). The ticket remembers which blocks were dirty already with
   * no update in flight covering them: this write covers only part of such a block, so submit()
   * makes it STALE (its acknowledgement must not clear the block; only a whole-block resync copy
   * can). If the link was reset between the two calls, every block counts as such.
   */
  beginWrite(offset: number, length: number): WriteTicket {
    const map = this.tracking.map;
    const [b0, b1] = map.blockRange(offset, length);
    let stale: number[] | null = null;
    let whole: number[] | null = null;
    for (let b = b0; b <= b1; b++) {
      const v = this.writing.get(b) ?? 0;
      this.writing.set(b, v + 1 + COVER);
      const busy = v >= COVER; // a write in progress covers the block
      if (map.isDirty(b)) {
        // Dirty with nothing covering it: not by an update in flight, nor by a write in progress
        // that still covers (began on a clean or covered block in this epoch and will be sent, or
        // will mark it STALE itself). A write in progress that covers nothing does not count.
        const last = this.lastSeq.get(b);
        if (last === STALE || (last === undefined && !busy)) {
          // An unreadable block no resync can copy: a write of all of it replaces its dirtiness.
          if (this.unreadableCount > 0 && this.isUnreadable(b) && this.coversBlock(b, offset, length))
            (whole ??= []).push(b);
          else (stale ??= []).push(b);
        }
      }
    }
    return { epoch: this.epoch, sending: sends(this.s.name), stale, covers: true, whole };
  }

  /** The client write to [offset, offset+length) of `ticket` reached the primary (or failed). */
  endWrite(offset: number, length: number, ticket: WriteTicket): void {
    const [b0, b1] = this.tracking.map.blockRange(offset, length);
    // Its covering count is gone already if its submit sent nothing or the epoch changed.
    const one = ticket.covers && ticket.epoch === this.epoch ? 1 + COVER : 1;
    ticket.covers = false;
    for (let b = b0; b <= b1; b++) {
      const n = this.writing.get(b)! - one;
      if (n !== 0) {
        this.writing.set(b, n);
        continue;
      }
      this.writing.delete(b);
      // clearDurable left the block alone while writes to it were in progress: clear it now if
      // its newest update is durable on the gateway.
      this.clearIfDurable(b, this.durableThrough);
    }
  }

  /** Clear block `b` if the newest update sent for it is durable through seq `d`. */
  private clearIfDurable(b: number, d: number): void {
    const last = this.lastSeq.get(b);
    if (last !== undefined && last <= d) {
      this.lastSeq.delete(b);
      this.tracking.clearBlock(b);
      this.mirrorDirty = true;
      // A client write covered it whole: the secondary holds what the primary does there now.
      if (this.unreadableCount > 0 && this.isUnreadable(b)) {
        this.forgetUnreadable(b);
        this.log.info(
          `gateway link: unreadable block at offset ${b * this.tracking.map.granularity} was overwritten ` +
            `whole and is on the secondary; ${this.unreadableCount} unreadable blocks left`,
        );
      }
    }
  }

  /** [offset, offset+length) covers all of block `b`. */
  private coversBlock(b: number, offset: number, length: number): boolean {
    const g = this.tracking.map.granularity;
    return offset <= b * g && offset + length >= Math.min((b + 1) * g, this.tracking.map.volumeSize);
  }

  private isUnreadable(b: number): boolean {
    return this.unreadable.has(b);
  }

  private skipped(b: number): boolean {
    return this.skip.has(b);
  }

  private blockBytes(b: number): number {
    const g = this.tracking.map.granularity;
    return Math.min((b + 1) * g, this.tracking.map.volumeSize) - b * g;
  }

  /** Block `b` failed to read (`error`) in this resync: unreadable, not retried until the next run. */
  private rememberUnreadable(b: number, now: number, error: string): void {
    this.skip.add(b);
    this.unreadableLastAt = now;
    this.unreadableError = error;
    if (this.isUnreadable(b)) return;
    this.unreadable.add(b);
    if (this.unreadableCount === 0) this.unreadableFirstAt = now;
    this.unreadableCount++;
    this.unreadableBytes += this.blockBytes(b);
  }

  /** `bytes` found unreadable are no work left for the resync running: its progress ends at 100%. */
  private leaveOut(bytes: number): void {
    this.progress.unreadableBytes += bytes;
    this.progress.totalBytes = Math.max(this.progress.doneBytes, this.progress.totalBytes - bytes);
  }

  /** Block `b` was read after all, or overwritten whole and cleared. */
  private forgetUnreadable(b: number): void {
    if (!this.isUnreadable(b)) return;
    this.unreadable.delete(b);
    this.skip.delete(b);
    this.unreadableCount--;
    this.unreadableBytes -= this.blockBytes(b);
    if (this.unreadableCount === 0) this.claimWanted = true;
  }

  /** The first `max` runs of unreadable blocks, as byte ranges. */
  private unreadableRanges(max: number): { offset: number; length: number }[] {
    const out: { offset: number; length: number }[] = [];
    if (this.unreadableCount === 0) return out;
    const g = this.tracking.map.granularity;
    const blocks = this.tracking.map.blocks;
    for (let b = this.unreadable.next(0); b >= 0 && out.length < max;) {
      let e = b;
      while (e < blocks && this.isUnreadable(e)) e++;
      out.push({ offset: b * g, length: Math.min(e * g, this.tracking.map.volumeSize) - b * g });
      b = this.unreadable.next(e);
    }
    return out;
  }

  /**
   * Send an update (the caller marked its blocks dirty and activated them first). `data` is
   * copied, unless it is large and `hold` lets the link keep it. Returns null when nothing is sent
   * (tracking) or, in sync mode, a promise settled when the gateway applied it (or the link gave
   * up on it).
   */
  submit(
    kind: UpdateKind,
    offset: number,
    length: number,
    data: Buffer | null,
    ticket: WriteTicket,
    hold: WriteHold | null = null,
  ): Promise<void> | null {
    if (!sends(this.s.name)) {
      // Nothing sent: this write covers nothing from now on (a later write into its blocks must
      // not count on it), although its primary write may still be running.
      if (ticket.covers && ticket.epoch === this.epoch) {
        const [b0, b1] = this.tracking.map.blockRange(offset, length);
        for (let b = b0; b <= b1; b++) this.writing.set(b, this.writing.get(b)! - COVER);
      }
      ticket.covers = false;
      return null;
    }
    const before = this.queued;
    let p: Promise<void> | null;
    if (data === null || length <= this.o.batchBytes)
      p = this.submitOne(kind, offset, length, data, ticket, hold);
    else {
      // A write larger than a batch goes as several updates (consecutive seqs, a piece each): one
      // update must fit in a batch and in the gateway's frame limit (MAX_STREAM_BODY).
      const piece = this.o.batchBytes;
      const waits: Promise<void>[] = [];
      for (let at = 0; at < length; at += piece) {
        const n = Math.min(piece, length - at);
        const w = this.submitOne(kind, offset + at, n, data.subarray(at, at + n), ticket, hold);
        if (w !== null) waits.push(w);
      }
      p = waits.length > 0 ? Promise.all(waits).then(() => {}) : null;
    }
    // One update alone in the queue is no overflow, however large (the largest request may be as
    // large as the queue's bound): the queue is bounded by --queue-size plus one request.
    if (this.o.mode === "async" && this.queued > this.o.queueBytes && before > 0) {
      this.dispatch({ type: "overflow", reason: `queue over ${this.o.queueBytes} bytes (gateway too slow)` });
    }
    return p;
  }

  private submitOne(
    kind: UpdateKind,
    offset: number,
    length: number,
    data: Buffer | null,
    ticket: WriteTicket,
    hold: WriteHold | null,
  ): Promise<void> | null {
    const seq = this.reserve(offset, length);
    let stale = false;
    if (ticket.epoch !== this.epoch || !ticket.sending) {
      const [b0, b1] = this.tracking.map.blockRange(offset, length);
      for (let b = b0; b <= b1; b++) this.lastSeq.set(b, STALE);
      stale = true;
    } else {
      if (ticket.stale !== null) {
        for (const b of ticket.stale) this.lastSeq.set(b, STALE);
        stale = true;
      }
      if (ticket.whole !== null) {
        // Unreadable blocks this piece covers whole take its seq (even over STALE); a block only
        // split pieces cover is STALE, as for any partial write. Done ones leave the list, so a
        // later piece does not make them STALE again.
        const left: number[] = [];
        for (const b of ticket.whole) {
          if (this.coversBlock(b, offset, length)) this.lastSeq.set(b, seq);
          else {
            this.lastSeq.set(b, STALE);
            left.push(b);
          }
        }
        ticket.whole = left.length > 0 ? left : null;
        if (left.length > 0) stale = true;
      }
    }
    // A STALE block needs a resync copy: a resync running copies it (it ends only when none is
    // left); a streaming link starts one (the block would otherwise wait for the next outage).
    if (stale && this.s.name === "streaming") this.requestResync();
    return this.enqueue(kind, offset, length, data, false, seq, null, null, hold);
  }

  /**
   * A primary write failed (or a trim the primary could not do): its blocks must be dirty whatever
   * the gateway acknowledges, though an acknowledgement may have cleared them already (call before
   * endWrite). Marks them again and asks for a resync (a streaming link copies dirty blocks only
   * when it resyncs); returns the tracking log's activation of the range (its marks durable).
   */
  poison(offset: number, length: number): Promise<void> {
    const map = this.tracking.map;
    const [b0, b1] = map.blockRange(offset, length);
    for (let b = b0; b <= b1; b++) this.lastSeq.set(b, STALE);
    map.mark(offset, length);
    this.mirrorDirty = true;
    const active = this.tracking.activate(offset, length);
    this.requestResync();
    return active;
  }

  /**
   * Sync mode FLUSH: everything sent so far is durable on the secondary, unless the link fails or
   * the gateway takes longer than --sync-timeout, as for a sync write: then the link tracks and the
   * FLUSH completes (found with the gateway stopped: each FLUSH waited 10 s for the flush request's
   * own timeout, and queued FLUSHes one after the other, 20, 40, 60 s: past the kernel client's 30).
   */
  async flushGateway(): Promise<void> {
    if (!sends(this.s.name)) return;
    const epoch = this.epoch;
    const started = performance.now();
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        if (epoch === this.epoch && sends(this.s.name)) {
          this.dispatch({
            type: "syncTimeout",
            reason:
              `a sync FLUSH waited ${Math.round(performance.now() - started)} ms for the gateway ` +
              `(--sync-timeout ${this.o.syncTimeoutMs} ms)`,
          });
        }
        resolve();
      }, this.o.syncTimeoutMs);
    });
    const flushed = (async (): Promise<void> => {
      // Client updates only: resync copies have no client waiting, and on a slow gateway they
      // would hold the FLUSH for up to half the queue (then time it out, dropping the link).
      await this.settled(true);
      if (epoch !== this.epoch || !sends(this.s.name)) return;
      await this.flushNow();
    })();
    try {
      await Promise.race([flushed, timedOut]);
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Take the next seq for [offset, offset+length) and make it the newest update of its blocks.
   * A client update leaves STALE blocks stale; a resync copy (`whole`: it covers whole blocks with
   * the primary's contents) makes them clearable again.
   */
  private reserve(offset: number, length: number, whole = false): number {
    const seq = this.seq++;
    const [b0, b1] = this.tracking.map.blockRange(offset, length);
    for (let b = b0; b <= b1; b++) if (whole || this.lastSeq.get(b) !== STALE) this.lastSeq.set(b, seq);
    return seq;
  }

  /**
   * Queue an update. `data` (WRITE only) is copied into a slab when it is small. Larger data is
   * kept as it is when it lives in `pooled` (handed over: back to the pool once sent or dropped)
   * or when the client's `hold` lets it keep the client's buffer (released likewise), else copied
   * (the caller reuses its buffer).
   */
  private enqueue(
    kind: UpdateKind,
    offset: number,
    length: number,
    data: Buffer | null,
    resync: boolean,
    seq = this.reserve(offset, length),
    pooled: Buffer | null = null,
    file: PieceLease | null = null,
    hold: WriteHold | null = null,
  ): Promise<void> | null {
    const [b0, b1] = this.tracking.map.blockRange(offset, length);
    const dataBytes = file !== null ? file.length : data === null ? 0 : data.length;
    const flags = this.consistency && (resync || this.inSync === null) ? FLAG_RESYNC : 0;
    const pending: Pending = {
      seq,
      ord: this.enqueued++,
      length,
      size: RECORD_HEADER + dataBytes,
      b0,
      b1,
      at: performance.now(),
      waiter: null,
      resync,
      slab: null,
      start: 0,
      head: null,
      data: null,
      pooled,
      kept: null,
      file: null,
    };
    if (file !== null) {
      pending.head = Buffer.allocUnsafe(RECORD_HEADER);
      encodeHeader(pending.head, 0, kind, seq, this.period, offset, length, flags);
      pending.file = file;
    } else if (dataBytes < OWN_BUFFER_MIN) {
      let slab = this.slab;
      if (slab === null || slab.used + pending.size > slab.buf.length) {
        slab?.retire();
        slab = this.slab = new Slab(SLAB_BYTES);
      }
      pending.slab = slab;
      pending.start = slab.used;
      encodeHeader(slab.buf, slab.used, kind, seq, this.period, offset, length, flags);
      if (data !== null) slab.buf.set(data, slab.used + RECORD_HEADER);
      slab.used += pending.size;
      slab.refs++;
      if (pooled !== null) release(pooled);
      pending.pooled = null;
    } else {
      pending.head = Buffer.allocUnsafe(RECORD_HEADER);
      encodeHeader(pending.head, 0, kind, seq, this.period, offset, length, flags);
      if (pooled !== null) pending.data = data;
      else if (hold !== null && hold.retain()) {
        pending.kept = hold; // the client's buffer stays as it is until done(): no copy
        pending.data = data;
      } else {
        pending.pooled = acquire(dataBytes);
        pending.data = pending.pooled.subarray(0, dataBytes);
        data!.copy(pending.data);
      }
    }
    let promise: Promise<void> | null = null;
    if (this.o.mode === "sync" && !resync)
      promise = new Promise<void>((resolve) => (pending.waiter = resolve));
    this.queue.push(pending);
    this.queued += pending.size;
    this.schedulePump();
    return promise;
  }

  /**
   * Send what is queued once the current burst has been taken in: the NBD receiver hands over
   * every request of one read in one callback, and the microtask after it finds them all queued,
   * so a burst of small writes leaves as one batch (one frame, one ACK, one apply) instead of a
   * batch each for the first maxBatches of them.
   */
  private schedulePump(): void {
    if (this.pumpScheduled) return;
    this.pumpScheduled = true;
    queueMicrotask(() => {
      this.pumpScheduled = false;
      this.pump();
    });
  }
  private pumpScheduled = false;

  /** The slab updates are appended to (null: none yet, or it filled up). */
  private slab: Slab | null = null;

  /** An update was sent or dropped: give back what holds its bytes. */
  private done(p: Pending): void {
    if (p.pooled !== null) release(p.pooled);
    if (p.kept !== null) {
      p.kept.release();
      p.kept = null;
    }
    p.slab?.release();
  }

  private pump(): void {
    while (
      this.batches < this.o.maxBatches &&
      this.queue.length > 0 &&
      sends(this.s.name) &&
      this.volumeName
    ) {
      let bytes = 0;
      let n = 0;
      while (n < this.queue.length && n < 4096) {
        const size = this.queue[n].size;
        if (n > 0 && bytes + size > this.o.batchBytes) break;
        bytes += size;
        n++;
      }
      const batch = this.queue.splice(0, n);
      this.queued -= bytes;
      this.batches++;
      this.sending.add(batch);
      void this.send(batch, bytes, this.epoch);
    }
  }

  /** The body of a batch: runs of updates that lie back to back in a slab go as one slice. */
  private static body(batch: Pending[]): BodyPart[] {
    const chunks: BodyPart[] = [];
    let runBuf: Buffer | null = null;
    let runStart = 0;
    let runEnd = 0;
    for (const p of batch) {
      if (p.slab !== null) {
        if (runBuf === p.slab.buf && runEnd === p.start) {
          runEnd += p.size;
          continue;
        }
        if (runBuf !== null) chunks.push(runBuf.subarray(runStart, runEnd));
        runBuf = p.slab.buf;
        runStart = p.start;
        runEnd = p.start + p.size;
        continue;
      }
      if (runBuf !== null) chunks.push(runBuf.subarray(runStart, runEnd));
      runBuf = null;
      if (p.file !== null) chunks.push({ head: p.head!, lease: p.file });
      else chunks.push(p.head!, p.data!);
    }
    if (runBuf !== null) chunks.push(runBuf.subarray(runStart, runEnd));
    return chunks;
  }

  /**
   * Resolves when every update enqueued before this call has been answered, or the epoch changed
   * (they were dropped). Updates enqueued later do not count: under steady writes the queue is
   * never empty, and a FLUSH or the end of a resync pass waiting for that would wait forever.
   */
  private settled(clientOnly = false): Promise<void> {
    let left = 0;
    if (!clientOnly) {
      left = this.queue.length;
      for (const b of this.sending) left += b.length;
    } else {
      for (const p of this.queue) if (!p.resync) left++;
      for (const b of this.sending) for (const p of b) if (!p.resync) left++;
    }
    if (left === 0) return Promise.resolve();
    return new Promise<void>((resolve) =>
      this.settleWaiters.push({ ord: this.enqueued, left, clientOnly, resolve }),
    );
  }

  /** A batch was answered (in this epoch): wake the settled() calls it completes. */
  private answered(batch: Pending[]): void {
    for (let i = 0; i < this.settleWaiters.length;) {
      const w = this.settleWaiters[i];
      for (const p of batch) if (p.ord < w.ord && (!w.clientOnly || !p.resync)) w.left--;
      if (w.left > 0) i++;
      else {
        this.settleWaiters.splice(i, 1);
        w.resolve();
      }
    }
  }

  private headers(): Record<string, string> {
    const h: Record<string, string> = {
      "x-blockfork-source": this.tracking.meta.source,
      "x-blockfork-generation": String(this.tracking.meta.generation),
      "x-blockfork-volume-size": String(this.tracking.meta.volumeSize),
      "x-blockfork-floor": String(this.floor),
      "x-blockfork-incarnation": this.incarnation,
    };
    if (this.takingOver) h["x-blockfork-takeover"] = "1";
    if (this.o.token) h.authorization = `Bearer ${this.o.token}`;
    return h;
  }

  private async call(
    method: "GET" | "POST" | "PUT",
    path: string,
    body?: Buffer | Buffer[],
    type?: string,
    length?: number,
    extra?: Record<string, string>,
  ): Promise<unknown> {
    const headers = extra === undefined ? this.headers() : { ...this.headers(), ...extra };
    if (type) headers["content-type"] = type;
    if (length !== undefined) headers["content-length"] = String(length);
    // undici writes an iterable body chunk by chunk (its type declarations only list single buffers).
    const payload = body as Buffer | undefined;
    const pool = body === undefined ? this.controlPool : this.pool;
    const res = await pool.request({ method, path, headers, ...(payload ? { body: payload } : {}) });
    const text = await res.body.text();
    if (res.statusCode !== 200) {
      let detail = text.slice(0, 300);
      let json: unknown = null;
      try {
        const j = JSON.parse(text) as { error?: { code?: string; message?: string } };
        json = j;
        if (j.error) detail = `${j.error.code ?? ""}: ${j.error.message ?? ""}`;
      } catch {
        // not JSON: keep the text
      }
      const hint = res.statusCode === 401 ? " (check --gateway-token-file)" : "";
      throw new HttpError(
        `${method} ${path} answered ${res.statusCode} ${detail}${hint}`,
        res.statusCode,
        json,
      );
    }
    return text ? (JSON.parse(text) as unknown) : {};
  }

  private async send(batch: Pending[], bytes: number, epoch: number): Promise<void> {
    try {
      let answer: unknown;
      if (this.stream !== null) answer = await this.stream.send(GatewayLink.body(batch), bytes, this.floor);
      else {
        const body = GatewayLink.body(batch);
        if (body.some((c) => !Buffer.isBuffer(c))) throw new Error("the update stream closed under a batch");
        answer = await this.call(
          "POST",
          `/v1/volumes/${this.volumeName}/updates`,
          body as Buffer[],
          "application/vnd.blockfork.updates",
          bytes,
        );
      }
      if (epoch !== this.epoch) return; // the link was reset meanwhile: this answer means nothing now
      const a = answer as {
        stale?: boolean;
        reused?: boolean;
        generation?: number;
        appliedThrough?: number;
        boot?: string;
      } | null;
      if (a?.stale === true) throw this.generationTaken("a batch", a.generation, a.reused === true);
      this.checkBoot(a?.boot);
      if (typeof a?.appliedThrough === "number" && a.appliedThrough > this.appliedSeen)
        this.appliedSeen = a.appliedThrough;
      this.takingOver = false; // applied: the gateway names this proxy the owner now
      this.lastContact = performance.now();
      for (const p of batch) {
        this.unflushed.push(p.seq, p.b0, p.b1);
        if (p.resync) this.progress.doneBytes += p.length;
        if (p.file !== null) this.progress.pageCacheBytes += p.length;
        p.waiter?.();
      }
      if (this.settleWaiters.length > 0) this.answered(batch);
    } catch (e) {
      if (epoch !== this.epoch) return;
      this.failed(`sending updates failed: ${(e as Error).message}`);
      for (const p of batch) p.waiter?.();
    } finally {
      for (const p of batch) this.done(p);
      this.sending.delete(batch);
      if (epoch === this.epoch) {
        this.batches--;
        this.pump();
      }
    }
  }

  /**
   * Throw if another gateway process answered than the first one of this epoch. A restarted
   * gateway lost what it had applied but not made durable, and which updates above its
   * durableThrough it had applied: a POST that undici held back and sends to the new process can
   * then land behind a newer update to the same blocks, and the seqs lost leave a gap that holds
   * durableThrough back for good. Neither shows in the watermarks, so the link fails (tracking,
   * then a resync copies every block not acknowledged durable) as the stream does when it breaks.
   * An answer without `boot` (an older gateway) checks nothing.
   */
  private checkBoot(boot: string | undefined): void {
    if (typeof boot !== "string") return;
    if (this.bootSeen === null) this.bootSeen = boot;
    else if (boot !== this.bootSeen)
      throw new Error(
        `the gateway restarted (boot ${this.bootSeen} -> ${boot}): updates it had applied but not ` +
          "made durable may be lost",
      );
  }

  /**
   * The gateway refused an answer as stale: it holds a newer generation of this source, or this
   * generation from another process. Another process has used this tracking log's sequence space:
   * the state directory was restored from a copy (a backup, a VM snapshot), or a second proxy runs
   * with a copy of it. Either way the map no longer describes the secondary, so: a generation
   * above the gateway's, every block dirty (a whole-volume resync), stored before anything is sent
   * again (the link fails now, and a link sends only after a new probe). Returns the link's error.
   */
  private generationTaken(what: string, theirs: number | undefined, reused: boolean): Error {
    const ours = this.tracking.meta.generation;
    const next = Math.max(ours, theirs ?? 0) + 1;
    const why = reused
      ? `it holds generation ${ours} of this source from another process`
      : `it holds generation ${theirs ?? "?"} of this source, newer than ours (${ours})`;
    this.log.error(
      `gateway link: the gateway refused ${what} as stale (nothing applied): ${why}. This state ` +
        `directory's tracking log was restored from a copy, or another proxy runs with a copy of it; ` +
        `it no longer describes the secondary: moving to generation ${next} and resyncing the whole volume`,
    );
    this.markStale(0, this.tracking.map.volumeSize);
    this.pendingMeta = this.tracking.updateMeta({ generation: next }, true);
    return new Error(
      `the gateway refused ${what} as stale (${why}); resyncing the whole volume as generation ${next}`,
    );
  }

  private failed(reason: string): void {
    this.lastError = reason;
    this.dispatch({ type: "failure", reason });
  }

  /** Forget every queued and in-flight update; their blocks stay dirty for the next resync. */
  private dropQueue(): void {
    this.epoch++;
    // Every seq below this.seq is now acknowledged or abandoned (nothing is reserved while the
    // link tracks): the gateway may stop waiting for the abandoned ones.
    this.floor = this.seq;
    this.closeStream();
    for (const p of this.queue) {
      p.waiter?.();
      this.done(p);
    }
    this.queue = [];
    this.queued = 0;
    this.batches = 0;
    for (const b of this.sending) for (const p of b) p.waiter?.();
    this.sending.clear();
    this.unflushed = [];
    this.appliedSeen = 0;
    this.bootSeen = null;
    this.inSync = null;
    this.lastSeq.clear();
    // Writes in progress cover nothing in the new epoch.
    for (const [b, v] of this.writing) if (v >= COVER) this.writing.set(b, v % COVER);
    for (const w of this.settleWaiters.splice(0)) w.resolve();
  }

  private flushNow(): Promise<void> {
    const epoch = this.epoch;
    // After the one in flight; not at all if it failed the link (no flush to a gateway that is
    // down: each would wait for its request timeout).
    if (this.flushing) return this.flushing.then(() => (epoch === this.epoch ? this.flushNow() : undefined));
    const covered = this.unflushed.length;
    // Every update the gateway said it applied before this flush is sent: the flush makes durable
    // at least up to the highest appliedThrough it answered (the gateway captures it at the start).
    const applied = this.appliedSeen;
    // The claim goes with the boot it was made in: a gateway restarted since must not take it.
    const claim =
      this.inSync !== null && this.bootSeen !== null
        ? {
            "x-blockfork-in-sync": String(this.inSync),
            "x-blockfork-boot": this.bootSeen,
            ...(this.wholeCopy ? { "x-blockfork-in-sync-whole": "1" } : {}),
          }
        : undefined;
    this.flushing = (async () => {
      try {
        const r = (await this.call(
          "POST",
          `/v1/volumes/${this.volumeName}/flush`,
          undefined,
          undefined,
          undefined,
          claim,
        )) as {
          durableThrough?: number;
          stale?: boolean;
          reused?: boolean;
          generation?: number;
          boot?: string;
          secondary?: unknown;
        };
        if (epoch !== this.epoch) return;
        if (r.stale === true) throw this.generationTaken("a flush", r.generation, r.reused === true);
        this.checkBoot(r.boot);
        const d = Number(r.durableThrough ?? 0);
        if (d < applied) {
          // The gateway lost updates it had applied and acknowledged but not made durable (it
          // restarted: a POST reconnects silently, and the restarted gateway resumes at its
          // durableThrough). Those seqs will never come again: later ones would wait above the gap
          // forever. A link failure: tracking, then a resync copies the dirty blocks.
          throw new Error(
            `the gateway lost acknowledged updates: it had applied through seq ${applied}, ` +
              `but its flush answered durableThrough ${d} (did it restart?)`,
          );
        }
        this.durableThrough = d;
        this.takingOver = false;
        this.lastContact = performance.now();
        this.clearDurable(d, covered);
        if (this.consistency && typeof r.secondary === "string") {
          if (r.secondary !== this.secondary) {
            const level = r.secondary === "consistent" ? "info" : "debug";
            this.log[level](`gateway link: the gateway reports its secondary ${r.secondary}`);
          }
          this.secondary = r.secondary;
          // Claims go on (one a period) while the gateway says anything but consistent: it may
          // have seen a gap meanwhile (a batch overtaken on POST), which the claim then ends.
          this.inSyncConfirmed = r.secondary === "consistent";
        }
      } catch (e) {
        if (epoch === this.epoch) this.failed(`flush failed: ${(e as Error).message}`);
      } finally {
        this.flushing = null;
      }
    })();
    return this.flushing;
  }

  /** Clear blocks whose newest update is durable (looking at the first `count` numbers of unflushed). */
  private clearDurable(d: number, count: number): void {
    const u = this.unflushed;
    const keep: number[] = [];
    for (let i = 0; i < u.length; i += 3) {
      const seq = u[i];
      if (i >= count || seq > d) {
        keep.push(seq, u[i + 1], u[i + 2]);
        continue;
      }
      for (let b = u[i + 1]; b <= u[i + 2]; b++) {
        // Not while a client write to the block is in progress: its own update may not even be
        // sent yet (it waits for the activity log), and its primary write may still fail. The
        // last of those writes clears the block when it ends (endWrite).
        if (!this.writing.has(b)) this.clearIfDurable(b, d);
      }
    }
    this.unflushed = keep;
    this.mirrorDirty = true;
  }

  /** Periodic: flush applied updates, enforce bounds. */
  private tick(): void {
    if (!sends(this.s.name)) return;
    // Ages and timeouts on the monotonic clock: a step of the wall clock must neither hold a sync
    // write past --sync-timeout nor drop the link for a queue that only seems old.
    const now = performance.now();
    const oldest = this.queue[0];
    if (this.o.mode === "sync") {
      // Only client updates count: a client waits for them. Resync copies have no waiter, and on
      // a slow gateway they may take long by design (the resync makes progress all the same).
      let first = now;
      for (const p of this.queue) {
        if (!p.resync) {
          first = p.at;
          break;
        }
      }
      for (const b of this.sending) {
        for (const p of b) {
          if (!p.resync) {
            if (p.at < first) first = p.at;
            break;
          }
        }
      }
      if (now - first > this.o.syncTimeoutMs) {
        this.dispatch({
          type: "syncTimeout",
          reason: `a sync write waited ${Math.round(now - first)} ms for the gateway (--sync-timeout ${this.o.syncTimeoutMs} ms)`,
        });
        return;
      }
    }
    if (oldest !== undefined && this.o.mode === "async") {
      // The age bound is for client updates: resync copies queue by design, up to half the bytes.
      let client: Pending | undefined;
      for (const p of this.queue) {
        if (!p.resync) {
          client = p;
          break;
        }
      }
      if (client !== undefined && now - client.at > this.o.queueAgeMs) {
        this.dispatch({
          type: "overflow",
          reason: `oldest queued update is ${Math.round(now - client.at)} ms old (gateway too slow)`,
        });
        return;
      }
    }
    // An idle link on POST hears of nothing (an update stream breaks when the gateway restarts,
    // or ends when another proxy takes the secondary over): look at the gateway now and then.
    if (this.stream === null && !this.checking && now - this.lastContact > IDLE_CHECK_MS)
      void this.checkAlive();
    // Nothing to flush but an unconfirmed claim: one flush a period carries it.
    const claim = this.inSync !== null && !this.inSyncConfirmed && now - this.lastFlush >= this.o.periodMs;
    if (
      (this.unflushed.length > 0 || claim) &&
      !this.flushing &&
      now - this.lastFlush >= this.o.flushIntervalMs
    ) {
      this.lastFlush = now;
      void this.flushNow();
    }
    if (this.s.name === "streaming" && !this.resyncRunning) {
      if (this.unreadableCount > 0 && now - this.resyncBegan >= this.o.unreadableRetryMs) {
        // Blocks the primary could not read: try them again (a sector may heal, or be remapped).
        this.requestResync();
      } else if (this.claimWanted) {
        // The last unreadable block left (overwritten whole): every difference is covered again,
        // and a resync (with nothing to copy) makes the in-sync claim.
        this.claimWanted = false;
        if (this.consistency && this.inSync === null && this.unreadableCount === 0) this.requestResync();
      }
    }
  }
  private lastFlush = 0;

  /**
   * An idle link's look at the gateway (GET /v1/health): another boot (it restarted: what it had
   * not made durable may be lost) or another owner (a proxy took the secondary over) is a failure,
   * as an unhealthy gateway is.
   */
  private async checkAlive(): Promise<void> {
    this.checking = true;
    const epoch = this.epoch;
    try {
      const h = (await this.call("GET", "/v1/health")) as { boot?: unknown; owner?: unknown };
      if (epoch !== this.epoch) return;
      this.lastContact = performance.now();
      if (typeof h.boot === "string") this.checkBoot(h.boot);
      if (typeof h.owner === "string" && h.owner !== this.tracking.meta.source) {
        throw new Error(`another proxy (source ${h.owner}) took the gateway's secondary over`);
      }
    } catch (e) {
      if (epoch === this.epoch) this.failed(`gateway check: ${(e as Error).message}`);
    } finally {
      this.checking = false;
    }
  }

  // ---- health

  private startProbe(): void {
    if (this.probing) return;
    this.probing = true;
    // Each loop has its own generation: a loop stopped and restarted (probeNow) while one of its
    // checks is awaiting must not carry on beside the new one (two loops, and the old one's update
    // stream left open at the gateway or replacing the new one's).
    const gen = ++this.probeGen;
    const live = (): boolean => this.probing && gen === this.probeGen && !this.stopped;
    let delay = 200;
    const first = this.failures === 0 ? 0 : Math.min(250 * 2 ** (this.failures - 1), 30_000);
    const once = async (): Promise<void> => {
      if (!live()) return;
      try {
        const h = (await this.call("GET", "/v1/health")) as {
          ok?: boolean;
          volume?: string;
          size?: number;
          features?: unknown;
          secondary?: unknown;
          secondaryId?: unknown;
          owner?: unknown;
          boot?: unknown;
        };
        if (!h.ok || typeof h.volume !== "string") throw new Error("health check answered without a volume");
        if (h.size !== undefined && h.size !== this.tracking.meta.volumeSize) {
          throw new RefusedError(
            `the secondary is ${h.size} bytes, the primary ${this.tracking.meta.volumeSize}: ` +
              `give the gateway a secondary of the primary's size`,
          );
        }
        this.volumeName = encodeURIComponent(h.volume);
        this.consistency = Array.isArray(h.features) && h.features.includes("consistency");
        // The health check needs no token: check it now, or a wrong token would show up only as
        // a refused update stream and then as failing batches, as if the gateway kept going down.
        await this.call("GET", "/v1/status");
        if (typeof h.owner === "string") this.checkOwner(h.owner);
        if (typeof h.secondaryId === "string" && /^[0-9a-f]{16}$/.test(h.secondaryId))
          this.checkSecondary(h.secondaryId);
        else if (this.tracking.recovery.gatewayMoved !== null && !this.movedChecked) {
          // The URL changed and this gateway cannot say which secondary it serves: assume another.
          this.movedChecked = true;
          this.log.error(
            "gateway link: the gateway at the new URL does not report its secondary's id; " +
              "resyncing the whole volume",
          );
          this.markStale(0, this.tracking.map.volumeSize);
          this.pendingMeta = this.tracking.updateMeta({}, true);
        }
        this.secondary = this.consistency && typeof h.secondary === "string" ? h.secondary : null;
        if (typeof h.boot === "string") this.bootSeen = h.boot;
        this.lastContact = performance.now();
        await this.pendingMeta; // a whole-volume resync is stored before anything is sent
        if (!live()) return;
        await this.openStream(live);
        if (!live()) {
          this.closeStream(); // ours, installed just now: no later loop can have opened one yet
          return;
        }
        this.probesDone++;
        this.dispatch({ type: "healthy" });
        return;
      } catch (e) {
        if (!live()) return; // another loop checks now
        // A gateway that is up but unhealthy says what its secondary is now (a failed disk makes
        // it inconsistent): status must not go on showing what it said before.
        const said =
          e instanceof HttpError ? (e.body as { secondary?: unknown } | null)?.secondary : undefined;
        if (this.consistency && typeof said === "string") this.secondary = said;
        this.lastError = `health check: ${transportHint(e, this.o.url)}`;
        this.probesDone++;
        const refused = refusal(e);
        if (this.s.name === "starting") this.dispatch({ type: "unhealthy", reason: this.lastError, refused });
        else if (refused) {
          this.log.limited(
            "error",
            `link refused ${this.lastError}`,
            `gateway link: the gateway refuses this proxy (${this.lastError}); tracking until that is fixed`,
          );
        }
      }
      if (!live()) return;
      delay = Math.min(delay * 2, 5000);
      this.probeTimer = setTimeout(() => void once(), delay);
      this.probeTimer.unref();
    };
    if (first === 0) void once();
    else {
      this.probeTimer = setTimeout(() => void once(), first);
      this.probeTimer.unref();
    }
  }

  /**
   * The gateway's secondary must be the one this tracking log describes. Another one (the gateway
   * restarted over a re-provisioned or swapped volume, or another gateway at the same URL) holds
   * none of what was replicated: every block is marked dirty, as DRBD does a full sync when the
   * peer's data generation is unknown to it. A log that never met the gateway records the id.
   */
  private checkSecondary(id: string): void {
    const known = this.tracking.meta.secondary;
    if (known === id) return;
    if (known === undefined) {
      this.log.info(`gateway link: the gateway's secondary is ${id}`);
      this.pendingMeta = this.tracking.updateMeta({ secondary: id }, false);
      return;
    }
    this.log.error(
      `gateway link: the gateway serves another secondary (${id}, not ${known}, which this tracking ` +
        `log describes: re-provisioned, swapped, or another gateway at ${this.o.url}); resyncing the whole volume`,
    );
    this.markStale(0, this.tracking.map.volumeSize);
    this.pendingMeta = this.tracking.updateMeta({ secondary: id }, true);
  }

  /**
   * The gateway's secondary takes updates from one proxy (source) only. Another's: refused (a
   * RefusedError: said loudly, retried), or with --gateway-takeover taken over: every block is
   * marked dirty (the secondary holds the other primary's data) and requests say so until the
   * gateway names this proxy the owner.
   */
  private checkOwner(owner: string): void {
    const me = this.tracking.meta.source;
    if (owner === me) {
      this.takingOver = false;
      return;
    }
    if (this.o.takeover !== true || this.tookOver) {
      this.secondary = null; // what the gateway says of its secondary is about another primary
      throw new RefusedError(
        this.tookOver
          ? `another proxy (source ${owner}) took the gateway's secondary over after this one ` +
              `(${me}) had taken it with --gateway-takeover: two proxies with that option would take ` +
              `it from each other for ever; this one stops replicating (restart it to take it again)`
          : `the gateway's secondary is the replica of another proxy (source ${owner}; this one is ` +
              `${me}). If that proxy is gone for good, restart this one with --gateway-takeover ` +
              `(it resyncs the whole volume)`,
      );
    }
    if (this.takingOver) return;
    this.tookOver = true;
    this.log.warn(
      `gateway link: taking the secondary over from source ${owner} (--gateway-takeover); resyncing the whole volume`,
    );
    this.takingOver = true;
    this.markStale(0, this.tracking.map.volumeSize);
    this.pendingMeta = this.tracking.updateMeta({}, true);
  }

  /**
   * Open the update stream for the next epoch (or leave the link on POST, saying why once). A
   * stream opened for a probe loop that is no longer `live` is closed at once, never kept.
   */
  private async openStream(live: () => boolean): Promise<void> {
    this.closeStream();
    if (this.o.updateStream === false) return;
    let stream: UpdateStream;
    try {
      stream = await UpdateStream.open(
        this.pool,
        `/v1/volumes/${this.volumeName}/stream`,
        this.headers(),
        this.o.requestTimeoutMs,
      );
    } catch (e) {
      const reason = (e as Error).message;
      if (reason !== this.streamRefused) {
        this.streamRefused = reason;
        this.log.info(`gateway link: no update stream (${reason}); sending batches with POST`);
      }
      return;
    }
    if (!live()) {
      stream.close();
      return;
    }
    this.closeStream(); // another loop's, if one slipped in meanwhile
    this.streamRefused = "";
    const epoch = this.epoch;
    stream.onClosed = (reason) => {
      if (this.stream === stream) this.stream = null;
      const readError = stream.leaseReadError;
      // A resync range sent from the primary's page cache could not be read (see zeroCopyOff).
      if (readError !== null) this.zeroCopyOff = true;
      if (epoch === this.epoch && sends(this.s.name)) {
        this.failed(
          readError !== null
            ? `a resync copy sent from the primary's page cache could not be read (${readError.message}); ` +
                "the next resync reads the primary instead"
            : `sending updates failed: ${reason}`,
        );
      }
    };
    this.stream = stream;
  }

  private closeStream(): void {
    const s = this.stream;
    this.stream = null;
    s?.close();
  }

  private stopProbe(): void {
    this.probing = false;
    this.probeGen++;
    if (this.probeTimer) clearTimeout(this.probeTimer);
    this.probeTimer = null;
  }

  // ---- resync

  private async resync(): Promise<void> {
    const token = ++this.resyncToken;
    const map = this.tracking.map;
    const g = map.granularity;
    const started = performance.now();
    if (map.dirtyBlocks === map.blocks) this.wholeCopy = true;
    this.resyncRunning = true;
    // Every run tries the unreadable blocks again (once: a block that fails again is skipped),
    // but the one after a run that a dead region failed.
    if (!this.skipCarry) this.skip.clear();
    this.skipCarry = false;
    // One that is no longer dirty needs nothing (clearIfDurable forgets it; this is in case).
    if (this.unreadableCount > 0)
      for (const { offset, length } of this.unreadableRanges(Number.MAX_SAFE_INTEGER)) {
        const [b0, b1] = map.blockRange(offset, length);
        for (let b = b0; b <= b1; b++) if (!map.isDirty(b)) this.forgetUnreadable(b);
      }
    this.resyncBegan = started;
    this.claimWanted = false;
    const retrying = this.unreadableCount;
    this.progress = {
      running: true,
      pass: 0,
      totalBytes: map.dirtyBytes,
      doneBytes: 0,
      pageCacheBytes: 0,
      unreadableBytes: 0,
      bytesPerSecond: 0,
      etaSeconds: null,
      startedAt: new Date().toISOString(),
      finishedAt: null,
    };
    if (this.progress.totalBytes > 0) {
      this.log.info(
        `resync: ${this.progress.totalBytes} bytes dirty` +
          (retrying > 0 ? `, of them ${retrying} blocks the primary could not read before (retried)` : ""),
      );
    }
    const alive = (): boolean => token === this.resyncToken && !this.stopped && this.s.name === "resyncing";
    let bucket = 0;
    let bucketAt = performance.now();
    // The first copy that failed (a primary read error): the ranges in flight never reject (an
    // unhandled rejection would end the process), they record it here and the pass rethrows it.
    let failure: Error | null = null;
    const check = (): void => {
      if (failure !== null) throw failure;
    };
    try {
      for (;;) {
        this.progress.pass++;
        let sentAny = false;
        const inflight = new Set<Promise<void>>();
        let reading = 0; // bytes of the ranges in flight (read, not all queued yet)
        for (const run of map.runs(0, Math.max(1, Math.floor(this.o.resyncChunkBytes / g)))) {
          if (!alive()) return;
          check();
          // Skip blocks with a client write in progress or an update already in flight.
          let start = run.start;
          const end = run.start + run.count;
          while (start < end) {
            while (start < end && !this.needsCopy(start)) start++;
            let stop = start;
            while (stop < end && this.needsCopy(stop)) stop++;
            if (stop > start) {
              const offset = start * g;
              const length = Math.min(stop * g, map.volumeSize) - offset;
              // Resync keeps to half the async queue's bytes, counting the ranges it is still
              // reading: client writes have the other half, so the resync alone never sends the
              // link over its bound.
              // And to resyncPendingBlocks blocks not yet durable, whatever their updates weigh.
              while (
                inflight.size >= this.o.resyncConcurrency ||
                (inflight.size > 0 && this.queued + reading + length > this.o.queueBytes / 2) ||
                this.queued > this.o.queueBytes / 2 ||
                this.lastSeq.seqCount >= this.o.resyncPendingBlocks
              ) {
                if (inflight.size > 0) await Promise.race(inflight);
                else await new Promise((r) => setTimeout(r, 5));
                if (!alive()) return;
                check();
              }
              if (this.o.resyncRate > 0) {
                const now = performance.now();
                bucket = Math.max(0, bucket - ((now - bucketAt) / 1000) * this.o.resyncRate);
                bucketAt = now;
                if (bucket > this.o.resyncRate / 10)
                  await new Promise((r) => setTimeout(r, (bucket / this.o.resyncRate) * 1000));
                bucket += length;
              }
              reading += length;
              const p: Promise<void> = this.resyncRange(offset, length, alive).then(
                () => {
                  reading -= length;
                  inflight.delete(p);
                },
                (e: unknown) => {
                  reading -= length;
                  inflight.delete(p);
                  failure ??= e instanceof Error ? e : new Error(String(e));
                },
              );
              inflight.add(p);
              sentAny = true;
            }
            start = stop;
          }
          this.updateRate(started);
        }
        await Promise.all(inflight);
        if (!alive()) return;
        check();
        await this.settled();
        if (!alive()) return;
        if (this.unflushed.length > 0) await this.flushNow();
        if (!alive()) return;
        // Done when every dirty block has an update in flight (streaming clears it) or none is left,
        // but for the blocks the primary could not read in this run (retried by the next one).
        let left = false;
        for (const run of map.runs()) {
          for (let b = run.start; b < run.start + run.count; b++) {
            const last = this.lastSeq.get(b);
            if ((last === undefined || last === STALE) && !this.skipped(b)) {
              left = true;
              break;
            }
          }
          if (left) break;
        }
        if (!left) break;
        if (!sentAny) await new Promise((r) => setTimeout(r, 50)); // only busy blocks left: let writes finish
      }
      this.updateRate(started);
      this.progress.running = false;
      this.progress.finishedAt = new Date().toISOString();
      const unreadable =
        this.unreadableCount > 0
          ? `${this.unreadableCount} blocks (${this.unreadableBytes} bytes) the primary cannot read, ` +
            `which stay dirty and differ on the secondary (retried every ${Math.round(this.o.unreadableRetryMs / 1000)} s)`
          : undefined;
      this.log.info(
        `resync: done, ${this.progress.doneBytes} bytes in ${((performance.now() - started) / 1000).toFixed(1)} s, ` +
          `${this.progress.pass} pass(es)` +
          (unreadable !== undefined ? `; not copied: ${unreadable}` : ""),
      );
      if (retrying > 0 && this.unreadableCount < retrying) {
        this.log.info(
          `resync: ${retrying - this.unreadableCount} of ${retrying} blocks the primary could not read ` +
            "before were read and copied",
        );
      }
      // Every dirty block has an update in flight, all of them up to the last seq reserved; not
      // so while blocks are unreadable: the secondary lacks them, it is no image of the primary.
      if (this.consistency && this.unreadableCount === 0) {
        this.inSync = this.seq - 1;
        this.inSyncConfirmed = false;
      }
      this.zeroCopyOff = false; // what could not be read is known now (copies skip it)
      this.dispatch(unreadable === undefined ? { type: "resyncDone" } : { type: "resyncDone", unreadable });
    } catch (e) {
      if (alive()) this.failed(`resync failed: ${(e as Error).message}`);
    } finally {
      if (token === this.resyncToken) {
        this.resyncRunning = false;
        this.progress.running = false;
      }
    }
  }

  /**
   * A dirty block that no update in flight covers and no client write is changing (and that the
   * primary did not fail to read in this run).
   */
  private needsCopy(b: number): boolean {
    if (!this.tracking.map.isDirty(b) || this.writing.has(b) || this.skipped(b)) return false;
    const last = this.lastSeq.get(b);
    return last === undefined || last === STALE;
  }

  private updateRate(started: number): void {
    const secs = (performance.now() - started) / 1000;
    const p = this.progress;
    p.bytesPerSecond = secs > 0 ? Math.round(p.doneBytes / secs) : 0;
    const left = Math.max(0, p.totalBytes - p.doneBytes); // unreadable bytes left totalBytes
    p.etaSeconds = p.bytesPerSecond > 0 ? Math.round(left / p.bytesPerSecond) : null;
    const now = performance.now();
    if (now - this.progressLogged >= 5000 && p.totalBytes > 0) {
      this.progressLogged = now;
      const pct = Math.min(100, (100 * p.doneBytes) / p.totalBytes).toFixed(1);
      this.log.info(
        `resync: ${p.doneBytes} of ${p.totalBytes} bytes (${pct}%), ${p.bytesPerSecond} bytes/s, ` +
          `ETA ${p.etaSeconds === null ? "?" : `${p.etaSeconds} s`}`,
      );
    }
  }
  private progressLogged = performance.now();

  /**
   * Copy one dirty range from the primary. For each run of blocks that no client write is changing
   * at this moment, the seq is reserved first (synchronously, so the check and the reservation see
   * the same state), and only then are the primary's extents and data read: a write that begins
   * later gets a higher seq and wins at the gateway whatever our read saw; a write in progress makes
   * us skip its blocks, which stay dirty for the next pass. A run that is all hole (or zeroes) goes
   * as one ZERO update, anything else as one WRITE (one seq each: the gateway needs them gap-free).
   */
  private async resyncRange(offset: number, length: number, alive: () => boolean): Promise<void> {
    const g = this.tracking.map.granularity;
    const end = offset + length;
    if (this.unreadableCount > 0 && !(await this.probeUnreadable(offset, length, alive))) return;
    /** Not copied now: a client write is changing it, or the probe found it unreadable still. */
    const busy = (b: number): boolean => this.writing.has(b) || this.skipped(b);
    let pos = offset;
    while (pos < end) {
      // Not `sends()`: a copy of a resync the link gave up on (an outage, then a new resync, all
      // within one copyRange) must reserve nothing in the new one, whose failures it cannot report.
      if (!alive()) return;
      while (pos < end && busy(Math.floor(pos / g))) pos = Math.min((Math.floor(pos / g) + 1) * g, end);
      if (pos >= end) break;
      let stop = pos;
      while (stop < end && !busy(Math.floor(stop / g))) stop = Math.min((Math.floor(stop / g) + 1) * g, end);
      const seq = this.reserve(pos, stop - pos, true);
      await this.copyRange(pos, stop - pos, seq);
      if (this.unreadableCount > 0) {
        // Unreadable blocks this copy read after all (a healed or remapped sector).
        const [b0, b1] = this.tracking.map.blockRange(pos, stop - pos);
        for (let b = b0; b <= b1; b++) if (this.isUnreadable(b) && !this.skipped(b)) this.forgetUnreadable(b);
      }
      pos = stop;
    }
  }

  /** [offset, offset+length) holds a block the primary could not read. */
  private overlapsUnreadable(offset: number, length: number): boolean {
    if (this.unreadableCount === 0) return false;
    const [b0, b1] = this.tracking.map.blockRange(offset, length);
    for (let b = b0; b <= b1; b++) if (this.isUnreadable(b)) return true;
    return false;
  }

  /**
   * Read the blocks of [offset, offset+length) that were unreadable before, each on its own and
   * before any seq is reserved for them: one that still fails is skipped by this run (no seq, so
   * nothing the gateway would wait for, and no outage; a block of which not one piece reads could
   * carry no seq). One that reads is copied as any other, right after (by pread, as the probe
   * left its pages read). False when the resync ended meanwhile.
   */
  private async probeUnreadable(offset: number, length: number, alive: () => boolean): Promise<boolean> {
    const map = this.tracking.map;
    const g = map.granularity;
    const [b0, b1] = map.blockRange(offset, length);
    let pooled: Buffer | null = null;
    try {
      for (let b = b0; b <= b1; b++) {
        if (!this.isUnreadable(b) || this.skipped(b) || this.writing.has(b)) continue;
        const at = Math.max(offset, b * g);
        const n = Math.min(offset + length, (b + 1) * g, map.volumeSize) - at;
        pooled ??= acquire(g);
        try {
          await this.primary.read(pooled.subarray(0, n), at);
        } catch (e) {
          if (!alive()) return false;
          if (!mediaError(e)) throw e;
          this.rememberUnreadable(b, Date.now(), (e as Error).message);
          this.leaveOut(this.blockBytes(b));
          continue;
        }
        if (!alive()) return false;
      }
    } finally {
      if (pooled !== null) release(pooled);
    }
    return alive();
  }

  private async copyRange(offset: number, length: number, seq: number): Promise<void> {
    // `seq` was reserved in this epoch: from here on, the copy is either queued in it or the link
    // fails (the gateway needs every seq of an epoch, and the blocks point at this one). An epoch
    // that ended meanwhile moved the floor above it: then the copy is simply forgotten.
    const epoch = this.epoch;
    let extents: Extent[];
    try {
      extents = await this.primary.extents(offset, length);
    } catch (e) {
      if (epoch === this.epoch) this.failed(`resync failed: ${(e as Error).message}`);
      throw e;
    }
    if (epoch !== this.epoch) return;
    let zeroBytes = 0;
    for (const e of extents) if (e.flags & 2) zeroBytes += e.length;
    if (zeroBytes >= length) {
      void this.enqueue(KIND.ZERO, offset, length, null, true, seq);
      return;
    }
    // On a plain-socket update stream, a range the page cache holds goes from there (sendfile): no
    // read into a buffer, no copy into the socket. The gateway may then see contents newer than
    // this moment (the kernel takes the pages when it sends them), which is fine: any write since
    // the seq was reserved has a higher seq and reaches the gateway on its own, which keeps the
    // newer data wherever they overlap.
    if (this.stream?.zeroCopy === true && !this.zeroCopyOff && !this.overlapsUnreadable(offset, length)) {
      const range = this.primary.fileRange?.(offset, length);
      if (range && isCached(range.fd, range.offset, length)) {
        void this.enqueue(
          KIND.WRITE,
          offset,
          length,
          null,
          true,
          seq,
          null,
          fileLease(range.fd, range.offset, length),
        );
        return;
      }
    }
    const pooled = acquire(length);
    const buf = pooled.subarray(0, length);
    try {
      await this.primary.read(buf, offset);
    } catch (e) {
      release(pooled);
      if (epoch === this.epoch && mediaError(e)) return this.isolate(offset, length, seq, epoch, e as Error);
      if (epoch === this.epoch) this.failed(`resync failed: ${(e as Error).message}`);
      throw e;
    }
    if (epoch !== this.epoch) {
      release(pooled);
      return;
    }
    void this.enqueue(KIND.WRITE, offset, length, buf, true, seq, pooled);
  }

  /**
   * The read of a resync copy failed with a media error: read [offset, offset+length) again block
   * by block, copy what reads, and leave the rest dirty as unreadable (see the notes at the top).
   * `seq` was reserved for the whole range and must go out in this epoch: on the first readable
   * run of blocks (their data read after it was reserved, as any copy's), else on a readable 4 KiB
   * piece of an unreadable block (a partial copy: it clears nothing). Blocks outside that update
   * lose `seq`: uncovered again, or STALE where a client write began on them since (it counted
   * on this copy). Readable ones are copied by the next pass, with a seq of their own.
   */
  private async isolate(
    offset: number,
    length: number,
    seq: number,
    epoch: number,
    first: Error,
  ): Promise<void> {
    const map = this.tracking.map;
    const g = map.granularity;
    const end = offset + length;
    const [b0, b1] = map.blockRange(offset, length);
    const pooled = acquire(length);
    const buf = pooled.subarray(0, length);
    const bad: number[] = [];
    let error = first;
    let runStart = -1; // the first readable run: [runStart, runEnd) blocks
    let runEnd = -1;
    let runOpen = false;
    for (let b = b0; b <= b1; b++) {
      const at = Math.max(offset, b * g);
      const to = Math.min(end, (b + 1) * g);
      const failed = await this.isolationRead(buf.subarray(at - offset, to - offset), at, epoch, pooled);
      if (failed !== null) {
        if (epoch !== this.epoch) break;
        error = failed;
        bad.push(b);
        runOpen = false;
        continue;
      }
      if (runStart < 0) {
        runStart = b;
        runEnd = b + 1;
        runOpen = true;
      } else if (runOpen) runEnd = b + 1;
    }
    if (epoch !== this.epoch) {
      release(pooled);
      return;
    }
    // The update that carries seq: [from, to) in bytes.
    let from = -1;
    let to = -1;
    if (runStart >= 0) {
      from = Math.max(offset, runStart * g);
      to = Math.min(end, runEnd * g);
    } else {
      for (let at = offset, tries = 0; at < end && from < 0 && tries < PIECE_TRIES; at += PIECE, tries++) {
        const n = Math.min(PIECE, end - at);
        if (
          (await this.isolationRead(buf.subarray(at - offset, at - offset + n), at, epoch, pooled)) === null
        ) {
          from = at;
          to = at + n;
        } else if (epoch !== this.epoch) break;
      }
      if (epoch !== this.epoch) {
        release(pooled);
        return;
      }
      if (from < 0) {
        // No piece of the range reads (a dead region): nothing can carry the seq, and the gateway
        // waits for every one. The link fails (a new epoch abandons the seq); the resync after it
        // skips these blocks (skipCarry) and so finishes; the retry timer tries them again.
        release(pooled);
        const now = Date.now();
        for (const b of bad) this.rememberUnreadable(b, now, error.message);
        this.skipCarry = true;
        const msg =
          `resync failed: no ${PIECE}-byte piece of [${offset}, ${end}) of the primary can be read ` +
          `(${error.message}); ` +
          "its seq cannot be sent";
        this.failed(msg);
        throw new Error(msg);
      }
    }
    // Blocks the update does not cover whole lose the seq reserved for them.
    const [c0, c1] = runStart >= 0 ? [runStart, runEnd - 1] : [-1, -2];
    for (let b = b0; b <= b1; b++) {
      if (b >= c0 && b <= c1) continue;
      const last = this.lastSeq.get(b);
      if (last === seq && (this.writing.get(b) ?? 0) < COVER) this.lastSeq.delete(b);
      else if (last !== undefined || (this.writing.get(b) ?? 0) >= COVER) this.lastSeq.set(b, STALE);
    }
    // With no bad block (every block read on its own: a transient error) the range goes as one
    // copy after all.
    if (bad.length > 0) this.reportIsolated(bad, offset, end, error);
    void this.enqueue(
      KIND.WRITE,
      from,
      to - from,
      buf.subarray(from - offset, to - offset),
      true,
      seq,
      pooled,
    );
  }

  /**
   * Read `buf` at `at` for an isolation in epoch `epoch`: null, or the error when it is a media
   * error or the epoch ended meanwhile (the caller looks); any other error gives `pooled` back and
   * fails the link, as a copy's read does.
   */
  private async isolationRead(buf: Buffer, at: number, epoch: number, pooled: Buffer): Promise<Error | null> {
    try {
      await this.primary.read(buf, at);
      return null;
    } catch (e) {
      if (epoch !== this.epoch || mediaError(e)) return e instanceof Error ? e : new Error(String(e));
      release(pooled);
      this.failed(`resync failed: ${(e as Error).message}`);
      throw e;
    }
  }

  /** Remember the `bad` blocks of [offset, end) as unreadable (`error`), and warn with their ranges. */
  private reportIsolated(bad: number[], offset: number, end: number, error: Error): void {
    const g = this.tracking.map.granularity;
    const now = Date.now();
    let badBytes = 0;
    for (const b of bad) {
      const was = this.isUnreadable(b);
      this.rememberUnreadable(b, now, error.message);
      badBytes += this.blockBytes(b);
      if (!was) this.mirrorDirty = true;
    }
    this.leaveOut(badBytes);
    const ranges: string[] = [];
    for (let i = 0; i < bad.length && ranges.length < SHOW_RANGES;) {
      let j = i + 1;
      while (j < bad.length && bad[j] === bad[j - 1] + 1) j++;
      const a = Math.max(offset, bad[i] * g);
      ranges.push(`[${a}, ${Math.min(end, bad[j - 1] * g + g)})`);
      i = j;
    }
    this.log.warn(
      `resync: ${bad.length} blocks (${badBytes} bytes) of the primary cannot be read: ${ranges.join(" ")}` +
        `${ranges.length < bad.length ? " ..." : ""} (${error.message}); they stay dirty, the secondary ` +
        `differs there, retried every ${Math.round(this.o.unreadableRetryMs / 1000)} s; ` +
        `${this.unreadableCount} blocks unreadable in all`,
    );
  }

  // ---- tracking mirror

  private async mirrorNow(): Promise<void> {
    if (!this.mirrorPool || this.mirrorBusy) return;
    const version = this.tracking.map.version;
    if (!this.mirrorDirty && version === this.mirrorVersion) return;
    if (this.s.name === "streaming" && this.mirrorSentClean && this.tracking.map.dirtyBlocks === 0) return;
    this.mirrorBusy = true;
    this.mirrorDirty = false;
    this.mirrorVersion = version;
    try {
      const { extents, truncated } = this.tracking.map.extents(10_000);
      const doc = {
        volumeId: this.tracking.meta.source,
        source: this.tracking.meta.source,
        generation: this.tracking.meta.generation,
        updatedAt: new Date().toISOString(),
        linkState: this.s.name,
        dirtyBytes: this.tracking.map.dirtyBytes,
        extentCount: extents.length,
        truncated,
        extents: extentsJson(extents),
      };
      const headers: Record<string, string> = { "content-type": "application/json" };
      const token = this.o.mirrorToken ?? this.o.token;
      if (token) headers.authorization = `Bearer ${token}`;
      const res = await this.mirrorPool.request({
        method: "PUT",
        path: `/v1/tracking/${this.tracking.meta.source}`,
        headers,
        body: JSON.stringify(doc),
      });
      await res.body.text();
      if (res.statusCode !== 200) {
        const hint = res.statusCode === 401 ? " (check --tracking-mirror-token-file)" : "";
        throw new Error(`PUT answered ${res.statusCode}${hint}`);
      }
      this.mirrorSentClean = this.s.name === "streaming" && doc.dirtyBytes === 0;
      this.mirrorError = "";
    } catch (e) {
      this.mirrorDirty = true;
      this.mirrorError = (e as Error).message;
      this.mirrorErrorAt = Date.now();
      this.log.limited(
        "warn",
        "tracking mirror",
        `tracking mirror ${this.o.mirror}: ${(e as Error).message}`,
      );
    } finally {
      this.mirrorBusy = false;
    }
  }
  private mirrorSentClean = false;
  private mirrorVersion = -1;

  /**
   * Blocks of [offset, offset+length) were marked dirty out of band (verify --repair, resync --full):
   * make them STALE, so that neither an update in flight nor a client write in progress (which began
   * when the block looked clean or covered) can clear them; only a whole-block resync copy can.
   * Only blocks something covers need it (a dirty block nothing covers is copied anyway): the walk
   * is over the range or over the covered blocks, whichever is smaller (--full is the whole volume).
   */
  markStale(offset: number, length: number): void {
    this.inSync = null;
    const [b0, b1] = this.tracking.map.blockRange(offset, length);
    if (b1 - b0 + 1 <= this.lastSeq.seqCount + this.writing.size) {
      for (let b = b0; b <= b1; b++) {
        if (this.lastSeq.has(b) || (this.writing.get(b) ?? 0) >= COVER) this.lastSeq.set(b, STALE);
      }
      return;
    }
    const covered = [...this.lastSeq.seqBlocks()]; // STALE ones are STALE already
    for (const [b, v] of this.writing) if (v >= COVER) covered.push(b);
    for (const b of covered) if (b >= b0 && b <= b1) this.lastSeq.set(b, STALE);
  }

  /** A warning about this link's volume, in the link's log. */
  warn(message: string): void {
    this.log.warn(message);
  }

  /** Blocks were marked dirty out of band (verify --repair): copy them now if the link streams. */
  requestResync(): void {
    this.inSync = null; // blocks were marked dirty that nothing covers: the claim no longer holds
    // A resync running has skipped the blocks it found unreadable: asked again, it tries them
    // again before it ends (`blockfork resync` would otherwise report them untried).
    if (this.resyncRunning && this.unreadableCount > 0 && !this.skipCarry) this.skip.clear();
    this.dispatch({ type: "resyncRequested" });
  }

  /** SHA-256 of each `block`-byte block of the secondary in [offset, offset+length). */
  async checksums(offset: number, length: number, block: number): Promise<string[]> {
    if (!this.volumeName) throw new Error("the gateway has not been reached yet (see blockfork status)");
    const r = (await this.call(
      "GET",
      `/v1/volumes/${this.volumeName}/checksums?offset=${offset}&length=${length}&block=${block}`,
    )) as { sums?: string[] };
    if (!Array.isArray(r.sums)) throw new Error("the gateway's checksum answer has no sums");
    return r.sums;
  }

  // ---- status and shutdown

  status(): LinkStatus {
    const oldest = this.queue[0];
    return {
      gateway: this.o.url,
      mode: this.o.mode,
      state: this.s.name,
      since: new Date(this.s.since).toISOString(),
      reason: this.s.reason,
      outages: this.s.outages,
      generation: this.tracking.meta.generation,
      seq: this.seq - 1,
      floor: this.floor,
      durableThrough: this.durableThrough,
      queue: {
        updates: this.queue.length,
        bytes: this.queued,
        oldestMs: oldest ? Math.round(performance.now() - oldest.at) : 0,
      },
      inflightBatches: this.batches,
      transport: sends(this.s.name) ? (this.stream !== null ? "stream" : "post") : null,
      lastError: this.lastError,
      lastErrorAt: this.lastErrorAt,
      resync: { ...this.progress, running: this.resyncRunning },
      mirror: this.o.mirror ?? null,
      mirrorError: this.mirrorError,
      mirrorErrorAt: this.mirrorErrorAt,
      secondary: this.secondary,
      unreadable: {
        blocks: this.unreadableCount,
        bytes: this.unreadableBytes,
        ranges: this.unreadableRanges(SHOW_RANGES),
        firstErrorAt: this.unreadableCount > 0 ? new Date(this.unreadableFirstAt).toISOString() : null,
        lastErrorAt: this.unreadableCount > 0 ? new Date(this.unreadableLastAt).toISOString() : null,
        error: this.unreadableCount > 0 ? this.unreadableError : "",
        retryMs: this.o.unreadableRetryMs,
      },
    };
  }

  /** Stop: finish what is in flight (best effort, bounded), flush the gateway, stop timers. */
  async stop(timeoutMs = 5000): Promise<void> {
    if (this.stopped) return;
    const finish = async (): Promise<void> => {
      if (sends(this.s.name)) {
        await this.settled();
        if (sends(this.s.name) && this.unflushed.length > 0) await this.flushNow();
      }
    };
    await Promise.race([finish(), new Promise((r) => setTimeout(r, timeoutMs))]);
    await this.mirrorNow().catch(() => {});
    this.stopped = true;
    const waiters = this.startWaiters;
    this.startWaiters = [];
    for (const w of waiters) w();
    this.dispatch({ type: "stop" });
    for (const t of this.timers) clearInterval(t);
    this.stopProbe();
    this.closeStream();
    await this.pool.close().catch(() => {});
    await this.controlPool.close().catch(() => {});
    await this.mirrorPool?.close().catch(() => {});
  }
}
