// The exports registry: how NBD_OPT_LIST, INFO, GO and EXPORT_NAME find what to serve. It is its
// own piece because exports are not only the primary: providers (the PIT snapshot views of later
// issues, `snap@<time>`, `snap@<bookmark>`) answer for names they recognise, open views on demand
// and are told when a connection lets go of one. NBD_OPT_INFO and the meta-context options only
// ask what an export is (info): a provider may answer that without opening anything (a snapshot
// view's pointer map costs up to a GiB), refusing exactly what open would refuse.

import { UsageError } from "../errors.js";
import type { Volume, VolumeCaps } from "../volume/volume.js";
import { MAX_STRING } from "./wire.js";

/** NBD block size constraints advertised with NBD_INFO_BLOCK_SIZE. */
export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

/** Default constraints: byte-granular files, 4 KiB preferred, 32 MiB per request (the kernel's cap). */
export const DEFAULT_BLOCK_SIZES: BlockSizes = { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };

/** An export opened for one connection. */
export interface OpenExport {
  /** Canonical name (NBD_INFO_NAME). */
  name: string;
  description: string;
  volume: Volume;
  blockSizes: BlockSizes;
  /** Called once when the connection is done with it. */
  release(): void;
}

/** What NBD_OPT_INFO tells of an export, without opening it for a connection. */
export interface ExportInfo {
  /** Canonical name (NBD_INFO_NAME). */
  name: string;
  description: string;
  size: number;
  caps: VolumeCaps;
  blockSizes: BlockSizes;
}

/** An entry of NBD_OPT_LIST. */
export interface ExportListing {
  name: string;
  description: string;
}

/** Why a name could not be opened: shown to the client in NBD_REP_ERR_UNKNOWN's message. */
export interface ExportRefusal {
  message: string;
}

/** Something that answers for a family of names (e.g. every `snap@...`). */
export interface ExportProvider {
  /** True when this provider owns `name` (it then answers open() for it, success or refusal). */
  owns(name: string): boolean;
  open(name: string): Promise<OpenExport | ExportRefusal>;
  /**
   * What open(name) would serve, or its refusal (the same message), without opening it. Without
   * this, info opens and releases at once.
   */
  info?(name: string): Promise<ExportInfo | ExportRefusal>;
  /** Entries to show in NBD_OPT_LIST. */
  list(): ExportListing[];
}

/** A fixed export served from one shared volume (the primary). */
export interface StaticExport {
  name: string;
  description: string;
  volume: Volume;
  blockSizes: BlockSizes;
}

/** Check block size constraints against proto.md's rules; throws UsageError with what is wrong. */
/** The largest maximum block size `--block-size` may advertise. */
export const MAX_BLOCK_LIMIT = 64 * 1024 * 1024;

export function checkBlockSizes(b: BlockSizes, exportSize: number): void {
  const pow2 = (n: number): boolean => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
  if (!pow2(b.minimum) || b.minimum > 65536) {
    throw new UsageError(`minimum block size ${b.minimum} must be a power of 2 between 1 and 65536`);
  }
  if (!pow2(b.preferred) || b.preferred < Math.max(b.minimum, 512)) {
    throw new UsageError(
      `preferred block size ${b.preferred} must be a power of 2, at least max(minimum, 512)`,
    );
  }
  if (
    !Number.isInteger(b.maximum) ||
    b.maximum % b.minimum !== 0 ||
    b.maximum < Math.min(b.preferred, exportSize)
  ) {
    throw new UsageError(
      `maximum block size ${b.maximum} must be a multiple of the minimum and at least min(preferred, export size)`,
    );
  }
  // A request's data is held in memory, and a structured reply's chunk length (8 + data) is 32
  // bits: past 4 GiB - 8 a read could not even be described. nbdkit caps requests at 64 MiB too.
  if (b.maximum > MAX_BLOCK_LIMIT) {
    throw new UsageError(
      `maximum block size ${b.maximum} is over ${MAX_BLOCK_LIMIT} (64 MiB), the largest request blockfork takes`,
    );
  }
  if (exportSize % b.minimum !== 0) {
    throw new UsageError(
      `export size ${exportSize} is not a multiple of the minimum block size ${b.minimum}`,
    );
  }
}

