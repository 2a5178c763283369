// Start `blockfork gateway` on 127.0.0.1 with a free port for a black-box test, and stop it again;
// and a tiny HTTP client that speaks the gateway API (update batches encoded with the project's own
// encodeUpdates, the identity headers, the token). Every gateway a test starts is stopped by the
// test (or its after() hook).

import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { rmSync, writeFileSync } from "node:fs";
import { Agent as HttpAgent, request as httpRequest, type IncomingHttpHeaders } from "node:http";
import { Agent as HttpsAgent, request as httpsRequest } from "node:https";
import { join } from "node:path";
import { encodeUpdates, type UpdateRecord } from "../../src/gateway/records.js";
import { BIN, scratchDir } from "./server.js";

/** A running gateway. */
export interface GatewayHandle {
  proc: ChildProcess;
  dir: string;
  volume: string;
  stateDir: string;
  /** Base URL, ".../v1". */
  url: string;
  port: number;
  token: string | null;
  /** A client with the gateway's token (and CA). */
  client: GatewayClient;
  /** Everything the gateway printed on stderr / stdout so far. */
  log(): string;
  stdout(): string;
  /** Send a signal (default SIGTERM; null: none, the gateway is ending already) and wait for the exit. */
  stop(signal?: NodeJS.Signals | null): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Options of startGateway(). */
export interface StartGatewayOptions {
  /** Extra arguments. */
  args?: string[];
  /** Volume path (default DIR/sec.img created with `size`). */
  volume?: string;
  /** --size (default 64M); null for none. */
  size?: string | null;
  /** Scratch directory (default: a new one, removed at stop unless keepDir). */
  dir?: string;
  keepDir?: boolean;
  /** --state-dir (default: the gateway's own default, VOLUME.gateway). */
  stateDir?: string;
  /** A token to require (true: a random one); written to DIR/token. */
  token?: string | true;
  /** Serve HTTPS with this certificate; the client trusts `ca`. */
  tls?: { cert: string; key: string; ca: Buffer };
  /** Port (default 0: a free one). */
  port?: number;
}

/** Start a gateway and wait for its banner (which carries the URL). */
export async function startGateway(opts: StartGatewayOptions = {}): Promise<GatewayHandle> {
  const dir = opts.dir ?? scratchDir("blockfork-gw-");
  const volume = opts.volume ?? join(dir, "sec.img");
  const args = [BIN, "gateway", "--volume", volume, "--listen", `127.0.0.1:${opts.port ?? 0}`];
  const size = opts.size === undefined ? "64M" : opts.size;
  if (size !== null) args.push("--size", size);
  let token: string | null = null;
  if (opts.token !== undefined) {
    token = opts.token === true ? randomBytes(16).toString("hex") : opts.token;
    writeFileSync(join(dir, "token"), `${token}\n`, { mode: 0o600 });
    args.push("--token-file", join(dir, "token"));
  }
  if (opts.stateDir !== undefined) args.push("--state-dir", opts.stateDir);
  if (opts.tls) args.push("--tls-cert", opts.tls.cert, "--tls-key", opts.tls.key);
  args.push(...(opts.args ?? []));
  const proc = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "pipe"] });
  let err = "";
  let out = "";
  proc.stderr.setEncoding("utf8").on("data", (d: string) => (err += d));
  proc.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) =>
    proc.once("exit", (code, signal) => res({ code, signal })),
  );
  let url: string | null = null;
  const deadline = Date.now() + 15_000;
  while (url === null) {
    const m = /^blockfork gateway: (https?:\/\/\S+\/v1) serving /m.exec(out);
    if (m) url = m[1];
    else if (proc.exitCode !== null || proc.signalCode !== null) {
      throw new Error(
        `gateway exited (${proc.exitCode ?? proc.signalCode}) before listening\nstderr:\n${err}`,
      );
    } else if (Date.now() > deadline) {
      proc.kill("SIGKILL");
      throw new Error(`no gateway banner after 15 s\nstdout:\n${out}\nstderr:\n${err}`);
    } else await new Promise((r) => setTimeout(r, 20));
  }
  const client = new GatewayClient(url, { token, ...(opts.tls ? { ca: opts.tls.ca } : {}) });
  let stopped = false;
  return {
    proc,
    dir,
    volume,
    stateDir: opts.stateDir ?? `${volume}.gateway`,
    url,
    port: Number(new URL(url).port),
    token,
    client,
    log: () => err,
    stdout: () => out,
    async stop(signal: NodeJS.Signals | null = "SIGTERM") {
      if (!stopped) {
        stopped = true;
        client.close();
        if (signal !== null && proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
        const timer = setTimeout(() => proc.kill("SIGKILL"), 40_000);
        const r = await exited;
        clearTimeout(timer);
        if (!opts.keepDir && opts.dir === undefined) rmSync(dir, { recursive: true, force: true });
        return r;
      }
      return exited;
    },
  };
}

/** A reply: status, headers, raw body, and the body as JSON. */
export interface Reply {
  status: number;
  headers: IncomingHttpHeaders;
  body: Buffer;
  /** The body parsed as JSON, typed as the caller says (not checked). */
  json<T = Record<string, unknown>>(): T;
}

/**
 * A reply body without its `boot` (the gateway process's id, new at every start), which must be
 * there as 16 hex digits.
 */
