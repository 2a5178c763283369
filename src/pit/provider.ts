// Snapshot exports: `snap@<ISO-8601 time>` and `snap@<bookmark>`, opened on demand by the NBD
// handshake through the exports registry. NBD_OPT_LIST lists the bookmarks.

import type { BlockSizes, ExportListing, ExportProvider, ExportRefusal, OpenExport } from "../nbd/exports.js";
import type { Volume } from "../volume/volume.js";
import type { Logger } from "../log.js";
import type { Journal } from "./journal.js";
import { SnapshotView } from "./snapshot.js";

const PREFIX = "snap@";

/**
 * An open waits this long for the changes stamped before its point to reach the primary (they
 * normally take milliseconds); past it the primary is not answering, and the open is refused
 * with a message rather than left hanging in the handshake.
 */
export const SETTLE_TIMEOUT_MS = 30_000;

/** A date-time with no zone (no Z, no offset): Date.parse would read it in local time. */
const ZONELESS = /^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?$/;

/**
 * Parse what follows "snap@" as an ISO-8601 time (ms), or null (then it names a bookmark). A time
 * without a zone is UTC, as a date alone is: the server's own zone must not change the point.
 */
export function parseSnapTime(text: string): number | null {
  if (!/^\d{4}-\d{2}-\d{2}/.test(text)) return null;
  const t = Date.parse(ZONELESS.test(text) ? `${text}Z` : text);
  return Number.isNaN(t) ? null : t;
}

/** Serves snap@... names from a journal over the primary. */
export class SnapshotProvider implements ExportProvider {
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

  open(name: string): Promise<OpenExport | ExportRefusal> {
    const target = name.slice(PREFIX.length);
    let t = parseSnapTime(target);
    let point: number;
    if (t === null) {
      const b = this.journal.listBookmarks().get(target);
      if (b === undefined) {
        return Promise.resolve({
          message: `${name}: no bookmark "${target}" and not an ISO-8601 time; ${this.range()}`,
        });
      }
      t = b;
      // A bookmark ends the merge window it is taken in (Journal.mark): it shows its own time.
      point = b;
    } else {
      const twice = this.journal.passedTwiceAt(t);
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
    if (settled === null) return Promise.resolve(this.openView(name, point));
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
        ? this.openView(name, point)
        : { message: `${name} is outside the journal's window; ${this.range()}` };
    });
  }

  private inWindow(t: number, point: number): boolean {
    const w = this.journal.window();
    return w.earliest !== null && point >= w.earliest && t <= w.latest;
  }

  private openView(name: string, point: number): OpenExport {
    const view = new SnapshotView(this.journal, this.primary, point, name);
    view.open();
    return {
      name,
      description: view.description,
      volume: view,
      blockSizes: this.blockSizes,
      release: () =>
        void view.close().catch((e: unknown) => {
          // A lent reply could not be copied (a read error): it is read from the files when sent.
          this.log?.error(`${name}: closing the snapshot view: ${(e as Error).message}`);
        }),
    };
  }
}
