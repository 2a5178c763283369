// The fork filter: every write, trim and zero that reaches the primary also goes to the gateway.
//
// Order of one write (DESIGN.md "dirty before sent"):
//   0. tell the link a write begins (resync leaves the blocks alone; partly-covered dirty blocks
//      become stale);
//   1. mark its blocks dirty in memory (before the activity log can evict their region, so an
//      eviction persists these bits);
//   2. make sure the activity log covers them durably (no I/O when the region is already hot);
//   3. write the primary and hand the data to the link (sent when the link streams, recorded
//      only while it tracks): copied, or for a large write whose caller passed a WriteHold (the
//      NBD layer does), kept in the caller's buffer until the gateway has it;
//   4. async mode: settle with the primary write; sync mode: also wait for the gateway to apply
//      it (bounded by --sync-timeout, after which the link tracks and the write settles anyway).
// A primary write that fails "poisons" its blocks: they are marked dirty again (an acknowledgement
// may have cleared them) and stay dirty whatever the gateway acknowledges, and a resync, requested
// at once, copies the primary's actual contents. The client hears of the failure once the marks
// are durable.
//
// TRIM: the gateway makes a trimmed range read as zeroes, so the primary must too, or the two
// differ (a plain trim is only a hint, and a file that cannot punch holes ignores it). As DRBD
// does with discards, the fork turns a trim into a fast zero of the primary (punch a hole, else
// FALLOC_FL_ZERO_RANGE). Where the primary can do neither, that first trim poisons its blocks (the
// TRIM already left for the gateway; a resync copies the primary's unchanged data back) and from
// then on trims are ignored on both sides: each keeps its data, and they stay equal.
// Reads, extents, cache and the zero-copy hint pass through untouched.
//
// Overlapping changes in flight together (NBD allows them: fio randtrimwrite, a guest's block
// layer): the primary could apply them in another order than their seqs, which the gateway follows,
// so the two would end with different data and every block "clean". As DRBD and qemu's block layer
// do with conflicting requests, a change that overlaps another whose primary operation has not
// completed waits for it (and for every earlier overlapping one) before it is applied and sent:
// the primary then applies overlapping changes in seq order, and the secondary ends the same. NBD
// promises no order between requests in flight, so the wait changes nothing a client may rely on.

import { constants } from "node:os";
import { IoError, NO_FAST_ZERO, NotSupportedError } from "../errors.js";
import { DONE } from "../util/done.js";
import type { TrackingLog } from "../tracking/log.js";
import type { Volume, VolumeSession, WriteHold, ZeroOptions } from "../volume/volume.js";
import { FilterVolume } from "../volume/filter.js";
import { KIND, type UpdateKind } from "../gateway/records.js";
import type { GatewayLink, WriteTicket } from "./link.js";

/** Wrap `next` so that every change is forked to `link`, tracked in `tracking`. */
export function forkVolume(
  next: Volume,
  tracking: TrackingLog,
  link: GatewayLink,
  mode: "async" | "sync",
): Volume {
  return new ForkVolume(next, tracking, link, mode, { trimIgnored: false, inFlight: new Set() });
}

/** What every session's ForkVolume shares. */
interface ForkShared {
  /** The primary cannot make a range read as zeroes quickly: trims are ignored on both sides. */
  trimIgnored: boolean;
  /** Changes whose primary operation is in flight or waiting: [start, end) byte ranges, and when
   * the primary operation has settled. */
  inFlight: Set<InFlight>;
}

interface InFlight {
  start: number;
  end: number;
  /** Resolves (never rejects) when the change's primary operation has settled: made by the first
   * change that waits for it. */
  settled: Promise<void> | null;
  settle: (() => void) | null;
}

function inFlight(start: number, end: number): InFlight {
  return { start, end, settled: null, settle: null };
}

/** When `r`'s primary operation will have settled. */
function settledOf(r: InFlight): Promise<void> {
  return (r.settled ??= new Promise<void>((res) => (r.settle = res)));
}

class ForkVolume extends FilterVolume {
  constructor(
    next: Volume,
    private readonly tracking: TrackingLog,
    private readonly link: GatewayLink,
    private readonly mode: "async" | "sync",
    private readonly shared: ForkShared,
  ) {
    super(next);
  }

