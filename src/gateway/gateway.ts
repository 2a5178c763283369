// The gateway's work on its secondary volume, apart from HTTP: applying batches of updates under the
// idempotency rules of each source (sequencer.ts), group-committed flushes that advance
// durableThrough and persist it (state.ts), reads and checksums for verification, and the counters
// that status reports.
//
// Notes on the design
// - Batches of one source run one at a time (a promise chain per source), so the sequencer's plan
//   and its commit see the same state; batches of different sources run concurrently.
// - A batch's pieces are disjoint (the sequencer subtracted newer ranges, including those of the
//   batch itself), so all its writes are issued at once and may complete in any order. The reply
//   waits until every one has settled: on any failure nothing is committed (the proxy resends the
//   batch; writing the same bytes again is harmless, and a retried older update can never clobber
//   a newer one because the subtraction is repeated).
// - Flush: capture every source's appliedThrough, then FileVolume.flush() (group commit: the
//   fdatasync it waits for starts after the call), then durableThrough = the captured values, then
//   sources.json (group-committed too). Every update counted in appliedThrough had completed its
//   write before the capture, so the fdatasync covers it.
// - One writer: a secondary is the replica of one primary, so it takes updates (and flushes, and
//   update streams) from one source, its owner: the first that writes, recorded durably in
//   sources.json before its first update applies. Another source is refused with 409 ERR_OWNER
//   (as DRBD refuses a second primary), unless it asks to take the secondary over
//   (X-Blockfork-Takeover: 1, `serve --gateway-takeover`, after which it resyncs the whole volume);
//   the old owner is refused from then on, so it knows its replica is gone.
// - The secondary's consistency (as DRBD's disk states): `consistent` when it is a crash-consistent
//   image of the primary (every write up to some point, in order, none after), `inconsistent` when
//   it may not be, `unknown` before any proxy said. It becomes inconsistent, and that is durable
//   in sources.json before the update that causes it is applied, when
//     - a batch holds a record flagged RESYNC (resync copies leave write order; client writes sent
//       before the resync finished come after writes the secondary never got),
//     - a floor abandons seqs while later ones are applied (a gap under applied writes),
//     - the gateway starts after an unclean stop (updates applied after the last flush may be
//       partly on disk: write-back is not in write order), or an fdatasync failed.
//   It becomes consistent on a flush that carries the proxy's claim `X-Blockfork-In-Sync: S`
//   (every block where primary and secondary differ has an update with seq <= S, and every later
//   update comes in write order), once the flush made every seq <= S durable, and only if nothing
//   since the claim was made undid it: the claim's boot is this process's, no RESYNC record above
//   S was applied, no seq at or above the claim's floor was abandoned, and the inconsistency is
//   the claiming source's (or nobody's), unless the claimant copied the whole volume since it
//   started (X-Blockfork-In-Sync-Whole: its map then holds every difference, whoever made it).

import { createHash, randomBytes } from "node:crypto";
import { constants } from "node:os";
import { errnoName, errnoOf } from "../errors.js";
import type { Logger } from "../log.js";
import { DONE } from "../util/done.js";
import type { Volume } from "../volume/volume.js";
import { HttpError } from "./http.js";
import { FLAG_RESYNC, KIND, type UpdateRecord } from "./records.js";
import { Sequencer, type BatchPlan, type SourceSnapshot } from "./sequencer.js";
import type { StateWriter } from "./state.js";

const E = constants.errno;
/** After an I/O failure, health says "cannot apply" for this long unless an operation succeeds. */
export const FAILING_HOLD_MS = 5000;
/** Checksums read the volume in chunks of this size (two buffers: one read ahead while hashing). */
const CHECKSUM_CHUNK = 1024 * 1024;

/** Who sends a request (the identity headers). */
export interface Identity {
  source: string;
  generation: number;
  /** X-Blockfork-Floor, when given. */
  floor: number | null;
  /** X-Blockfork-Incarnation (the proxy process), when given. */
  incarnation?: string | null;
  /** X-Blockfork-Takeover: 1: take the secondary over from the source that writes it now. */
  takeover?: boolean;
}

