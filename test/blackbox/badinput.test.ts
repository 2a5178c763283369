// Black-box abuse of `blockfork serve` over its unix socket with raw bytes: wrong magic, truncated
// messages, oversized, out-of-range, misaligned and unknown requests, writes to a read-only export,
// stalled handshakes, thousands of idle connections and the connection limit, and a volume file
// truncated by another program while it is served (reads past its new end: EIO). After every abuse
// the process must still be alive and serve a well-behaved client correctly, and it must shut down
// cleanly at the end (exit status 0).

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { BIN, scratchDir, startServer, waitForSocket, type ServerHandle } from "../helpers/server.js";
import { run } from "../helpers/run.js";
import {
  optionBytes,
  infoRequestData,
  RawClient,
  requestBytes,
  type RawRequest,
} from "../helpers/raw-client.js";

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 };
const ERR = { EPERM: 1, EINVAL: 22, ENOSPC: 28 };

/** What these tests need of a running server (startServer's handle, or one spawned here). */
interface Server {
  proc: ChildProcess;
  sock: string;
  log(): string;
  stop(): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function alive(srv: Server): void {
  assert.equal(srv.proc.exitCode, null, `the server exited; its log:\n${srv.log()}`);
  assert.equal(srv.proc.signalCode, null, `the server was killed; its log:\n${srv.log()}`);
}

/** The process is alive and a good client can write and read back random data. */
async function healthy(srv: Server, opts: { readOnly?: boolean } = {}): Promise<void> {
  alive(srv);
  const c = await RawClient.connect(srv.sock);
  try {
    const s = await c.handshake({ structured: false });
    assert.equal(s.size, SIZE);
    const off = 4096 * (1 + Math.floor(Math.random() * 1000));
    const data = randomBytes(65536);
    if (opts.readOnly) {
      assert.equal((await c.readAt(off, 65536)).length, 65536);
    } else {
      assert.equal(await c.writeAt(off, data), 0);
      assert.deepEqual(await c.readAt(off, 65536), data);
    }
    await c.disconnect();
  } finally {
    c.destroy();
  }
  alive(srv);
}

/** Wait (at most `ms`) for the server's log to match `re` (stderr arrives through a pipe). */
async function logMatches(srv: Server, re: RegExp, ms = 3000): Promise<boolean> {
  const t0 = Date.now();
  while (!re.test(srv.log())) {
    if (Date.now() - t0 > ms) return false;
    await sleep(50);
  }
  return true;
}

/** Stop a server and require a clean exit. */
async function stopClean(srv: Server): Promise<void> {
  const r = await srv.stop();
  assert.deepEqual(r, { code: 0, signal: null }, `the server did not exit cleanly; its log:\n${srv.log()}`);
}

/** A connected client in transmission (simple replies). */
async function session(srv: Server): Promise<RawClient> {
  const c = await RawClient.connect(srv.sock);
  await c.handshake();
  return c;
}

/** Send a request and return the simple reply's error. */
async function errorOf(c: RawClient, r: RawRequest, payload?: Buffer): Promise<number> {
  c.request(r, payload);
  const reply = await c.simpleReply(15_000);
  assert.equal(reply.cookie, r.cookie ?? 0n);
  return reply.error;
}

/** The soft limit on open files of this test process (inherited by a child shell). */
async function openFileLimit(): Promise<number> {
  const r = await run("bash", ["-c", "ulimit -n"]);
  const n = Number(r.stdout.trim());
  return Number.isFinite(n) ? n : 1024;
}

/**
 * Spawn `blockfork serve` the way startServer does, but under `ulimit -n nofile` (thousands of
 * connections need descriptors). Falls back to the hard limit when nofile is above it.
 */
async function spawnServer(args: string[], nofile: number): Promise<Server> {
  const dir = scratchDir();
  const sock = join(dir, "nbd.sock");
  const volume = join(dir, "disk.img");
  const script = `ulimit -n ${nofile} 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec "$@"`;
  const proc = spawn(
    "bash",
    [
      "-c",
      script,
      "bash",
      process.execPath,
      BIN,
      "serve",
      "--volume",
      volume,
      "--size",
      "64M",
      "--socket",
      sock,
      "--listen",
      "none",
      ...args,
    ],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  let err = "";
  proc.stderr.setEncoding("utf8").on("data", (d: string) => (err += d));
  proc.stdout.resume();
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) =>
    proc.once("exit", (code, signal) => res({ code, signal })),
  );
  try {
    await waitForSocket(sock, 15_000, proc);
  } catch (e) {
    proc.kill("SIGKILL");
    throw new Error(`${(e as Error).message}\nserver stderr:\n${err}`);
  }
  let stopped = false;
  return {
    proc,
    sock,
    log: () => err,
    async stop() {
      if (!stopped) {
        stopped = true;
        if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGTERM");
        const timer = setTimeout(() => proc.kill("SIGKILL"), 40_000);
        const r = await exited;
        clearTimeout(timer);
        rmSync(dir, { recursive: true, force: true });
        return r;
      }
      return exited;
    },
  };
}

