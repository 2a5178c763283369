// Snapshot exports: `snap@<ISO-8601 time>` and `snap@<bookmark>`, opened on demand by the NBD
// handshake through the exports registry. NBD_OPT_LIST lists the bookmarks.
//
// - One view per point: every connection that opens a point (the merge-window start a time maps
//   to, or a bookmark's time, so `snap@NAME` and `snap@<time>` of the same point share) gets the
//   same SnapshotView, counted; the last release closes it (copies what is still lent, stops
//   following the journal, unpins). A view's pointer map is its memory (up to about 1 GiB for a
//   fully changed 1 TiB volume) and its build time, and nbdcopy or qemu open several connections
//   at once. A view that broke (the journal stopped, or it was revoked over --pit-max-bytes) is
//   never handed out again: the next open builds a new one, or is refused as it would be anyway.
// - NBD_OPT_INFO (info) resolves the name exactly as open does, with the same refusals (one
//   function, resolve), but builds and pins nothing: what it answers does not depend on the map.

import type {
  BlockSizes,
  ExportInfo,
  ExportListing,
  ExportProvider,
  ExportRefusal,
  OpenExport,
} from "../nbd/exports.js";
import type { Volume } from "../volume/volume.js";
import type { Logger } from "../log.js";
import type { Journal } from "./journal.js";
import { SNAPSHOT_CAPS, snapshotDescription, SnapshotView } from "./snapshot.js";

const PREFIX = "snap@";

/**
 * An open waits this long for the changes stamped before its point to reach the primary (they
 * normally take milliseconds); past it the primary is not answering, and the open is refused
 * with a message rather than left hanging in the handshake.
 */
export const SETTLE_TIMEOUT_MS = 30_000;

/**
 * ISO 8601's extended format, as far as a point in time needs it: a date, optionally a time
 * (hh, hh:mm, hh:mm:ss, with a fraction after "." or ","; "T", "t" or a space between), and with
 * a time optionally a zone (Z, +hh, +hh:mm, +hhmm). Parsed here, not by Date.parse: that reads
 * many near-misses ("2026-11-23 1:02", a trailing space, "5:02 pm") in the server's local zone
 * and rolls impossible dates over ("2026-02-30" is March 2nd), each a different point than the
 * one asked for.
 */
