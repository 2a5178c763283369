// The NBD server: listeners (TCP and unix sockets), connection lifecycle, limits, and graceful
// shutdown. Each accepted connection runs the handshake (handshake.ts) under a deadline, then a
// Transmission (transmission.ts) until it closes.
//
// Shutdown (SIGINT/SIGTERM in `blockfork serve`): stop accepting; drop connections still in the
// handshake (nothing of theirs is at stake); answer new requests with ESHUTDOWN while in-flight
// requests finish; the caller flushes the volumes; then every connection is closed gracefully.

import { createServer, type Server, type Socket } from "node:net";
import { existsSync, unlinkSync } from "node:fs";
import { dirname } from "node:path";
import { clearStaleSocket } from "../util/unix-socket.js";
import type { Duplex } from "node:stream";
import type { Logger } from "../log.js";
import { StreamClosedError } from "./reader.js";
import { HandshakeAbort, negotiate, type TlsSettings } from "./handshake.js";
import type { ExportRegistry } from "./exports.js";
import { Transmission } from "./transmission.js";
import { UsageError } from "../errors.js";

/** Where to listen. */
export type Endpoint = { host: string; port: number } | { path: string };

/** Server settings. */
export interface ServerOptions {
  registry: ExportRegistry;
  tls: TlsSettings;
  log: Logger;
  handshakeTimeoutMs: number;
  maxConnections: number;
}

interface Conn {
  id: number;
  /** The connection's stream (the transmission's own socket once it has taken the descriptor over). */
  socket: Duplex;
  tx: Transmission | null;
}

/** Parse "HOST:PORT" / "[v6]:PORT" for --listen. */
export function parseListen(text: string, example = "127.0.0.1:10809"): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(text);
  const port = m ? Number(m[3]) : NaN;
  if (!m || !Number.isInteger(port) || port < 0 || port > 65535) {
    throw new UsageError(`--listen "${text}" is not HOST:PORT (for example ${example})`);
  }
  return { host: m[1] ?? (m[2] || "127.0.0.1"), port };
}

/** An NBD server over an export registry. */
export class NbdServer {
  private readonly servers: Server[] = [];
  private readonly conns = new Set<Conn>();
  private nextId = 1;
  private stopping = false;
  private readonly log: Logger;
  private unixPaths: string[] = [];

  constructor(private readonly opts: ServerOptions) {
    this.log = opts.log;
  }

  /** Number of open connections (any phase). */
  get connectionCount(): number {
    return this.conns.size;
  }

  /** Start listening; resolves with a printable address. */
  async listen(ep: Endpoint): Promise<string> {
    // allowHalfOpen: a client may shut down its sending side and still wait for its replies.
    const server = createServer({ allowHalfOpen: true, noDelay: true }, (s) => this.accept(s));
    server.maxConnections = this.opts.maxConnections + 64; // we refuse politely before the hard cap
    if ("path" in ep) await clearStaleSocket(ep.path);
    await new Promise<void>((resolve, reject) => {
      server.once("error", (e: NodeJS.ErrnoException) => {
        const where = "path" in ep ? ep.path : `${ep.host}:${ep.port}`;
        if (e.code === "EADDRINUSE")
          reject(new UsageError(`${where} is in use; stop the other server or listen elsewhere`));
        else if ("path" in ep && !existsSync(dirname(ep.path))) {
          // Node reports a missing directory as EACCES.
          reject(
            new UsageError(`cannot listen on ${where}: the directory ${dirname(ep.path)} does not exist`),
          );
        } else if (e.code === "EADDRNOTAVAIL" || e.code === "EACCES" || e.code === "ENOTFOUND") {
          reject(new UsageError(`cannot listen on ${where}: ${e.code}`));
        } else reject(e);
      });
      if ("path" in ep) server.listen(ep.path, resolve);
      else server.listen(ep.port, ep.host, resolve);
    });
    server.on("error", (e) => this.log.error(`listener error: ${e.message}`));
    this.servers.push(server);
    if ("path" in ep) {
      this.unixPaths.push(ep.path);
      return ep.path;
    }
    const a = server.address();
    const port = typeof a === "object" && a !== null ? a.port : ep.port;
    return `${ep.host.includes(":") ? `[${ep.host}]` : ep.host}:${port}`;
  }

  private accept(socket: Socket): void {
    const id = this.nextId++;
    const peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : "unix";
    const log = this.log.child(`conn ${id}`);
    socket.on("error", (e) => log.debug(`socket error: ${e.message}`));
    if (this.stopping) {
      socket.destroy();
      return;
    }
    if (this.conns.size >= this.opts.maxConnections) {
      this.log.limited(
        "warn",
        "connection limit",
        `refusing connection from ${peer}: ${this.conns.size} connections open (--max-connections ${this.opts.maxConnections})`,
      );
      socket.destroy();
      return;
    }
    const conn: Conn = { id, socket, tx: null };
    this.conns.add(conn);
    socket.once("close", () => {
      if (conn.tx === null) this.conns.delete(conn);
    });
    log.debug(`connected from ${peer}`);
    this.run(conn, log).catch((e: unknown) => {
      log.error(`connection failed: ${e instanceof Error ? e.message : String(e)}`);
      socket.destroy();
    });
  }