/** The one source whose updates the secondary takes (see the notes at the top). */
export interface Owner {
  source: string;
  /** When it became the owner (ISO time). */
  since: string;
}

/**
 * The answer to a batch. `stale`: the batch came from an older generation, or (`reused` too) from
 * another process with the same generation, and was not applied.
 */
export interface BatchResult {
  applied: number;
  duplicates: number;
  appliedThrough: number;
  durableThrough: number;
  stale?: true;
  reused?: true;
  generation?: number;
}

/** What is known of the secondary as an image of the primary (see the notes at the top). */
export interface SecondaryState {
  state: "consistent" | "inconsistent" | "unknown";
  /** When it became so (ISO time). */
  since: string;
  reason: string;
  /** The source whose in-sync claim can make it consistent; null: any source's. */
  source: string | null;
}

/** A proxy's claim on a flush: in sync through `seq` (X-Blockfork-In-Sync), made in `boot`. */
export interface InSyncClaim {
  seq: number;
  boot: string;
  /** X-Blockfork-In-Sync-Whole: the claimant copied the whole volume since it started. */
  whole?: boolean;
}

/** Counters reported by status. */
export interface Counters {
  updates: number;
  bytes: number;
  duplicates: number;
  stale: number;
  flushes: number;
  errors: number;
}

/** Sources (proxy identities) a gateway keeps state for; more are refused (503), not remembered. */
export const MAX_SOURCES = 1024;

class Source {
  private tail: Promise<unknown> = Promise.resolve();
  /** Since when (ISO time) updates of this source are applied above a gap; null: none are. */
  gapSince: string | null = null;
  constructor(
    readonly id: string,
    readonly seq: Sequencer,
  ) {}

  /** Run `fn` after every earlier call of this source has settled. */
  serialize<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.tail.then(fn, fn);
    this.tail = p.then(
      () => {},
      () => {},
    );
    return p;
  }
}

/** The secondary volume and the state of every source that writes to it. */
export class Gateway {
  readonly counters: Counters = { updates: 0, bytes: 0, duplicates: 0, stale: 0, flushes: 0, errors: 0 };
  private readonly sources = new Map<string, Source>();
  private lastFailure: { at: number; message: string } | null = null;
  /**
   * An fdatasync of the secondary failed. Linux reports a write-back error to one fdatasync only
   * and may drop the failed pages (they are no longer dirty), so a later fdatasync succeeds
   * without them: nothing applied before it may ever be called durable. As PostgreSQL does since
   * "fsyncgate", the gateway refuses every flush (and reports itself unhealthy) until it restarts:
   * the proxies then track, and resync what they had not seen durable.
   */
  private syncBroken: string | null = null;
  private state: StateWriter | null = null;
  /**
   * Inconsistent, and recorded so with no consistent state on its way to the record: what makes
   * it inconsistent needs no new record. While one is on its way it does (recordConsistent).
   */
  private get inconsistentAsRecorded(): boolean {
    return this.secondaryState.state === "inconsistent" && this.recording === null;
  }

  /** A consistent state being written to sources.json before it is told (recordConsistent). */
  private recording: { from: SecondaryState; next: SecondaryState } | null = null;
  private secondaryState: SecondaryState = {
    state: "unknown",
    since: new Date().toISOString(),
    reason: "no proxy has said yet that this secondary is in sync with its primary",
    source: null,
  };
  /** Between start() and stop(): sources.json says `running`, so a crash shows at the next start. */
  running = false;
  /** The secondary's id (state.ts secondaryId(); /v1/health): new for every new secondary. */
  secondaryId = "";
  /** The source whose updates the secondary takes (null: none yet). */
  owner: Owner | null = null;
  /** Called when another source took the secondary over (the server ends the old one's streams). */
  onTakeover: ((from: string) => void) | null = null;

  constructor(
    readonly volume: Volume,
    private readonly log: Logger,
    persisted: Map<string, SourceSnapshot> = new Map(),
    /** This process's boot id (the HTTP replies' `boot`): an in-sync claim made in another is void. */
    readonly boot = randomBytes(8).toString("hex"),
  ) {
    for (const [id, snap] of persisted) this.sources.set(id, new Source(id, new Sequencer(snap)));
  }