export function unboot(j: Record<string, unknown>): Record<string, unknown> {
  const { boot, ...rest } = j;
  assert.match(String(boot), /^[0-9a-f]{16}$/, `boot in ${JSON.stringify(j)}`);
  return rest;
}

/** Who sends updates: the identity headers. */
export interface SourceIdent {
  source: string;
  generation: number;
  /** X-Blockfork-Volume-Size. */
  size: number;
  floor?: number;
  /** Send X-Blockfork-Takeover: 1 (take the secondary over from the source that owns it). */
  takeover?: boolean;
}

/** Options of one request. */
export interface RequestOptions {
  body?: Buffer | string;
  headers?: Record<string, string>;
  /** Token to send instead of the client's; null: send no Authorization header. */
  token?: string | null;
  timeoutMs?: number;
}

/** The identity headers of `id`. */
export function identityHeaders(id: SourceIdent): Record<string, string> {
  const h: Record<string, string> = {
    "X-Blockfork-Source": id.source,
    "X-Blockfork-Generation": String(id.generation),
    "X-Blockfork-Volume-Size": String(id.size),
  };
  if (id.floor !== undefined) h["X-Blockfork-Floor"] = String(id.floor);
  if (id.takeover === true) h["X-Blockfork-Takeover"] = "1";
  return h;
}

/** A minimal client of the gateway API over one keep-alive agent (one connection by default). */
export class GatewayClient {
  private readonly agent: HttpAgent;
  private readonly https: boolean;

  constructor(
    readonly base: string,
    private readonly opts: { token?: string | null; ca?: Buffer; maxSockets?: number } = {},
  ) {
    this.https = base.startsWith("https:");
    const agentOpts = { keepAlive: true, maxSockets: opts.maxSockets ?? 1 };
    this.agent = this.https
      ? new HttpsAgent({ ...agentOpts, ...(opts.ca ? { ca: opts.ca } : {}) })
      : new HttpAgent(agentOpts);
  }

  /** Close the kept-alive connections. */
  close(): void {
    this.agent.destroy();
  }

  /** One request to `base + path`. */
  request(method: string, path: string, o: RequestOptions = {}): Promise<Reply> {
    // The path goes out as given (no dot-segment normalisation): tests send odd paths on purpose.
    const url = new URL(this.base);
    const headers: Record<string, string> = { ...o.headers };
    const token = o.token === undefined ? this.opts.token : o.token;
    if (token !== null && token !== undefined) headers.Authorization = `Bearer ${token}`;
    const body = typeof o.body === "string" ? Buffer.from(o.body) : o.body;
    // Content-Length "" means: send none (the body goes chunked).
    if (headers["Content-Length"] === "") delete headers["Content-Length"];
    else if (body !== undefined && headers["Content-Length"] === undefined) {
      headers["Content-Length"] = String(body.length);
    }
    const req = (this.https ? httpsRequest : httpRequest)({
      protocol: url.protocol,
      hostname: url.hostname,
      port: url.port,
      path: url.pathname + path,
      method,
      headers,
      agent: this.agent,
    });
    return new Promise<Reply>((resolve, reject) => {
      const timer = setTimeout(() => {
        req.destroy(new Error(`${method} ${path}: no reply after ${o.timeoutMs ?? 60_000} ms`));
      }, o.timeoutMs ?? 60_000);
      req.on("error", (e) => {
        clearTimeout(timer);
        reject(e);
      });
      req.on("response", (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("error", (e) => {
          clearTimeout(timer);
          reject(e);
        });
        res.on("end", () => {
          clearTimeout(timer);
          const b = Buffer.concat(chunks);
          resolve({
            status: res.statusCode ?? 0,
            headers: res.headers,
            body: b,
            json: <T>() => JSON.parse(b.toString("utf8")) as T,
          });
        });
      });
      req.end(body);
    });
  }

  /** POST a batch (records, or a raw body) to /volumes/NAME/updates. */
  updates(
    name: string,
    id: SourceIdent,
    records: UpdateRecord[] | Buffer,
    o: RequestOptions = {},
  ): Promise<Reply> {
    const body = Buffer.isBuffer(records) ? records : encodeUpdates(records);
    return this.request("POST", `/volumes/${encodeURIComponent(name)}/updates`, {
      ...o,
      body,
      headers: {
        "Content-Type": "application/vnd.blockfork.updates",
        ...identityHeaders(id),
        ...o.headers,
      },
    });
  }

  /** POST /volumes/NAME/flush. */
  flush(name: string, id: SourceIdent, o: RequestOptions = {}): Promise<Reply> {
    return this.request("POST", `/volumes/${encodeURIComponent(name)}/flush`, {
      ...o,
      headers: { ...identityHeaders(id), ...o.headers },
    });
  }

  /** GET /volumes/NAME/data. */
  data(name: string, offset: number, length: number): Promise<Reply> {
    return this.request("GET", `/volumes/${encodeURIComponent(name)}/data?offset=${offset}&length=${length}`);
  }

  /** GET /volumes/NAME/checksums. */
  checksums(name: string, offset: number, length: number, block: number): Promise<Reply> {
    return this.request(
      "GET",
      `/volumes/${encodeURIComponent(name)}/checksums?offset=${offset}&length=${length}&block=${block}`,
    );
  }

  /** PUT /fault. */
  setFault(fault: Record<string, unknown>): Promise<Reply> {
    return this.request("PUT", "/fault", {
      body: JSON.stringify(fault),
      headers: { "Content-Type": "application/json" },
    });
  }
}