  private async run(conn: Conn, log: Logger): Promise<void> {
    const socket = conn.socket as Socket;
    const started = performance.now();
    let allowed = this.opts.handshakeTimeoutMs;
    const expire = (): void => {
      log.limited(
        "warn",
        "handshake timeout",
        `handshake not finished after ${Math.round(allowed / 100) / 10} s; disconnecting`,
      );
      socket.destroy();
    };
    let timer = setTimeout(expire, allowed);
    const extendDeadline = (ms: number): void => {
      if (this.opts.handshakeTimeoutMs + ms <= allowed) return;
      allowed = this.opts.handshakeTimeoutMs + ms;
      clearTimeout(timer);
      timer = setTimeout(expire, Math.max(0, started + allowed - performance.now()));
    };
    let neg;
    try {
      neg = await negotiate(socket, {
        registry: this.opts.registry,
        client: `conn ${conn.id}`,
        tls: this.opts.tls,
        log,
        shuttingDown: () => this.stopping,
        extendDeadline,
      });
    } catch (e) {
      if (e instanceof HandshakeAbort)
        log.limited("warn", "handshake abort", `handshake ended: ${e.message}`);
      else if (e instanceof StreamClosedError) log.debug(`closed during handshake: ${e.message}`);
      else throw e;
      // The replies written so far go out first (destroy() would drop those still queued), then
      // the client has 2 s to close; what it sends meanwhile is discarded.
      socket.removeAllListeners("data");
      socket.on("data", () => {});
      socket.end();
      setTimeout(() => socket.destroy(), 2000).unref();
      return;
    } finally {
      clearTimeout(timer);
    }
    if (neg === null) {
      log.debug("client aborted the handshake");
      socket.end();
      // The client should close after our ACK; one that keeps the socket open must not hold a slot.
      setTimeout(() => socket.destroy(), 2000).unref();
      return;
    }
    // The socket may be gone by now: the handshake deadline (or the client) closed it while the
    // export was opening (a snap@ open waits for changes in flight to settle). Its close event has
    // fired already, so a Transmission on it would never finish and the export (a snapshot, which
    // holds back the journal's retention) would never be released.
    if (this.stopping || socket.destroyed || neg.stream.destroyed) {
      if (!this.stopping) {
        log.limited(
          "warn",
          "opened late",
          `export "${neg.export.name}" opened after the connection closed; released`,
        );
      }
      neg.export.release();
      socket.destroy();
      return;
    }
    const exp = neg.export;
    neg.stream.on("error", (e) => log.debug(`stream error: ${e.message}`));
    log.info(
      `export "${exp.name}" (${exp.volume.size} bytes, flags 0x${neg.flags.toString(16)}` +
        `${neg.structured ? ", structured replies" : ""}${neg.blockStatus ? ", base:allocation" : ""}` +
        `${neg.tls ? ", TLS" : ""})`,
    );
    const tx = new Transmission(
      neg.stream,
      {
        volume: exp.volume,
        flags: neg.flags,
        structured: neg.structured,
        blockStatus: neg.blockStatus,
        minBlock: exp.blockSizes.minimum,
        maxBlock: exp.blockSizes.maximum,
        log,
      },
      neg.leftover,
    );
    conn.tx = tx;
    conn.socket = tx.socket;
    await tx.finished;
    exp.release();
    this.conns.delete(conn);
    const s = tx.stats;
    log.info(
      `closed: ${tx.reason || "connection closed"} (${s.requests} requests, ${s.errors} errors, ` +
        `${s.bytesRead} bytes read, ${s.bytesWritten} bytes written)`,
    );
  }

  /**
   * First half of a graceful shutdown: stop accepting, drop handshakes, refuse new requests with
   * ESHUTDOWN, and wait (at most `timeoutMs`) for in-flight requests. Returns true when quiet.
   */
  async quiesce(timeoutMs = 30_000): Promise<boolean> {
    this.stopping = true;
    for (const s of this.servers) s.close();
    // Clients still haggling get a moment in which each option is answered NBD_REP_ERR_SHUTDOWN
    // (proto.md: SHOULD), so they learn why rather than seeing a reset; then they are dropped.
    for (const c of this.conns) {
      if (c.tx === null) setTimeout(() => c.tx === null && c.socket.destroy(), HAGGLE_GRACE_MS).unref();
    }
    const waits = [...this.conns].filter((c) => c.tx !== null).map((c) => c.tx!.quiesce());
    return withTimeout(
      Promise.all(waits).then(() => true),
      timeoutMs,
      false,
    );
  }

  /** Second half: close every connection gracefully, then force what remains after `timeoutMs`. */
  async closeAll(timeoutMs = 5_000): Promise<void> {
    const txs = [...this.conns].map((c) => c.tx).filter((t): t is Transmission => t !== null);
    for (const t of txs) t.close("server shutdown");
    const ok = await withTimeout(
      Promise.all(txs.map((t) => t.finished)).then(() => true),
      timeoutMs,
      false,
    );
    if (!ok) for (const t of txs) t.destroy("server shutdown (grace period over)");
    for (const c of this.conns) c.socket.destroy();
    for (const p of this.unixPaths) {
      try {
        unlinkSync(p);
      } catch {
        // already gone
      }
    }
  }
}

/** How long a client still haggling when the server quiesces may go on hearing ERR_SHUTDOWN (ms). */
const HAGGLE_GRACE_MS = 1000;

/** `p`, or `fallback` after `ms`. The timer is not unref'd: it keeps the process alive while it waits. */
function withTimeout<T>(p: Promise<T>, ms: number, fallback: T): Promise<T> {
  return new Promise<T>((resolve) => {
    const t = setTimeout(() => resolve(fallback), ms);
    p.then(
      (v) => {
        clearTimeout(t);
        resolve(v);
      },
      () => {
        clearTimeout(t);
        resolve(fallback);
      },
    );
  });
}