  /**
   * What is known of the secondary as an image of the primary. While updates of a source are
   * applied above a gap (a batch overtook another: POST requests on several connections, or a
   * batch failed and later ones applied), the secondary is not a write-order prefix until the gap
   * fills (or its floor comes and makes it a lasting inconsistency). Written as such into
   * sources.json too, so a restart in that state starts inconsistent.
   */
  get secondary(): SecondaryState {
    return this.view(this.secondaryState);
  }

  /**
   * What sources.json records of the secondary: what is told, or the consistent state on its way
   * to being told (recordConsistent), unless something changed the state meanwhile.
   */
  get secondaryToRecord(): SecondaryState {
    const r = this.recording;
    return this.view(r !== null && r.from === this.secondaryState ? r.next : this.secondaryState);
  }

  /** `st` as told: inconsistent while the owner's updates are applied above a gap. */
  private view(st: SecondaryState): SecondaryState {
    if (st.state === "inconsistent") return st;
    // The owner's gaps (a source that lost the secondary will never fill its own; the owner that
    // took it over resyncs the whole volume, which makes it inconsistent until done).
    for (const src of this.sources.values()) {
      if (this.owner !== null && src.id !== this.owner.source) continue;
      if (src.gapSince !== null) {
        return {
          state: "inconsistent",
          since: src.gapSince,
          reason:
            `source ${src.id} has ${src.seq.outOfOrder} update(s) applied above seq ` +
            `${src.seq.appliedThrough + 1}, which has not arrived: not a write-order image until it does`,
          source: src.id,
        };
      }
    }
    return st;
  }

  /**
   * Take up the state the last run left (sources.json's `secondary` and `running`) and persist
   * `running`. A run that did not stop cleanly may have left updates it applied after its last
   * flush partly on disk: the secondary is then inconsistent until a proxy resyncs them.
   */
  async start(previous: {
    secondary: SecondaryState | null;
    running: boolean | null;
    owner?: Owner | null;
  }): Promise<void> {
    this.owner = previous.owner ?? null;
    if (previous.secondary !== null) this.secondaryState = previous.secondary;
    else if (previous.running !== null || this.sources.size > 0) {
      this.secondaryState = {
        ...this.secondaryState,
        reason: "the state directory was written by a gateway that did not record consistency",
      };
    }
    if (previous.running === true && this.secondaryState.state !== "inconsistent") {
      this.setSecondary(
        "inconsistent",
        "the gateway did not stop cleanly (killed or crashed): updates it applied after its last " +
          "flush may be partly on disk, until a proxy resyncs them",
        null,
      );
    }
    this.running = true;
    if (this.state) {
      try {
        await this.state.save();
      } catch (e) {
        throw new Error(
          `cannot write the state file in the state directory ${this.state.dir} (${(e as Error).message}); ` +
            "free space there (or fix its file system) and start the gateway again",
          { cause: e },
        );
      }
    }
  }

  /** A clean stop: sources.json says not running (written by the final syncAll). */
  stop(): void {
    this.running = false;
  }

  private setSecondary(state: SecondaryState["state"], reason: string, source: string | null): void {
    this.publish({ state, since: new Date().toISOString(), reason, source });
  }

  private publish(st: SecondaryState): void {
    this.secondaryState = st;
    const text = `secondary ${st.state.toUpperCase()}: ${st.reason}`;
    if (st.state === "consistent") this.log.info(text);
    else this.log.warn(`${text}; do not fail over to it before it is consistent again`);
  }

  /**
   * Make the secondary consistent, recorded before it is told: sources.json gets it first, and
   * only then do /v1/health, /status and the flush's answer say so (a failover tool that read
   * "consistent" finds it so after a crash of the gateway too). A change meanwhile wins: a state
   * made inconsistent is recorded after this (the writer's order) and stays; a claim that no
   * longer `holds` is not told, and the record is written again.
   */
  private async recordConsistent(reason: string, source: string, holds: () => boolean): Promise<void> {
    const rec = {
      from: this.secondaryState,
      next: { state: "consistent" as const, since: new Date().toISOString(), reason, source },
    };
    this.recording = rec;
    try {
      await this.saveState();
    } finally {
      if (this.recording === rec) this.recording = null;
    }
    if (this.secondaryState !== rec.from) return;
    if (!holds()) {
      await this.saveState();
      return;
    }
    this.publish(rec.next);
  }

