// Helpers for the point-in-time (PIT) black-box and VM tests: recording reference points (wait past
// a merge-window boundary, note the time, checksum the primary streamed out by nbdcopy), the
// `blockfork mark/snapshots` commands, fio with the nbd engine (in the foreground or as a
// background load), the server's answer to NBD_OPT_GO for a snapshot name (with a raw client),
// nbdsh snippets with test/python/nbdcheck.py, and nbdfuse + loop device stacks.
//
// Every process, mount and loop device these helpers create is removed by the caller's after()
// hooks through the returned handles (stop(), detach()); nothing is found or killed by name.

import { spawn, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { BIN, ROOT, type ServerHandle } from "./server.js";
import { nbdsh, run, SYSTEM_PATH, type RunResult } from "./run.js";
import { infoRequestData, RawClient, REP_ACK } from "./raw-client.js";
import type { SnapshotsReport } from "../../src/admin/server.js";

/** What `blockfork snapshots --json` prints. */
export type { SnapshotsReport };

export const MiB = 1024 * 1024;
/** Margin after a window boundary before a reference time is taken (clock skew between processes). */
export const BOUNDARY_MARGIN_MS = 150;
/** NBD_REP_ERR_UNKNOWN. */
export const REP_ERR_UNKNOWN = 0x80000006;

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Sleep until `margin` ms after the next boundary of `windowMs` windows (wall clock). */
export async function pastBoundary(windowMs: number, margin = BOUNDARY_MARGIN_MS): Promise<void> {
  const now = Date.now();
  await sleep(windowMs - (now % windowMs) + margin);
}

/**
 * sha256 (hex) of a whole export: `nbdcopy URI -` hashed as it streams (OpenSSL's SHA-256 in this
 * process, several times faster here than coreutils' sha256sum on GiB-sized exports).
 */
export function exportSha(uri: string, timeoutMs = 120_000): Promise<string> {
  return new Promise((resolve, reject) => {
    const p = spawn("nbdcopy", ["--", uri, "-"], {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, PATH: SYSTEM_PATH },
    });
    const hash = createHash("sha256");
    let bytes = 0;
    let stderr = "";
    p.stdout.on("data", (d: Buffer) => {
      hash.update(d);
      bytes += d.length;
    });
    p.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const timer = setTimeout(() => p.kill("SIGKILL"), timeoutMs);
    p.on("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
    p.on("close", (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve(hash.digest("hex"));
      else reject(new Error(`nbdcopy ${uri} - exited ${code ?? signal} after ${bytes} bytes: ${stderr}`));
    });
  });
}

/** A reference point: the time (ISO-8601) and the primary's sha256 at that time. */
export interface PitPoint {
  label: string;
  iso: string;
  ms: number;
  sha: string;
}

/**
 * Record a reference point: the caller has finished every write; wait past the next window
 * boundary, take the time, checksum the primary. Nothing may write until this resolves.
 */
export async function recordPoint(srv: ServerHandle, label: string, windowMs = 1000): Promise<PitPoint> {
  await pastBoundary(windowMs);
  const ms = Date.now();
  const sha = await exportSha(srv.uri);
  return { label, iso: new Date(ms).toISOString(), ms, sha };
}

/** The URI of snap@<what> on the server's socket. */
export function snapUri(srv: ServerHandle, what: string): string {
  return srv.uriFor(`snap@${what}`);
}

/** Run the blockfork CLI (never throws on a non-zero exit status). */
export function blockfork(args: string[], timeoutMs = 30_000): Promise<RunResult> {
  return run(process.execPath, [BIN, ...args], { allowFailure: true, timeoutMs });
}

/** `blockfork snapshots --state-dir DIR --json`, parsed; throws with the output on failure. */
export async function snapshots(stateDir: string): Promise<SnapshotsReport> {
  const r = await blockfork(["snapshots", "--state-dir", stateDir, "--json"]);
  if (r.code !== 0) throw new Error(`blockfork snapshots exited ${r.code}: ${r.stdout}${r.stderr}`);
  return JSON.parse(r.stdout) as SnapshotsReport;
}

/** `blockfork mark NAME --state-dir DIR`; throws with the output on failure. */
export async function mark(stateDir: string, name: string): Promise<string> {
  const r = await blockfork(["mark", name, "--state-dir", stateDir]);
  if (r.code !== 0) throw new Error(`blockfork mark ${name} exited ${r.code}: ${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** The server's final answer to NBD_OPT_GO for `name`: the reply type and its message. */
export async function goReply(sock: string, name: string): Promise<{ type: number; message: string }> {
  const c = await RawClient.connect(sock);
  try {
    await c.greeting();
    c.sendClientFlags(3);
    const replies = await c.option(7, infoRequestData(name));
    const last = replies[replies.length - 1];
    const message = last.type === REP_ACK ? "" : last.data.toString("utf8");
    if (last.type === REP_ACK) {
      // In transmission now: leave politely (NBD_CMD_DISC).
      const disc = Buffer.alloc(28);
      disc.writeUInt32BE(0x25609513, 0);
      disc.writeUInt16BE(2, 6);
      await c.send(disc);
    } else {
      c.sendOption(2); // NBD_OPT_ABORT
      await c.optionReply().catch(() => undefined);
    }
    return { type: last.type, message };
  } finally {
    c.destroy();
  }
}

/** The export names NBD_OPT_LIST returns (NBD_REP_SERVER replies), with a raw client. */
export async function listExports(sock: string): Promise<string[]> {
  const c = await RawClient.connect(sock);
  try {
    await c.greeting();
    c.sendClientFlags(3);
    const replies = await c.option(3);
    const last = replies[replies.length - 1];
    if (last.type !== REP_ACK) throw new Error(`NBD_OPT_LIST refused: 0x${last.type.toString(16)}`);
    c.sendOption(2); // NBD_OPT_ABORT
    await c.optionReply().catch(() => undefined);
    return replies
      .filter((r) => r.type === 2)
      .map((r) => r.data.toString("utf8", 4, 4 + r.data.readUInt32BE(0)));
  } finally {
    c.destroy();
  }
}

/** Wait until the server's log matches `re`; returns the matching line. */
export async function waitForLog(srv: ServerHandle, re: RegExp, timeoutMs = 15_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const line = srv
      .log()
      .split("\n")
      .find((l) => re.test(l));
    if (line !== undefined) return line;
    if (Date.now() > deadline)
      throw new Error(`the server never logged ${re} in ${timeoutMs} ms; log:\n${srv.log()}`);
    await sleep(100);
  }
}

// ---- nbdsh with test/python/nbdcheck.py

const PYLIB = join(ROOT, "test", "python");
const PRELUDE =
  'import os, sys, errno, random\nsys.path.insert(0, os.environ["PYLIB"])\nfrom nbdcheck import *\nimport nbd\n';

function dedent(s: string): string {
  const lines = s.replace(/^\n/, "").split("\n");
  const indents = lines.filter((l) => l.trim() !== "").map((l) => /^ */.exec(l)![0].length);
  const cut = Math.min(...indents);
  return lines.map((l) => l.slice(cut)).join("\n");
}

/** Run a Python body (nbdcheck's helpers imported) under nbdsh with URI=uri; throws on failure. */
export async function py(uri: string, body: string, env: Record<string, string> = {}): Promise<RunResult> {
  return nbdsh(uri, PRELUDE + dedent(body), { env: { PYLIB, ...env }, timeoutMs: 90_000 });
}

// ---- fio (nbd engine)

export interface FioJob {
  jobname: string;
  error: number;
  read: { io_bytes: number };
  write: { io_bytes: number; total_ios: number };
  trim: { io_bytes: number };
}

/** Parse fio's JSON report (the nbd engine prints a line before it). */
export function fioJobs(r: RunResult): FioJob[] {
  const start = r.stdout.indexOf("{");
  if (start < 0) throw new Error(`no JSON report from fio (exit ${r.code}):\n${r.stdout}\n${r.stderr}`);
  return (JSON.parse(r.stdout.slice(start)) as { jobs: FioJob[] }).jobs;
}

/** Run fio on `uri` to completion (jobs as threads); throws unless it exits 0 with no job error. */
export async function fio(uri: string, cwd: string, args: string[], timeoutMs = 90_000): Promise<FioJob[]> {
  const r = await run(
    "fio",
    ["--ioengine=nbd", "--thread", `--uri=${uri}`, "--output-format=json", ...args],
    {
      cwd,
      allowFailure: true,
      timeoutMs,
    },
  );
  const jobs = fioJobs(r);
  const errors = jobs.filter((j) => j.error !== 0).map((j) => `${j.jobname}: ${j.error}`);
  if (r.code !== 0 || errors.length > 0) {
    throw new Error(`fio exited ${r.code}; job errors: ${errors.join(", ")}\n${r.stderr}`);
  }
  return jobs;
}

/** A background process (fio load, ...) with its output; stop() ends it by its PID. */
export interface Background {
  proc: ChildProcess;
  /** Resolves when it exits by itself or after stop(). */
  done: Promise<RunResult>;
  stop(signal?: NodeJS.Signals): Promise<RunResult>;
}

/** Start a command in the background. */
export function background(cmd: string, args: string[], cwd: string): Background {
  const proc = spawn(cmd, args, {
    cwd,
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, PATH: SYSTEM_PATH },
  });
  let stdout = "";
  let stderr = "";
  proc.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
  proc.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  const done = new Promise<RunResult>((resolve) => {
    proc.on("error", (e) => resolve({ code: -1, signal: null, stdout, stderr: stderr + String(e) }));
    proc.on("close", (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
  return {
    proc,
    done,
    async stop(signal: NodeJS.Signals = "SIGINT") {
      if (proc.exitCode === null && proc.signalCode === null && proc.pid !== undefined) proc.kill(signal);
      const t = setTimeout(() => proc.kill("SIGKILL"), 20_000);
      const r = await done;
      clearTimeout(t);
      return r;
    },
  };
}

/**
 * A background fio write load on `uri` (time-based; stop() ends it early). Jobs run as threads
 * (--thread), so the one PID we started is the whole of fio: no forked job process survives it.
 */
export function fioLoad(uri: string, cwd: string, args: string[]): Background {
  return background(
    "fio",
    ["--ioengine=nbd", "--thread", `--uri=${uri}`, "--output-format=json", ...args],
    cwd,
  );
}

// ---- nbdfuse + loop device (test/helpers/fuse.ts)

export { FuseLoop } from "./fuse.js";
