// The tracking mirror (docs/gateway-api.md, "PUT /v1/tracking/{volumeId}"): while a proxy's own
// gateway link is down, it sends its dirty extents here, so the secondary site knows which of its
// blocks are stale even if the proxy host is lost. The latest document per volume id is kept in
// `<state-dir>/mirror/<volumeId>.json`, replaced atomically; PUTs for one id are written one at a
// time, in arrival order, so the file ends with the last one.

import { readdirSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { badRequest, HttpError } from "./http.js";
import { MIRROR_DIR, writeFileAtomic } from "./state.js";

const ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

/** Volumes whose documents a mirror keeps at most (as many as the sources a gateway keeps). */
export const MAX_MIRRORED = 1024;

/** Check a volume id from the path: it names a file, so it is kept to safe characters. */
export function checkVolumeId(id: string): void {
  if (!ID.test(id)) {
    throw badRequest(
      `volume id ${JSON.stringify(id.slice(0, 140))} must be 1 to 128 letters, digits, ".", "_" or "-", ` +
        `starting with a letter or digit`,
    );
  }
}

function isCount(v: unknown): boolean {
  return typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
}

/** Check a tracking document (throws 400 saying what is wrong). */
export function checkTrackingDoc(id: string, doc: unknown): Record<string, unknown> {
  if (typeof doc !== "object" || doc === null || Array.isArray(doc)) {
    throw badRequest("the tracking document must be a JSON object");
  }
  const d = doc as Record<string, unknown>;
  if (d.volumeId !== id) {
    throw badRequest(`the document's volumeId ${JSON.stringify(d.volumeId)} must equal the path's "${id}"`);
  }
  if (!Array.isArray(d.extents)) throw badRequest(`"extents" must be an array of {offset, length, ...}`);
  for (const [i, e] of (d.extents as unknown[]).entries()) {
    const x = e as { offset?: unknown; length?: unknown } | null;
    if (typeof x !== "object" || x === null || !isCount(x.offset) || !isCount(x.length) || x.length === 0) {
      throw badRequest(`extents[${i}] must be {"offset": N, "length": N > 0, ...} with integers`);
    }
  }
  for (const k of ["dirtyBytes", "extentCount"]) {
    if (d[k] !== undefined && !isCount(d[k])) throw badRequest(`"${k}" must be a non-negative integer`);
  }
  return d;
}

/** The stored tracking documents of a state directory. */
export class TrackingMirror {
  private readonly chains = new Map<string, Promise<void>>();

  constructor(
    private readonly stateDir: string,
    private readonly maxVolumes = MAX_MIRRORED,
  ) {}

  private path(id: string): string {
    return join(this.stateDir, MIRROR_DIR, `${id}.json`);
  }

  /** The ids with a stored document (read from the directory at the first PUT). */
  private ids: Set<string> | null = null;

  /** Store the latest document for `id` (checked already); 507 for a new id past the limit. */
  put(id: string, doc: Record<string, unknown>): Promise<void> {
    if (this.ids === null) {
      try {
        const files = readdirSync(join(this.stateDir, MIRROR_DIR));
        this.ids = new Set(files.filter((f) => f.endsWith(".json")).map((f) => f.slice(0, -5)));
      } catch {
        this.ids = new Set();
      }
    }
    if (!this.ids.has(id)) {
      if (this.ids.size >= this.maxVolumes) {
        return Promise.reject(
          new HttpError(
            507,
            "ERR_NO_SPACE",
            `this mirror already keeps the tracking of ${this.maxVolumes} volumes (its limit): remove the ` +
              `documents of volumes gone for good from ${join(this.stateDir, MIRROR_DIR)}, then retry`,
          ),
        );
      }
      this.ids.add(id);
    }
    const text = JSON.stringify(doc) + "\n";
    const prev = this.chains.get(id) ?? Promise.resolve();
    const p = prev.then(
      () => writeFileAtomic(this.path(id), text),
      () => writeFileAtomic(this.path(id), text),
    );
    this.chains.set(id, p);
    const clear = (): void => {
      if (this.chains.get(id) === p) this.chains.delete(id);
    };
    p.then(clear, clear);
    return p;
  }

  /** The latest document for `id` as stored JSON text, or null before the first PUT. */
  async get(id: string): Promise<string | null> {
    await this.chains.get(id)?.catch(() => {});
    try {
      return await readFile(this.path(id), "utf8");
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return null;
      throw e;
    }
  }

  /** Wait for the writes in progress (shutdown). */
  async settle(): Promise<void> {
    await Promise.allSettled([...this.chains.values()]);
  }
}