  /**
   * Record the secondary inconsistent, durably, before what makes it so is applied. A failure to
   * persist that is the request's failure (nothing of it is applied).
   */
  private async inconsistent(reason: string, source: string | null): Promise<void> {
    if (this.inconsistentAsRecorded) return;
    this.setSecondary("inconsistent", reason, source);
    await this.saveState();
  }

  /** Write sources.json (group-committed); a failure is the request's (500, or 507 when full). */
  private async saveState(): Promise<void> {
    if (!this.state) return;
    try {
      await this.state.save();
    } catch (e) {
      throw this.ioFailure(e, "writing the state file", this.state.dir);
    }
  }

  /** Where flushes persist the state (set once, by the command). */
  attachState(writer: StateWriter): void {
    this.state = writer;
  }

  /** The persistent state of every source, for the state writer. */
  *snapshots(): Iterable<[string, SourceSnapshot]> {
    for (const [id, s] of this.sources) yield [id, s.seq.snapshot()];
  }

  private source(id: Identity): Source {
    let s = this.sources.get(id.source);
    if (!s) {
      if (this.sources.size >= MAX_SOURCES) {
        throw new HttpError(
          503,
          "ERR_UNAVAILABLE",
          `this gateway already keeps idempotency state for ${MAX_SOURCES} sources (its limit); ` +
            `source ${id.source} is refused: stop the gateway and remove ${"sources.json"} from its state directory to forget old proxies`,
        );
      }
      s = new Source(
        id.source,
        new Sequencer({
          generation: id.generation,
          durableThrough: 0,
          floor: 0,
          ...(id.incarnation ? { incarnation: id.incarnation } : {}),
        }),
      );
      this.sources.set(id.source, s);
      this.log.info(`new source ${id.source} (generation ${id.generation})`);
    }
    return s;
  }

  /**
   * Bring the source to the request's generation and floor; false when the request's generation
   * is stale. A floor that leaves a gap under applied updates makes the secondary inconsistent.
   */
  private async admit(s: Source, id: Identity): Promise<"ok" | "stale" | "reused"> {
    const before = s.seq.generation;
    const gapBefore = s.seq.outOfOrder > 0;
    const through = s.seq.appliedThrough;
    const g = s.seq.checkGeneration(id.generation, id.incarnation ?? null);
    if (g === "reused") {
      this.log.limited(
        "error",
        `reused ${s.id}`,
        `source ${s.id}: generation ${id.generation} comes from another process than before (a copy ` +
          `of the proxy's state directory?): refused as stale, nothing applied`,
      );
      return "reused";
    }
    if (g === "stale") return "stale";
    let gap = false;
    if (g === "reset") {
      this.log.info(`source ${s.id}: generation ${before} -> ${id.generation}, idempotency state reset`);
      gap = gapBefore; // the new generation will never send what the old one left missing
    }
    if (id.floor !== null && s.seq.raiseFloor(id.floor) === "gap") gap = true;
    if (s.seq.outOfOrder === 0) s.gapSince = null;
    if (gap) {
      await this.inconsistent(
        `source ${s.id} abandoned updates after seq ${through} that later applied ones came ` +
          `after, until it resyncs their blocks`,
        s.id,
      );
    }
    return "ok";
  }

  /**
   * Refuse a source that is not the owner (409 ERR_OWNER), unless it takes the secondary over;
   * with `claim`, make it the owner (durably) when there is none or it takes over.
   */
  async admitOwner(id: Identity, claim: boolean): Promise<void> {
    const o = this.owner;
    if (o !== null && o.source === id.source) return;
    this.checkOwner(id);
    if (!claim) return;
    this.owner = { source: id.source, since: new Date().toISOString() };
    if (o === null) this.log.info(`source ${id.source} owns the secondary`);
    else {
      this.log.warn(`source ${id.source} took the secondary over from source ${o.source}`);
      this.onTakeover?.(o.source);
    }
    try {
      await this.saveState();
    } catch (e) {
      this.owner = o;
      throw e;
    }
  }

