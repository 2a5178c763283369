// The gateway's state directory: `sources.json` (the idempotency state of every source, written at
// each flush and at shutdown), the fault trigger file `fault`, and the tracking-mirror documents
// under `mirror/`.
//
// Crash safety: every document is replaced atomically (write a temporary file, fsync it, rename
// it over the old one, fsync the directory), so a crash leaves either the old or the new version.
// sources.json is written only after the fdatasync of the secondary that its durableThrough values
// describe, so it never claims more than the disk holds. Losing the latest version is harmless:
// durableThrough only moves back, and the proxy resends what it has not seen acknowledged durable.
//
// sources.json:
//   {"version": 1, "volume": {"name": "...", "size": N}, "savedAt": "ISO time",
//    "sources": [{"source": "hex", "generation": G, "durableThrough": D, "floor": F,
//                 "incarnation": "hex" (the proxy process that sent generation G)}, ...],
//    "owner": {"source": "hex", "since": "ISO time"} | null (the one source whose updates apply),
//    "running": true|false, "secondary": {"state": "consistent"|"inconsistent"|"unknown",
//    "since": "ISO time", "reason": "...", "source": "hex"|null}}
// `running` is true from the gateway's start to its clean stop; `secondary` is what is known of
// the secondary as an image of the primary (gateway.ts). Files written before those two fields
// existed load as "unknown".

import { randomBytes } from "node:crypto";
import { mkdirSync, readFileSync } from "node:fs";
import { writeFileAtomicSync } from "../util/atomic.js";
import { open, rename, unlink } from "node:fs/promises";
import { dirname, join } from "node:path";
import { UsageError } from "../errors.js";
import { stateDirAdvice } from "../util/dir-hint.js";
import type { SourceSnapshot } from "./sequencer.js";
import type { Owner, SecondaryState } from "./gateway.js";

export const STATE_FILE = "sources.json";
/** The secondary's id (16 hex digits): new for every new secondary, reported by /v1/health. */
export const SECONDARY_ID_FILE = "secondary-id";
export const FAULT_FILE = "fault";
export const MIRROR_DIR = "mirror";

/** Create the state directory (and mirror/) if needed. Throws UsageError with what to do. */
export function prepareStateDir(dir: string): void {
  try {
    mkdirSync(join(dir, MIRROR_DIR), { recursive: true });
  } catch (e) {
    throw new UsageError(
      `cannot create the state directory ${dir} (${(e as Error).message}): ` + stateDirAdvice(dir, e),
    );
  }
}

/**
 * The secondary's id: read from the state directory, or made and stored when `fresh` (a new
 * secondary: a new state directory, or another file at the volume's path) or none is stored yet.
 * A proxy whose tracking log knows another id resyncs the whole volume.
 */
export function secondaryId(dir: string, fresh: boolean): string {
  const path = join(dir, SECONDARY_ID_FILE);
  if (!fresh) {
    try {
      const id = readFileSync(path, "utf8").trim();
      if (/^[0-9a-f]{16}$/.test(id)) return id;
    } catch {
      // none yet: made below
    }
  }
  const id = randomBytes(8).toString("hex");
  writeFileAtomicSync(path, id + "\n");
  return id;
}

let tmpCounter = 0;

