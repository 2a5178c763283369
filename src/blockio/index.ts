// Typed, promise-based block I/O over the native addon: the one API the rest of blockfork uses for
// files and block devices.
//
// Notes on the design
// - Small reads first try the page cache on the JS thread (preadv2 RWF_NOWAIT, ~0.6 µs for 4 KiB here);
//   only what is not cached goes to the thread pool. RWF_NOWAIT never blocks: the kernel answers
//   EAGAIN instead of going to the disk. Where RWF_NOWAIT reads are unsupported (tmpfs answers
//   EOPNOTSUPP), a range that cachestat(2) finds wholly in the page cache is read with a plain
//   pread on the JS thread (it cannot wait for a disk), the rest on the pool.
// - Writes: ext4 (like most file systems) answers EOPNOTSUPP to RWF_NOWAIT buffered writes, so a
//   write is done inline (a plain pwrite on the JS thread) only when it is judged not to wait for
//   the disk: not FUA, and no partial page whose old contents would have to be read from disk
//   (probed with a 1-byte RWF_NOWAIT read; not past `holesFrom`, where a file that is appended to
//   was never written: probing a hole zero-fills it into the cache). A buffered write can still be
//   slowed by dirty-page throttling, so inline writes are watched: a write slower than
//   INLINE_SLOW_MS opens a probe window (PROBE_MS) in which each inline write is bracketed by the
//   thread's count of voluntary context switches (getrusage RUSAGE_THREAD, ~0.3 µs). A slow write
//   that slept in the kernel (a throttling pause, a lock, a disk read) switches inline writes off
//   for INLINE_BACKOFF_MS (everything goes to the pool), so a throttled disk costs a slow write or
//   two, not a stalled event loop. A write that was merely preempted (a busy machine: involuntary
//   switches) does not: on 2 shared cores that happened every few milliseconds and sent every write
//   to the pool at ~3x the CPU cost. `inlineWrites: false` turns the inline path off entirely.
// - Everything else (cache misses, FUA writes, fdatasync, fallocate, readahead) is queued and sent
//   to the native side as batches: all operations queued in one tick go in one crossing per pool
//   thread (IoQueue). No ordering is promised between operations queued in the same tick; callers
//   that need an order await the first before issuing the second.

import {
  closeSync,
  existsSync,
  fstatSync,
  fdatasyncSync,
  fsyncSync,
  ftruncateSync,
  mkdirSync,
  openSync,
  readFileSync,
  readSync,
  statSync,
  statfsSync,
  constants as fsc,
} from "node:fs";
import { dirname, join } from "node:path";
import { performance } from "node:perf_hooks";
import { constants as osc } from "node:os";
import { binding } from "./native.js";
import { errnoOf, IoError, UsageError } from "../errors.js";
import { DONE, noop } from "../util/done.js";
import { stateDirAdvice } from "../util/dir-hint.js";

const E = osc.errno;
const PAGE = 4096;
/** An inline write slower than this (ms) means the page cache is throttling us. */
const INLINE_SLOW_MS = Number(process.env.BF_INLINE_SLOW_MS ?? 2);
/** How long inline writes stay off after a slow one that slept in the kernel (ms). */
const INLINE_BACKOFF_MS = 1000;
/** How long inline writes are watched for sleeping after a slow one (ms). */
const PROBE_MS = 200;
/**
 * Larger requests always go to the pool, even when cached: copying a megabyte takes long enough
 * that doing it on a pool thread, in parallel with the event loop parsing the next request, wins.
 */
const INLINE_MAX = Number(process.env.BF_INLINE_MAX ?? 128 * 1024);

/** Send lent reads' copied pieces from mappings of the files (BF_NO_MAPPED_SEND=1: pread them). */
const MAPPED_SEND = process.env.BF_NO_MAPPED_SEND !== "1";

const enum Op {
  Read = 0,
  Write = 1,
  Sync = 2,
  Fallocate = 3,
  Extents = 4,
  Advise = 5,
  WriteZeroes = 6,
}
const SYSCALL = ["pread", "pwrite", "fdatasync", "fallocate", "lseek", "posix_fadvise", "pwrite(zeroes)"];