/** "Max open files" soft limit of a running process. */
function processFileLimit(pid: number): number {
  const m = /Max open files\s+(\d+)/.exec(readFileSync(`/proc/${pid}/limits`, "utf8"));
  return m ? Number(m[1]) : 0;
}

/** Open n connections (in batches, under the listen backlog) and read each greeting or close. */
async function openMany(sock: string, n: number): Promise<{ greeted: RawClient[]; refused: RawClient[] }> {
  const greeted: RawClient[] = [];
  const refused: RawClient[] = [];
  for (let i = 0; i < n; i += 100) {
    const batch = await Promise.all(
      Array.from({ length: Math.min(100, n - i) }, async () => {
        const c = await RawClient.connect(sock, 15_000);
        try {
          await c.greeting(15_000);
          return { c, ok: true };
        } catch (e) {
          if ((e as { code?: string }).code !== "ERR_RAW_CLOSED") throw e;
          return { c, ok: false };
        }
      }),
    );
    for (const { c, ok } of batch) (ok ? greeted : refused).push(c);
  }
  return { greeted, refused };
}

void describe("bad input against the default server", () => {
  let srv: ServerHandle;
  before(async () => {
    srv = await startServer();
  });
  after(async () => {
    await stopClean(srv);
  });

  void test("wrong request magic: earlier requests answered, then the connection is closed", async () => {
    for (const magic of [0, 0x25609512, 0x67446698, 0xffffffff]) {
      const c = await session(srv);
      c.write(
        Buffer.concat([
          requestBytes({ type: CMD.FLUSH, cookie: 1n }),
          requestBytes({ type: CMD.READ, cookie: 2n, offset: 0, length: 512, magic }),
          requestBytes({ type: CMD.FLUSH, cookie: 3n }),
        ]),
      );
      assert.deepEqual(await c.simpleReply(), { error: 0, cookie: 1n });
      const rest = await c.readToEnd(10_000);
      assert.equal(rest.length, 0, `magic 0x${magic.toString(16)}: nothing after the violation`);
      c.destroy();
    }
    await healthy(srv);
    assert.ok(await logMatches(srv, /bad request magic/), "the violation is logged");
  });

  void test("truncated messages followed by a close, in every phase", async () => {
    const cuts: [string, (c: RawClient) => Promise<void>][] = [
      ["nothing after connecting", () => Promise.resolve()],
      ["half the client flags", async (c) => void (await c.greeting(), c.write(Buffer.from([0, 0])))],
      [
        "part of an option header",
        async (c) =>
          void (
            await c.greeting(),
            c.write(Buffer.concat([Buffer.from("00000003", "hex"), optionBytes(7).subarray(0, 9)]))
          ),
      ],
      [
        "part of the option data",
        async (c) =>
          void (
            await c.greeting(),
            c.write(
              Buffer.concat([
                Buffer.from("00000003", "hex"),
                optionBytes(7, infoRequestData("")).subarray(0, 20),
              ]),
            )
          ),
      ],
      [
        "an option announcing 1 MiB and sending 10 bytes",
        async (c) =>
          void (
            await c.greeting(),
            c.write(Buffer.concat([Buffer.from("00000003", "hex"), optionBytes(3, Buffer.alloc(10), MiB)]))
          ),
      ],
      [
        "part of a request header",
        async (c) =>
          void (await c.handshake(), c.write(requestBytes({ type: CMD.READ, length: 512 }).subarray(0, 13))),
      ],
      [
        "part of a WRITE payload",
        async (c) =>
          void (
            await c.handshake(),
            c.write(
              Buffer.concat([
                requestBytes({ type: CMD.WRITE, offset: 0, length: 65536 }),
                Buffer.alloc(1000),
              ]),
            )
          ),
      ],
      [
        "part of a rejected WRITE payload",
        async (c) =>
          void (
            await c.handshake(),
            c.write(
              Buffer.concat([
                requestBytes({ type: CMD.WRITE, offset: SIZE, length: 65536 }),
                Buffer.alloc(1000),
              ]),
            )
          ),
      ],
    ];
    for (const [what, fn] of cuts) {
      for (const how of ["end", "destroy"] as const) {
        const c = await RawClient.connect(srv.sock);
        await fn(c);
        if (how === "end") {
          c.end();
          await c
            .readToEnd(10_000)
            .catch((e: unknown) => assert.fail(`${what}: the server did not close (${String(e)})`));
        }
        c.destroy();
        await sleep(20);
        alive(srv);
      }
    }
    await healthy(srv);
  });

  void test("a WRITE larger than the maximum block size is drained and refused with EINVAL", async () => {
    const c = await session(srv);
    const len = 32 * MiB + 512;
    // A payload of DISC headers: if the server parsed it as requests, it would disconnect.
    const payload = Buffer.alloc(len);
    const disc = requestBytes({ type: CMD.DISC });
    for (let i = 0; i + 28 <= len; i += 28) disc.copy(payload, i);
    assert.equal(
      await errorOf(c, { type: CMD.WRITE, cookie: 5n, offset: 0, length: len }, payload),
      ERR.EINVAL,
    );
    c.request({ type: CMD.READ, cookie: 6n, offset: 0, length: 33 * MiB });
    assert.deepEqual(await c.simpleReply(), { error: ERR.EINVAL, cookie: 6n });
    const data = randomBytes(4096);
    assert.equal(await c.writeAt(8192, data, 7n), 0);
    assert.deepEqual(await c.readAt(8192, 4096, 8n), data);
    await c.disconnect();
    await healthy(srv);
  });

  void test("requests past the end: ENOSPC for writes and zeroes, EINVAL for the rest (trim too)", async () => {
    const c = await session(srv);
    const cases: [RawRequest, number, Buffer?][] = [
      [{ type: CMD.READ, cookie: 1n, offset: SIZE, length: 1 }, ERR.EINVAL],
      [{ type: CMD.READ, cookie: 2n, offset: SIZE - 512, length: 1024 }, ERR.EINVAL],
      [{ type: CMD.CACHE, cookie: 3n, offset: SIZE - 1, length: 2 }, ERR.EINVAL],
      [{ type: CMD.WRITE, cookie: 4n, offset: SIZE - 100, length: 200 }, ERR.ENOSPC, Buffer.alloc(200, 1)],
      [{ type: CMD.TRIM, cookie: 5n, offset: SIZE, length: 4096 }, ERR.EINVAL],
      [{ type: CMD.WRITE_ZEROES, cookie: 6n, offset: SIZE - 4096, length: 8192 }, ERR.ENOSPC],
      [{ type: CMD.READ, cookie: 7n, offset: 2n ** 64n - 1n, length: 1 }, ERR.EINVAL],
      [{ type: CMD.WRITE, cookie: 8n, offset: 2n ** 63n, length: 16 }, ERR.ENOSPC, Buffer.alloc(16)],
      [{ type: CMD.TRIM, cookie: 9n, offset: 2n ** 53n, length: 1 }, ERR.EINVAL],
    ];
    for (const [r, e, payload] of cases)
      assert.equal(await errorOf(c, r, payload), e, `${r.type} at ${r.offset}`);
    // The last bytes of the export still read (and were not changed by the refused WRITE).
    assert.deepEqual(await c.readAt(SIZE - 512, 512, 10n), Buffer.alloc(512));
    await c.disconnect();
    await healthy(srv);
  });

  void test("unknown commands and flags: EINVAL, and the connection carries on", async () => {
    const c = await session(srv);
    const cases: RawRequest[] = [
      { type: 8, cookie: 1n, offset: 0, length: 512 }, // RESIZE: not advertised
      { type: 9, cookie: 2n, offset: 0, length: 512 },
      { type: 0x7fff, cookie: 3n },
      { type: 0xffff, cookie: 4n, offset: 0, length: 0 },
      { type: CMD.READ, cookie: 5n, flags: 0x40, offset: 0, length: 512 },
      { type: CMD.READ, cookie: 6n, flags: 0x8000, offset: 0, length: 512 },
      { type: CMD.READ, cookie: 7n, flags: 8, offset: 0, length: 512 }, // REQ_ONE
      { type: CMD.READ, cookie: 8n, flags: 4, offset: 0, length: 512 }, // DF without structured replies
      { type: CMD.TRIM, cookie: 9n, flags: 2, offset: 0, length: 512 }, // NO_HOLE
      { type: CMD.FLUSH, cookie: 10n, flags: 0x10 },
      { type: CMD.BLOCK_STATUS, cookie: 11n, offset: 0, length: 512 }, // no metadata context
    ];
    for (const r of cases)
      assert.equal(await errorOf(c, r), ERR.EINVAL, `type ${r.type} flags ${r.flags ?? 0}`);
    assert.equal(
      await errorOf(
        c,
        { type: CMD.WRITE, cookie: 12n, flags: 0x20, offset: 0, length: 100 },
        Buffer.alloc(100),
      ),
      ERR.EINVAL,
    );
    assert.equal(await errorOf(c, { type: CMD.FLUSH, cookie: 13n }), 0);
    await c.disconnect();
    await healthy(srv);
  });
});

