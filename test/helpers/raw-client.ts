// A minimal raw NBD client for tests: it writes exactly the bytes a test asks for (valid or not)
// and reads the server's answers byte by byte, so tests can check the wire format and how the
// server copes with broken clients. Also an in-process server (NbdServer over in-memory exports)
// for unit tests, with its log captured.
//
// Nothing here interprets more than a test needs: helpers that parse a reply check its magic and
// throw a RawProtocolError (code ERR_RAW_PROTOCOL) on anything unexpected, and every read has a
// deadline so a silent server fails the test instead of hanging it.

import { connect, type Socket } from "node:net";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Logger, type LogLevel } from "../../src/log.js";
import { NbdServer } from "../../src/nbd/server.js";
import { DEFAULT_BLOCK_SIZES, ExportRegistry, type BlockSizes } from "../../src/nbd/exports.js";
import type { Volume } from "../../src/volume/volume.js";

// ---- constants (written out here rather than imported, so the tests check src/nbd/wire.ts)

export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_MAGIC = 0x67446698;
export const STRUCTURED_MAGIC = 0x668e33ef;
export const REP_ACK = 1;
export const REP_ERR_BIT = 0x80000000;

/** A read timed out. */
export class RawTimeoutError extends Error {
  readonly code = "ERR_RAW_TIMEOUT";
}
/** The server closed the connection before sending what was asked for. */
export class RawClosedError extends Error {
  readonly code = "ERR_RAW_CLOSED";
}
/** The server sent something that is not what the helper expected. */
export class RawProtocolError extends Error {
  readonly code = "ERR_RAW_PROTOCOL";
}

/** One option reply. */
export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

/** A request as the test wants to send it; any field may be invalid. */
export interface RawRequest {
  type: number;
  flags?: number;
  cookie?: bigint;
  offset?: number | bigint;
  length?: number;
  magic?: number;
}

/** A simple reply header. */
export interface SimpleReply {
  error: number;
  cookie: bigint;
}

/** One structured reply chunk. */
export interface Chunk {
  flags: number;
  type: number;
  cookie: bigint;
  payload: Buffer;
}

/** The result of a handshake that entered transmission. */
export interface Session {
  size: number;
  flags: number;
  /** Every option reply received during the handshake, in order. */
  replies: OptionReply[];
}

/** Options of RawClient.handshake(). */
export interface HandshakeOptions {
  /** Client flags (default FIXED_NEWSTYLE | NO_ZEROES = 3). */
  clientFlags?: number;
  /** Export name for GO (default ""). */
  name?: string;
  /** Negotiate structured replies first. */
  structured?: boolean;
  /** SET_META_CONTEXT queries (implies structured); sent for `metaExport ?? name`. */
  meta?: string[];
  metaExport?: string;
  /** NBD_INFO requests in GO. */
  infos?: number[];
}

const DEFAULT_TIMEOUT = 5000;

/** Encode a request header (28 bytes) from fields that may be out of range on purpose. */
export function requestBytes(r: RawRequest): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE((r.magic ?? REQUEST_MAGIC) >>> 0, 0);
  b.writeUInt16BE(r.flags ?? 0, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeBigUInt64BE(r.cookie ?? 0n, 8);
  b.writeBigUInt64BE(BigInt(r.offset ?? 0), 16);
  b.writeUInt32BE((r.length ?? 0) >>> 0, 24);
  return b;
}

/** Encode an option: IHAVEOPT, option, length, data. */
export function optionBytes(option: number, data: Buffer = Buffer.alloc(0), length = data.length): Buffer {
  const h = Buffer.alloc(16);
  h.write("IHAVEOPT", 0, "latin1");
  h.writeUInt32BE(option >>> 0, 8);
  h.writeUInt32BE(length >>> 0, 12);
  return Buffer.concat([h, data]);
}

/** Data of NBD_OPT_INFO / NBD_OPT_GO: name length, name, info count, infos. */
export function infoRequestData(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name, "utf8");
  const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((t, i) => b.writeUInt16BE(t, 6 + n.length + 2 * i));
  return b;
}

