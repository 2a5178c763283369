// Graceful shutdown under load. While fio (verifying its own data) and a libnbd writer hammer the
// server, SIGTERM (or SIGINT) arrives: the server must finish what is in flight, refuse new
// requests with ESHUTDOWN, flush, remove its socket and exit 0; and every write that was
// acknowledged before the end must be in the volume file. The writer makes that checkable: each
// write has a sequence number whose content is unique, and its log of acknowledged and refused
// writes is compared block by block with the volume file after the server has exited.
// Also: a second signal during a slow shutdown exits at once with 130, and new connections are
// refused while shutting down.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { closeSync, existsSync, openSync, readSync, rmSync } from "node:fs";
import { connect } from "node:net";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { run, SYSTEM_PATH } from "../helpers/run.js";
import { RawClient } from "../helpers/raw-client.js";

const MiB = 1024 * 1024;
const BS = 4096;
/** The writer's region: blocks [WRITER_BASE, WRITER_BASE + WRITER_BLOCKS * BS); fio stays below. */
const WRITER_BASE = 256 * MiB;
const WRITER_BLOCKS = 16384;

const cleanups: (() => Promise<void> | void)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** A child process whose output is collected and which is killed at the end of the file. */
interface Child {
  proc: ChildProcess;
  stdout(): string;
  stderr(): string;
  exited: Promise<number | null>;
}

function child(cmd: string, args: string[], env: NodeJS.ProcessEnv = {}, cwd?: string): Child {
  const proc = spawn(cmd, args, {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, PATH: SYSTEM_PATH, ...env },
    ...(cwd ? { cwd } : {}),
  });
  let out = "";
  let err = "";
  proc.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
  proc.stderr.setEncoding("utf8").on("data", (d: string) => (err += d));
  const exited = new Promise<number | null>((resolve) => proc.once("close", (code) => resolve(code)));
  cleanups.push(() => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
  });
  return { proc, stdout: () => out, stderr: () => err, exited };
}

async function until(what: string, ok: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(25);
  }
}

async function server(args: string[] = []): Promise<ServerHandle> {
  const dir = scratchDir("blockfork-shutdown-");
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const srv = await startServer({ dir, size: "512M", args });
  cleanups.push(async () => {
    await srv.stop("SIGKILL");
  });
  return srv;
}

// ---- the acknowledged-writes writer (libnbd through nbdsh)

const WRITER = `
import errno, hashlib, json, os, sys, time
import nbd

BS = 4096
base = int(os.environ["BASE"])
nblocks = int(os.environ["NBLOCKS"])
qd = 32
limit = float(os.environ["LIMIT"])

def content(seq):
    return hashlib.sha256(b"blockfork-shutdown-%d" % seq).digest() * (BS // 32)

h = nbd.NBD()
h.connect_uri(os.environ["URI"])
last = [-1] * nblocks
failed = []
pending = {}
state = {"acked": 0, "reported": 0, "seq": 0, "stop": False}

def errname(e):
    # libnbd's Python binding gives the errno name as a string; older ones an int.
    if isinstance(e.errno, str):
        return e.errno
    return errno.errorcode.get(e.errno or 0, "errno %s" % e.errno)

def settle(c):
    s = pending[c][0]
    try:
        done = h.aio_command_completed(c)
    except nbd.Error as e:
        del pending[c]
        failed.append([s, errname(e)])
        state["stop"] = True
        return
    if done:
        del pending[c]
        b = s % nblocks
        last[b] = max(last[b], s)
        state["acked"] += 1

t0 = time.time()
try:
    while True:
        # Sequence numbers that share a block are nblocks apart and qd < nblocks, so two writes
        # to one block are never in flight together: the later one was issued after the
        # earlier one completed.
        while not state["stop"] and len(pending) < qd and time.time() - t0 < limit:
            s = state["seq"]
            buf = nbd.Buffer.from_bytearray(bytearray(content(s)))
            try:
                c = h.aio_pwrite(buf, base + (s % nblocks) * BS)
            except nbd.Error as e:
                failed.append([s, errname(e)])
                state["stop"] = True
                break
            pending[c] = (s, buf)
            state["seq"] = s + 1
        if not pending:
            break
        try:
            h.poll(-1)
        except nbd.Error:
            state["stop"] = True
        for c in list(pending):
            settle(c)
        if h.aio_is_dead() or h.aio_is_closed():
            state["stop"] = True
            for c in list(pending):
                settle(c)
            break
        if state["acked"] - state["reported"] >= 2000:
            state["reported"] = state["acked"]
            print("acked %d" % state["acked"], file=sys.stderr, flush=True)
except nbd.Error as e:
    failed.append([-1, errname(e)])
print(json.dumps({"last": last, "failed": failed, "unknown": [p[0] for p in pending.values()],
                  "acked": state["acked"], "issued": state["seq"]}))
`;