void describe("bad input against --block-size 512,4096,1048576", () => {
  let srv: ServerHandle;
  before(async () => {
    srv = await startServer({ args: ["--block-size", "512,4096,1048576"] });
  });
  after(async () => {
    await stopClean(srv);
  });

  void test("misaligned requests: EINVAL (a misaligned WRITE is drained)", async () => {
    const c = await session(srv);
    const cases: [RawRequest, Buffer?][] = [
      [{ type: CMD.READ, cookie: 1n, offset: 100, length: 512 }],
      [{ type: CMD.READ, cookie: 2n, offset: 512, length: 100 }],
      [{ type: CMD.WRITE, cookie: 3n, offset: 1, length: 512 }, Buffer.alloc(512, 3)],
      [{ type: CMD.WRITE, cookie: 4n, offset: 512, length: 513 }, Buffer.alloc(513, 3)],
      [{ type: CMD.TRIM, cookie: 5n, offset: 256, length: 4096 }],
      [{ type: CMD.WRITE_ZEROES, cookie: 6n, offset: 0, length: 4000 }],
      [{ type: CMD.CACHE, cookie: 7n, offset: 4095, length: 512 }],
    ];
    for (const [r, p] of cases)
      assert.equal(await errorOf(c, r, p), ERR.EINVAL, `${r.type} ${r.offset}+${r.length}`);
    assert.deepEqual(await c.readAt(0, 2048, 8n), Buffer.alloc(2048), "refused writes changed nothing");
    await c.disconnect();
    await healthy(srv);
  });

  void test("over the 1 MiB maximum: READ and WRITE refused, TRIM and WRITE_ZEROES allowed", async () => {
    const c = await session(srv);
    const big = 2 * MiB;
    assert.equal(
      await errorOf(c, { type: CMD.WRITE, cookie: 1n, offset: 0, length: big }, Buffer.alloc(big, 7)),
      ERR.EINVAL,
    );
    assert.equal(await errorOf(c, { type: CMD.READ, cookie: 2n, offset: 0, length: big }), ERR.EINVAL);
    assert.equal(await errorOf(c, { type: CMD.TRIM, cookie: 3n, offset: 0, length: big }), 0);
    assert.equal(await errorOf(c, { type: CMD.WRITE_ZEROES, cookie: 4n, offset: big, length: big }), 0);
    const data = randomBytes(MiB);
    assert.equal(await c.writeAt(MiB, data, 5n), 0);
    assert.deepEqual(await c.readAt(MiB, MiB, 6n), data);
    await c.disconnect();
    await healthy(srv);
  });
});