/**
 * The error of a failed read of [offset, offset+length) of `fd`. An EIO of a regular file that now
 * ends before the range is a read past the end: a volume never reads past its size, so the file
 * was cut short under us (truncated by another program), and the message says so.
 */
function readError(errno: number, syscall: string, fd: number, offset: number, length: number): IoError {
  let detail = `offset ${offset}, length ${length}`;
  if (errno === E.EIO) {
    try {
      const st = fstatSync(fd);
      if (st.isFile() && offset + length > st.size) {
        detail +=
          `: past the end of the file, which is now ${st.size} bytes ` +
          "(was it truncated by another program? the volume keeps the size it was opened with)";
      }
    } catch {
      // the descriptor is gone: the plain error
    }
  }
  return new IoError(errno, syscall, detail);
}

/** fallocate modes (linux/falloc.h). */
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

/** A run of the volume: `flags` are NBD base:allocation flags (1 = hole, 2 = reads as zero). */
export interface Extent {
  length: number;
  flags: number;
}

interface Pending {
  kind: Op;
  fd: number;
  offset: number;
  length: number;
  flags: number;
  buf: Uint8Array | undefined;
  resolve: (n: number) => void;
  reject: (e: Error) => void;
}

/** Collects the operations of one tick and submits them as batches, one per pool thread. */
class IoQueue {
  private queue: Pending[] = [];
  private scheduled = false;
  constructor(private readonly workers: number) {}

  run(
    kind: Op,
    fd: number,
    offset: number,
    length: number,
    flags: number,
    buf?: Uint8Array,
  ): Promise<number> {
    return new Promise<number>((resolve, reject) => {
      this.queue.push({ kind, fd, offset, length, flags, buf, resolve, reject });
      if (!this.scheduled) {
        this.scheduled = true;
        process.nextTick(this.dispatch);
      }
    });
  }

  private readonly dispatch = (): void => {
    this.scheduled = false;
    const ops = this.queue;
    this.queue = [];
    const groups = Math.min(this.workers, ops.length);
    const per = Math.ceil(ops.length / groups);
    for (let start = 0; start < ops.length; start += per) submit(ops.slice(start, start + per));
  };
}

function submit(ops: Pending[]): void {
  const n = ops.length;
  const desc = new Float64Array(n * 5);
  const bufs = new Array<Uint8Array | undefined>(n);
  const results = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const op = ops[i];
    desc[i * 5] = op.kind;
    desc[i * 5 + 1] = op.fd;
    desc[i * 5 + 2] = op.offset;
    desc[i * 5 + 3] = op.length;
    desc[i * 5 + 4] = op.flags;
    bufs[i] = op.buf;
  }
  binding.submit(desc, bufs, results, () => {
    // desc/bufs/results are referenced by this closure until here: the pool thread is done with them.
    for (let i = 0; i < n; i++) {
      const r = results[i];
      const op = ops[i];
      if (r < 0) {
        op.reject(
          op.kind === Op.Read
            ? readError(-r, "pread", op.fd, op.offset, op.length)
            : new IoError(-r, SYSCALL[op.kind], `offset ${op.offset}, length ${op.length}`),
        );
      } else op.resolve(r);
    }
  });
}

const poolSize = Math.max(1, Number(process.env.UV_THREADPOOL_SIZE ?? 4) || 4);
const queue = new IoQueue(poolSize);
const probe = Buffer.alloc(1);

/** How to open a BlockFile. */
export interface BlockFileOptions {
  readOnly?: boolean;
  /** Create a sparse regular file of `size` bytes if the path does not exist. */
  create?: boolean;
  /** Expected size in bytes; a mismatch with an existing file or device is an error. */
  size?: number;
  /** Allow blocking page-cache writes on the JS thread (default true). */
  inlineWrites?: boolean;
  /**
   * Take a non-blocking flock on the volume (exclusive, shared when read-only) so that a second
   * blockfork serve or gateway on the same file or device is refused instead of corrupting it.
   * Held until close (or process death). Default false: the library itself locks nothing.
   */
  lock?: boolean;
}