  openSession(label: string): VolumeSession {
    const inner = this.next.openSession?.(label);
    if (!inner) return { volume: this, close: () => {} };
    return {
      volume: new ForkVolume(inner.volume, this.tracking, this.link, this.mode, this.shared),
      close: () => inner.close(),
    };
  }

  override write(buf: Buffer, offset: number, fua: boolean, hold?: WriteHold): Promise<void> {
    return this.change(KIND.WRITE, offset, buf.length, buf, () => this.next.write(buf, offset, fua), hold);
  }

  override trim(offset: number, length: number, fua: boolean): Promise<void> {
    if (this.shared.trimIgnored) return DONE; // trim is a hint: primary and secondary keep their data
    return this.change(KIND.TRIM, offset, length, null, () => this.trimPrimary(offset, length, fua));
  }

  /** Make the range read as zeroes on the primary, as the gateway will (see the notes on TRIM). */
  private trimPrimary(offset: number, length: number, fua: boolean): Promise<void> {
    const p = this.next.zero(offset, length, { fua, mayTrim: true, fast: true });
    if (p === DONE) return DONE;
    return p.catch((e: unknown) => {
      if (!(e instanceof NotSupportedError)) throw e;
      // The primary kept its data, the gateway will not: copy these blocks again (a whole-block
      // resync copy is the only thing that clears a poisoned block), and ignore trims from now on.
      const active = this.link.poison(offset, length);
      if (!this.shared.trimIgnored) {
        this.shared.trimIgnored = true;
        this.link.warn(
          `the primary can neither punch holes nor zero ranges quickly (${e.message}): trims are ` +
            "ignored from now on, on the primary and the secondary alike",
        );
      }
      return active === DONE ? undefined : active;
    });
  }

