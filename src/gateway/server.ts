// The gateway's HTTP front (docs/gateway-api.md): routing, authentication, identity headers,
// limits, fault injection, JSON errors, and graceful shutdown. The work itself is in gateway.ts.
//
// Order of checks for a request:
//   1. shutting down: 503 ERR_UNAVAILABLE (the connection closes after the reply)
//   2. injected fault (all but /v1/fault): down -> 503; drop -> connection destroyed
//   3. authentication (all but GET /v1/health): 401
//   4. injected fault: slow -> wait (all but health); error -> 500 (all but health)
//   5. route: unknown path 404, wrong method 405, unknown volume 404
//   6. identity headers and the volume size (400), Content-Length and the 64 MiB limit (400/413)
//   7. the body, parsed and checked whole (400), then applied (500/507 on failure)
// /v1/fault is exempt from faults: otherwise "down" or "drop" could not be cleared over the API.

import {
  createServer as createHttpServer,
  ServerResponse,
  STATUS_CODES,
  type IncomingMessage,
  type Server,
} from "node:http";
import { createServer as createHttpsServer } from "node:https";
import type { Socket } from "node:net";
import type { Duplex } from "node:stream";
import { createHash, timingSafeEqual } from "node:crypto";
import type { Logger } from "../log.js";
import { acquire, release } from "../util/buffer-pool.js";
import { FaultSpecError, FaultSwitch, faultFromJson } from "./faults.js";
import type { Gateway, Identity, InSyncClaim } from "./gateway.js";
import { badRequest, errorBody, HttpError, readBody, sendError, sendJson } from "./http.js";
import { checkTrackingDoc, checkVolumeId, type TrackingMirror } from "./mirror.js";
import { parseUpdates, RecordError } from "./records.js";
import { STREAM_PROTOCOL } from "./frames.js";
import { StreamSession } from "./stream.js";

/** Largest request body (updates, tracking documents). */
export const MAX_BODY = 64 * 1024 * 1024;
/** Largest read of GET .../data. */
export const MAX_DATA = 32 * 1024 * 1024;
/** Most blocks in one GET .../checksums. */
export const MAX_CHECKSUM_BLOCKS = 65536;
/** Largest PUT /v1/fault body. */
const MAX_FAULT_BODY = 64 * 1024;
/**
 * What this gateway understands beyond version 1's first form, in /v1/health: "consistency" means
 * records flagged RESYNC and the flush's X-Blockfork-In-Sync claim (a proxy sends neither to a
 * gateway that does not list it).
 */
export const FEATURES = ["consistency"];
export const UPDATES_TYPE = "application/vnd.blockfork.updates";

/** What the server serves and how. */
export interface GatewayServerOptions {
  gateway: Gateway;
  /** The secondary's name ({name} in the paths) and path (for status). */
  name: string;
  path: string;
  /** Bearer token, or null for none. */
  token: string | null;
  faults: FaultSwitch;
  mirror: TrackingMirror;
  log: Logger;
  tls?: { cert: Buffer; key: Buffer };
  /** How long a part-read update-stream frame may go without a byte (ms; stream.ts STALL_MS). */
  streamStallMs?: number;
  /**
   * Update streams served at once (default 64). Each may hold a frame body of up to 64 MiB while
   * it arrives; more are refused with 503 until one ends.
   */
  maxStreams?: number;
}

type Handler = (req: IncomingMessage, res: ServerResponse, arg: string, query: string) => Promise<void>;

interface Route {
  methods: Record<string, Handler>;
}

function sha256(s: string | Buffer): Buffer {
  return createHash("sha256").update(s).digest();
}

/** Wait `ms`; the timer does not keep the process alive (a request's connection does). */
function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms).unref());
}

/** A decimal integer parameter (query or header), or undefined when absent. */
function intParam(v: string | null | undefined, what: string): number | undefined {
  if (v === null || v === undefined) return undefined;
  const n = Number(v);
  if (!/^\d{1,16}$/.test(v) || !Number.isSafeInteger(n)) {
    throw badRequest(`${what} must be a non-negative decimal integer below 2^53, not ${JSON.stringify(v)}`);
  }
  return n;
}

