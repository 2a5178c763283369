// A pool of large buffers by power-of-two size class. Large Buffer.allocUnsafe calls are malloc'd
// above glibc's mmap threshold: every one is a fresh mapping whose pages the kernel must fault in
// and zero, then unmap. For 1 MiB requests that cost more than the copy itself. Buffers handed out
// here are recycled when released; the pool keeps at most MAX_POOLED_BYTES idle.

const MIN_CLASS = 17; // 128 KiB
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
 * A buffer of at least n bytes (its length is the size class; use a subarray). Small sizes are
 * plain allocations: Node's own 8 KiB pool and the heap serve them well.
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

/** Give a buffer from acquire() back. It must not be used afterwards. */
export function release(b: Buffer): void {
  const n = b.length;
  if (n < 1 << MIN_CLASS || n > 1 << MAX_CLASS || (n & (n - 1)) !== 0) return;
  if (pooledBytes + n > MAX_POOLED_BYTES) return;
  classes[classOf(n)].push(b);
  pooledBytes += n;
}
