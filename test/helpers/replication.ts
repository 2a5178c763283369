// Black-box replication tests: a `blockfork gateway` and a `blockfork serve --gateway` on private
// paths (one scratch directory, a unix socket for NBD, 127.0.0.1 with a free port for HTTP), with
// the faults the tests need: SIGKILL and restart of either process on the same port and state,
// the gateway's fault API and its trigger file. Also the CLI calls (status, tracking show, verify,
// resync), fio in the foreground or background, and file checksums. Every process started here is
// stopped by stop() (by PID), which tests call in finally/after.

import { spawn, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { createReadStream, rmSync, unlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { startGateway, type GatewayHandle } from "./gateway.js";
import { BIN, scratchDir, startServer, type ServerHandle } from "./server.js";
import { nbdsh, run, SYSTEM_PATH, type RunResult } from "./run.js";

/** What `blockfork status --json` prints (the parts the tests read). */
export interface ProxyStatus {
  volume: { path: string; name: string; size: number };
  nbd: { connections: number };
  link: {
    gateway: string;
    mode: string;
    state: string;
    since: string;
    reason: string;
    outages: number;
    generation: number;
    seq: number;
    floor: number;
    durableThrough: number;
    queue: { updates: number; bytes: number; oldestMs: number };
    transport: "stream" | "post" | null;
    lastError: string;
    resync: {
      running: boolean;
      totalBytes: number;
      doneBytes: number;
      pageCacheBytes: number;
      pass: number;
      bytesPerSecond: number;
    };
    mirror: string | null;
    mirrorError?: string;
    mirrorErrorAt?: number;
    /** The secondary as the gateway last reported it. */
    secondary: string | null;
  } | null;
  tracking: {
    dirtyBytes: number;
    dirtyBlocks: number;
    granularity: number;
    regionSize: number;
    generation: number;
    source: string;
    firstDirtied: string | null;
    lastDirtied: string | null;
    recovery: {
      newLog: boolean;
      crashed: boolean;
      alRegions: number;
      gatewayChanged: boolean;
      gatewayMoved: { from: string } | null;
      fullResync: { since: string; reason: string } | null;
    };
    degraded: { since: string; reason: string } | null;
  } | null;
}

/** What `blockfork tracking show --json` prints. */
export interface TrackingShow {
  dirtyBytes: number;
  granularity: number;
  truncated: boolean;
  extents: { offset: number; length: number; firstDirtied: string; lastDirtied: string }[];
}

/** Run the blockfork CLI (never rejects: the status is part of the answer). */
export function cli(args: string[], timeoutMs = 60_000): Promise<RunResult> {
  return run(process.execPath, [BIN, ...args], { allowFailure: true, timeoutMs });
}

/** Options of startPair(). */
export interface PairOptions {
  /** Size of both volumes (default 128M). */
  size?: string;
  /** Extra `serve` arguments (after --gateway and --state-dir). */
  proxyArgs?: string[];
  /** Extra `gateway` arguments. */
  gatewayArgs?: string[];
  /** Require a token at the gateway (true: random); the proxy gets it unless proxyToken says otherwise. */
  token?: string | true;
  /** A token file content for the proxy (default: the gateway's token). */
  proxyToken?: string;
  /** Wait until the first resync is done (default true). */
  waitSynced?: boolean;
  /** Directory of the primary (default: the pair's scratch directory). */
  primaryDir?: string;
  /** The proxy's --state-dir (default: state/ in the pair's scratch directory). */
  stateDir?: string;
  /** Extra environment of the proxy. */
  proxyEnv?: NodeJS.ProcessEnv;
}

/** A gateway and a proxy forking to it. */
export interface Pair {
  dir: string;
  primary: string;
  secondary: string;
  /** The proxy's --state-dir. */
  stateDir: string;
  /** The gateway's --state-dir (fault trigger file, sources.json, mirror). */
  gwStateDir: string;
  /** Gateway base URL without /v1, as given to --gateway. */
  url: string;
  gw: GatewayHandle | null;
  proxy: ServerHandle | null;
  /** Everything the proxies printed on stderr, across restarts. */
  proxyLog(): string;
  killGateway(signal?: NodeJS.Signals): Promise<void>;
  restartGateway(): Promise<void>;
  killProxy(signal?: NodeJS.Signals): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  restartProxy(): Promise<void>;
  status(): Promise<ProxyStatus>;
  trackingShow(): Promise<TrackingShow>;
  /** Poll status until `ok` (or fail after timeoutMs, showing the last status and the logs). */
  waitStatus(what: string, ok: (s: ProxyStatus) => boolean, timeoutMs?: number): Promise<ProxyStatus>;
  /** Streaming with 0 dirty bytes. */
  waitSynced(timeoutMs?: number): Promise<ProxyStatus>;
  /** Write (or with null, remove) the gateway's fault trigger file. */
  faultFile(text: string | null): void;
  /** PUT /v1/fault. */
  setFault(fault: Record<string, unknown>): Promise<void>;
  /** Bytes of the secondary through the gateway's data endpoint. */
  gatewayData(offset: number, length: number): Promise<Buffer>;
  /** Stop both (SIGTERM, by PID) and remove the directory. */
  stop(): Promise<void>;
}

/** A free 127.0.0.1 port is picked by the first gateway; restarts bind the same one. */
export async function startPair(opts: PairOptions = {}): Promise<Pair> {
  const dir = scratchDir("blockfork-repl-");
  const size = opts.size ?? "128M";
  const primary = join(opts.primaryDir ?? dir, "prim.img");
  const secondary = join(dir, "sec.img");
  const stateDir = opts.stateDir ?? join(dir, "state");
  const gwStateDir = join(dir, "gw-state");
  let port = 0;
  let token: string | undefined;
  const gwOpts = () => ({
    dir,
    keepDir: true,
    volume: secondary,
    size,
    stateDir: gwStateDir,
    port,
    ...(token !== undefined ? { token } : opts.token !== undefined ? { token: opts.token } : {}),
    ...(opts.gatewayArgs ? { args: opts.gatewayArgs } : {}),
  });
  let logs = "";
  const pair: Pair = {
    dir,
    primary,
    secondary,
    stateDir,
    gwStateDir,
    url: "",
    gw: null,
    proxy: null,
    proxyLog: () => logs + (pair.proxy?.log() ?? ""),
    async killGateway(signal: NodeJS.Signals = "SIGKILL") {
      const g = pair.gw;
      pair.gw = null;
      if (g) await g.stop(signal);
    },
    async restartGateway() {
      if (pair.gw) throw new Error("the gateway is running");
      pair.gw = await startGateway(gwOpts());
    },
    async killProxy(signal: NodeJS.Signals = "SIGKILL") {
      const p = pair.proxy;
      pair.proxy = null;
      if (!p) return { code: null, signal: null };
      const r = await p.stop(signal);
      logs += p.log();
      return r;
    },
    async restartProxy() {
      if (pair.proxy) throw new Error("the proxy is running");
      pair.proxy = await startProxy();
    },
    async status() {
      const r = await cli(["status", "--state-dir", stateDir, "--json"]);
      if (r.code !== 0) throw new Error(`blockfork status exited ${r.code}: ${r.stderr}`);
      return JSON.parse(r.stdout) as ProxyStatus;
    },
    async trackingShow() {
      const r = await cli(["tracking", "show", "--state-dir", stateDir, "--json", "--limit", "100000"]);
      if (r.code !== 0) throw new Error(`blockfork tracking show exited ${r.code}: ${r.stderr}`);
      return JSON.parse(r.stdout) as TrackingShow;
    },
    async waitStatus(what, ok, timeoutMs = 30_000) {
      const deadline = Date.now() + timeoutMs;
      let last: ProxyStatus | null = null;
      for (;;) {
        last = await pair.status();
        if (ok(last)) return last;
        if (Date.now() > deadline) {
          throw new Error(
            `timed out after ${timeoutMs} ms waiting for ${what}; last status:\n` +
              `${JSON.stringify({ link: last.link, tracking: last.tracking }, null, 1)}\n` +
              `proxy log (tail):\n${pair.proxyLog().slice(-3000)}`,
          );
        }
        await new Promise((r) => setTimeout(r, 150));
      }
    },
    waitSynced(timeoutMs = 60_000) {
      return pair.waitStatus(
        "streaming with 0 dirty bytes",
        (s) => s.link?.state === "streaming" && s.tracking?.dirtyBytes === 0,
        timeoutMs,
      );
    },
    faultFile(text) {
      const f = join(gwStateDir, "fault");
      if (text === null) {
        try {
          unlinkSync(f);
        } catch {
          // not there
        }
      } else writeFileSync(f, text);
    },
    async setFault(fault) {
      if (!pair.gw) throw new Error("no gateway running");
      const r = await pair.gw.client.setFault(fault);
      if (r.status !== 200) throw new Error(`PUT /v1/fault answered ${r.status}: ${r.body.toString()}`);
    },
    async gatewayData(offset, length) {
      if (!pair.gw) throw new Error("no gateway running");
      const r = await pair.gw.client.data("sec", offset, length);
      if (r.status !== 200) throw new Error(`GET data answered ${r.status}: ${r.body.toString()}`);
      return r.body;
    },
    async stop() {
      try {
        await pair.killProxy("SIGTERM");
      } finally {
        try {
          await pair.killGateway("SIGTERM");
        } finally {
          rmSync(dir, { recursive: true, force: true });
        }
      }
    },
  };

  const startProxy = async (): Promise<ServerHandle> => {
    const args = ["--gateway", pair.url, "--state-dir", stateDir];
    if (opts.token !== undefined || opts.proxyToken !== undefined) {
      const file = join(dir, "proxy-token");
      writeFileSync(file, `${opts.proxyToken ?? token}\n`, { mode: 0o600 });
      args.push("--gateway-token-file", file);
    }
    args.push(...(opts.proxyArgs ?? []));
    return startServer({ dir, keepDir: true, volume: primary, size, args, env: opts.proxyEnv });
  };

  try {
    pair.gw = await startGateway(gwOpts());
    port = pair.gw.port;
    if (pair.gw.token !== null) token = pair.gw.token;
    pair.url = pair.gw.url.replace(/\/v1$/, "");
    pair.proxy = await startProxy();
    if (opts.waitSynced !== false) await pair.waitSynced();
  } catch (e) {
    await pair.stop().catch(() => {});
    throw e;
  }
  return pair;
}

/** Write `data` at `offset` through the pair's proxy (nbdsh), then FLUSH. */
export function writeThroughNbd(pair: Pair, offset: number, data: Buffer): Promise<void> {
  return writeToUri(pair.proxy!.uri, pair.dir, offset, data);
}

/** Write `data` at `offset` to the export at `uri` (nbdsh; the data staged in `dir`), then FLUSH. */
export async function writeToUri(uri: string, dir: string, offset: number, data: Buffer): Promise<void> {
  const file = join(dir, `data-${Date.now()}.bin`);
  writeFileSync(file, data);
  await nbdsh(
    uri,
    [
      "import nbd, os",
      "h = nbd.NBD()",
      'h.connect_uri(os.environ["URI"])',
      `h.pwrite(open(${JSON.stringify(file)}, "rb").read(), ${offset})`,
      "h.flush()",
      "h.shutdown()",
    ].join("\n"),
  );
  rmSync(file, { force: true });
}

/** SHA-256 of a file (hex). */
export function sha256File(path: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const h = createHash("sha256");
    createReadStream(path)
      .on("data", (d) => h.update(d))
      .on("error", reject)
      .on("end", () => resolve(h.digest("hex")));
  });
}