interface WriterResult {
  last: number[];
  failed: [number, string][];
  unknown: number[];
  acked: number;
  issued: number;
}

function startWriter(uri: string, limitSec: number): Child {
  return child("nbdsh", ["-n", "-c", WRITER], {
    URI: uri,
    BASE: String(WRITER_BASE),
    NBLOCKS: String(WRITER_BLOCKS),
    LIMIT: String(limitSec),
  });
}

function ackedSoFar(w: Child): number {
  const all = [...w.stderr().matchAll(/acked (\d+)/g)];
  return all.length ? Number(all[all.length - 1][1]) : 0;
}

function content(seq: number): Buffer {
  return Buffer.concat(
    Array.from({ length: BS / 32 }, () => createHash("sha256").update(`blockfork-shutdown-${seq}`).digest()),
  );
}

/**
 * Compare the writer's log with the volume file: each block holds the content of its last
 * acknowledged write, or of a later write whose fate is unknown (sent, no answer); never that of
 * a write refused with ESHUTDOWN (refused means not performed), and never anything else.
 */
function verifyAcknowledged(volume: string, r: WriterResult): { exact: number; later: number } {
  const candidates = new Map<number, number[]>();
  const maybeWritten = (s: number): void => {
    const b = s % WRITER_BLOCKS;
    candidates.set(b, [...(candidates.get(b) ?? []), s]);
  };
  const refused = new Set<number>();
  for (const [s, err] of r.failed) {
    if (s < 0) continue;
    if (err === "ESHUTDOWN") refused.add(s);
    else maybeWritten(s);
  }
  r.unknown.forEach(maybeWritten);
  const fd = openSync(volume, "r");
  const buf = Buffer.alloc(BS);
  let exact = 0;
  let later = 0;
  try {
    for (let b = 0; b < WRITER_BLOCKS; b++) {
      assert.equal(readSync(fd, buf, 0, BS, WRITER_BASE + b * BS), BS);
      const last = r.last[b];
      const expected = last >= 0 ? content(last) : Buffer.alloc(BS);
      if (buf.equals(expected)) {
        exact++;
        continue;
      }
      const other = (candidates.get(b) ?? []).filter((s) => s > last);
      if (other.some((s) => buf.equals(content(s)))) {
        later++;
        continue;
      }
      const refusedHere = [...refused].filter((s) => s % WRITER_BLOCKS === b && buf.equals(content(s)));
      assert.equal(
        refusedHere.length,
        0,
        `block ${b} holds write #${refusedHere[0]}, which was refused with ESHUTDOWN`,
      );
      assert.fail(
        `block ${b}: the volume does not hold acknowledged write #${last} ` +
          `(nor a later write of unknown fate: ${other.join(", ") || "none"})`,
      );
    }
  } finally {
    closeSync(fd);
  }
  return { exact, later };
}

function parseWriter(w: Child): WriterResult {
  const line = w.stdout().trim().split("\n").pop() ?? "";
  try {
    return JSON.parse(line) as WriterResult;
  } catch {
    throw new Error(`the writer printed no result:\nstdout: ${w.stdout()}\nstderr: ${w.stderr()}`);
  }
}

function checkShutdownLog(srv: ServerHandle, sig: string): void {
  const log = srv.log();
  assert.match(log, new RegExp(`${sig}: shutting down`), `no shutdown message:\n${log}`);
  assert.match(log, /volume flushed/, `no final flush:\n${log}`);
  assert.match(log, /\bstopped\b/);
}

