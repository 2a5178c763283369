// FileVolume: a regular file or block device through the native addon (src/blockio).
//
// - read/write: BlockFile's inline fast paths and batched pool (see src/blockio/index.ts).
// - flush: group commit. At most one fdatasync runs; flushes that arrive meanwhile share the next
//   one, which starts after the running one ends (it must: writes completed after the running
//   fdatasync started are not covered by it).
// - trim: punch a hole (FALLOC_FL_PUNCH_HOLE|KEEP_SIZE); where unsupported, nothing (trim is a hint).
// - zero: punch a hole (mayTrim) or FALLOC_FL_ZERO_RANGE; else write zeroes, unless `fast`.
// - extents: SEEK_DATA/SEEK_HOLE; block devices report all data.

import {
  BlockFile,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  type BlockFileOptions,
} from "../blockio/index.js";
import { errnoOf, NO_FAST_ZERO, NotSupportedError } from "../errors.js";
import { constants } from "node:os";
import { DONE, noop } from "../util/done.js";
import {
  fullCaps,
  type Extent,
  type FileRange,
  type Volume,
  type VolumeCaps,
  type ZeroOptions,
} from "./volume.js";

const E = constants.errno;

function unsupported(err: unknown): boolean {
  const n = errnoOf(err);
  // EINVAL: block devices refuse ranges not aligned to their logical block size.
  return n === E.EOPNOTSUPP || n === E.ENOSYS || n === E.EINVAL;
}

/** A Volume over a file or block device. */
export class FileVolume implements Volume {
  readonly file: BlockFile;
  readonly size: number;
  readonly description: string;
  private readonly capabilities: VolumeCaps;
  private syncing: Promise<void> | null = null;
  private nextSync: Promise<void> | null = null;
  private canPunch = true;
  private canZeroRange = true;

  constructor(file: BlockFile) {
    this.file = file;
    this.size = file.size;
    this.description = `${file.isBlockDevice ? "block device" : "file"} ${file.path}`;
    this.capabilities = fullCaps({
      readOnly: file.readOnly,
      trim: !file.readOnly,
      zero: !file.readOnly,
      fastZero: !file.readOnly,
    });
  }

  /** Open a file or block device as a volume (see BlockFile.open). */
  static open(path: string, opts: BlockFileOptions = {}): FileVolume {
    return new FileVolume(BlockFile.open(path, opts));
  }

  caps(): VolumeCaps {
    return this.capabilities;
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return this.file.read(buf, offset);
  }

  write(buf: Buffer, offset: number, fua: boolean): Promise<void> {
    return this.file.write(buf, offset, fua);
  }

  flush(): Promise<void> {
    if (this.nextSync) return this.nextSync;
    if (!this.syncing) return this.startSync();
    this.nextSync = this.syncing.then(noop, noop).then(() => {
      this.nextSync = null;
      return this.startSync();
    });
    return this.nextSync;
  }

  private startSync(): Promise<void> {
    const p = this.file.sync();
    this.syncing = p;
    const clear = (): void => {
      if (this.syncing === p) this.syncing = null;
    };
    p.then(clear, clear);
    return p;
  }

  async trim(offset: number, length: number, fua: boolean): Promise<void> {
    if (this.canPunch) {
      try {
        await this.file.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
      } catch (e) {
        if (!unsupported(e)) throw e;
        if (errnoOf(e) !== E.EINVAL) this.canPunch = false;
        return; // trim is advisory: nothing discarded, nothing lost
      }
    }
    if (fua) await this.flush();
  }

  async zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    if (await this.zeroFast(offset, length, opts.mayTrim === true, opts.fast === true)) {
      if (opts.fua) await this.flush();
      return;
    }
    if (opts.fast) throw new NotSupportedError(NO_FAST_ZERO);
    await this.file.writeZeroes(offset, length, opts.fua === true);
  }

  /** A fast zero would find no way that works here (see zeroFast): known after a first try. */
  cannotZeroFast(mayTrim: boolean): boolean {
    if (this.file.readOnly) return false; // refused as read-only, not as unsupported
    return !(mayTrim && this.canPunch) && !(this.canZeroRange && !this.file.isBlockDevice);
  }

  /** Try the fallocate ways of making zeroes; false when none works here. */
  private async zeroFast(offset: number, length: number, mayTrim: boolean, fast: boolean): Promise<boolean> {
    if (mayTrim && this.canPunch) {
      try {
        await this.file.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
        return true;
      } catch (e) {
        if (!unsupported(e)) throw e;
        if (errnoOf(e) !== E.EINVAL) this.canPunch = false;
      }
    }
    // On a block device ZERO_RANGE may fall back to writing zeroes inside the kernel: not fast.
    if (this.canZeroRange && !(fast && this.file.isBlockDevice)) {
      try {
        await this.file.fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);
        return true;
      } catch (e) {
        if (!unsupported(e)) throw e;
        if (errnoOf(e) !== E.EINVAL) this.canZeroRange = false;
      }
    }
    return false;
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    if (this.file.isBlockDevice) return Promise.resolve([{ length, flags: 0 }]);
    try {
      return Promise.resolve(this.file.extents(offset, length));
    } catch (e) {
      return Promise.reject(e);
    }
  }

  fileRange(offset: number, _length: number): FileRange {
    return { fd: this.file.fd, offset };
  }

  cache(offset: number, length: number): Promise<void> {
    return this.file.advise(offset, length);
  }

  close(): Promise<void> {
    this.file.close();
    return DONE;
  }
}