const ISO_TIME =
  /^(\d{4})-(\d{2})-(\d{2})(?:[Tt ](\d{2})(?::(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?(?:([Zz])|([+-])(\d{2})(?::?(\d{2}))?)?)?$/;

const MONTHS = [
  "January",
  "February",
  "March",
  "April",
  "May",
  "June",
  "July",
  "August",
  "September",
  "October",
  "November",
  "December",
];

const ISO_FORMS =
  "use YYYY-MM-DD or YYYY-MM-DDThh:mm[:ss[.fff]], with Z or +hh:mm for a zone (without one: UTC)";

/**
 * Parse an ISO-8601 time to ms since the epoch, or say what is wrong with it (a string). A time
 * without a zone is UTC, as a date alone is: the server's own zone must not change the point.
 * A fraction finer than 1 ms is cut to the ms; a leap second (ss = 60) is the start of the next
 * minute, and 24:00 the start of the next day.
 */
export function parseIsoTime(text: string): number | string {
  const m = ISO_TIME.exec(text);
  if (m === null) return `"${text.slice(0, 64)}" is not an ISO-8601 time: ${ISO_FORMS}`;
  const [year, month, day] = [Number(m[1]), Number(m[2]), Number(m[3])];
  const [hour, minute, second] = [Number(m[4] ?? 0), Number(m[5] ?? 0), Number(m[6] ?? 0)];
  const frac = m[7] ?? "";
  if (month < 1 || month > 12) return `${m[1]}-${m[2]}-${m[3]}: there is no month ${month}`;
  const days = new Date(Date.UTC(2000, month, 0)).getUTCDate() - (month === 2 && !leap(year) ? 1 : 0);
  if (day < 1 || day > days) {
    return `${m[1]}-${m[2]}-${m[3]}: there is no such day (${MONTHS[month - 1]} ${year} has ${days} days)`;
  }
  const midnight = hour === 24 && minute === 0 && second === 0 && /^0*$/.test(frac);
  if ((hour > 23 && !midnight) || minute > 59 || second > 60) {
    return `"${text.slice(0, 64)}": the time of day is out of range (hh 00-23, mm 00-59, ss 00-60)`;
  }
  let offsetMin = 0;
  if (m[9] !== undefined) {
    const oh = Number(m[10]);
    const om = Number(m[11] ?? 0);
    if (oh > 23 || om > 59) return `"${text.slice(0, 64)}": the zone offset is out of range`;
    offsetMin = (m[9] === "-" ? -1 : 1) * (oh * 60 + om);
  }
  const d = new Date(0);
  d.setUTCFullYear(year, month - 1, day); // years 0-99 too, unlike Date.UTC
  d.setUTCHours(hour, minute, second, Number((frac + "000").slice(0, 3)));
  return d.getTime() - offsetMin * 60_000;
}

function leap(y: number): boolean {
  return (y % 4 === 0 && y % 100 !== 0) || y % 400 === 0;
}

/**
 * Parse what follows "snap@" as an ISO-8601 time (ms), or null: it does not begin with a date, so
 * it names a bookmark (bookmark names never begin with one). A string says why a time is invalid.
 */
export function parseSnapTime(text: string): number | string | null {
  if (!/^\d{4}-\d{2}-\d{2}/.test(text)) return null;
  return parseIsoTime(text);
}

/** An open view and the connections that hold it. */
interface SharedView {
  view: SnapshotView;
  refs: number;
}

/** An open snapshot view as `blockfork snapshots` shows it. */
export interface OpenViewReport {
  point: number;
  /** Connections that hold it (NBD connections, after their GO). */
  connections: number;
  /** Blocks its pointer map reads from the journal. */
  journalBlocks: number;
  /** Why it no longer serves its point (it stays open until its connections close). */
  broken: string | null;
}

/** Serves snap@... names from a journal over the primary. */
export class SnapshotProvider implements ExportProvider {
  /** The views new connections may share, by point. */
  private readonly views = new Map<number, SharedView>();
  /** Every view still open (shareable or not), for the report. */
  private readonly live = new Set<SharedView>();
  private built = 0;

  constructor(
    private readonly journal: Journal,
    private readonly primary: Volume,
    private readonly blockSizes: BlockSizes,
    private readonly log?: Logger,
    /** How long an open waits for changes stamped before its point before it is refused. */
    private readonly settleTimeoutMs = SETTLE_TIMEOUT_MS,
  ) {}

  owns(name: string): boolean {
    return name.startsWith(PREFIX);
  }

  list(): ExportListing[] {
    const out: ExportListing[] = [];
    const w = this.journal.window();
    if (w.earliest === null) return out; // nothing can be opened while the journal is stopped
    for (const [name, ts] of this.journal.listBookmarks()) {
      if (ts < w.earliest) continue;
      out.push({
        name: `${PREFIX}${name}`,
        description: `bookmark: the primary at ${new Date(ts).toISOString()}`,
      });
    }
    return out;
  }

  private range(): string {
    const w = this.journal.window();
    if (w.earliest === null) {
      return w.stopped
        ? `no point in time is available: the journal stopped at ${w.stopped.at} (${w.stopped.reason})`
        : "no point in time is available yet";
    }
    return (
      `available: ${new Date(w.earliest).toISOString()} to ${new Date(w.latest).toISOString()}` +
      ` (in steps of ${w.windowMs} ms)`
    );
  }

  /** Views built so far (a second connection to an open point builds none). */
  get builds(): number {
    return this.built;
  }

  /** Open `name` for a connection: the point's shared view, built if none serves it yet. */
  open(name: string): Promise<OpenExport | ExportRefusal> {
    return this.resolve(name).then((r) => (typeof r === "number" ? this.openView(name, r) : r));
  }

  /** What open(name) would serve, or its refusal, without building or pinning a view. */
  info(name: string): Promise<ExportInfo | ExportRefusal> {
    return this.resolve(name).then((r) =>
      typeof r === "number"
        ? {
            name,
            description: snapshotDescription(name, r),
            size: this.primary.size,
            caps: { ...SNAPSHOT_CAPS },
            blockSizes: this.blockSizes,
          }
        : r,
    );
  }

  /**
   * The point `name` shows, once every change stamped before it has reached the primary, or why
   * it cannot be served. Both open and info go through here, so they refuse alike.
   */
  private resolve(name: string): Promise<number | ExportRefusal> {
    const target = name.slice(PREFIX.length);
    const parsed = parseSnapTime(target);
    if (typeof parsed === "string")
      return Promise.resolve({ message: `${name}: ${parsed}; ${this.range()}` });
    let t = parsed;
    let point: number;
    if (t === null) {
      const b = this.journal.listBookmarks().get(target);
      if (b === undefined) {
        return Promise.resolve({
          message: `${name}: no bookmark "${target}" (and not an ISO-8601 time); ${this.range()}`,
        });
      }
      t = b;
      // A bookmark ends the merge window it is taken in (Journal.mark): it shows its own time.
      point = b;
    } else {
      // Not only t: the window start it maps to (the point snap@t shows) must not have passed
      // twice either, nor anything between them.
      const twice = this.journal.passedTwiceAt(this.journal.pointOf(t), t);
      if (twice !== null) {
        const iso = (x: number): string => new Date(x).toISOString();
        return Promise.resolve({
          message:
            `${name}: the wall clock went back, so the times from ${iso(twice[0])} to ${iso(twice[1])} ` +
            "passed twice and this one could mean either; name a bookmark, or a time outside that range; " +
            this.range(),
        });
      }
      point = this.journal.pointOf(t);
    }
    if (!this.inWindow(t, point)) {
      return Promise.resolve({ message: `${name} is outside the journal's window; ${this.range()}` });
    }
    // Changes stamped before the point but not yet applied to the primary belong in the view:
    // wait for them, or the view would read a block's older contents first and theirs later.
    const settled = this.journal.settled(point);
    if (settled === null) return Promise.resolve(point);
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<false>((resolve) => {
      timer = setTimeout(() => resolve(false), this.settleTimeoutMs);
    });
    return Promise.race([settled.then(() => true as const), late]).then((ok) => {
      clearTimeout(timer);
      if (!ok) {
        const s = (this.settleTimeoutMs / 1000).toFixed(this.settleTimeoutMs < 1000 ? 1 : 0);
        return {
          message:
            `${name}: changes made to the primary before that point have not completed after ${s} s ` +
            "(is the primary's storage hanging?); try again later",
        };
      }
      return this.inWindow(t, point) // the journal may have stopped meanwhile
        ? point
        : { message: `${name} is outside the journal's window; ${this.range()}` };
    });
  }

  private inWindow(t: number, point: number): boolean {
    const w = this.journal.window();
    return w.earliest !== null && point >= w.earliest && t <= w.latest;
  }

  /** The point's view, shared: built when none is open or the open one broke. */
  private openView(name: string, point: number): OpenExport {
    let shared = this.views.get(point);
    if (shared === undefined || shared.view.unusable !== null) {
      const started = performance.now();
      const view = new SnapshotView(this.journal, this.primary, point, name);
      const mapped = view.open();
      shared = { view, refs: 0 };
      this.views.set(point, shared); // a broken one stays open (out of the map) for its holders
      this.live.add(shared);
      this.built++;
      this.log?.info(
        `${name}: built the view at ${new Date(point).toISOString()} (${mapped} blocks from the ` +
          `journal, ${(performance.now() - started).toFixed(1)} ms); views open: ${this.live.size}`,
      );
    }
    const s = shared;
    s.refs++;
    let released = false;
    return {
      name,
      description: snapshotDescription(name, point),
      volume: s.view,
      blockSizes: this.blockSizes,
      release: () => {
        if (released) return;
        released = true;
        if (--s.refs > 0) return;
        if (this.views.get(point) === s) this.views.delete(point);
        this.live.delete(s);
        s.view.close().catch((e: unknown) => {
          // A lent reply could not be copied (a read error): it is read from the files when sent.
          this.log?.error(`${name}: closing the snapshot view: ${(e as Error).message}`);
        });
      },
    };
  }

  /** The views open now, oldest point first. */
  openViews(): OpenViewReport[] {
    return [...this.live]
      .map((s) => ({
        point: s.view.point,
        connections: s.refs,
        journalBlocks: s.view.journalBlocks,
        broken: s.view.unusable,
      }))
      .sort((a, b) => a.point - b.point);
  }
}