  override zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    if (opts.fast === true) {
      // A FAST_ZERO the primary may refuse must not reach the gateway first (the secondary would
      // read zeroes where the primary keeps its data): refused at once when the primary is known
      // to refuse it, else sent only once the primary has done it (fastZero).
      if (this.next.cannotZeroFast?.(opts.mayTrim === true) === true)
        return Promise.reject(new NotSupportedError(NO_FAST_ZERO));
      return this.change(
        KIND.ZERO,
        offset,
        length,
        null,
        () => this.next.zero(offset, length, opts),
        null,
        false,
        true,
      );
    }
    return this.change(KIND.ZERO, offset, length, null, () => this.next.zero(offset, length, opts));
  }

  private change(
    kind: UpdateKind,
    offset: number,
    length: number,
    data: Buffer | null,
    apply: () => Promise<void>,
    hold: WriteHold | null = null,
    waited = false,
    primaryFirst = false,
  ): Promise<void> {
    const failure = this.tracking.error;
    if (failure) return Promise.reject(new IoError(constants.errno.EIO, "tracking log", failure.message));
    if (this.mode === "sync" && !waited) {
      // Not while the link is still starting: the write would be acknowledged unsent, unsaid.
      const started = this.link.whenStarted();
      if (started !== null)
        return started.then(() => this.change(kind, offset, length, data, apply, hold, true, primaryFirst));
    }
    const ticket = this.link.beginWrite(offset, length); // before marking: it looks at what was dirty
    this.tracking.map.mark(offset, length);
    const active = this.tracking.activate(offset, length);
    if (active === DONE) return this.forward(kind, offset, length, data, apply, ticket, hold, primaryFirst);
    return active.then(
      () => this.forward(kind, offset, length, data, apply, ticket, hold, primaryFirst),
      (e: unknown) => {
        this.link.endWrite(offset, length, ticket);
        throw new IoError(constants.errno.EIO, "tracking log", (e as Error).message);
      },
    );
  }

  private forward(
    kind: UpdateKind,
    offset: number,
    length: number,
    data: Buffer | null,
    apply: () => Promise<void>,
    ticket: WriteTicket,
    hold: WriteHold | null,
    primaryFirst: boolean,
  ): Promise<void> {
    const end = offset + length;
    let before: Promise<void>[] | null = null;
    for (const r of this.shared.inFlight) {
      if (r.start < end && offset < r.end) (before ??= []).push(settledOf(r));
    }
    if (before === null)
      return this.issue(kind, offset, length, data, apply, ticket, hold, null, primaryFirst);
    // Wait for the overlapping changes. Registered now, so that a later change overlapping this one
    // waits for it in turn.
    const range = inFlight(offset, end);
    this.shared.inFlight.add(range);
    return Promise.all(before).then(() => {
      try {
        return this.issue(kind, offset, length, data, apply, ticket, hold, range, primaryFirst);
      } catch (e) {
        this.settled(range); // never leave later overlapping changes waiting for ever
        throw e;
      }
    });
  }

  /** Apply the change to the primary and hand it to the link: no overlapping change is in flight. */
  private issue(
    kind: UpdateKind,
    offset: number,
    length: number,
    data: Buffer | null,
    apply: () => Promise<void>,
    ticket: WriteTicket,
    hold: WriteHold | null,
    waited: InFlight | null,
    primaryFirst = false,
  ): Promise<void> {
    let p: Promise<void>;
    try {
      p = apply();
    } catch (e) {
      p = Promise.reject(e);
    }
    if (primaryFirst) return this.afterPrimary(kind, offset, length, p, ticket, waited);
    const sent = this.link.submit(kind, offset, length, data, ticket, hold);
    if (p === DONE) {
      if (waited) this.settled(waited);
      this.link.endWrite(offset, length, ticket);
      return sent === null || this.mode === "async" ? DONE : sent;
    }
    const range = waited ?? inFlight(offset, offset + length);
    if (!waited) this.shared.inFlight.add(range);
    const primary = p.then(
      () => {
        this.settled(range);
        this.link.endWrite(offset, length, ticket);
      },
      (e: unknown) => {
        this.settled(range);
        return this.primaryFailed(offset, length, ticket, e);
      },
    );
    if (sent === null || this.mode === "async") return primary;
    return Promise.all([primary, sent]).then(() => undefined);
  }

  /**
   * A change sent to the gateway only once the primary has made it (a FAST_ZERO, which the primary
   * may refuse): refused, it leaves both sides as they were and nothing is sent.
   */
  private afterPrimary(
    kind: UpdateKind,
    offset: number,
    length: number,
    p: Promise<void>,
    ticket: WriteTicket,
    waited: InFlight | null,
  ): Promise<void> {
    const range = waited ?? inFlight(offset, offset + length);
    if (!waited) this.shared.inFlight.add(range);
    return p.then(
      () => {
        const sent = this.link.submit(kind, offset, length, null, ticket);
        this.settled(range);
        this.link.endWrite(offset, length, ticket);
        return sent === null || this.mode === "async" ? undefined : sent;
      },
      (e: unknown) => {
        this.settled(range);
        if (e instanceof NotSupportedError) {
          // Both sides unchanged; the marks stay, and a resync copies those blocks (once: the
          // primary now says it cannot, so later FAST_ZEROs are refused before anything is marked).
          this.link.endWrite(offset, length, ticket);
          this.link.requestResync();
          throw e;
        }
        return this.primaryFailed(offset, length, ticket, e);
      },
    );
  }

  /**
   * The primary operation failed with `e`: its blocks are dirty whatever the gateway acknowledges
   * (poison first: endWrite may clear blocks whose update is durable on the gateway); the client
   * hears of `e` once the marks are durable.
   */
  private primaryFailed(offset: number, length: number, ticket: WriteTicket, e: unknown): Promise<void> {
    const active = this.link.poison(offset, length);
    this.link.endWrite(offset, length, ticket);
    if (active === DONE) return Promise.reject(e);
    return active.then(
      () => Promise.reject(e),
      () => Promise.reject(e),
    );
  }

  /** `r`'s primary operation has settled: changes waiting for it may go. */
  private settled(r: InFlight): void {
    this.shared.inFlight.delete(r);
    r.settle?.();
  }

  override async flush(): Promise<void> {
    try {
      await this.next.flush();
    } catch (e) {
      // Writes the primary acknowledged may be lost on its disk, and the gateway has them.
      this.tracking.primaryFailed(e as Error);
      throw e;
    }
    if (this.mode === "sync") await this.link.flushGateway();
  }
}