/** One fio job's result. */
export interface FioJob {
  jobname: string;
  error: number;
  write: { io_bytes: number; total_ios: number };
  read: { io_bytes: number; total_ios: number };
}

/** fio's exit and its JSON report (null when it printed none, e.g. killed). */
export interface FioResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  jobs: FioJob[] | null;
  stdout: string;
  stderr: string;
}

/** A fio run in the background. */
export interface FioRun {
  proc: ChildProcess;
  done: Promise<FioResult>;
  /** SIGKILL it (by PID) if it still runs, and wait. */
  kill(): Promise<FioResult>;
}

/** Start fio with the nbd engine on `uri` in the background. */
export function fioStart(uri: string, cwd: string, args: string[]): FioRun {
  const proc = spawn("fio", ["--ioengine=nbd", `--uri=${uri}`, "--output-format=json", ...args], {
    cwd,
    env: { ...process.env, PATH: SYSTEM_PATH },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  proc.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
  proc.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  const done = new Promise<FioResult>((resolve) => {
    proc.on("error", (e) =>
      resolve({ code: null, signal: null, jobs: null, stdout, stderr: `${stderr}\n${e.message}` }),
    );
    proc.on("close", (code, signal) => {
      // The nbd engine prints "fio: connected to NBD server" before the report.
      const start = stdout.startsWith("{") ? 0 : stdout.indexOf("\n{") + 1;
      let jobs: FioJob[] | null = null;
      if (start >= 0 && stdout.slice(start).startsWith("{")) {
        try {
          jobs = (JSON.parse(stdout.slice(start)) as { jobs: FioJob[] }).jobs;
        } catch {
          jobs = null;
        }
      }
      resolve({ code, signal, jobs, stdout, stderr });
    });
  });
  return {
    proc,
    done,
    async kill() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
      return done;
    },
  };
}

/** fio exited 0, every job has error 0, and wrote something. */
export function fioClean(r: FioResult): string | null {
  if (r.code !== 0 || r.jobs === null)
    return `fio exited ${r.code ?? r.signal}\n${r.stderr}\n${r.stdout.slice(-2000)}`;
  for (const j of r.jobs) {
    if (j.error !== 0) return `fio job ${j.jobname} error ${j.error}\n${r.stderr}`;
    if (j.write.io_bytes === 0) return `fio job ${j.jobname} wrote nothing`;
  }
  return null;
}

/** A process in the background (an nbdsh writer, ...): its output, its end, and a kill by PID. */
export interface Background {
  proc: ChildProcess;
  done: Promise<RunResult>;
  output(): { stdout: string; stderr: string };
  kill(): Promise<RunResult>;
}

/** Start `cmd` in the background with the system PATH (nbdsh needs Debian's python3). */
export function background(cmd: string, args: string[], env: NodeJS.ProcessEnv = {}): Background {
  const proc = spawn(cmd, args, {
    env: { ...process.env, PATH: SYSTEM_PATH, ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  proc.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
  proc.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  const done = new Promise<RunResult>((resolve) => {
    proc.on("error", (e) => resolve({ code: null, signal: null, stdout, stderr: `${stderr}\n${e.message}` }));
    proc.on("close", (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
  return {
    proc,
    done,
    output: () => ({ stdout, stderr }),
    async kill() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
      return done;
    },
  };
}

/** Sleep. */
export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