void describe("bad input against --read-only", () => {
  let srv: ServerHandle;
  let dir: string;
  const content = randomBytes(SIZE);
  before(async () => {
    dir = scratchDir();
    const volume = join(dir, "ro.img");
    writeFileSync(volume, content);
    srv = await startServer({ volume, size: null, args: ["--read-only"] });
  });
  after(async () => {
    await stopClean(srv);
    rmSync(dir, { recursive: true, force: true });
  });

  void test("WRITE (drained), TRIM and WRITE_ZEROES are EPERM; reads see the file", async () => {
    const c = await session(srv);
    assert.equal(
      await errorOf(c, { type: CMD.WRITE, cookie: 1n, offset: 0, length: 65536 }, Buffer.alloc(65536, 9)),
      ERR.EPERM,
    );
    assert.equal(
      await errorOf(c, { type: CMD.WRITE, cookie: 2n, flags: 1, offset: 0, length: 512 }, Buffer.alloc(512)),
      ERR.EPERM,
      "EPERM even with FUA, which a read-only export does not advertise (nbdkit does the same)",
    );
    assert.equal(await errorOf(c, { type: CMD.TRIM, cookie: 3n, offset: 0, length: 65536 }), ERR.EPERM);
    assert.equal(
      await errorOf(c, { type: CMD.WRITE_ZEROES, cookie: 4n, offset: 0, length: 65536 }),
      ERR.EPERM,
    );
    assert.equal(await errorOf(c, { type: CMD.FLUSH, cookie: 5n }), 0);
    assert.deepEqual(await c.readAt(0, 65536, 6n), content.subarray(0, 65536));
    await c.disconnect();
    await healthy(srv, { readOnly: true });
    assert.ok(
      readFileSync(join(dir, "ro.img")).subarray(0, 65536).equals(content.subarray(0, 65536)),
      "the file is unchanged",
    );
  });
});