  /** Throw 409 ERR_OWNER when `id` is not the owner and does not take the secondary over. */
  checkOwner(id: Identity): void {
    const o = this.owner;
    if (o !== null && o.source !== id.source && id.takeover !== true) {
      throw new HttpError(
        409,
        "ERR_OWNER",
        `this secondary is the replica of source ${o.source} (since ${o.since}); another proxy's ` +
          `updates would overwrite it. If that proxy is gone for good (its state directory lost), ` +
          `start this one with --gateway-takeover: it takes the secondary over and resyncs the whole volume`,
      );
    }
  }

  /** Apply a parsed, checked batch. Rejects with HttpError 500/507 when a write fails. */
  applyBatch(id: Identity, records: UpdateRecord[]): Promise<BatchResult> {
    if (this.syncBroken !== null) return Promise.reject(this.brokenSync());
    let s: Source;
    try {
      this.checkOwner(id); // before source(): a refused source leaves no state behind
      s = this.source(id);
    } catch (e) {
      return Promise.reject(e);
    }
    return s.serialize(async () => {
      if (this.owner?.source !== id.source) await this.admitOwner(id, true); // (not per batch)
      const admitted = await this.admit(s, id);
      if (admitted !== "ok") {
        this.counters.stale += records.length;
        return {
          applied: 0,
          duplicates: records.length,
          appliedThrough: 0,
          durableThrough: 0,
          stale: true,
          ...(admitted === "reused" ? { reused: true as const } : {}),
          generation: s.seq.generation,
        };
      }
      const plan = s.seq.plan(records);
      if (!this.inconsistentAsRecorded) {
        for (const u of plan.updates) {
          if (((u.record.flags ?? 0) & FLAG_RESYNC) !== 0) {
            await this.inconsistent(
              `source ${s.id} is resyncing: blocks arrive out of write order until it is done`,
              s.id,
            );
            break;
          }
        }
      }
      try {
        await this.write(plan);
      } catch (e) {
        // Nothing of the batch is acknowledged, but the writes that succeeded are on the
        // secondary: some updates without the ones before them (a full disk fails writes into
        // holes and lets overwrites through). Best effort: the state directory may be full too.
        if (plan.updates.length > 0) {
          await this.inconsistent(
            `a batch of source ${s.id} failed part-way (${(e as Error).message}): some of its ` +
              "writes may be on the secondary without the others",
            s.id,
          ).catch(() => {});
        }
        throw e;
      }
      s.seq.commit(plan);
      if (s.seq.outOfOrder === 0) s.gapSince = null;
      else s.gapSince ??= new Date().toISOString();
      const c = this.counters;
      c.updates += plan.updates.length;
      for (const u of plan.updates) c.bytes += u.record.length;
      c.duplicates += plan.duplicates;
      return {
        applied: plan.updates.length,
        duplicates: plan.duplicates,
        appliedThrough: s.seq.appliedThrough,
        durableThrough: s.seq.durableThrough,
      };
    });
  }

  private write(plan: BatchPlan): Promise<void> {
    const v = this.volume;
    let pending: Promise<void>[] | null = null;
    const issue = (r: UpdateRecord, offset: number, length: number, dataStart: number): void => {
      let p: Promise<void>;
      try {
        if (r.kind === KIND.WRITE) {
          const data =
            dataStart === 0 && length === r.length
              ? r.data!
              : r.data!.subarray(dataStart, dataStart + length);
          p = v.write(data, offset, false);
        } else {
          p = v.zero(offset, length, { mayTrim: true });
        }
      } catch (e) {
        p = Promise.reject(e);
      }
      if (p !== DONE) (pending ??= []).push(p);
    };
    for (const u of plan.updates) {
      const r = u.record;
      if (u.pieces === null) issue(r, r.offset, r.length, 0);
      else for (const piece of u.pieces) issue(r, piece.offset, piece.length, piece.dataStart);
    }
    if (pending === null) {
      this.lastFailure = null;
      return DONE;
    }
    return Promise.allSettled(pending as Promise<void>[]).then((results) => {
      for (const r of results) if (r.status === "rejected") throw this.ioFailure(r.reason, "write");
      this.lastFailure = null;
    });
  }