/** Data of NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT. */
export function metaContextData(name: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const n = Buffer.from(name, "utf8");
  const head = Buffer.alloc(4);
  head.writeUInt32BE(n.length, 0);
  parts.push(head, n);
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length, 0);
  parts.push(count);
  for (const q of queries) {
    const qb = Buffer.from(q, "utf8");
    const l = Buffer.alloc(4);
    l.writeUInt32BE(qb.length, 0);
    parts.push(l, qb);
  }
  return Buffer.concat(parts);
}

/** True when `type` is an option error reply. */
export function isOptionError(type: number): boolean {
  return (type & REP_ERR_BIT) !== 0;
}

/** A raw connection to an NBD server on a unix socket. */
export class RawClient {
  readonly socket: Socket;
  /** Settles when the socket is closed (by either side). */
  readonly closed: Promise<void>;
  /** Settles when the server has closed its side (EOF) or the socket is closed. */
  readonly serverEnded: Promise<void>;
  private resolveEnded!: () => void;
  /** The first socket error seen (ECONNRESET, EPIPE, ...), if any. */
  error: Error | null = null;
  private chunks: Buffer[] = [];
  private buffered = 0;
  private eof = false;
  private wake: (() => void) | null = null;

  private constructor(socket: Socket) {
    this.socket = socket;
    this.serverEnded = new Promise<void>((resolve) => (this.resolveEnded = resolve));
    socket.on("data", (d: Buffer) => {
      this.chunks.push(d);
      this.buffered += d.length;
      this.poke();
    });
    socket.on("end", () => {
      this.eof = true;
      this.resolveEnded();
      this.poke();
    });
    socket.on("error", (e) => {
      if (this.error === null) this.error = e;
    });
    this.closed = new Promise<void>((resolve) =>
      socket.once("close", () => {
        this.eof = true;
        this.resolveEnded();
        this.poke();
        resolve();
      }),
    );
  }

  /**
   * Connect to a unix socket, or (a number) to that TCP port on 127.0.0.1; half-close is allowed
   * so a test can end its side and still read.
   */
  static connect(path: string | number, timeoutMs = DEFAULT_TIMEOUT): Promise<RawClient> {
    return new Promise<RawClient>((resolve, reject) => {
      const s =
        typeof path === "number"
          ? connect({ host: "127.0.0.1", port: path, allowHalfOpen: true })
          : connect({ path, allowHalfOpen: true });
      const t = setTimeout(() => {
        s.destroy();
        reject(new RawTimeoutError(`connect to ${path} timed out`));
      }, timeoutMs);
      const onError = (e: Error): void => {
        clearTimeout(t);
        reject(e);
      };
      s.once("error", onError);
      s.once("connect", () => {
        clearTimeout(t);
        s.off("error", onError);
        resolve(new RawClient(s));
      });
    });
  }

  /** The server has closed its side (EOF or close). */
  get ended(): boolean {
    return this.eof;
  }

  /** Bytes received and not yet read. */
  get available(): number {
    return this.buffered;
  }