void describe("stalled handshakes with --handshake-timeout 1", () => {
  let srv: ServerHandle;
  before(async () => {
    srv = await startServer({ args: ["--handshake-timeout", "1"] });
  });
  after(async () => {
    await stopClean(srv);
  });

  void test("a client that stalls is disconnected after about a second, and it is logged", async () => {
    const stalls: [string, (c: RawClient) => Promise<void>][] = [
      ["never reads the greeting", () => Promise.resolve()],
      ["stops after the greeting", async (c) => void (await c.greeting())],
      [
        "stops in an option header",
        async (c) =>
          void (
            await c.greeting(),
            c.write(Buffer.concat([Buffer.from("00000003", "hex"), optionBytes(3).subarray(0, 5)]))
          ),
      ],
      ["stops after a LIST", async (c) => void (await c.greeting(), c.sendClientFlags(3), await c.option(3))],
    ];
    const results = await Promise.all(
      stalls.map(async ([what, fn]) => {
        const c = await RawClient.connect(srv.sock);
        const t0 = Date.now();
        await fn(c);
        const closed = await c.closesWithin(5000);
        const dt = Date.now() - t0;
        c.destroy();
        return { what, closed, dt };
      }),
    );
    for (const r of results) {
      assert.ok(r.closed, `${r.what}: not disconnected`);
      assert.ok(r.dt >= 800 && r.dt < 4000, `${r.what}: disconnected after ${r.dt} ms`);
    }
    assert.ok(await logMatches(srv, /warn.*handshake/), `the timeout is logged:\n${srv.log()}`);
    await healthy(srv);
  });

  void test("a session that finished its handshake is not subject to the deadline", async () => {
    const c = await session(srv);
    assert.equal(await c.closesWithin(1800), false);
    assert.equal((await c.readAt(0, 512, 1n)).length, 512);
    await c.disconnect();
  });
});

void describe("2000 simultaneous idle connections", () => {
  let srv: Server;
  before(async () => {
    srv = await spawnServer(["--max-connections", "4096", "--handshake-timeout", "120"], 8192);
  });
  after(async () => {
    await stopClean(srv);
  });

  void test("are all accepted; a normal client still works alongside them and after", async (t) => {
    const serverLimit = processFileLimit(srv.proc.pid!);
    const ownLimit = await openFileLimit();
    // Each connection costs this process one descriptor and the server one.
    const n = Math.min(2000, ownLimit - 200, serverLimit - 200);
    t.diagnostic(`opening ${n} connections (file limits: test ${ownLimit}, server ${serverLimit})`);
    assert.ok(n >= 500, `file limits too low for this test (test ${ownLimit}, server ${serverLimit})`);
    const { greeted, refused } = await openMany(srv.sock, n);
    try {
      assert.equal(refused.length, 0, `${refused.length} connections refused`);
      assert.equal(greeted.length, n);
      // Some of them go further and sit idle in transmission.
      for (const c of greeted.slice(0, 50)) {
        c.sendClientFlags(3);
        c.sendOption(7, infoRequestData(""));
      }
      for (const c of greeted.slice(0, 50)) await c.optionReplies(15_000);
      await healthy(srv);
      // The idle ones are still connected.
      await sleep(200);
      assert.equal(greeted.filter((c) => c.ended).length, 0, "idle connections were dropped");
    } finally {
      for (const c of [...greeted, ...refused]) c.destroy();
    }
    await sleep(500);
    await healthy(srv);
  });
});