/** flock the volume for `BlockFileOptions.lock`; throws UsageError naming the conflict. */
function lockVolume(fd: number, path: string, readOnly: boolean): void {
  const r = binding.lockFd(fd, readOnly ? 0 : 1);
  if (r === 0) return;
  if (r === -E.EAGAIN) {
    throw new UsageError(
      `${path} is in use: another blockfork serve or gateway holds its lock ` +
        `(${readOnly ? "a writer" : "a writer or a reader"}); stop that process first, or give another volume`,
    );
  }
  throw new IoError(-r, "flock", path);
}

/**
 * Take `DIR/lock` (flock, exclusive) for the life of the process: one server per state directory.
 * A second `blockfork serve` on the same directory must fail before it opens anything in it: its
 * journal recovery would otherwise clear the header of the record the running server is still
 * appending (read as a record torn by a crash), and its tracking log open would fail only later.
 * Returns the descriptor (closing it releases the lock; exit does too).
 */
export function lockStateDir(dir: string): number {
  let fd: number;
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    fd = openSync(join(dir, "lock"), fsc.O_RDWR | fsc.O_CREAT, 0o600);
  } catch (e) {
    const fix = stateDirAdvice(dir, e);
    throw new UsageError(`cannot use ${dir} as the state directory (${(e as Error).message}): ${fix}`);
  }
  const r = binding.lockFd(fd, 1);
  if (r === 0) return fd;
  closeSync(fd);
  if (r === -E.EAGAIN) {
    throw new UsageError(
      `the state directory ${dir} is in use by another blockfork process (it holds ${join(dir, "lock")}); ` +
        "stop that process first, or give another --state-dir",
    );
  }
  throw new IoError(-r, "flock", join(dir, "lock"));
}

/** An open regular file or block device with positional, batched, mostly non-blocking I/O. */
/** The kernel's read-only flag of the block device `rdev` (sysfs), false when it cannot tell. */
function deviceReadOnly(rdev: number): boolean {
  // Linux's dev_t (glibc's major() and minor()).
  const d = BigInt(rdev);
  const major = Number(((d >> 8n) & 0xfffn) | ((d >> 32n) & ~0xfffn));
  const minor = Number((d & 0xffn) | ((d >> 12n) & ~0xffn));
  try {
    return readFileSync(`/sys/dev/block/${major}:${minor}/ro`, "utf8").trim() === "1";
  } catch {
    return false;
  }
}

export class BlockFile {
  readonly path: string;
  readonly fd: number;
  readonly size: number;
  readonly isBlockDevice: boolean;
  readonly readOnly: boolean;
  private fastReads = true;
  /** RWF_NOWAIT reads are unsupported: read inline what cachestat finds cached. */
  private cachedReads = false;
  /**
   * A file in memory (tmpfs, ramfs): reads and page probes never wait for a disk, and fdatasync has
   * nothing to do, so both run on the JS thread instead of costing a pool round trip.
   */
  private readonly memoryBacked: boolean;
  private inlineWrites: boolean;
  private inlineOffUntil = 0;
  /** Until when inline writes are bracketed by threadSleeps() (0: not probing). */
  private probeUntil = 0;
  private closed = false;
  /**
   * The first failed fdatasync/fsync or durable (FUA) write, or null. Linux reports a write-back
   * error to one sync of the file and may drop the pages that failed; the next sync then succeeds
   * without them. So once one has failed, every later sync (and FUA write) fails with it, until the
   * file is reopened (PostgreSQL since "fsyncgate", qemu's file-posix alike): a FLUSH is never
   * answered as if writes it covers were durable when they may be gone.
   */
  private syncFailure: IoError | null = null;
  private readonly extentsOut = new Float64Array(2 * 1024);
  /**
   * Every byte at or past this offset is a hole that was never written (the owner of a file it
   * appends to keeps it current; Infinity: unknown). A write's partial last page there needs no
   * read, so inline writes skip the page-cache probe for it: probing with a read makes the kernel
   * read ahead over the hole, zero-filling (large) folios that the next appends then write into.
   */
  holesFrom = Infinity;