  /**
   * Turn an I/O error into the API error (507 for a full disk, else 500) and remember it for health.
   * `stateDir`: the failure was in the gateway's state directory, not on the secondary.
   */
  private ioFailure(err: unknown, what: string, stateDir?: string): HttpError {
    const errno = errnoOf(err);
    const detail = err instanceof Error ? err.message : String(err);
    const where = stateDir === undefined ? "on the secondary" : `in the state directory ${stateDir}`;
    this.counters.errors++;
    this.lastFailure = { at: performance.now(), message: `${what} failed: ${detail}` };
    this.log.limited("error", `io ${what}`, `${what} ${where} failed: ${detail}`);
    if (errno === E.ENOSPC || errno === E.EDQUOT) {
      const full =
        stateDir === undefined
          ? `the secondary's storage is full (${errnoName(errno)}: ${detail}); nothing of this request ` +
            `was acknowledged; free space on the gateway's volume`
          : `the gateway's state directory ${stateDir} is full (${errnoName(errno)}: ${detail}); ` +
            `nothing of this request was acknowledged; free space there`;
      return new HttpError(507, "ERR_NO_SPACE", full, { cause: err });
    }
    return new HttpError(
      500,
      "ERR_IO",
      `${what} ${where} failed (${detail}); nothing of this request was acknowledged`,
      { cause: err },
    );
  }

  /**
   * FLUSH for one source: fdatasync (shared with concurrent flushes), then durableThrough and
   * sources.json. Resolves with the source's durableThrough.
   */
  async flush(
    id: Identity,
    claim: InSyncClaim | null = null,
  ): Promise<{
    durableThrough: number;
    secondary: string;
    stale?: true;
    reused?: true;
    generation?: number;
  }> {
    if (this.syncBroken !== null) throw this.brokenSync();
    this.checkOwner(id); // before source(): a refused source leaves no state behind
    const s = this.source(id);
    if (this.owner?.source !== id.source) await this.admitOwner(id, true);
    if (
      id.generation !== s.seq.generation ||
      id.floor !== null ||
      (id.incarnation ?? null) !== s.seq.incarnation
    ) {
      // A generation change or a floor changes state that batches in flight rely on: in line.
      const admitted = await s.serialize(() => this.admit(s, id));
      if (admitted !== "ok") {
        return {
          durableThrough: 0,
          secondary: this.secondary.state,
          stale: true,
          ...(admitted === "reused" ? { reused: true as const } : {}),
          generation: s.seq.generation,
        };
      }
    }
    await this.syncAll();
    if (claim !== null && this.secondaryState.state !== "consistent" && this.claimHolds(s, id, claim)) {
      await this.recordConsistent(`in sync with source ${s.id} through seq ${claim.seq}`, s.id, () =>
        this.claimHolds(s, id, claim),
      );
    }
    return { durableThrough: s.seq.durableThrough, secondary: this.secondary.state };
  }

  /** Whether an in-sync claim, checked after its flush's fdatasync, proves the secondary consistent. */
  private claimHolds(s: Source, id: Identity, claim: InSyncClaim): boolean {
    const q = s.seq;
    const owner = this.secondaryState.source;
    return (
      claim.boot === this.boot &&
      q.generation === id.generation &&
      q.durableThrough >= claim.seq &&
      q.resyncMax <= claim.seq &&
      q.abandonedMax < (id.floor ?? 1) &&
      (owner === null || owner === s.id || claim.whole === true)
    );
  }