function requiredInt(params: URLSearchParams, name: string): number {
  const n = intParam(params.get(name), `query parameter "${name}"`);
  if (n === undefined) throw badRequest(`query parameter "${name}" is required`);
  return n;
}

function header(req: IncomingMessage, name: string): string | undefined {
  const v = req.headers[name];
  return Array.isArray(v) ? v.join(", ") : v;
}

/** The gateway's HTTP(S) server. */
export class GatewayServer {
  private readonly server: Server;
  private readonly log: Logger;
  private readonly tokenHash: Buffer | null;
  private readonly started = performance.now();
  /**
   * Names this process (like an NFS server's write verifier): a restart loses what was applied
   * but not made durable, and the idempotency state of updates above each durableThrough. A proxy
   * that sees it change within one run of its link treats the link as failed and resyncs, since a
   * POST that undici held back may reach the new process, behind newer updates the old one applied.
   * (Gateway.boot: new at every start.)
   */
  get boot(): string {
    return this.opts.gateway.boot;
  }
  private readonly size: number;
  private readonly routes = new Map<string, Route>();
  private inFlight = 0;
  private idle: (() => void) | null = null;
  /** Upgrade requests being checked: their socket and the bytes after the request head. */
  private readonly upgrades = new WeakMap<IncomingMessage, { socket: Duplex; head: Buffer }>();
  private readonly sessions = new Set<StreamSession>();
  /** The source of each update stream (a takeover ends the old owner's). */
  private readonly sessionSource = new WeakMap<StreamSession, string>();
  private stopping = false;

  constructor(private readonly opts: GatewayServerOptions) {
    this.log = opts.log;
    this.size = opts.gateway.volume.size;
    this.tokenHash = opts.token === null ? null : sha256(opts.token);
    const handler = (req: IncomingMessage, res: ServerResponse): void => this.onRequest(req, res);
    this.server = opts.tls
      ? createHttpsServer({ cert: opts.tls.cert, key: opts.tls.key, minVersion: "TLSv1.2" }, handler)
      : createHttpServer({}, handler);
    // Proxies keep connections open between batches; undici honours the Keep-Alive hint.
    this.server.keepAliveTimeout = 30_000;
    this.server.headersTimeout = 60_000;
    this.server.on("clientError", (err: Error & { code?: string }, socket: Socket) =>
      this.onClientError(err, socket),
    );
    this.server.on("upgrade", (req: IncomingMessage, socket: Duplex, head: Buffer) =>
      this.onUpgrade(req, socket, head),
    );
    this.defineRoutes();
    // A takeover ends the old owner's update streams: an idle proxy would otherwise go on calling
    // a secondary it no longer owns its replica (its next probe is refused with 409).
    opts.gateway.onTakeover = (from) => {
      for (const s of this.sessions) if (this.sessionSource.get(s) === from) s.stop();
    };
  }

  /** Listen; resolves with the bound address (port 0 picks a free port). */
  listen(host: string, port: number): Promise<{ host: string; port: number }> {
    return new Promise((resolve, reject) => {
      this.server.once("error", reject);
      this.server.listen(port, host, () => {
        this.server.off("error", reject);
        this.server.on("error", (e) => this.log.error(`listener error: ${e.message}`));
        const a = this.server.address();
        if (a === null || typeof a === "string") reject(new Error("the listener has no TCP address"));
        else resolve({ host: a.address, port: a.port });
      });
    });
  }