  private constructor(
    path: string,
    fd: number,
    size: number,
    isBlockDevice: boolean,
    opts: BlockFileOptions,
  ) {
    this.path = path;
    this.fd = fd;
    this.size = size;
    this.isBlockDevice = isBlockDevice;
    this.readOnly = opts.readOnly === true;
    this.inlineWrites = opts.inlineWrites !== false;
    this.memoryBacked = !isBlockDevice && MEMORY_FS.has(fsType(path));
    if (this.memoryBacked) this.fastReads = false;
    if (!isBlockDevice) {
      const st = fstatSync(fd);
      this.mayHaveHoles = st.blocks * 512 < size;
    }
    // Copied pieces of lent reads (sendPieces) go from read-only mappings: one copy instead of
    // two (crates/blockio/src/maps.rs). A device is mapped up to its size; a regular file may
    // grow (journal segments), and mapping past its end is harmless there.
    if (MAPPED_SEND) binding.mapRegister(fd, isBlockDevice ? size : -1);
  }

  /**
   * False while the file is known to have no holes (fully allocated when opened, and nothing
   * punched since): extents() then answers "all data" without SEEK_DATA/SEEK_HOLE, whose cost on
   * some file systems grows with the rest of the file (tmpfs walks every page to the next hole).
   * "Data" is always a correct answer; the volume lock keeps other processes from punching holes.
   */
  private mayHaveHoles = false;

  /** Open (or create, sparse) a file or block device. Throws UsageError with what to do. */
  static open(path: string, opts: BlockFileOptions = {}): BlockFile {
    const readOnly = opts.readOnly === true;
    if (!existsSync(path)) {
      if (!opts.create || opts.size === undefined) {
        throw new UsageError(`${path} does not exist; give --size to create it as a sparse file`);
      }
      if (readOnly) throw new UsageError(`${path} does not exist and --read-only cannot create it`);
      if (!Number.isSafeInteger(opts.size) || opts.size <= 0) {
        throw new UsageError(`cannot create ${path}: size must be a positive number of bytes`);
      }
      const fd = openOrExplain(path, fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL, false);
      try {
        ftruncateSync(fd, opts.size);
        fsyncSync(fd);
        syncDir(dirname(path));
      } catch (e) {
        closeSync(fd);
        throw e;
      }
      if (opts.lock === true) {
        try {
          lockVolume(fd, path, false);
        } catch (e) {
          closeSync(fd);
          throw e;
        }
      }
      return new BlockFile(path, fd, opts.size, false, opts);
    }
    if (statSync(path).isDirectory())
      throw new UsageError(`${path} is a directory; give a file or a block device`);
    const fd = openOrExplain(path, readOnly ? fsc.O_RDONLY : fsc.O_RDWR, readOnly);
    try {
      const st = fstatSync(fd);
      let size: number;
      if (st.isBlockDevice()) {
        size = binding.deviceSize(fd);
        if (size < 0) throw new IoError(-size, "ioctl(BLKGETSIZE64)", path);
        // Root opens a read-only device (blockdev --setro, a write-protected disk) O_RDWR all the
        // same, and every write then fails with EPERM: say so now instead.
        if (!readOnly && deviceReadOnly(st.rdev)) {
          throw new UsageError(
            `${path} is a read-only block device: serve it with --read-only, or make it writable ` +
              `(blockdev --setrw ${path})`,
          );
        }
      } else if (st.isFile()) {
        size = st.size;
      } else {
        throw new UsageError(`${path} is neither a regular file nor a block device`);
      }
      if (opts.size !== undefined && opts.size !== size) {
        throw new UsageError(
          `${path} is ${size} bytes but --size asks for ${opts.size}; ` +
            `omit --size to serve it as it is (blockfork never truncates or grows an existing volume)`,
        );
      }
      if (size === 0) throw new UsageError(`${path} is empty (0 bytes); nothing to serve`);
      if (opts.lock === true) lockVolume(fd, path, readOnly);
      return new BlockFile(path, fd, size, st.isBlockDevice(), opts);
    } catch (e) {
      closeSync(fd);
      throw e;
    }
  }

