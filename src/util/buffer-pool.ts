// A pool of large buffers by power-of-two size class. Large Buffer.allocUnsafe calls are malloc'd
// above glibc's mmap threshold: every one is a fresh mapping whose pages the kernel must fault in
// and zero, then unmap. For 1 MiB requests that cost more than the copy itself. Buffers handed out
// here are recycled when released; the pool keeps at most MAX_POOLED_BYTES idle.
//
// Sizes from 8 KiB up are pooled too, not for malloc's sake but for the garbage collector's: V8
// counts every ArrayBuffer's backing store as external memory against the old generation's limit.
// A gateway taking batches of 8-31 4K updates (33-127 KiB bodies) allocated one per batch, and ran
// a full mark-compact every half second with a flat 10 MB heap; pooled, once in 8 s.

const MIN_CLASS = 13; // 8 KiB (below that, Node's own 8 KiB pool slices allocUnsafe)
const MAX_CLASS = 26; // 64 MiB
const MAX_POOLED_BYTES = 128 * 1024 * 1024;

const classes: Buffer[][] = [];
for (let i = 0; i <= MAX_CLASS; i++) classes.push([]);
let pooledBytes = 0;

function classOf(n: number): number {
  let c = MIN_CLASS;
  while (1 << c < n) c++;
  return c;
}

/**
 * A buffer of at least n bytes (its length is the size class; use a subarray). Sizes under 8 KiB
 * are plain allocations (Node slices those under 4 KiB from its own pool).
 */
export function acquire(n: number): Buffer {
  if (n < 1 << MIN_CLASS || n > 1 << MAX_CLASS) return Buffer.allocUnsafe(n);
  const c = classOf(n);
  const b = classes[c].pop();
  if (b !== undefined) {
    pooledBytes -= b.length;
    return b;
  }
  return Buffer.allocUnsafe(1 << c);
}

/**
 * A pooled buffer that pieces are carved from one after another (at `used`), counting one
 * reference per piece in use. Retired (full, or given up), it goes back to the pool once its last
 * reference is dropped. The current slab starts again at the top when its last reference is
 * dropped: nothing refers to any of its bytes then.
 */
export class Slab {
  readonly buf: Buffer;
  used = 0;
  refs = 0;
  retired = false;
  constructor(size: number) {
    this.buf = acquire(size);
  }

  /** Carve no more from it: back to the pool now if nothing refers to it, else at its last release(). */
  retire(): void {
    this.retired = true;
    if (this.refs === 0) release(this.buf);
  }

  /** Drop one reference. */
  release(): void {
    if (--this.refs !== 0) return;
    if (this.retired) release(this.buf);
    else this.used = 0;
  }
}

/** Give a buffer from acquire() back. It must not be used afterwards. */
export function release(b: Buffer): void {
  const n = b.length;
  if (n < 1 << MIN_CLASS || n > 1 << MAX_CLASS || (n & (n - 1)) !== 0) return;
  if (pooledBytes + n > MAX_POOLED_BYTES) return;
  classes[classOf(n)].push(b);
  pooledBytes += n;
}