/** Replace `path` with `data` atomically and durably (tmp file, fsync, rename, fsync of the dir). */
export async function writeFileAtomic(path: string, data: string | Buffer): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}-${tmpCounter++}`;
  const fh = await open(tmp, "w", 0o644);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } catch (e) {
    await fh.close();
    await unlink(tmp).catch(() => {});
    throw e;
  }
  await fh.close();
  try {
    await rename(tmp, path);
  } catch (e) {
    await unlink(tmp).catch(() => {});
    throw e;
  }
  const dir = await open(dirname(path), "r");
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}

/** What sources.json holds about the volume it belongs to. */
export interface VolumeIdentity {
  name: string;
  size: number;
}

function isCount(v: unknown): v is number {
  return typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
}

/**
 * Load the persisted sources of `dir` (empty when there is no sources.json yet). A file that is
 * not ours, or was written for a volume of another size, is a UsageError that says what to do.
 */
export function loadSources(dir: string, volume: VolumeIdentity): Map<string, SourceSnapshot> {
  const path = join(dir, STATE_FILE);
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return new Map();
    throw new UsageError(`cannot read ${path}: ${(e as Error).message}`);
  }
  const fix = `move it away to start with empty idempotency state (proxies then resend what is not durable)`;
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (e) {
    throw new UsageError(`${path} is not valid JSON (${(e as Error).message}); ${fix}`);
  }
  const d = doc as { version?: unknown; volume?: { size?: unknown }; sources?: unknown };
  if (typeof doc !== "object" || doc === null || d.version !== 1 || !Array.isArray(d.sources)) {
    throw new UsageError(`${path} is not a blockfork gateway state file (version 1); ${fix}`);
  }
  if (d.volume?.size !== volume.size) {
    throw new UsageError(
      `${path} was written for a volume of ${String(d.volume?.size)} bytes, but the volume is ` +
        `${volume.size} bytes; use another --state-dir for this volume, or ${fix}`,
    );
  }
  const out = new Map<string, SourceSnapshot>();
  for (const s of d.sources as unknown[]) {
    const e = s as {
      source?: unknown;
      generation?: unknown;
      durableThrough?: unknown;
      floor?: unknown;
      incarnation?: unknown;
    };
    if (
      typeof e.source !== "string" ||
      !isCount(e.generation) ||
      !isCount(e.durableThrough) ||
      !isCount(e.floor) ||
      (e.incarnation !== undefined && typeof e.incarnation !== "string")
    ) {
      throw new UsageError(`${path} has a malformed source entry ${JSON.stringify(s)}; ${fix}`);
    }
    const snap: SourceSnapshot = {
      generation: e.generation,
      durableThrough: e.durableThrough,
      floor: e.floor,
    };
    if (typeof e.incarnation === "string") snap.incarnation = e.incarnation;
    out.set(e.source, snap);
  }
  return out;
}

/**
 * sources.json's `secondary` and `running` (null when absent: no file, or an older one). The file
 * was checked by loadSources(); a malformed `secondary` is a UsageError.
 */
export function loadSecondary(dir: string): {
  secondary: SecondaryState | null;
  running: boolean | null;
  owner: Owner | null;
} {
  const path = join(dir, STATE_FILE);
  let doc: { secondary?: Partial<SecondaryState> | null; running?: unknown; owner?: Partial<Owner> | null };
  try {
    doc = JSON.parse(readFileSync(path, "utf8")) as typeof doc;
  } catch {
    return { secondary: null, running: null, owner: null };
  }
  const running = typeof doc.running === "boolean" ? doc.running : null;
  let owner: Owner | null = null;
  if (doc.owner !== undefined && doc.owner !== null) {
    const o = doc.owner;
    if (typeof o.source !== "string" || typeof o.since !== "string") {
      throw new UsageError(
        `${path} has a malformed "owner" entry ${JSON.stringify(o).slice(0, 200)}; remove that ` +
          `entry to let the next proxy that writes own the secondary`,
      );
    }
    owner = { source: o.source, since: o.since };
  }
  if (doc.secondary === undefined) return { secondary: null, running, owner };
  const x = doc.secondary;
  if (
    typeof x !== "object" ||
    x === null ||
    (x.state !== "consistent" && x.state !== "inconsistent" && x.state !== "unknown") ||
    typeof x.since !== "string" ||
    typeof x.reason !== "string" ||
    (x.source !== null && typeof x.source !== "string")
  ) {
    throw new UsageError(
      `${path} has a malformed "secondary" entry ${JSON.stringify(doc.secondary).slice(0, 200)}; ` +
        `remove that entry to start with the secondary's consistency unknown`,
    );
  }
  return {
    secondary: { state: x.state, since: x.since, reason: x.reason, source: x.source },
    running,
    owner,
  };
}

/**
 * Writes sources.json with group commit: save() resolves after a write that started at or after
 * the call; calls made while a write runs share the one write that follows it.
 */
export class StateWriter {
  private running: Promise<void> | null = null;
  private next: Promise<void> | null = null;

  constructor(
    /** The state directory. */
    readonly dir: string,
    private readonly volume: VolumeIdentity,
    private readonly sources: () => Iterable<[string, SourceSnapshot]>,
    /** `running` and `secondary` (gateway.ts); left out when not given. */
    private readonly more: () => {
      running: boolean;
      secondary: SecondaryState;
      owner: Owner | null;
    } | null = () => null,
  ) {}

  save(): Promise<void> {
    if (this.next) return this.next;
    if (!this.running) return this.start();
    const after = (): Promise<void> => {
      this.next = null;
      return this.start();
    };
    this.next = this.running.then(after, after);
    return this.next;
  }

  private start(): Promise<void> {
    const list = [...this.sources()].map(([source, s]) => ({ source, ...s }));
    const doc = {
      version: 1,
      volume: this.volume,
      savedAt: new Date().toISOString(),
      sources: list,
      ...this.more(),
    };
    const p = writeFileAtomic(join(this.dir, STATE_FILE), JSON.stringify(doc, null, 1) + "\n");
    this.running = p;
    const clear = (): void => {
      if (this.running === p) this.running = null;
    };
    p.then(clear, clear);
    return p;
  }
}