async function checkWriterAfterShutdown(srv: ServerHandle, w: Child): Promise<string> {
  const wcode = await w.exited;
  const r = parseWriter(w);
  assert.equal(wcode, 0, `the writer crashed:\n${w.stderr()}`);
  assert.ok(r.acked >= 4000, `only ${r.acked} writes were acknowledged`);
  const kinds = new Set(r.failed.map(([, e]) => e));
  assert.ok(
    kinds.has("ESHUTDOWN"),
    `no write was refused with ESHUTDOWN, so the signal did not land mid-run (failures: ${JSON.stringify(r.failed.slice(0, 5))})`,
  );
  for (const k of kinds) {
    assert.ok(["ESHUTDOWN", "ENOTCONN", "ECONNRESET", "EPIPE"].includes(k), `unexpected write failure ${k}`);
  }
  const v = verifyAcknowledged(srv.volume, r);
  assert.equal(v.exact + v.later, WRITER_BLOCKS);
  const refused = r.failed.filter(([, e]) => e === "ESHUTDOWN").length;
  return (
    `writer: ${r.issued} issued, ${r.acked} acknowledged, ${refused} refused with ESHUTDOWN, ` +
    `${r.failed.length - refused} other failures, ${r.unknown.length} unanswered; ` +
    `${v.exact} blocks hold their last acknowledged write, ${v.later} a later unacknowledged one`
  );
}

void test(
  "SIGTERM under fio and libnbd load: exit 0, flushed, every acknowledged write on disk",
  { timeout: 120_000 },
  async (t) => {
    const srv = await server();
    const fio = child(
      "fio",
      [
        "--name=load",
        "--ioengine=nbd",
        `--uri=${srv.uri}`,
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--offset=0",
        "--size=128M",
        "--verify=crc32c",
        "--verify_backlog=1024",
        "--time_based",
        "--runtime=6",
        "--output-format=json",
      ],
      {},
      srv.dir,
    );
    const writer = startWriter(srv.uri, 60);
    const t0 = Date.now();
    await until("the writer's first acknowledgements", () => ackedSoFar(writer) >= 4000, 30_000);
    await sleep(Math.max(0, 3000 - (Date.now() - t0)));
    assert.equal(fio.proc.exitCode, null, `fio ended before the signal:\n${fio.stderr()}`);
    const stopped = await srv.stop("SIGTERM");
    assert.equal(stopped.code, 0, `exit ${stopped.code ?? stopped.signal}\n${srv.log()}`);
    checkShutdownLog(srv, "SIGTERM");
    assert.equal(existsSync(srv.sock), false, "the socket file is still there after shutdown");

    // fio: interrupted by the shutdown (ESHUTDOWN), never by a verification failure.
    await fio.exited;
    const json = fio.stdout().slice(fio.stdout().indexOf("{"));
    const report = JSON.parse(json) as { jobs: { error: number; write: { io_bytes: number } }[] };
    assert.ok(report.jobs[0].write.io_bytes > 0, "fio wrote nothing");
    assert.equal(report.jobs[0].error, 108, `fio ended with error ${report.jobs[0].error}:\n${fio.stderr()}`);
    assert.doesNotMatch(fio.stderr(), /verify|bad magic|crc32c/i, `fio saw corrupt data:\n${fio.stderr()}`);

    t.diagnostic(await checkWriterAfterShutdown(srv, writer));
  },
);

void test("SIGINT shuts down the same way", { timeout: 120_000 }, async (t) => {
  const srv = await server();
  const writer = startWriter(srv.uri, 60);
  await until("the writer's first acknowledgements", () => ackedSoFar(writer) >= 6000, 30_000);
  const stopped = await srv.stop("SIGINT");
  assert.equal(stopped.code, 0, `exit ${stopped.code ?? stopped.signal}\n${srv.log()}`);
  checkShutdownLog(srv, "SIGINT");
  assert.equal(existsSync(srv.sock), false, "the socket file is still there after shutdown");
  t.diagnostic(await checkWriterAfterShutdown(srv, writer));
});

/** Connect over TCP; resolves with the error code, or "connected". */
function tcpConnect(port: number): Promise<string> {
  return new Promise((resolve) => {
    const s = connect({ host: "127.0.0.1", port });
    s.once("connect", () => {
      s.destroy();
      resolve("connected");
    });
    s.once("error", (e: NodeJS.ErrnoException) => resolve(e.code ?? e.message));
  });
}