  /** Fill `buf` from `offset`: page cache inline, the rest on the pool. */
  read(buf: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    if (this.fastReads && buf.length <= INLINE_MAX) {
      const r = binding.readNowait(this.fd, buf, offset);
      if (r === buf.length) return DONE;
      if (r > 0) done = r;
      else if (r === -E.EOPNOTSUPP || r === -E.EINVAL) {
        this.fastReads = false;
        this.cachedReads = cachestatWorks;
      } else if (r !== -E.EAGAIN && r !== 0)
        return Promise.reject(readError(-r, "pread", this.fd, offset, buf.length));
    } else if (
      buf.length <= INLINE_MAX &&
      (this.memoryBacked || (this.cachedReads && isCached(this.fd, offset, buf.length)))
    ) {
      const r = binding.readInline(this.fd, buf, offset);
      if (r === buf.length) return DONE;
      if (r < 0) return Promise.reject(readError(-r, "pread", this.fd, offset, buf.length));
      // Short (end of file): the pool read below says so the usual way.
    }
    const rest = done === 0 ? buf : buf.subarray(done);
    return queue.run(Op.Read, this.fd, offset + done, rest.length, 0, rest).then(noop);
  }

  /** Write `buf` at `offset`; with `fua` it is durable when the promise settles. */
  write(buf: Uint8Array, offset: number, fua = false): Promise<void> {
    if (fua) {
      if (this.syncFailure) return Promise.reject(this.syncFailure);
      const durable = (): Promise<void> =>
        queue.run(Op.Write, this.fd, offset, buf.length, 1, buf).then(noop, this.durableWriteFailed);
      // A partial page the kernel must read first: read it here, so that an unreadable sector
      // fails this write as a read error, not as a failed sync that would fail every later FLUSH
      // (the EIO of an RWF_DSYNC write cannot say which step failed).
      const pre = this.readPartialPages(offset, buf.length);
      return pre === null ? durable() : pre.then(durable);
    }
    if (!fua && this.inlineWrites && buf.length <= INLINE_MAX && this.inlineSafe(offset, buf.length)) {
      const probing = this.probeUntil !== 0;
      const slept0 = probing ? binding.threadSleeps() : 0;
      const t0 = performance.now();
      const r = binding.writeInline(this.fd, buf, offset);
      const t1 = performance.now();
      if (probing) {
        if (t1 - t0 > INLINE_SLOW_MS / 2 && binding.threadSleeps() !== slept0) {
          this.inlineOffUntil = t1 + INLINE_BACKOFF_MS;
          this.probeUntil = 0;
        } else if (t1 > this.probeUntil) this.probeUntil = 0;
      } else if (t1 - t0 > INLINE_SLOW_MS) this.probeUntil = t1 + PROBE_MS;
      if (r === buf.length) return DONE;
      return Promise.reject(new IoError(r < 0 ? -r : E.EIO, "pwrite", `offset ${offset}`));
    }
    return queue.run(Op.Write, this.fd, offset, buf.length, 0, buf).then(noop);
  }

