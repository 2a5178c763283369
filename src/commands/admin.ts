// `blockfork status`, `blockfork tracking show`, `blockfork verify`, `blockfork resync`: ask a
// running proxy (through the admin socket in its state directory) what it knows, or make it act.

import { parseArgs } from "node:util";
import { UsageError } from "../errors.js";
import { adminCall, NoProxyError, proxyRunning } from "../admin/client.js";
import type { SnapshotsReport } from "../admin/server.js";
import type { UnreadableStatus } from "../forks/link.js";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { Journal } from "../pit/journal.js";
import { Logger } from "../log.js";
import { formatSize } from "../util/size.js";

export const STATUS_HELP = `Usage: blockfork status --state-dir DIR [--json]

Show a running proxy's replication state: the gateway link (streaming, tracking, resyncing), its
queue, the dirty bytes of the tracking log with their time span, resync progress, and the blocks
of the primary a resync could not read (the secondary differs there).
DIR is the proxy's --state-dir (default for a file volume: VOLUME.blockfork).
Exit status: 0; 1 when no proxy answers on DIR/admin.sock; 2 on a usage error.
`;

export const TRACKING_HELP = `Usage: blockfork tracking show --state-dir DIR [--limit N] [--json]

Print the tracking log of a running proxy: every dirty extent with the time its region was first
and last dirtied, and the totals.
Exit status: 0; 1 when no proxy answers; 2 on a usage error.
`;

export const VERIFY_HELP = `Usage: blockfork verify --state-dir DIR [--repair] [--json]

Compare the primary and the secondary of a running proxy block by block (SHA-256 per tracking
block, computed on the gateway for its side), like DRBD's online verify. Blocks still dirty are
expected to differ and are skipped. With --repair, blocks that differ are marked dirty and resynced.
Exit status: 0 when both sides agree (or were repaired); 3 when mismatches were found without
--repair; 1 on failure; 2 on a usage error.
`;

export const RESYNC_HELP = `Usage: blockfork resync --state-dir DIR [--full] [--no-wait]

Make a running proxy resync now and show a progress bar until it streams again. --full marks every
block dirty first (a complete copy to the secondary). Blocks the primary cannot read are tried
again; those that still fail stay dirty (the secondary differs there) and are listed.
Exit status: 0 when the link streams again; 1 on failure, or when blocks of the primary could not
be read (the link streams, the secondary differs there); 2 on a usage error.
`;

/**
 * --state-dir and the command's options; `names` positionals allowed (mark's NAME), more are a
 * usage error (`resync ... full` must not run a partial resync and exit 0).
 */
function stateDirArg(argv: string[], extra: Record<string, { type: "string" | "boolean" }>, names = 0) {
  const { values, positionals } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: true,
    options: { "state-dir": { type: "string" }, json: { type: "boolean" }, ...extra },
  });
  if (positionals.length > names) {
    const stray = positionals
      .slice(names)
      .map((p) => JSON.stringify(p))
      .join(" ");
    throw new UsageError(`unexpected argument ${stray}: options start with --`);
  }
  const dir = values["state-dir"];
  if (typeof dir !== "string")
    throw new UsageError("--state-dir DIR is required (the proxy's state directory)");
  return { dir, values: values as Record<string, string | boolean | undefined>, positionals };
}

export interface Status {
  volume: { path: string; name: string; size: number };
  nbd: { connections: number };
  link: {
    gateway: string;
    mode: string;
    state: string;
    since: string;
    reason: string;
    outages: number;
    queue: { updates: number; bytes: number; oldestMs: number };
    transport: "stream" | "post" | null;
    lastError: string;
    lastErrorAt?: number;
    seq: number;
    durableThrough: number;
    /** The secondary as the gateway last reported it (null: not known). */
    secondary?: string | null;
    mirror?: string | null;
    mirrorError?: string;
    mirrorErrorAt?: number;
    resync: {
      running: boolean;
      totalBytes: number;
      doneBytes: number;
      /** Bytes this run found unreadable on the primary (not in totalBytes). */
      unreadableBytes?: number;
      bytesPerSecond: number;
      etaSeconds: number | null;
    };
    /** Blocks of the primary a resync could not read: dirty, the secondary differs there. */
    unreadable?: UnreadableStatus;
  } | null;
  tracking: {
    dirtyBytes: number;
    granularity: number;
    firstDirtied: string | null;
    lastDirtied: string | null;
    /** Set when the tracking log failed and the proxy runs from memory (see src/tracking/log.ts). */
    degraded?: { since: string; reason: string } | null;
    /** The log failed and not even the full-resync mark could be written: writes are refused. */
    failure?: string | null;
  } | null;
}