  /** fdatasync the secondary and persist every source's new durableThrough. */
  async syncAll(): Promise<void> {
    const captured: [Sequencer, number, number][] = [];
    for (const s of this.sources.values()) {
      captured.push([s.seq, s.seq.generation, s.seq.appliedThrough]);
    }
    this.counters.flushes++;
    if (this.syncBroken !== null) throw this.brokenSync();
    try {
      await this.volume.flush();
    } catch (e) {
      const err = this.ioFailure(e, "fdatasync");
      this.syncBroken = `an fdatasync of the secondary failed (${e instanceof Error ? e.message : String(e)})`;
      // Best effort: the state directory is usually on other storage, and shutdown writes it too.
      this.inconsistent(`${this.syncBroken}: updates applied before it may be lost`, null).catch(() => {});
      this.log.error(
        `${this.syncBroken}: updates applied before it may be lost, so no flush succeeds until the ` +
          "gateway restarts (fix the secondary's storage, then restart the gateway; proxies resync)",
      );
      throw err;
    }
    if (this.syncBroken !== null) throw this.brokenSync(); // another flush failed meanwhile
    for (const [seq, generation, through] of captured) {
      if (seq.generation === generation) seq.markDurable(through);
    }
    await this.saveState();
    this.lastFailure = null;
  }

  /** Read [offset, offset+length) of the secondary into `buf` (checked by the caller). */
  read(buf: Buffer, offset: number): Promise<void> {
    return this.volume.read(buf, offset).catch((e: unknown) => {
      throw this.ioFailure(e, "read");
    });
  }

  /** SHA-256 (hex) of each `block`-byte block of [offset, offset+length); the last may be short. */
  async checksums(offset: number, length: number, block: number): Promise<string[]> {
    // Read in windows of about CHECKSUM_CHUNK (whole blocks when blocks are smaller), two buffers:
    // the next window is read while this one is hashed. Memory stays 2 MiB whatever the length.
    const window = block >= CHECKSUM_CHUNK ? CHECKSUM_CHUNK : Math.floor(CHECKSUM_CHUNK / block) * block;
    const size = Math.min(window, length);
    const bufs = [Buffer.allocUnsafe(size), Buffer.allocUnsafe(size)];
    const end = offset + length;
    const sums: string[] = [];
    let hash = createHash("sha256");
    const readWindow = (i: number): Promise<void> => {
      const at = offset + i * window;
      return this.read(bufs[i % 2].subarray(0, Math.min(window, end - at)), at);
    };
    const count = Math.ceil(length / window);
    let ahead = readWindow(0);
    for (let i = 0; i < count; i++) {
      await ahead;
      if (i + 1 < count) ahead = readWindow(i + 1);
      const at = offset + i * window;
      const wEnd = Math.min(at + window, end);
      const buf = bufs[i % 2];
      for (let pos = at; pos < wEnd;) {
        const blockEnd = offset + (Math.floor((pos - offset) / block) + 1) * block;
        const segEnd = Math.min(blockEnd, wEnd);
        hash.update(buf.subarray(pos - at, segEnd - at));
        if (segEnd === blockEnd || segEnd === end) {
          sums.push(hash.digest("hex"));
          hash = createHash("sha256");
        }
        pos = segEnd;
      }
    }
    return sums;
  }

  /** The answer to every flush once an fdatasync failed (see syncBroken). */
  private brokenSync(): HttpError {
    this.counters.errors++;
    return new HttpError(
      500,
      "ERR_IO",
      `${this.syncBroken}: updates applied before it may be lost, so the gateway makes nothing ` +
        "durable until it restarts; restart it once its storage is healthy",
    );
  }

  /** Whether updates can be applied now (health); `reason` when not. */
  health(): { ok: boolean; reason?: string } {
    if (this.syncBroken !== null) {
      return { ok: false, reason: `${this.syncBroken}; restart the gateway once its storage is healthy` };
    }
    const f = this.lastFailure;
    if (f && performance.now() - f.at < FAILING_HOLD_MS) {
      return { ok: false, reason: `the secondary is failing: ${f.message}` };
    }
    return { ok: true };
  }

  /** Per-source state for status. */
  sourceStatus(): Record<string, unknown>[] {
    return [...this.sources.values()].map((s) => ({
      source: s.id,
      generation: s.seq.generation,
      appliedThrough: s.seq.appliedThrough,
      durableThrough: s.seq.durableThrough,
      floor: s.seq.floor,
      outOfOrder: s.seq.outOfOrder,
      lastPeriod: s.seq.lastPeriod,
    }));
  }
}
