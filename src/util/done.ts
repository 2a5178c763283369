/**
 * The settled promise every operation returns when it finished synchronously (a page-cache hit on
 * the inline fast path). Callers on hot paths compare against it (`p === DONE`) and complete the
 * request inline, without a microtask or a closure; everyone else just awaits it like any promise.
 * Filters that pass a call through return `next`'s promise unchanged, so the fast path survives
 * a stack of pass-through filters.
 */
export const DONE: Promise<void> = Promise.resolve();

/** A no-op continuation for `.then(noop)` that turns Promise<number> into Promise<void>. */
export function noop(): void {}

/**
 * Like Promise.all, but settles only once every promise has: the first rejection's reason, after
 * the others finished too. For reads into a caller's buffer: the caller may reuse or give back the
 * buffer as soon as it hears of a failure, and a read still running would then write into memory
 * that belongs to someone else.
 */
export async function allFinished(ps: readonly Promise<unknown>[]): Promise<void> {
  const settled = await Promise.allSettled(ps);
  for (const r of settled) if (r.status === "rejected") throw r.reason;
}