/** blockfork status */
export async function status(argv: string[]): Promise<number> {
  const { dir, values } = stateDirArg(argv, {});
  const s = (await adminCall(dir, "GET", "/status")) as Status;
  if (values.json) {
    process.stdout.write(JSON.stringify(s, null, 2) + "\n");
    return 0;
  }
  process.stdout.write(statusText(s));
  return 0;
}

/** The text `blockfork status` prints for a proxy's status document. */
export function statusText(s: Status): string {
  const lines = [
    `volume    ${s.volume.path} (${formatSize(s.volume.size)}), export "${s.volume.name}", ${s.nbd.connections} NBD connections`,
  ];
  if (s.link) {
    const l = s.link;
    lines.push(`gateway   ${l.gateway} (${l.mode})`);
    lines.push(
      `link      ${l.state} since ${l.since}${l.reason ? ` (${l.reason})` : ""}; ${l.outages} outages` +
        (l.transport
          ? `; batches ${l.transport === "stream" ? "on the update stream" : "as POST requests"}`
          : ""),
    );
    lines.push(
      `queue     ${l.queue.updates} updates, ${formatSize(l.queue.bytes)}, oldest ${l.queue.oldestMs} ms; seq ${l.seq}, durable through ${l.durableThrough}`,
    );
    if (l.secondary) {
      // While the link tracks, what the gateway said is from before the outage: the secondary
      // lacks every dirty block since, and the gateway may have failed since (its disk).
      const then = l.state === "tracking" ? ", before the link went down; it lacks what is dirty since" : "";
      lines.push(
        `secondary ${l.secondary}` +
          (l.secondary === "consistent"
            ? ` (a crash-consistent image of the primary, as the gateway last reported${then})`
            : l.secondary === "inconsistent"
              ? " (the gateway says: not a usable image until a resync finishes)"
              : " (the gateway has not been told yet)"),
      );
    }
    if (l.mirror) {
      lines.push(
        `mirror    ${l.mirror}` +
          (l.mirrorError
            ? `: FAILING (${l.mirrorError}, at ${new Date(l.mirrorErrorAt ?? 0).toISOString()})`
            : ""),
      );
    }
    // The link keeps its last failure after it recovers: shown, with its time, only while the
    // link is not streaming (then it is why), never as if it were current.
    if (l.lastError && l.state !== "streaming") {
      const at = l.lastErrorAt ? ` (at ${new Date(l.lastErrorAt).toISOString()})` : "";
      lines.push(`error     ${l.lastError}${at}`);
    }
    if (l.resync.running || l.state === "resyncing") {
      const skipped = l.resync.unreadableBytes ?? 0;
      lines.push(
        `resync    ${progressText(l.resync.doneBytes, l.resync.totalBytes, l.resync.bytesPerSecond, l.resync.etaSeconds)}` +
          (skipped > 0 ? `; ${formatBytes(skipped)} unreadable on the primary, not counted` : ""),
      );
    }
    const u = l.unreadable;
    if (u && u.blocks > 0) lines.push(`unreadable ${unreadableText(u)}`);
  }
  if (s.tracking) {
    const t = s.tracking;
    lines.push(
      `dirty     ${formatSize(t.dirtyBytes)} at ${formatSize(t.granularity)} granularity` +
        (t.firstDirtied ? `, first ${t.firstDirtied}, last ${t.lastDirtied}` : ""),
    );
    if (t.degraded) {
      lines.push(
        `tracking  FAILED at ${t.degraded.since} (${t.degraded.reason}): running from memory; ` +
          "the next start resyncs the whole volume",
      );
    } else if (t.failure) {
      lines.push(
        `tracking  FAILED (${t.failure}) and the full-resync mark could not be written either: ` +
          "writes are refused (EIO) until the proxy restarts; check the state directory's disk",
      );
    }
  }
  return lines.join("\n") + "\n";
}