  /** Stop accepting and answer new requests 503; resolves when in-flight requests are done (false: timed out). */
  quiesce(timeoutMs = 30_000): Promise<boolean> {
    this.stopping = true;
    this.server.close();
    this.server.closeIdleConnections();
    for (const s of this.sessions) s.stop();
    if (this.inFlight === 0) return Promise.resolve(true);
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.idle = null;
        resolve(false);
      }, timeoutMs);
      this.idle = () => {
        clearTimeout(t);
        this.idle = null;
        resolve(true);
      };
    });
  }

  /** Close every connection that is left. */
  closeAll(): void {
    this.server.closeAllConnections();
    for (const s of this.sessions) s.destroy();
  }

  private onClientError(err: Error & { code?: string }, socket: Socket): void {
    if (err.code === "ECONNRESET" || !socket.writable) {
      socket.destroy();
      return;
    }
    const timeout = err.code === "ERR_HTTP_REQUEST_TIMEOUT";
    const status = timeout ? 408 : 400;
    const body = JSON.stringify(
      timeout
        ? errorBody("ERR_BAD_REQUEST", "the request did not arrive in time (request timeout)")
        : errorBody("ERR_BAD_REQUEST", `malformed HTTP request (${err.code ?? err.message})`),
    );
    this.log.limited("info", "client error", `malformed HTTP request: ${err.code ?? err.message}`);
    socket.end(
      `HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\nContent-Type: application/json\r\n` +
        `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
    );
  }

  private onRequest(req: IncomingMessage, res: ServerResponse): void {
    this.inFlight++;
    let counted = true;
    res.on("close", () => {
      if (!counted) return;
      counted = false;
      if (--this.inFlight === 0 && this.idle) this.idle();
    });
    if (this.log.enabled("debug")) {
      const t0 = performance.now();
      res.on("finish", () =>
        this.log.debug(
          `${req.method} ${req.url} -> ${res.statusCode} (${(performance.now() - t0).toFixed(1)} ms)`,
        ),
      );
    }
    this.handle(req, res).catch((e: unknown) => this.fail(req, res, e));
  }

  /**
   * A request with `Connection: Upgrade`: the same checks as any request, through a response bound
   * to the socket (errors are ordinary JSON replies, then the connection closes); the stream route
   * takes the socket over when everything is right.
   */
  private onUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): void {
    const res = new ServerResponse(req);
    res.shouldKeepAlive = false;
    res.assignSocket(socket as Socket);
    // An error reply ends the connection; its close ends the request's bookkeeping ('close' of
    // the response, as for any request). Whatever the client still sends is read and dropped, and
    // the socket is destroyed 2 s later: half-closed and never read, it would stay open for good.
    res.on("finish", () => {
      socket.end();
      socket.resume();
      setTimeout(() => socket.destroy(), 2000).unref();
    });
    socket.on("error", () => socket.destroy());
    this.upgrades.set(req, { socket, head });
    this.onRequest(req, res);
  }

  private fail(req: IncomingMessage, res: ServerResponse, e: unknown): void {
    let err: HttpError;
    if (e instanceof HttpError) err = e;
    else if (e instanceof RecordError) err = new HttpError(400, e.code, e.message);
    else {
      this.log.error(`${req.method} ${req.url}: ${(e as Error).stack ?? String(e)}`);
      err = new HttpError(500, "ERR_IO", `internal error: ${(e as Error).message}`);
    }
    if (err.status >= 500)
      this.log.limited(
        "warn",
        `http ${err.code}`,
        `${req.method} ${req.url}: ${err.status} ${err.code}: ${err.message}`,
      );
    else
      this.log.limited(
        "info",
        `http ${err.code}`,
        `${req.method} ${req.url}: ${err.status} ${err.code}: ${err.message}`,
      );
    if (res.headersSent || res.destroyed) {
      res.destroy();
      return;
    }
    sendError(res, err);
    if (err.close) {
      // The body was not read: give the reply a moment to reach the client, then drop the rest.
      res.on("finish", () => setTimeout(() => req.socket.destroy(), 2000).unref());
    }
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = req.url ?? "/";
    const q = url.indexOf("?");
    const path = q < 0 ? url : url.slice(0, q);
    const query = q < 0 ? "" : url.slice(q + 1);
    const method = req.method ?? "GET";
    const isHealth = path === "/v1/health";
    const isFaultPath = path === "/v1/fault";

    if (this.stopping) {
      if (isHealth) {
        sendJson(res, 503, { ok: false, reason: "the gateway is shutting down" }, { Connection: "close" });
        return;
      }
      throw new HttpError(503, "ERR_UNAVAILABLE", "the gateway is shutting down; retry after it is back", {
        close: true,
      });
    }
    const fault = isFaultPath ? null : this.opts.faults.current();
    if (fault?.mode === "down") {
      const message = "injected outage (fault mode down); clear it with PUT /v1/fault or the trigger file";
      if (isHealth) sendJson(res, 503, { ok: false, reason: message, ...errorBody("ERR_FAULT", message) });
      else sendJson(res, 503, errorBody("ERR_FAULT", message));
      return;
    }
    if (fault?.mode === "drop" && FaultSwitch.strikes(fault)) {
      req.socket.destroy();
      return;
    }
    if (!(isHealth && method === "GET")) this.authorize(req);
    if (fault !== null && !isHealth) {
      if (fault.mode === "slow") await delay(fault.delayMs);
      else if (fault.mode === "error" && FaultSwitch.strikes(fault)) {
        throw new HttpError(500, "ERR_FAULT", "injected error (fault mode error); nothing was applied");
      }
    }

    const segs = path.split("/");
    // "", "v1", a, b?, c?
    if (segs[1] !== "v1" || segs.length < 3) throw this.notFound(path);
    let key: string;
    let arg = "";
    try {
      if (segs.length === 3) key = segs[2];
      else if (segs.length === 5 && segs[2] === "volumes") {
        key = `volumes/*/${segs[4]}`;
        arg = decodeURIComponent(segs[3]);
      } else if (segs.length === 4 && segs[2] === "tracking") {
        key = "tracking/*";
        arg = decodeURIComponent(segs[3]);
      } else throw this.notFound(path);
    } catch (e) {
      if (e instanceof URIError)
        throw badRequest(`the path ${JSON.stringify(path)} is not valid percent-encoding`);
      throw e;
    }
    const route = this.routes.get(key);
    if (!route) throw this.notFound(path);
    if (key !== "volumes/*/stream" && this.upgrades.has(req)) {
      // Node stops parsing a request that asks to upgrade: its body never reaches the handler.
      throw new HttpError(
        400,
        "ERR_BAD_REQUEST",
        `${path} does not upgrade (only .../stream does, to ${STREAM_PROTOCOL}): send the request ` +
          "without an Upgrade header",
        { close: true },
      );
    }
    const h = route.methods[method];
    if (!h) {
      const allow = Object.keys(route.methods).join(", ");
      throw new HttpError(405, "ERR_METHOD", `${method} is not allowed on ${path}; use ${allow}`, {
        headers: { Allow: allow },
      });
    }
    if (key.startsWith("volumes/") && arg !== this.opts.name) {
      throw new HttpError(
        404,
        "ERR_NOT_FOUND",
        `no volume ${JSON.stringify(arg)} here: this gateway serves "${this.opts.name}"`,
      );
    }
    await h(req, res, arg, query);
  }

  private notFound(path: string): HttpError {
    return new HttpError(
      404,
      "ERR_NOT_FOUND",
      `no such endpoint ${JSON.stringify(path.slice(0, 200))} (see docs/gateway-api.md)`,
    );
  }

  private authorize(req: IncomingMessage): void {
    if (this.tokenHash === null) return;
    const auth = header(req, "authorization");
    const m = auth === undefined ? null : /^Bearer +(\S+) *$/i.exec(auth);
    // Compare digests: equal lengths whatever was sent, and no timing signal about the token.
    if (m === null || !timingSafeEqual(sha256(m[1]), this.tokenHash)) {
      throw new HttpError(
        401,
        "ERR_AUTH",
        auth === undefined
          ? "missing Authorization header: send Authorization: Bearer <token> (the gateway's --token-file)"
          : m === null
            ? "the Authorization header must be 'Authorization: Bearer <token>' (the Bearer scheme, a " +
              "space, then the content of the gateway's --token-file)"
            : "wrong token: send Authorization: Bearer <token> with the content of the gateway's --token-file",
        { headers: { "WWW-Authenticate": 'Bearer realm="blockfork gateway"' } },
      );
    }
  }

  /**
   * A flush's X-Blockfork-In-Sync (the proxy's claim: in sync through that seq) and
   * X-Blockfork-Boot (the gateway boot its link saw when it made the claim); null without a claim.
   */
  private inSyncClaim(req: IncomingMessage): InSyncClaim | null {
    const seq = intParam(header(req, "x-blockfork-in-sync"), "X-Blockfork-In-Sync");
    if (seq === undefined) return null;
    const boot = header(req, "x-blockfork-boot");
    if (boot === undefined || !/^[0-9a-f]{16}$/.test(boot)) {
      throw badRequest(
        "X-Blockfork-In-Sync needs X-Blockfork-Boot: the 16 hex digits of the gateway's boot id the claim was made with",
      );
    }
    const whole = header(req, "x-blockfork-in-sync-whole");
    if (whole !== undefined && whole !== "1")
      throw badRequest('X-Blockfork-In-Sync-Whole must be "1" when given');
    return { seq, boot, whole: whole === "1" };
  }

  /** The identity headers of update and flush requests (400 when missing or wrong). */
  private identity(req: IncomingMessage): Identity {
    const source = header(req, "x-blockfork-source");
    if (source === undefined || !/^[0-9a-fA-F]{1,128}$/.test(source)) {
      throw badRequest(
        source === undefined
          ? "X-Blockfork-Source is required (the proxy's identity, hex)"
          : `X-Blockfork-Source must be 1 to 128 hex digits, not ${JSON.stringify(source.slice(0, 140))}`,
      );
    }
    const gen = header(req, "x-blockfork-generation");
    const generation = intParam(gen, "X-Blockfork-Generation");
    if (generation === undefined || generation === 0) {
      throw badRequest(
        "X-Blockfork-Generation is required: a positive decimal integer that grows at every proxy start",
      );
    }
    const size = intParam(header(req, "x-blockfork-volume-size"), "X-Blockfork-Volume-Size");
    if (size === undefined)
      throw badRequest("X-Blockfork-Volume-Size is required (the primary's size in bytes)");
    if (size !== this.size) {
      throw new HttpError(
        400,
        "ERR_SIZE_MISMATCH",
        `the primary is ${size} bytes but this gateway's secondary "${this.opts.name}" is ${this.size} bytes; ` +
          `give the gateway a volume of the same size`,
      );
    }
    const floor = intParam(header(req, "x-blockfork-floor"), "X-Blockfork-Floor") ?? null;
    const incarnation = header(req, "x-blockfork-incarnation");
    if (incarnation !== undefined && !/^[0-9a-fA-F]{1,64}$/.test(incarnation)) {
      throw badRequest(
        `X-Blockfork-Incarnation must be 1 to 64 hex digits, not ${JSON.stringify(incarnation.slice(0, 80))}`,
      );
    }
    const takeover = header(req, "x-blockfork-takeover");
    if (takeover !== undefined && takeover !== "1")
      throw badRequest('X-Blockfork-Takeover must be "1" when given');
    return {
      source: source.toLowerCase(),
      generation,
      floor,
      incarnation: incarnation === undefined ? null : incarnation.toLowerCase(),
      takeover: takeover === "1",
    };
  }

  private defineRoutes(): void {
    const g = this.opts.gateway;
    const r = (key: string, methods: Record<string, Handler>): void => {
      this.routes.set(key, { methods });
    };

    r("health", {
      GET: (_req, res) => {
        const h = g.health();
        if (h.ok) {
          sendJson(res, 200, {
            ok: true,
            volume: this.opts.name,
            size: this.size,
            boot: this.boot,
            features: FEATURES,
            secondary: g.secondary.state,
            secondaryId: g.secondaryId,
            owner: g.owner?.source ?? null,
          });
        } else sendJson(res, 503, { ok: false, reason: h.reason, secondary: g.secondary.state });
        return Promise.resolve();
      },
    });

    r("status", {
      GET: (_req, res) => {
        sendJson(res, 200, {
          volume: { name: this.opts.name, size: this.size, path: this.opts.path, id: g.secondaryId },
          secondary: g.secondary,
          owner: g.owner,
          sources: g.sourceStatus(),
          counters: g.counters,
          fault: this.opts.faults.describe(),
          health: g.health(),
          boot: this.boot,
          uptime: Math.floor((performance.now() - this.started) / 1000),
        });
        return Promise.resolve();
      },
    });

    r("fault", {
      GET: (_req, res) => {
        sendJson(res, 200, this.opts.faults.describe());
        return Promise.resolve();
      },
      PUT: async (req, res) => {
        const doc = await this.readJson(req, MAX_FAULT_BODY);
        try {
          this.opts.faults.set(faultFromJson(doc));
        } catch (e) {
          if (e instanceof FaultSpecError) throw badRequest(e.message);
          throw e;
        }
        sendJson(res, 200, this.opts.faults.describe());
      },
    });

    r("volumes/*/updates", {
      POST: async (req, res) => {
        const id = this.identity(req);
        const type = (header(req, "content-type") ?? "").split(";")[0].trim().toLowerCase();
        if (type !== UPDATES_TYPE) {
          throw badRequest(`send the batch with Content-Type: ${UPDATES_TYPE}, not ${JSON.stringify(type)}`);
        }
        const body = await readBody(req, MAX_BODY, true);
        try {
          const records = parseUpdates(body.data, this.size);
          const result = await g.applyBatch(id, records);
          sendJson(res, 200, { ...result, boot: this.boot });
        } finally {
          body.dispose();
        }
      },
    });

    r("volumes/*/stream", {
      GET: (req, res) => {
        const up = this.upgrades.get(req);
        const asked = (header(req, "upgrade") ?? "").trim().toLowerCase();
        if (up === undefined || asked !== STREAM_PROTOCOL) {
          throw new HttpError(
            426,
            "ERR_BAD_REQUEST",
            `this endpoint is an update stream: send Connection: Upgrade and Upgrade: ${STREAM_PROTOCOL}` +
              (asked ? ` (not ${JSON.stringify(asked.slice(0, 60))})` : ""),
            { headers: { Upgrade: STREAM_PROTOCOL, Connection: "Upgrade" }, close: true },
          );
        }
        const id = this.identity(req);
        g.checkOwner(id);
        const max = this.opts.maxStreams ?? 64;
        if (this.sessions.size >= max) {
          throw new HttpError(
            503,
            "ERR_UNAVAILABLE",
            `the gateway serves ${max} update streams already (--max-streams); retry when one ends`,
            { close: true },
          );
        }
        this.upgrades.delete(req);
        // The socket is the session's from here: the response object never writes to it.
        res.detachSocket(up.socket as Socket);
        res.removeAllListeners("finish");
        this.inFlight++;
        const session: StreamSession = new StreamSession(
          up.socket,
          up.head,
          `HTTP/1.1 101 Switching Protocols\r\nUpgrade: ${STREAM_PROTOCOL}\r\nConnection: Upgrade\r\n\r\n`,
          {
            gateway: g,
            id,
            size: this.size,
            faults: this.opts.faults,
            log: this.log,
            ...(this.opts.streamStallMs !== undefined ? { stallMs: this.opts.streamStallMs } : {}),
            onClose: () => {
              this.sessions.delete(session);
              if (--this.inFlight === 0 && this.idle) this.idle();
            },
          },
        );
        this.sessions.add(session);
        this.sessionSource.set(session, id.source);
        if (this.stopping) session.stop();
        this.log.debug(`update stream from source ${id.source} (generation ${id.generation})`);
        // The response is not sent: end the request's bookkeeping without writing.
        res.emit("close");
        return Promise.resolve();
      },
    });

    r("volumes/*/flush", {
      POST: async (req, res) => {
        const id = this.identity(req);
        const cl = header(req, "content-length");
        if (header(req, "transfer-encoding") !== undefined || (cl !== undefined && cl !== "0")) {
          throw badRequest("flush takes an empty body");
        }
        sendJson(res, 200, { ...(await g.flush(id, this.inSyncClaim(req))), boot: this.boot });
      },
    });

    r("volumes/*/data", {
      GET: async (_req, res, _name, query) => {
        const p = new URLSearchParams(query);
        const offset = requiredInt(p, "offset");
        const length = requiredInt(p, "length");
        this.checkRange(offset, length);
        if (length > MAX_DATA) {
          throw new HttpError(
            400,
            "ERR_RANGE",
            `length ${length} is over ${MAX_DATA} bytes; read in smaller pieces`,
          );
        }
        const backing = acquire(length);
        const buf = backing.subarray(0, length);
        try {
          await g.read(buf, offset);
        } catch (e) {
          release(backing);
          throw e;
        }
        res.writeHead(200, {
          "Content-Type": "application/octet-stream",
          "Content-Length": String(length),
          "Cache-Control": "no-store",
        });
        res.end(buf, () => release(backing));
      },
    });

    r("volumes/*/checksums", {
      GET: async (_req, res, _name, query) => {
        const p = new URLSearchParams(query);
        const offset = requiredInt(p, "offset");
        const length = requiredInt(p, "length");
        const block = requiredInt(p, "block");
        if (block === 0 || block % 4096 !== 0) {
          throw badRequest(`block must be a positive multiple of 4096, not ${block}`);
        }
        this.checkRange(offset, length);
        const blocks = Math.ceil(length / block);
        if (blocks > MAX_CHECKSUM_BLOCKS) {
          throw new HttpError(
            400,
            "ERR_RANGE",
            `${blocks} blocks asked for; at most ${MAX_CHECKSUM_BLOCKS} per request (shorten length or grow block)`,
          );
        }
        const sums = await g.checksums(offset, length, block);
        sendJson(res, 200, { algorithm: "sha256", block, offset, sums });
      },
    });

    r("tracking/*", {
      GET: async (_req, res, id) => {
        checkVolumeId(id);
        const text = await this.opts.mirror.get(id);
        if (text === null) {
          throw new HttpError(404, "ERR_NOT_FOUND", `no tracking document for volume id "${id}" yet`);
        }
        res.writeHead(200, {
          "Content-Type": "application/json",
          "Content-Length": String(Buffer.byteLength(text)),
          "Cache-Control": "no-store",
        });
        res.end(text);
      },
      PUT: async (req, res, id) => {
        checkVolumeId(id);
        const doc = checkTrackingDoc(id, await this.readJson(req, MAX_BODY));
        await this.opts.mirror.put(id, doc);
        sendJson(res, 200, { stored: true, volumeId: id });
      },
    });
  }

  private checkRange(offset: number, length: number): void {
    if (length === 0) throw new HttpError(400, "ERR_RANGE", "length must be at least 1");
    if (offset > this.size || length > this.size - offset) {
      throw new HttpError(
        400,
        "ERR_RANGE",
        `[${offset}, +${length}) ends past the end of the volume (${this.size} bytes)`,
      );
    }
  }

  private async readJson(req: IncomingMessage, limit: number): Promise<unknown> {
    const body = await readBody(req, limit, true);
    try {
      return JSON.parse(body.data.toString("utf8")) as unknown;
    } catch (e) {
      throw badRequest(`the body is not valid JSON: ${(e as Error).message}`);
    } finally {
      body.dispose();
    }
  }
}