/** The server is still running (shutting down); else fail with how it ended and its log. */
function assertShuttingDown(srv: ServerHandle, why: string): void {
  const { exitCode, signalCode } = srv.proc;
  if (exitCode !== null || signalCode !== null) {
    assert.fail(`${why}, but the server already exited (${exitCode ?? signalCode}):\n${srv.log()}`);
  }
}

/** Wait for the server to exit by itself (no signal); its exit code. */
async function exitOf(srv: ServerHandle, timeoutMs: number): Promise<number | null> {
  await until(
    "the server to exit",
    () => srv.proc.exitCode !== null || srv.proc.signalCode !== null,
    timeoutMs,
  );
  return srv.proc.exitCode;
}

/** A server with a client in transmission that never closes its side: shutdown waits for it. */
async function slowShutdown(): Promise<{ srv: ServerHandle; held: RawClient; port: number }> {
  const srv = await server(["--listen", "127.0.0.1:0"]);
  await until("the banner", () => /nbd:\/\/127\.0\.0\.1:\d+/.test(srv.stdout()), 10_000);
  const port = Number(/nbd:\/\/127\.0\.0\.1:(\d+)/.exec(srv.stdout())![1]);
  const held = await RawClient.connect(srv.sock);
  cleanups.push(() => held.destroy());
  const session = await held.handshake();
  assert.equal(session.size, 512 * MiB);
  return { srv, held, port };
}

void test(
  "during shutdown new connections are refused; the shutdown then ends by itself",
  { timeout: 60_000 },
  async () => {
    const { srv, held, port } = await slowShutdown();
    const midHandshake = await RawClient.connect(srv.sock);
    cleanups.push(() => midHandshake.destroy());
    await midHandshake.greeting();
    assert.equal(await tcpConnect(port), "connected", "the TCP listener does not accept before the signal");

    srv.proc.kill("SIGTERM");
    await until("the shutdown message", () => /SIGTERM: shutting down/.test(srv.log()), 10_000);
    assert.equal(
      await midHandshake.closesWithin(5_000),
      true,
      "a client still in the handshake was not dropped",
    );
    assertShuttingDown(srv, "with a client still connected, the shutdown must wait for it");
    assert.equal(await tcpConnect(port), "ECONNREFUSED", "a TCP connection was accepted during shutdown");
    const unix = await run("nbdinfo", ["--size", srv.uri], { allowFailure: true, timeoutMs: 10_000 });
    assert.notEqual(unix.code, 0, "nbdinfo got in during shutdown");
    const tcp = await run("nbdinfo", ["--size", `nbd://127.0.0.1:${port}`], {
      allowFailure: true,
      timeoutMs: 10_000,
    });
    assert.notEqual(tcp.code, 0, "nbdinfo over TCP got in during shutdown");
    assertShuttingDown(srv, "the shutdown must still be in progress here");

    // No second signal: the shutdown must end on its own once the held client's grace period is over.
    const code = await exitOf(srv, 30_000);
    assert.equal(code, 0, `exit ${code}\n${srv.log()}`);
    assert.equal(held.ended, true, "the held client was never told the server was closing");
    assert.equal(existsSync(srv.sock), false, "the socket file is still there after shutdown");
    checkShutdownLog(srv, "SIGTERM");
  },
);

void test("a second SIGTERM during a slow shutdown exits at once with 130", { timeout: 60_000 }, async () => {
  const { srv } = await slowShutdown();
  srv.proc.kill("SIGTERM");
  await until("the shutdown message", () => /SIGTERM: shutting down/.test(srv.log()), 10_000);
  await sleep(300);
  assertShuttingDown(srv, "the shutdown must still be in progress when the second signal comes");
  const t = Date.now();
  const stopped = await srv.stop("SIGTERM");
  const took = Date.now() - t;
  assert.equal(stopped.code, 130, `exit ${stopped.code ?? stopped.signal}\n${srv.log()}`);
  assert.ok(took < 2000, `the second signal took ${took} ms to end the server`);
  assert.match(srv.log(), /second SIGTERM/);
});