  /** Read the partial first and last pages of a write that are not cached; null when none. */
  private readPartialPages(offset: number, length: number): Promise<void> | null {
    // Out of range: the write itself refuses it (EINVAL).
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length)) return null;
    const reads: Promise<void>[] = [];
    const page = (at: number): void => {
      if (at >= this.size || this.pageCached(at)) return;
      reads.push(this.read(Buffer.allocUnsafe(Math.min(PAGE, this.size - at)), at));
    };
    const head = offset % PAGE;
    if (head !== 0) page(offset - head);
    const end = offset + length;
    const tail = end % PAGE;
    if (tail !== 0 && (head === 0 || Math.floor(end / PAGE) !== Math.floor(offset / PAGE))) page(end - tail);
    if (reads.length === 0) return null;
    return Promise.all(reads).then(noop);
  }

  /** Remember a failed sync (see syncFailure) and rethrow it. */
  private readonly syncFailed = (e: unknown): never => {
    const errno = errnoOf(e);
    // EINVAL, EBADF: this file cannot be synced at all, which says nothing about its pages.
    if (errno !== E.EINVAL && errno !== E.EBADF) this.rememberSyncFailure(errno, e);
    throw e;
  };

  /** A durable (FUA) write failed: remember it as a failed sync unless nothing was written. */
  private readonly durableWriteFailed = (e: unknown): never => {
    const errno = errnoOf(e);
    // Refused before anything was written (a bad range, no space or quota for new blocks): not a
    // write-back error, nothing acknowledged can be missing.
    if (errno !== E.EINVAL && errno !== E.EBADF && errno !== E.ENOSPC && errno !== E.EDQUOT)
      this.rememberSyncFailure(errno, e);
    throw e;
  };

  private rememberSyncFailure(errno: number, e: unknown): void {
    if (this.syncFailure !== null) return;
    this.syncFailure = new IoError(
      errno === 0 ? E.EIO : errno,
      "fdatasync",
      `${this.path}: an earlier sync failed (${(e as Error).message}), so writes since the last ` +
        "good one may be lost; nothing is called durable again: check the storage, then restart",
    );
  }

  private inlineSafe(offset: number, length: number): boolean {
    if (this.inlineOffUntil !== 0) {
      if (performance.now() < this.inlineOffUntil) return false;
      this.inlineOffUntil = 0;
    }
    // A partial page must be read before it is modified: only inline if it is already cached.
    const head = offset % PAGE;
    if (head !== 0 && !this.pageCached(offset - head)) return false;
    const end = offset + length;
    const tail = end % PAGE;
    if (
      tail !== 0 &&
      end < this.size &&
      end - tail < this.holesFrom &&
      (head === 0 || Math.floor(end / PAGE) !== Math.floor(offset / PAGE))
    ) {
      if (!this.pageCached(end - tail)) return false;
    }
    return true;
  }

  /** The page at `at` is in the page cache (a write to part of it needs no disk read). */
  private pageCached(at: number): boolean {
    if (this.memoryBacked) return true;
    if (this.fastReads) return binding.readNowait(this.fd, probe, at) >= 0;
    return this.cachedReads && isCached(this.fd, at, 1);
  }

  /** fdatasync (or fsync with `full`). */
  sync(full = false): Promise<void> {
    if (this.syncFailure) return Promise.reject(this.syncFailure);
    if (this.memoryBacked) {
      try {
        if (full) fsyncSync(this.fd);
        else fdatasyncSync(this.fd);
      } catch (e) {
        return Promise.reject(new IoError(errnoOf(e), full ? "fsync" : "fdatasync", this.path)).catch(
          this.syncFailed,
        );
      }
      return DONE;
    }
    return queue.run(Op.Sync, this.fd, 0, 0, full ? 1 : 0).then(noop, this.syncFailed);
  }

  /** fallocate(mode) over a range; rejects with IoError (EOPNOTSUPP where unsupported). */
  fallocate(mode: number, offset: number, length: number): Promise<void> {
    if ((mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) !== 0) this.mayHaveHoles = true;
    return queue.run(Op.Fallocate, this.fd, offset, length, mode).then(noop);
  }

  /** Write zeroes the slow way (for storage where fallocate cannot). */
  writeZeroes(offset: number, length: number, fua = false): Promise<void> {
    if (!fua) return queue.run(Op.WriteZeroes, this.fd, offset, length, 0).then(noop);
    if (this.syncFailure) return Promise.reject(this.syncFailure);
    return queue.run(Op.WriteZeroes, this.fd, offset, length, 1).then(noop, this.durableWriteFailed);
  }

  /** Start readahead of a range (posix_fadvise WILLNEED). */
  advise(offset: number, length: number): Promise<void> {
    return queue.run(Op.Advise, this.fd, offset, length, 0).then(noop);
  }

  /**
   * Data and holes in [offset, offset+length), at most `max` runs, summing to at most `length`.
   * lseek(SEEK_DATA/SEEK_HOLE) on the JS thread: it reads the file system's extent tree, which is
   * in memory for a file in use (qemu's file-posix does the same on its I/O thread).
   */
  extents(offset: number, length: number, max = 1024): Extent[] {
    if (!this.mayHaveHoles && !this.isBlockDevice) return [{ length, flags: 0 }];
    const out = this.extentsOut;
    const n = binding.extentsSync(this.fd, offset, length, out.subarray(0, 2 * Math.min(max, 1024)));
    if (n < 0) throw readError(-n, "lseek(SEEK_DATA)", this.fd, offset, length);
    const list: Extent[] = [];
    for (let i = 0; i < n; i++) list.push({ length: out[2 * i], flags: out[2 * i + 1] });
    return list;
  }

  /** Close the descriptor (idempotent). In-flight operations must have settled. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    // Before the close: a mapping keeps the file, and the number may be reused for another.
    binding.mapForget(this.fd);
    closeSync(this.fd);
  }
}

/**
 * open(2) a volume; a file system mounted read-only or a permission refused is the operator's to
 * fix: a UsageError (exit 2) saying what to do, not a bare errno (exit 1).
 */