  private poke(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  /** Send bytes (ignored once the socket is gone: the server may have dropped us on purpose). */
  write(b: Uint8Array): void {
    if (this.socket.destroyed || this.socket.writableEnded) return;
    this.socket.write(b);
  }

  /** Send bytes and wait until they are handed to the kernel. */
  async send(b: Uint8Array): Promise<void> {
    if (this.socket.destroyed || this.socket.writableEnded) return;
    await new Promise<void>((resolve) => this.socket.write(b, () => resolve()));
  }

  /**
   * Send bytes; resolves true once they are handed to the kernel, or false as soon as the server
   * has closed its side (a server that stopped reading must not hang the test in a write).
   */
  async sendUnlessEnded(b: Uint8Array): Promise<boolean> {
    if (this.eof || this.socket.destroyed || this.socket.writableEnded) return false;
    const written = new Promise<boolean>((resolve) => this.socket.write(b, (e) => resolve(!e)));
    return Promise.race([written, this.serverEnded.then(() => false)]);
  }

  /** Send bytes in pieces of `piece` bytes, yielding to the event loop between them. */
  async sendSlowly(b: Uint8Array, piece = 1): Promise<void> {
    for (let i = 0; i < b.length; i += piece) {
      await this.send(b.subarray(i, Math.min(b.length, i + piece)));
      await new Promise((r) => setImmediate(r));
    }
  }

  /** Half-close: no more requests from us. */
  end(): void {
    if (!this.socket.destroyed) this.socket.end();
  }

  /** Drop the connection. */
  destroy(): void {
    this.socket.destroy();
  }

  private async waitFor(pred: () => boolean, timeoutMs: number, what: string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!pred()) {
      const left = deadline - Date.now();
      if (left <= 0) throw new RawTimeoutError(`timed out after ${timeoutMs} ms waiting for ${what}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
  }

  private take(n: number): Buffer {
    const first = this.chunks[0];
    let out: Buffer;
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      // Join only as many chunks as the read needs (replies can pile up to megabytes).
      let k = 0;
      let have = 0;
      while (have < n) have += this.chunks[k++].length;
      const joined = Buffer.concat(this.chunks.slice(0, k), have);
      out = joined.subarray(0, n);
      this.chunks.splice(0, k, ...(have > n ? [joined.subarray(n)] : []));
    }
    this.buffered -= n;
    return out;
  }

  /** Exactly n bytes; RawClosedError if the server closes first, RawTimeoutError after timeoutMs. */
  async read(n: number, timeoutMs = DEFAULT_TIMEOUT): Promise<Buffer> {
    if (n === 0) return Buffer.alloc(0);
    await this.waitFor(() => this.buffered >= n || this.eof, timeoutMs, `${n} bytes`);
    if (this.buffered < n) {
      throw new RawClosedError(`server closed the connection after ${this.buffered} of ${n} bytes`);
    }
    return this.take(n);
  }

  /** Look at the next n bytes without consuming them. */
  async peek(n: number, timeoutMs = DEFAULT_TIMEOUT): Promise<Buffer> {
    const b = await this.read(n, timeoutMs);
    this.chunks.unshift(Buffer.from(b));
    this.buffered += n;
    return b;
  }

  /** Everything the server sends until it closes; RawTimeoutError if it does not close in time. */
  async readToEnd(timeoutMs = DEFAULT_TIMEOUT): Promise<Buffer> {
    await this.waitFor(() => this.eof, timeoutMs, "the server to close the connection");
    return this.buffered === 0 ? Buffer.alloc(0) : this.take(this.buffered);
  }

  /** Resolve when the server has closed the connection (unread bytes are discarded). */
  async expectClosed(timeoutMs = DEFAULT_TIMEOUT): Promise<void> {
    await this.readToEnd(timeoutMs);
  }

  /** Wait `ms` and report whether the server closed meanwhile. */
  async closesWithin(ms: number): Promise<boolean> {
    try {
      await this.waitFor(() => this.eof, ms, "close");
      return true;
    } catch (e) {
      if (e instanceof RawTimeoutError) return false;
      throw e;
    }
  }

  // ---- handshake

  /** Read the 18-byte greeting; returns the handshake flags. */
  async greeting(timeoutMs = DEFAULT_TIMEOUT): Promise<number> {
    const g = await this.read(18, timeoutMs);
    if (g.toString("latin1", 0, 16) !== "NBDMAGICIHAVEOPT") {
      throw new RawProtocolError(`bad greeting ${g.toString("hex")}`);
    }
    return g.readUInt16BE(16);
  }

  /** Send the client flags (4 bytes). */
  sendClientFlags(flags: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(flags >>> 0, 0);
    this.write(b);
  }

  /** Send one option. */
  sendOption(option: number, data: Buffer = Buffer.alloc(0)): void {
    this.write(optionBytes(option, data));
  }

  /** Read one option reply. */
  async optionReply(timeoutMs = DEFAULT_TIMEOUT): Promise<OptionReply> {
    const h = await this.read(20, timeoutMs);
    const magic = h.readBigUInt64BE(0);
    if (magic !== OPTION_REPLY_MAGIC)
      throw new RawProtocolError(`bad option reply magic ${magic.toString(16)}`);
    const option = h.readUInt32BE(8);
    const type = h.readUInt32BE(12);
    const len = h.readUInt32BE(16);
    return { option, type, data: await this.read(len, timeoutMs) };
  }

  /** Read option replies up to and including the final one (ACK or an error). */
  async optionReplies(timeoutMs = DEFAULT_TIMEOUT): Promise<OptionReply[]> {
    const out: OptionReply[] = [];
    for (;;) {
      const r = await this.optionReply(timeoutMs);
      out.push(r);
      if (r.type === REP_ACK || isOptionError(r.type)) return out;
    }
  }

  /** Send an option and read its replies. */
  async option(option: number, data: Buffer = Buffer.alloc(0)): Promise<OptionReply[]> {
    this.sendOption(option, data);
    return this.optionReplies();
  }

  /** A whole fixed-newstyle handshake ending in NBD_OPT_GO. Throws if any step is refused. */
  async handshake(opts: HandshakeOptions = {}): Promise<Session> {
    await this.greeting();
    this.sendClientFlags(opts.clientFlags ?? 3);
    const replies: OptionReply[] = [];
    const name = opts.name ?? "";
    const must = (rs: OptionReply[], what: string): void => {
      replies.push(...rs);
      const last = rs[rs.length - 1];
      if (last.type !== REP_ACK) {
        throw new RawProtocolError(
          `${what} refused: 0x${last.type.toString(16)} ${last.data.toString("utf8")}`,
        );
      }
    };
    if (opts.structured === true || opts.meta !== undefined) must(await this.option(8), "STRUCTURED_REPLY");
    if (opts.meta !== undefined) {
      must(await this.option(10, metaContextData(opts.metaExport ?? name, opts.meta)), "SET_META_CONTEXT");
    }
    const go = await this.option(7, infoRequestData(name, opts.infos ?? []));
    must(go, "GO");
    const info = go.find((r) => r.type === 3 && r.data.readUInt16BE(0) === 0);
    if (info === undefined) throw new RawProtocolError("GO without NBD_INFO_EXPORT");
    return { size: Number(info.data.readBigUInt64BE(2)), flags: info.data.readUInt16BE(10), replies };
  }

  // ---- transmission

  /** Send a request header, and a payload if given. */
  request(r: RawRequest, payload?: Uint8Array): void {
    this.write(payload ? Buffer.concat([requestBytes(r), payload]) : requestBytes(r));
  }

  /** Read a simple reply header (and nothing after it). */
  async simpleReply(timeoutMs = DEFAULT_TIMEOUT): Promise<SimpleReply> {
    const h = await this.read(16, timeoutMs);
    const magic = h.readUInt32BE(0);
    if (magic !== SIMPLE_MAGIC)
      throw new RawProtocolError(`expected a simple reply, got magic ${magic.toString(16)}`);
    return { error: h.readUInt32BE(4), cookie: h.readBigUInt64BE(8) };
  }

  /** Read one structured reply chunk. */
  async chunk(timeoutMs = DEFAULT_TIMEOUT): Promise<Chunk> {
    const h = await this.read(20, timeoutMs);
    const magic = h.readUInt32BE(0);
    if (magic !== STRUCTURED_MAGIC) {
      throw new RawProtocolError(`expected a structured reply, got magic ${magic.toString(16)}`);
    }
    const len = h.readUInt32BE(16);
    return {
      flags: h.readUInt16BE(4),
      type: h.readUInt16BE(6),
      cookie: h.readBigUInt64BE(8),
      payload: await this.read(len, timeoutMs),
    };
  }

  /** Read chunks of one reply until the DONE flag (assumes replies are not interleaved). */
  async structuredReply(timeoutMs = DEFAULT_TIMEOUT): Promise<Chunk[]> {
    const out: Chunk[] = [];
    for (;;) {
      const c = await this.chunk(timeoutMs);
      out.push(c);
      if (c.flags & 1) return out;
    }
  }

  /** Magic of the next reply (simple or structured), without consuming it. */
  async nextMagic(timeoutMs = DEFAULT_TIMEOUT): Promise<number> {
    return (await this.peek(4, timeoutMs)).readUInt32BE(0);
  }

  /** Send a simple-mode WRITE and return the reply's error. */
  async writeAt(offset: number, data: Buffer, cookie = 1n, flags = 0): Promise<number> {
    this.request({ type: 1, flags, cookie, offset, length: data.length }, data);
    const r = await this.simpleReply();
    if (r.cookie !== cookie) throw new RawProtocolError(`reply for cookie ${r.cookie}, expected ${cookie}`);
    return r.error;
  }

  /** Send a simple-mode READ and return its data (throws on an error reply). */
  async readAt(offset: number, length: number, cookie = 2n): Promise<Buffer> {
    this.request({ type: 0, cookie, offset, length });
    const r = await this.simpleReply();
    if (r.cookie !== cookie) throw new RawProtocolError(`reply for cookie ${r.cookie}, expected ${cookie}`);
    if (r.error !== 0) throw new RawProtocolError(`READ failed with NBD error ${r.error}`);
    return this.read(length);
  }

  /** Send DISC and wait for the server to close. */
  async disconnect(timeoutMs = DEFAULT_TIMEOUT): Promise<void> {
    this.request({ type: 2, cookie: 0xd15cn });
    this.end();
    await this.expectClosed(timeoutMs);
  }
}

// ---- an in-process server for unit tests

/** One export of an in-process server. */
export interface TestExport {
  name: string;
  volume: Volume;
  description?: string;
  blockSizes?: BlockSizes;
}

/** Options of startTestServer(). */
export interface TestServerOptions {
  exports: TestExport[];
  handshakeTimeoutMs?: number;
  maxConnections?: number;
  logLevel?: LogLevel;
}

/** A running in-process NbdServer on a private unix socket. */
export interface TestServer {
  server: NbdServer;
  registry: ExportRegistry;
  path: string;
  /** Log lines written so far. */
  log: string[];
  /** Open a raw connection (closed by stop()). */
  connect(): Promise<RawClient>;
  /** Close every client this server handed out, shut the server down, remove the socket. */
  stop(): Promise<void>;
}

/** Start an NbdServer (TLS off) over the given exports; the first export is the default. */
export async function startTestServer(opts: TestServerOptions): Promise<TestServer> {
  const dir = mkdtempSync(join(tmpdir(), "bf-raw-"));
  const path = join(dir, "nbd.sock");
  const log: string[] = [];
  const registry = new ExportRegistry();
  for (const e of opts.exports) {
    registry.addStatic({
      name: e.name,
      description: e.description ?? "",
      volume: e.volume,
      blockSizes: e.blockSizes ?? DEFAULT_BLOCK_SIZES,
    });
  }
  const server = new NbdServer({
    registry,
    tls: { mode: "off" },
    log: Logger.create(opts.logLevel ?? "warn", (l) => log.push(l)),
    handshakeTimeoutMs: opts.handshakeTimeoutMs ?? 10_000,
    maxConnections: opts.maxConnections ?? 1024,
  });
  await server.listen({ path });
  const clients = new Set<RawClient>();
  return {
    server,
    registry,
    path,
    log,
    async connect() {
      const c = await RawClient.connect(path);
      clients.add(c);
      void c.closed.then(() => clients.delete(c));
      return c;
    },
    async stop() {
      for (const c of clients) c.destroy();
      await server.quiesce(2000);
      await server.closeAll(2000);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