void describe("--max-connections 100", () => {
  let srv: Server;
  before(async () => {
    srv = await spawnServer(["--max-connections", "100", "--handshake-timeout", "120"], 4096);
    await sleep(300); // the readiness probe's connection must be gone before we count
  });
  after(async () => {
    await stopClean(srv);
  });

  void test("connections beyond the limit are closed and logged; the existing ones keep working", async () => {
    const { greeted, refused } = await openMany(srv.sock, 150);
    const extra: RawClient[] = [];
    try {
      assert.equal(greeted.length, 100);
      assert.equal(refused.length, 50);
      for (const c of refused) assert.ok(c.ended);
      assert.ok(await logMatches(srv, /warn.*refusing connection/), `refusals are logged:\n${srv.log()}`);
      // A new client is refused while the limit is reached.
      const late = await RawClient.connect(srv.sock);
      extra.push(late);
      await assert.rejects(
        late.greeting(5000),
        (e: unknown) => (e as { code?: string }).code === "ERR_RAW_CLOSED",
      );
      // An accepted connection finishes its handshake and does I/O.
      const c = greeted[0];
      c.sendClientFlags(3);
      const go = await c.option(7, infoRequestData(""));
      assert.equal(go[go.length - 1].type, 1);
      const data = randomBytes(8192);
      assert.equal(await c.writeAt(12288, data, 1n), 0);
      assert.deepEqual(await c.readAt(12288, 8192, 2n), data);
      // Freeing slots lets new clients in.
      for (const x of greeted.slice(50)) x.destroy();
      await sleep(300);
      await healthy(srv);
      assert.deepEqual(await c.readAt(12288, 8192, 3n), data, "the older session is unaffected");
      await c.disconnect();
    } finally {
      for (const c of [...greeted, ...refused, ...extra]) c.destroy();
    }
    await sleep(300);
    await healthy(srv);
  });
});

void describe("a volume file truncated under the server", () => {
  let srv: ServerHandle;
  let dir: string;
  const HALF = SIZE / 2;
  const content = randomBytes(HALF);
  const EIO = 5;
  before(async () => {
    dir = scratchDir();
    const volume = join(dir, "cut.img");
    writeFileSync(volume, content);
    truncateSync(volume, SIZE); // data, then a hole: large reads look for holes (SEEK_DATA)
    srv = await startServer({ volume, size: null });
    truncateSync(volume, HALF); // another program cuts the file in half
  });
  after(async () => {
    await stopClean(srv);
    rmSync(dir, { recursive: true, force: true });
  });

  /** The NBD error of a structured reply (0 when it has no error chunk). */
  async function structuredError(
    c: RawClient,
    offset: number,
    length: number,
    cookie: bigint,
  ): Promise<number> {
    c.request({ type: CMD.READ, cookie, offset, length });
    const chunks = await c.structuredReply(15_000);
    for (const ch of chunks) assert.equal(ch.cookie, cookie);
    const err = chunks.find((ch) => (ch.type & 0x8000) !== 0);
    return err === undefined ? 0 : err.payload.readUInt32BE(0);
  }

  void test("reads past the new end are EIO on every read path (not zeroes), and the log says why", async () => {
    const s = await RawClient.connect(srv.sock);
    await s.handshake({ structured: true });
    // small (pread) and large (SEEK_DATA first: what was a hole is gone, not zeroes) reads,
    // wholly past the end and across it
    assert.equal(await structuredError(s, HALF + MiB, 4096, 1n), EIO, "4 KiB past the end");
    assert.equal(await structuredError(s, HALF + MiB, MiB, 2n), EIO, "1 MiB past the end");
    assert.equal(await structuredError(s, HALF - MiB, 2 * MiB, 3n), EIO, "2 MiB across the end");
    assert.equal(await structuredError(s, HALF - 4096, 4096, 4n), 0, "the last block before the end");
    await s.disconnect();

    const c = await session(srv);
    assert.equal(await errorOf(c, { type: CMD.READ, cookie: 5n, offset: HALF + MiB, length: 4096 }), EIO);
    assert.deepEqual(await c.readAt(HALF - 4096, 4096, 6n), content.subarray(HALF - 4096, HALF));
    await c.disconnect();

    assert.ok(
      await logMatches(
        srv,
        /past the end of the file, which is now 33554432 bytes \(was it truncated by another program\?/,
      ),
      `the log does not explain the EIO:\n${srv.log()}`,
    );
    await healthy(srv);
  });
});
