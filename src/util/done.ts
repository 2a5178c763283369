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