function openOrExplain(path: string, flags: number, readOnly: boolean): number {
  try {
    return openSync(path, flags, 0o644);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === "EROFS" && !readOnly) {
      throw new UsageError(
        `${path} is on a read-only file system: serve it with --read-only, or remount the file system read-write`,
      );
    }
    if (code === "EACCES" || code === "EPERM") {
      throw new UsageError(`${path}: permission denied (${code}); check its owner and mode`);
    }
    throw e;
  }
}

let cachestatWorks = true;

/** statfs f_type of file systems that live in memory: tmpfs, ramfs. */
const MEMORY_FS = new Set([0x01021994, 0x858458f6]);

/** The statfs(2) type of the file system holding `path` (0 when it cannot be told). */
function fsType(path: string): number {
  try {
    return statfsSync(path).type;
  } catch {
    return 0;
  }
}

/** fsync a directory: the files created, renamed or removed in it stay so after a crash. */
export function syncDir(dir: string): void {
  const d = openSync(dir, fsc.O_RDONLY);
  try {
    fsyncSync(d);
  } finally {
    closeSync(d);
  }
}

/** False once cachestat(2) turned out missing (Linux before 6.5): isCached then always says no. */
export function cacheVisible(): boolean {
  return cachestatWorks;
}

/**
 * True when every page of [offset, offset+length) of `fd` is in the page cache (cachestat(2),
 * Linux 6.5+; false on older kernels), so that sending it cannot block on the disk.
 */
export function isCached(fd: number, offset: number, length: number): boolean {
  if (!cachestatWorks) return false;
  const n = binding.cachedBytes(fd, offset, length);
  if (n < 0) {
    if (n === -E.ENOSYS) cachestatWorks = false;
    return false;
  }
  const pages = Math.ceil((offset + length) / PAGE) - Math.floor(offset / PAGE);
  return n >= pages * PAGE;
}

/**
 * Send `header` and then `length` bytes of `fd` at `offset` on the non-blocking socket `sock`
 * (sendfile: no copy through user space). Returns the bytes sent, header included, stopping early
 * when the socket is full; negative errno when the connection failed before anything was sent.
 */
export function sendHeaderAndFile(
  sock: number,
  header: Uint8Array,
  fd: number,
  offset: number,
  length: number,
): number {
  onePiece[0] = fd;
  onePiece[1] = offset;
  onePiece[2] = length;
  return binding.sendPieces(sock, header, onePiece, 0, -1);
}
const onePiece = new Float64Array(3);

/**
 * Send `header`, then `pieces` ((fd, offset, length) triples; fd -1: zeroes) less their first
 * `skip` bytes, on the non-blocking socket `sock`: pieces of `copyFd` (every piece when -2) are
 * copied during the call (from a read-only mapping when the file is a BlockFile's: one copy, page
 * cache to socket; else read into a buffer and sent), the others go with sendfile (the kernel
 * keeps references to their pages until the peer reads them: only for files that do not change).
 * Bytes sent in all, stopping early when the socket is full; negative errno when the connection
 * failed before anything was sent.
 */