/** Resolves export names for the handshake. */
export class ExportRegistry {
  private readonly statics = new Map<string, StaticExport>();
  private defaultName: string | undefined;
  private readonly providers: ExportProvider[] = [];

  /** Add a fixed export; the first one added (or one with `isDefault`) also answers to "". */
  addStatic(e: StaticExport, isDefault = false): void {
    if (Buffer.byteLength(e.name) > MAX_STRING)
      throw new UsageError(`export name longer than ${MAX_STRING} bytes`);
    if (Buffer.byteLength(e.description) > MAX_STRING)
      throw new UsageError(
        `export description longer than ${MAX_STRING} bytes, the NBD limit for strings: shorten --description`,
      );
    if (this.statics.has(e.name)) throw new UsageError(`export "${e.name}" is defined twice`);
    this.statics.set(e.name, e);
    if (isDefault || this.defaultName === undefined) this.defaultName = e.name;
  }

  /** Add a provider for a family of names. */
  addProvider(p: ExportProvider): void {
    this.providers.push(p);
  }

  /** Exports for NBD_OPT_LIST: the fixed ones, then what providers list. */
  list(): ExportListing[] {
    const out: ExportListing[] = [];
    for (const e of this.statics.values()) out.push({ name: e.name, description: e.description });
    for (const p of this.providers) for (const e of p.list()) out.push(e);
    return out;
  }

  /**
   * Open an export by name ("" = the default) for a client session `client` (a label for logs and
   * per-session state such as the PIT journal's partial journals).
   */
  async open(name: string, client = "client"): Promise<OpenExport | ExportRefusal> {
    const key = name === "" ? this.defaultName : name;
    const s = key === undefined ? undefined : this.statics.get(key);
    if (s) {
      const session = s.volume.openSession?.(client);
      return {
        name: s.name,
        description: s.description,
        volume: session?.volume ?? s.volume,
        blockSizes: s.blockSizes,
        release: () => session?.close(),
      };
    }
    for (const p of this.providers) if (p.owns(name)) return p.open(name);
    return this.unknown(name);
  }

  /**
   * What open(name) would serve (NBD_OPT_INFO, the meta-context options), or the same refusal,
   * without opening a session or a view where the provider can say it without one.
   */
  async info(name: string): Promise<ExportInfo | ExportRefusal> {
    const key = name === "" ? this.defaultName : name;
    const s = key === undefined ? undefined : this.statics.get(key);
    if (s) {
      const { description, volume, blockSizes } = s;
      return { name: s.name, description, size: volume.size, caps: volume.caps(), blockSizes };
    }
    for (const p of this.providers) {
      if (!p.owns(name)) continue;
      if (p.info) return p.info(name);
      const opened = await p.open(name);
      if (!isOpen(opened)) return opened;
      opened.release();
      const { description, volume, blockSizes } = opened;
      return { name: opened.name, description, size: volume.size, caps: volume.caps(), blockSizes };
    }
    return this.unknown(name);
  }

  private unknown(name: string): ExportRefusal {
    const names = [...this.statics.keys()].map((n) => `"${n}"`).join(", ");
    return {
      message: `no export named "${name}" (this server has ${names || "none"}; NBD_OPT_LIST lists them)`,
    };
  }
}

/** True when open() succeeded. */
export function isOpen(r: OpenExport | ExportInfo | ExportRefusal): r is OpenExport {
  return (r as OpenExport).volume !== undefined;
}

/** True when info() found the export. */
export function isInfo(r: ExportInfo | ExportRefusal): r is ExportInfo {
  return (r as ExportInfo).caps !== undefined;
}