/** What the unreadable line says: how much, where, the error, when, and what happens to them. */
function unreadableText(u: UnreadableStatus): string {
  const where = u.ranges.map((r) => `[${r.offset}, ${r.offset + r.length})`).join(" ");
  const more = u.ranges.reduce((n, r) => n + r.length, 0) < u.bytes ? " ..." : "";
  return (
    `${u.blocks} blocks (${formatBytes(u.bytes)}) of the primary cannot be read; the secondary ` +
    `differs there: ${where}${more} (${u.error}; first at ${u.firstErrorAt}, last at ${u.lastErrorAt}); ` +
    `they stay dirty and are retried every ${Math.round(u.retryMs / 1000)} s`
  );
}

function progressText(done: number, total: number, rate: number, eta: number | null): string {
  const pct = total > 0 ? Math.min(100, (100 * done) / total) : 100;
  return `${formatBytes(done)} of ${formatBytes(total)} (${pct.toFixed(1)}%), ${formatBytes(rate)}/s, ETA ${eta === null ? "?" : `${eta} s`}`;
}

function formatBytes(n: number): string {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${u[i]}`;
}

function bar(done: number, total: number, suffix: string): void {
  if (!process.stderr.isTTY) return;
  const width = 30;
  const f = total > 0 ? Math.min(1, done / total) : 1;
  const full = Math.round(f * width);
  process.stderr.write(`\r[${"#".repeat(full)}${"-".repeat(width - full)}] ${suffix}\x1b[K`);
}

/** blockfork tracking show */
export async function tracking(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  if (sub !== "show")
    throw new UsageError(
      sub === undefined ? `the subcommand "show" is missing` : `the subcommand is "show", not "${sub}"`,
    );
  const { dir, values } = stateDirArg(rest, { limit: { type: "string" } });
  const limit = values.limit ? Number(values.limit) : 1000;
  if (!Number.isSafeInteger(limit) || limit <= 0) throw new UsageError("--limit must be a positive integer");
  const t = (await adminCall(dir, "GET", `/tracking?limit=${limit}`)) as {
    dirtyBytes: number;
    granularity: number;
    truncated: boolean;
    extents: { offset: number; length: number; firstDirtied: string; lastDirtied: string }[];
  };
  if (values.json) {
    process.stdout.write(JSON.stringify(t, null, 2) + "\n");
    return 0;
  }
  const out = [`${"offset".padStart(16)} ${"length".padStart(14)}  first dirtied              last dirtied`];
  for (const x of t.extents) {
    out.push(
      `${String(x.offset).padStart(16)} ${String(x.length).padStart(14)}  ${x.firstDirtied}  ${x.lastDirtied}`,
    );
  }
  out.push(
    `${t.extents.length}${t.truncated ? "+" : ""} extents, ${t.dirtyBytes} bytes dirty (${formatSize(t.granularity)} blocks)` +
      (t.truncated ? `; more than --limit ${limit}` : ""),
  );
  process.stdout.write(out.join("\n") + "\n");
  return 0;
}

/** blockfork verify */
export async function verifyCommand(argv: string[]): Promise<number> {
  const { dir, values } = stateDirArg(argv, { repair: { type: "boolean" } });
  const repair = values.repair === true;
  const started = performance.now();
  const r = (await adminCall(dir, "POST", `/verify${repair ? "?repair=1" : ""}`, (line) => {
    const p = (line as { progress?: { done: number; total: number } }).progress;
    if (p) {
      const secs = (performance.now() - started) / 1000;
      bar(p.done, p.total, progressText(p.done, p.total, secs > 0 ? p.done / secs : 0, null));
    }
  })) as {
    result?: {
      mismatchedBlocks: number;
      skippedBlocks: number;
      blocks: number;
      checkedBytes: number;
      mismatches: { offset: number; length: number }[];
      repaired: boolean;
      seconds: number;
    };
    error?: { message: string };
  };
  if (process.stderr.isTTY) process.stderr.write("\n");
  if (r.error || !r.result) throw new Error(r.error?.message ?? "verify gave no result");
  const res = r.result;
  if (values.json) process.stdout.write(JSON.stringify(res, null, 2) + "\n");
  else {
    const lines = [
      `verified ${formatBytes(res.checkedBytes)} in ${res.seconds.toFixed(1)} s: ${res.blocks} blocks, ` +
        `${res.mismatchedBlocks} differ, ${res.skippedBlocks} dirty (skipped)`,
    ];
    for (const m of res.mismatches.slice(0, 50))
      lines.push(`  differs: offset ${m.offset}, length ${m.length}`);
    if (res.mismatches.length > 50) lines.push(`  ... ${res.mismatches.length - 50} more extents`);
    if (res.repaired)
      lines.push("repair: the differing blocks are marked dirty and resyncing (see blockfork status)");
    process.stdout.write(lines.join("\n") + "\n");
  }
  return res.mismatchedBlocks > 0 && !res.repaired ? 3 : 0;
}

/** blockfork resync */
export async function resyncCommand(argv: string[]): Promise<number> {
  const { dir, values } = stateDirArg(argv, { full: { type: "boolean" }, "no-wait": { type: "boolean" } });
  const started = (await adminCall(dir, "POST", `/resync${values.full ? "?full=1" : ""}`)) as {
    dirtyBytes: number;
    running?: boolean;
    state: string;
    lastError?: string;
  };
  if (started.state === "tracking") {
    // The proxy checked the gateway when asked (see the admin handler): this is that check.
    process.stdout.write(
      `the gateway is not reachable (${started.lastError ?? "no answer"}); the proxy keeps tracking ` +
        `${formatBytes(started.dirtyBytes)} dirty and resyncs when it returns\n`,
    );
    return 1;
  }
  process.stdout.write(
    started.running === true
      ? `a resync was running already: ${formatBytes(started.dirtyBytes)} dirty when asked\n`
      : `resync started: ${formatBytes(started.dirtyBytes)} dirty\n`,
  );
  if (values["no-wait"]) return 0;
  for (;;) {
    await new Promise((r) => setTimeout(r, 250));
    const s = (await adminCall(dir, "GET", "/status")) as Status;
    const l = s.link!;
    bar(
      l.resync.doneBytes,
      l.resync.totalBytes,
      progressText(l.resync.doneBytes, l.resync.totalBytes, l.resync.bytesPerSecond, l.resync.etaSeconds),
    );
    if (l.state === "streaming") {
      if (process.stderr.isTTY) process.stderr.write("\n");
      const u = l.unreadable;
      if (u && u.blocks > 0) {
        // Streaming, but the secondary is not a copy of the primary: say so, and fail the command.
        process.stdout.write(
          `resync finished: ${formatBytes(l.resync.doneBytes)} copied; streaming, but ${unreadableText(u)}\n`,
        );
        return 1;
      }
      process.stdout.write(`resync complete: ${formatBytes(l.resync.doneBytes)} copied; streaming\n`);
      return 0;
    }
    if (l.state === "tracking") {
      if (process.stderr.isTTY) process.stderr.write("\n");
      process.stdout.write(
        `the resync did not finish: the link is tracking again (${l.lastError || l.reason}); the proxy ` +
          "resyncs when the gateway answers again\n",
      );
      return 1;
    }
  }
}

export const MARK_HELP = `Usage: blockfork mark NAME --state-dir DIR [--replace]

Bookmark the current point in time of a running proxy with a PIT journal (--pit). The bookmark is
served as the read-only export snap@NAME and listed by NBD_OPT_LIST (nbdinfo --list). It shows the
volume at exactly that time, with every write completed before it (not rounded down to the merge
window, as snap@<time> is): sync or freeze the filesystem first, then mark.
NAME: 1-64 letters, digits, '.', '_', ':' or '-'. A NAME already bookmarked is refused (the earlier
point would be lost); --replace moves that bookmark to now.
Within the first merge window of a new or restarted journal no point in time exists yet: mark
waits for the first one (a second by default) and records the bookmark then.
Exit status: 0; 1 when no proxy answers, the journal is stopped, or the first point in time is
more than 10 s away (a --pit-window over 10 s: the message says when; mark again then); 2 on a
usage error (a NAME already bookmarked without --replace).
`;

export const SNAPSHOTS_HELP = `Usage: blockfork snapshots --state-dir DIR [--json]

Show the points in time a proxy can serve (snap@<ISO-8601 time> within the window, in steps of the
merge window), its bookmarks (snap@NAME), the journal's size, the ranges of time that passed twice
because the wall clock went back (snap@ a time in one is refused: use a bookmark), and the snapshot
views open (one per point, shared by every connection to it, with their connection counts). With
no proxy running, the journal in DIR/journal is read directly (the window then ends at the last
journaled change).
Exit status: 0 (also when no proxy answers and the journal is read directly); 1 on failure; 2 on
a usage error or when no proxy answers and DIR holds no journal.
`;

/** The same summary read from the journal directory itself, when no proxy runs. */
function offlineSnapshots(dir: string): SnapshotsReport {
  const jdir = join(dir, "journal");
  if (!existsSync(jdir))
    throw new UsageError(`no proxy is running with --state-dir ${dir} and it holds no journal`);
  const s = Journal.inspect({ dir: jdir, volumeSize: 1, log: Logger.create("error") });
  const iso = (t: number | null): string | null => (t === null ? null : new Date(t).toISOString());
  return {
    earliest: s.entries > 0 || s.earliest !== null ? iso(s.earliest) : null,
    // Nothing changed after the last entry; when that came before the first point (all changes in
    // the first merge window), the first point is the only one, not an empty window.
    latest: new Date(Math.max(s.latest ?? Date.now(), s.earliest ?? 0)).toISOString(),
    windowMs: s.windowMs,
    stopped: s.stopped ? { at: "?", reason: "the journal was stopped when the proxy ended" } : null,
    journalBytes: s.bytes,
    segments: s.segments,
    entries: s.entries,
    bookmarks: [...s.bookmarks].map(([name, ts]) => ({ name, time: iso(ts), export: `snap@${name}` })),
    passedTwice: s.passedTwice.map(([from, to]) => ({ from: iso(from)!, to: iso(to)! })),
    offline: true,
  };
}

/** blockfork mark NAME */
export async function mark(argv: string[]): Promise<number> {
  const { dir, values, positionals } = stateDirArg(argv, { replace: { type: "boolean" } }, 1);
  if (positionals.length !== 1) throw new UsageError("give one bookmark NAME");
  const replace = values.replace === true ? "&replace=1" : "";
  const r = (await adminCall(dir, "POST", `/mark?name=${encodeURIComponent(positionals[0])}${replace}`)) as {
    name: string;
    time: string;
    export: string;
  };
  process.stdout.write(`bookmark "${r.name}" at ${r.time}: export ${r.export}\n`);
  return 0;
}

/** blockfork snapshots */
export async function snapshots(argv: string[]): Promise<number> {
  const { dir, values } = stateDirArg(argv, {});
  let answer: unknown;
  try {
    answer = proxyRunning(dir) ? await adminCall(dir, "GET", "/snapshots") : offlineSnapshots(dir);
  } catch (e) {
    // A socket left behind by a killed proxy: nobody answers, read the journal itself.
    if (!(e instanceof NoProxyError)) throw e;
    answer = offlineSnapshots(dir);
  }
  const s = answer as SnapshotsReport;
  if (values.json) {
    process.stdout.write(JSON.stringify(s, null, 2) + "\n");
    return 0;
  }
  const lines = [
    s.earliest === null
      ? `window    none${s.stopped ? ` (journal stopped at ${s.stopped.at}: ${s.stopped.reason})` : ""}`
      : `window    ${s.earliest} .. ${s.latest} (snap@<time>, in steps of ${s.windowMs} ms)`,
    `journal   ${formatBytes(s.journalBytes)} in ${s.segments} segments, ${s.entries} before-images`,
  ];
  if (s.bookmarks.length === 0) lines.push("bookmarks none (blockfork mark NAME)");
  for (const b of s.bookmarks) lines.push(`bookmark  ${b.export.padEnd(24)} ${b.time}`);
  for (const r of s.passedTwice ?? []) {
    lines.push(`twice     ${r.from} .. ${r.to} (the clock went back: snap@ these times is refused)`);
  }
  for (const v of s.views ?? []) {
    lines.push(
      `view      ${v.point}: ${v.connections} connection${v.connections === 1 ? "" : "s"}, ` +
        `${v.journalBlocks} blocks from the journal${v.broken ? ` (broken: ${v.broken})` : ""}`,
    );
  }
  process.stdout.write(lines.join("\n") + "\n");
  return 0;
}