export function sendPieces(
  sock: number,
  header: Buffer,
  pieces: Float64Array,
  skip: number,
  copyFd: number,
): number {
  return binding.sendPieces(sock, header, pieces, skip, copyFd);
}

/**
 * Fill `buf` from `fd` at `offset` on the JS thread, for ranges that were in the page cache a
 * moment ago (cachestat): non-blocking reads, and a blocking read for whatever was evicted since.
 * Throws an IoError for a read error, and EIO for the end of the file (the file was cut short).
 */
export function readFullySync(fd: number, buf: Buffer, offset: number): void {
  let done = 0;
  while (done < buf.length) {
    const r = binding.readNowait(fd, buf.subarray(done), offset + done);
    if (r > 0) {
      done += r;
      continue;
    }
    const n = readSync(fd, buf, done, buf.length - done, offset + done);
    if (n <= 0) throw readError(E.EIO, "pread", fd, offset + done, buf.length - done);
    done += n;
  }
}

/**
 * Fill `dst` with the bytes of `pieces` ((fd, offset, length) triples; fd -1: zeroes), starting
 * `skip` bytes in (see readFullySync).
 */
export function readPiecesSync(pieces: Float64Array, skip: number, dst: Buffer): void {
  let at = 0;
  for (let k = 0; k < pieces.length && at < dst.length; k += 3) {
    const len = pieces[k + 2];
    if (skip >= len) {
      skip -= len;
      continue;
    }
    const n = Math.min(len - skip, dst.length - at);
    const part = dst.subarray(at, at + n);
    if (pieces[k] < 0) part.fill(0);
    else readFullySync(pieces[k], part, pieces[k + 1] + skip);
    at += n;
    skip = 0;
  }
}

/**
 * Send a whole buffer on a socket without blocking: bytes sent (fewer, down to 0, when the socket
 * is full), or a negative errno when the connection failed.
 */
export function sendNow(sock: number, buf: Uint8Array): number {
  return binding.sendNow(sock, buf);
}

/**
 * Ask for a socket send buffer of `bytes` (SO_SNDBUF; the kernel caps it at net.core.wmem_max and
 * doubles it): the size the kernel then reports, or a negative errno.
 */
export function setSendBuffer(sock: number, bytes: number): number {
  return binding.setSendBuffer(sock, bytes);
}

/**
 * For long-running servers (serve, gateway): malloc keeps freed memory for reuse instead of
 * handing it back and faulting it in again (allocations up to 1 MiB from the heap, the heap
 * trimmed only past 64 MiB free, grown 8 MiB at a time). Node copies every HTTP body chunk into a
 * fresh 64 KiB allocation; with glibc's defaults the gateway's heap shrank and grew around them.
 * Costs up to ~64 MiB of resident memory kept for reuse. BF_NO_MALLOC_TUNING=1 leaves malloc's
 * defaults alone. True when malloc accepted it.
 */
export function tuneMallocForServers(): boolean {
  if (process.env.BF_NO_MALLOC_TUNING === "1") return false;
  return binding.tuneMalloc(1 << 20, 64 << 20, 8 << 20) === 1;
}

/** Receive into `buf` without blocking: bytes (0 at end of stream), or a negative errno (-EAGAIN). */
export function recvNowait(sock: number, buf: Uint8Array): number {
  return binding.recvNowait(sock, buf);
}

/** A close-on-exec duplicate of a file descriptor; throws IoError. */
export function dupFd(fd: number): number {
  const r = binding.dupFd(fd);
  if (r < 0) throw new IoError(-r, "fcntl(F_DUPFD_CLOEXEC)");
  return r;
}

/** CRC32C (Castagnoli) of `buf`, continuing from `seed` (0 to start). Hardware-accelerated. */
export function crc32c(buf: Uint8Array, seed = 0): number {
  return binding.crc32c(buf, seed);
}
