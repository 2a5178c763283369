// `blockfork gateway` as a proxy meets it, over HTTP on 127.0.0.1: batches applied and read back
// (data endpoint and the volume file), duplicates not re-applied, out-of-order arrival over two
// connections (the higher seq wins), zero/trim, flush and durableThrough, status, checksums against
// the file, the state across restarts (clean and killed), graceful shutdown with a request in
// flight, the tracking mirror, and the command line (help, usage errors).

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { closeSync, existsSync, openSync, readFileSync, readSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { KIND, type UpdateRecord } from "../../src/gateway/records.js";
import {
  GatewayClient,
  startGateway,
  type GatewayHandle,
  type SourceIdent,
  unboot,
} from "../helpers/gateway.js";
import { BIN, scratchDir } from "../helpers/server.js";

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const NAME = "sec";

const handles: GatewayHandle[] = [];
const dirs: string[] = [];
after(async () => {
  for (const h of handles) await h.stop("SIGKILL");
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

function tmp(): string {
  const d = scratchDir("blockfork-gw-bb-");
  dirs.push(d);
  return d;
}

async function start(opts: Parameters<typeof startGateway>[0] = {}): Promise<GatewayHandle> {
  const h = await startGateway(opts);
  handles.push(h);
  return h;
}

let sourceCounter = 0;
/** A new source identity (each test writes as its own proxy). */
/**
 * A new source of updates. The tests share one gateway and a secondary takes updates from one
 * source at a time: each new one takes it over (its own test, "one writer", checks the refusal).
 */
function newSource(generation = 1): SourceIdent {
  return {
    source: `0a${(++sourceCounter).toString(16).padStart(4, "0")}`,
    generation,
    size: SIZE,
    takeover: true,
  };
}

function w(seq: number, offset: number, data: Buffer, period = 1): UpdateRecord {
  return { kind: KIND.WRITE, seq, period, offset, length: data.length, data };
}

function z(kind: 2 | 3, seq: number, offset: number, length: number): UpdateRecord {
  return { kind, seq, period: 1, offset, length, data: null };
}

/** Bytes [offset, offset+length) of a file, read directly. */
function fileBytes(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, "r");
  try {
    const b = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = readSync(fd, b, done, length - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    return b;
  } finally {
    closeSync(fd);
  }
}

async function ok(p: Promise<{ status: number; body: Buffer }>, what: string): Promise<void> {
  const r = await p;
  assert.equal(r.status, 200, `${what}: ${r.status} ${r.body.toString()}`);
}

void describe("gateway: updates, flush, status, checksums", () => {
  let gw: GatewayHandle;
  let c: GatewayClient;
  before(async () => {
    gw = await start();
    c = gw.client;
  });

  void test("a batch is applied and reads back through the API and in the volume file", async () => {
    const id = newSource();
    const a = randomBytes(65536);
    const b = randomBytes(1000);
    const r = await c.updates(NAME, id, [w(1, 0, a), w(2, MiB + 512, b)]);
    assert.equal(r.status, 200, r.body.toString());
    assert.deepEqual(unboot(r.json()), { applied: 2, duplicates: 0, appliedThrough: 2, durableThrough: 0 });
    assert.equal(r.headers["content-type"], "application/json");
    const d = await c.data(NAME, 0, 65536);
    assert.equal(d.status, 200);
    assert.equal(d.headers["content-type"], "application/octet-stream");
    assert.deepEqual(d.body, a);
    assert.deepEqual((await c.data(NAME, MiB + 512, 1000)).body, b);
    assert.deepEqual(fileBytes(gw.volume, 0, 65536), a);
    assert.deepEqual(fileBytes(gw.volume, MiB + 512, 1000), b);
  });

  void test("duplicates are not re-applied: seq 1 = A, seq 2 = B on one block, seq 1 again leaves B", async () => {
    const id = newSource();
    const off = 2 * MiB;
    const A = Buffer.alloc(4096, 0xaa);
    const B = Buffer.alloc(4096, 0xbb);
    await ok(c.updates(NAME, id, [w(1, off, A)]), "seq 1");
    await ok(c.updates(NAME, id, [w(2, off, B)]), "seq 2");
    const r = await c.updates(NAME, id, [w(1, off, A)]);
    assert.equal(r.status, 200);
    assert.deepEqual(unboot(r.json()), { applied: 0, duplicates: 1, appliedThrough: 2, durableThrough: 0 });
    assert.deepEqual((await c.data(NAME, off, 4096)).body, B);
    assert.deepEqual(fileBytes(gw.volume, off, 4096), B);
  });

  void test("out of order over two connections: the higher seq wins wherever ranges overlap", async () => {
    const id = newSource();
    const base = 4 * MiB;
    const BLOCKS = 8;
    const N = 60;
    // Each update writes 1 to 3 blocks of a small region, filled with its seq: heavy overlap.
    const updates: UpdateRecord[] = [];
    for (let seq = 1; seq <= N; seq++) {
      const first = (seq * 5) % BLOCKS;
      const count = 1 + (seq % Math.min(3, BLOCKS - first));
      updates.push(w(seq, base + first * 4096, Buffer.alloc(count * 4096, seq)));
    }
    // Deal them into batches of 1 to 3, reversed pairs, alternating between two connections.
    const batches: UpdateRecord[][] = [];
    for (let i = 0; i < N;) {
      const n = 1 + (i % 3);
      batches.push(updates.slice(i, i + n).reverse());
      i += n;
    }
    for (let i = 0; i + 1 < batches.length; i += 2)
      [batches[i], batches[i + 1]] = [batches[i + 1], batches[i]];
    const x = new GatewayClient(gw.url);
    const y = new GatewayClient(gw.url);
    try {
      // Two connections, each sending its batches one after another, both at once.
      const send = async (client: GatewayClient, mine: UpdateRecord[][]): Promise<void> => {
        for (const batch of mine) await ok(client.updates(NAME, id, batch), "batch");
      };
      await Promise.all([
        send(
          x,
          batches.filter((_, i) => i % 2 === 0),
        ),
        send(
          y,
          batches.filter((_, i) => i % 2 === 1),
        ),
      ]);
      // Then the strictly late case: resend the oldest half; nothing changes.
      const late = await x.updates(NAME, id, updates.slice(0, N / 2));
      assert.equal(late.json().duplicates, N / 2);
    } finally {
      x.close();
      y.close();
    }
    const disk = fileBytes(gw.volume, base, BLOCKS * 4096);
    for (let blk = 0; blk < BLOCKS; blk++) {
      let want = 0;
      for (const u of updates) {
        const s = (u.offset - base) / 4096;
        if (blk >= s && blk < s + u.length / 4096) want = Math.max(want, u.seq);
      }
      assert.ok(
        disk.subarray(blk * 4096, (blk + 1) * 4096).every((v) => v === want),
        `block ${blk} should hold seq ${want}, has ${disk[blk * 4096]}`,
      );
    }
    const st = (await c.request("GET", "/status")).json<{
      sources: { source: string; appliedThrough: number }[];
    }>();
    assert.equal(st.sources.find((s) => s.source === id.source)?.appliedThrough, N);
  });

  void test("ZERO and TRIM read back as zeroes (API and file)", async () => {
    const id = newSource();
    const off = 8 * MiB;
    await ok(c.updates(NAME, id, [w(1, off, randomBytes(256 * 1024))]), "fill");
    await ok(
      c.updates(NAME, id, [z(KIND.ZERO, 2, off, 65536), z(KIND.TRIM, 3, off + 131072, 65536 + 100)]),
      "zero/trim",
    );
    const d = (await c.data(NAME, off, 256 * 1024)).body;
    const f = fileBytes(gw.volume, off, 256 * 1024);
    for (const buf of [d, f]) {
      assert.ok(
        buf.subarray(0, 65536).every((v) => v === 0),
        "ZERO range",
      );
      assert.ok(
        buf.subarray(131072, 131072 + 65636).every((v) => v === 0),
        "TRIM range",
      );
      assert.ok(
        buf.subarray(65536, 131072).some((v) => v !== 0),
        "data between stays",
      );
    }
  });

  void test("flush: durableThrough becomes appliedThrough, and sources.json says so", async () => {
    const id = newSource();
    await ok(
      c.updates(NAME, id, [w(1, 12 * MiB, randomBytes(4096)), w(2, 12 * MiB + 4096, randomBytes(4096))]),
      "b",
    );
    await ok(c.updates(NAME, id, [w(4, 12 * MiB, randomBytes(4096))]), "b4");
    const f = await c.flush(NAME, id);
    assert.equal(f.status, 200, f.body.toString());
    // Seq 4 is applied and 3 is not: not a write-order image until 3 comes.
    assert.deepEqual(unboot(f.json()), { durableThrough: 2, secondary: "inconsistent" });
    const r = await c.updates(NAME, id, [w(3, 12 * MiB, randomBytes(10))]);
    assert.deepEqual(unboot(r.json()), { applied: 1, duplicates: 0, appliedThrough: 4, durableThrough: 2 });
    // Several flushes at once all answer, and cover everything applied before them.
    const flushes = await Promise.all(
      [1, 2, 3, 4]
        .map(() => new GatewayClient(gw.url))
        .map(async (cl) => {
          try {
            return (await cl.flush(NAME, id)).json<{ durableThrough: number }>();
          } finally {
            cl.close();
          }
        }),
    );
    assert.ok(
      flushes.every((x) => x.durableThrough === 4),
      JSON.stringify(flushes),
    );
    const state = JSON.parse(readFileSync(join(gw.stateDir, "sources.json"), "utf8")) as {
      sources: { source: string; durableThrough: number; generation: number }[];
    };
    const mine = state.sources.find((s) => s.source === id.source);
    assert.deepEqual(mine, { source: id.source, generation: 1, durableThrough: 4, floor: 0 });
  });

  void test("status: volume, sources, counters, fault, uptime", async () => {
    const id = newSource();
    await ok(
      c.updates(NAME, id, [w(2, 16 * MiB, randomBytes(512), 9)], { headers: { "X-Blockfork-Floor": "1" } }),
      "u",
    );
    const r = await c.request("GET", "/status");
    assert.equal(r.status, 200);
    const st = r.json<{
      volume: { name: string; size: number; path: string; id: string };
      owner: { source: string; since: string };
      sources: Record<string, unknown>[];
      counters: Record<string, number>;
      fault: { mode: string };
      uptime: number;
    }>();
    assert.match(st.volume.id, /^[0-9a-f]{16}$/);
    assert.deepEqual(st.volume, { name: NAME, size: SIZE, path: gw.volume, id: st.volume.id });
    assert.equal(st.owner.source, id.source, "the source that wrote last took the secondary over");
    assert.deepEqual(
      st.sources.find((s) => s.source === id.source),
      {
        source: id.source,
        generation: 1,
        appliedThrough: 0,
        durableThrough: 0,
        floor: 1,
        outOfOrder: 1,
        lastPeriod: 9,
      },
    );
    for (const k of ["updates", "bytes", "duplicates", "stale", "flushes", "errors"]) {
      assert.equal(typeof st.counters[k], "number", k);
    }
    assert.ok(st.counters.updates > 0 && st.counters.bytes > 0 && st.counters.duplicates > 0);
    assert.equal(st.fault.mode, "none");
    assert.ok(Number.isInteger(st.uptime) && st.uptime >= 0);
    const h = await c.request("GET", "/health");
    assert.deepEqual(unboot(h.json()), {
      ok: true,
      volume: NAME,
      size: SIZE,
      features: ["consistency"],
      secondary: "inconsistent", // this source's seq 2 is applied above a gap (outOfOrder 1)
      secondaryId: st.volume.id,
      owner: id.source,
    });
  });

  void test("a source that is not the owner: 409 ERR_OWNER to updates and flush, and no state kept for it", async () => {
    const owner = newSource();
    await ok(c.updates(NAME, owner, [w(1, 19 * MiB, randomBytes(512))]), "owner");
    const sourcesNow = async (): Promise<string[]> =>
      (await c.request("GET", "/status"))
        .json<{ sources: { source: string }[] }>()
        .sources.map((x) => x.source);
    const before = await sourcesNow();
    for (let i = 0; i < 20; i++) {
      const other = { ...newSource(), takeover: false };
      const u = await c.updates(NAME, other, [w(1, 19 * MiB, randomBytes(512))]);
      assert.equal(u.status, 409, u.body.toString());
      assert.equal(u.json<{ error: { code: string } }>().error.code, "ERR_OWNER");
      const f = await c.flush(NAME, other);
      assert.equal(f.status, 409, f.body.toString());
    }
    assert.deepEqual(
      await sourcesNow(),
      before,
      "refused sources were kept (1024 of them block every new source)",
    );
  });

  void test("a floor header makes abandoned seqs count as done", async () => {
    const id = newSource();
    await ok(c.updates(NAME, id, [w(5, 17 * MiB, randomBytes(512))]), "5");
    const r = await c.updates(NAME, id, [w(2, 17 * MiB, randomBytes(512))], {
      headers: { "X-Blockfork-Floor": "5" },
    });
    assert.deepEqual(unboot(r.json()), { applied: 0, duplicates: 1, appliedThrough: 5, durableThrough: 0 });
  });

  void test("generations: an older one is stale (not applied), a newer one starts over", async () => {
    const id = newSource(7);
    const off = 18 * MiB;
    await ok(c.updates(NAME, id, [w(1, off, Buffer.alloc(512, 7))]), "gen 7");
    const old = await c.updates(NAME, { ...id, generation: 6 }, [w(1, off, Buffer.alloc(512, 6))]);
    assert.equal(old.status, 200);
    assert.deepEqual(unboot(old.json()), {
      applied: 0,
      duplicates: 1,
      appliedThrough: 0,
      durableThrough: 0,
      stale: true,
      generation: 7,
    });
    assert.equal((await c.data(NAME, off, 1)).body[0], 7);
    const fresh = await c.updates(NAME, { ...id, generation: 8 }, [w(1, off, Buffer.alloc(512, 8))]);
    assert.deepEqual(unboot(fresh.json()), {
      applied: 1,
      duplicates: 0,
      appliedThrough: 1,
      durableThrough: 0,
    });
    assert.equal((await c.data(NAME, off, 1)).body[0], 8);
  });

  void test("checksums equal the sha256 of the file's blocks", async () => {
    const id = newSource();
    const off = 20 * MiB;
    await ok(c.updates(NAME, id, [w(1, off, randomBytes(3 * MiB))]), "fill");
    const file = fileBytes(gw.volume, off, 4 * MiB);
    const sums = (block: number, length: number): string[] => {
      const out: string[] = [];
      for (let at = 0; at < length; at += block) {
        out.push(
          createHash("sha256")
            .update(file.subarray(at, Math.min(at + block, length)))
            .digest("hex"),
        );
      }
      return out;
    };
    for (const [length, block] of [
      [4 * MiB, 4096],
      [4 * MiB, 65536],
      [4 * MiB - 4096 + 17, 1024 * 1024],
      [4 * MiB, 3 * 1024 * 1024],
    ]) {
      const r = await c.checksums(NAME, off, length, block);
      assert.equal(r.status, 200, r.body.toString());
      assert.deepEqual(r.json(), { algorithm: "sha256", block, offset: off, sums: sums(block, length) });
    }
    // The last block of the volume may be short.
    const tail = await c.checksums(NAME, SIZE - 6000, 6000, 4096);
    const tailBytes = fileBytes(gw.volume, SIZE - 6000, 6000);
    assert.deepEqual(tail.json().sums, [
      createHash("sha256").update(tailBytes.subarray(0, 4096)).digest("hex"),
      createHash("sha256").update(tailBytes.subarray(4096)).digest("hex"),
    ]);
    // A whole-volume checksum in 64 MiB of 1 MiB blocks: answered without a volume-sized buffer.
    const all = await c.checksums(NAME, 0, SIZE, MiB);
    assert.equal(all.json<{ sums: string[] }>().sums.length, 64);
  });

  void test("the tracking mirror: 404 before the first PUT, then the latest document", async () => {
    const vid = "vol-1.primary";
    assert.equal((await c.request("GET", `/tracking/${vid}`)).status, 404);
    const doc = {
      volumeId: vid,
      source: "0abc",
      generation: "3",
      updatedAt: new Date().toISOString(),
      linkState: "tracking",
      dirtyBytes: 65536 + 4096,
      extentCount: 2,
      truncated: false,
      extents: [
        {
          offset: 0,
          length: 65536,
          firstDirtied: "2026-01-01T00:00:00Z",
          lastDirtied: "2026-01-01T00:00:01Z",
        },
        {
          offset: 1048576,
          length: 4096,
          firstDirtied: "2026-01-01T00:00:00Z",
          lastDirtied: "2026-01-01T00:00:00Z",
        },
      ],
    };
    const put = await c.request("PUT", `/tracking/${vid}`, { body: JSON.stringify(doc) });
    assert.equal(put.status, 200, put.body.toString());
    const second = { ...doc, dirtyBytes: 4096, extentCount: 1, extents: [doc.extents[1]] };
    assert.equal((await c.request("PUT", `/tracking/${vid}`, { body: JSON.stringify(second) })).status, 200);
    const got = await c.request("GET", `/tracking/${vid}`);
    assert.equal(got.status, 200);
    assert.deepEqual(got.json(), second);
    assert.deepEqual(JSON.parse(readFileSync(join(gw.stateDir, "mirror", `${vid}.json`), "utf8")), second);
    for (const [path, body] of [
      [`/tracking/%2E%2E`, doc],
      [`/tracking/a%2Fb`, { ...doc, volumeId: "a/b" }],
      [`/tracking/${vid}`, { ...doc, volumeId: "other" }],
      [`/tracking/${vid}`, { ...doc, extents: [{ offset: -1, length: 1 }] }],
      [`/tracking/${vid}`, { ...doc, extents: "none" }],
    ] as const) {
      const r = await c.request("PUT", path, { body: JSON.stringify(body) });
      assert.equal(r.status, 400, `${path} ${JSON.stringify(body).slice(0, 80)}: ${r.body.toString()}`);
      assert.equal(r.json<{ error: { code: string } }>().error.code, "ERR_BAD_REQUEST");
    }
    const notJson = await c.request("PUT", `/tracking/${vid}`, { body: "{not json" });
    assert.equal(notJson.status, 400);
  });
});

void describe("gateway: state across restarts and shutdown", () => {
  void test("a clean restart: durableThrough persisted, old seqs are duplicates, data kept", async () => {
    const dir = tmp();
    const id = newSource();
    const data = randomBytes(8192);
    let gw = await start({ dir });
    await ok(gw.client.updates(NAME, id, [w(1, 0, data), w(2, 8192, data), w(3, 16384, data)]), "apply");
    const boot1 = (await gw.client.request("GET", "/health")).json().boot;
    const stop = await gw.stop("SIGINT"); // Ctrl-C: the same clean shutdown as SIGTERM
    assert.deepEqual(stop, { code: 0, signal: null }, gw.log());
    assert.match(gw.log(), /volume flushed \(fdatasync\) and state written/);

    gw = await start({ dir, size: null });
    const st = (await gw.client.request("GET", "/status")).json<{
      sources: Record<string, unknown>[];
      boot: string;
    }>();
    // A new process: a new boot id (proxies resync what it had not made durable).
    assert.match(st.boot, /^[0-9a-f]{16}$/);
    assert.notEqual(st.boot, boot1);
    assert.deepEqual(st.sources, [
      {
        source: id.source,
        generation: 1,
        appliedThrough: 3,
        durableThrough: 3,
        floor: 0,
        outOfOrder: 0,
        lastPeriod: 0,
      },
    ]);
    const r = await gw.client.updates(NAME, id, [w(2, 8192, randomBytes(8192)), w(4, 65536, data)]);
    assert.deepEqual(unboot(r.json()), { applied: 1, duplicates: 1, appliedThrough: 4, durableThrough: 3 });
    assert.deepEqual((await gw.client.data(NAME, 8192, 8192)).body, data);
    assert.deepEqual((await gw.stop()).code, 0);
  });

  void test("killed after a flush: what was flushed is a duplicate, what came after is applied again", async () => {
    const dir = tmp();
    const id = newSource();
    let gw = await start({ dir });
    await ok(gw.client.updates(NAME, id, [w(1, 0, randomBytes(512)), w(2, 512, randomBytes(512))]), "1-2");
    assert.deepEqual(unboot((await gw.client.flush(NAME, id)).json()), {
      durableThrough: 2,
      secondary: "unknown",
    });
    await ok(gw.client.updates(NAME, id, [w(3, 1024, randomBytes(512))]), "3");
    assert.equal((await gw.stop("SIGKILL")).signal, "SIGKILL");

    gw = await start({ dir, size: null });
    const r = await gw.client.updates(NAME, id, [w(2, 512, randomBytes(512)), w(3, 1024, randomBytes(512))]);
    assert.deepEqual(unboot(r.json()), { applied: 1, duplicates: 1, appliedThrough: 3, durableThrough: 2 });
    assert.equal((await gw.stop()).code, 0);
  });

  void test("SIGTERM with a request in flight: it completes, new connections are refused, exit 0", async () => {
    const gw = await start({ dir: tmp() });
    const id = newSource();
    await ok(gw.client.setFault({ mode: "slow", delayMs: 700 }), "fault");
    const inFlight = gw.client.updates(NAME, id, [w(1, 0, Buffer.alloc(4096, 1))]);
    await new Promise((r) => setTimeout(r, 200));
    gw.proc.kill("SIGTERM");
    await new Promise((r) => setTimeout(r, 100));
    const other = new GatewayClient(gw.url);
    const refused = await other.request("GET", "/health").then(
      (r) => `status ${r.status}`,
      (e: NodeJS.ErrnoException) => e.code ?? "error",
    );
    other.close();
    assert.ok(refused === "ECONNREFUSED" || refused === "status 503", refused);
    const r = await inFlight;
    assert.equal(r.status, 200, r.body.toString());
    assert.equal(r.json().applied, 1);
    const exit = await gw.stop(null);
    assert.deepEqual(exit, { code: 0, signal: null }, gw.log());
    assert.deepEqual(fileBytes(gw.volume, 0, 4096), Buffer.alloc(4096, 1));
  });

  void test("a second signal during shutdown exits at once with 130", async () => {
    const gw = await start();
    await ok(gw.client.setFault({ mode: "slow", delayMs: 20_000 }), "fault");
    // Its own connection: stop() closes the handle's client, which would end the request early.
    const other = new GatewayClient(gw.url);
    const hanging = other.request("GET", "/status").catch(() => null);
    await new Promise((r) => setTimeout(r, 200));
    const t0 = Date.now();
    gw.proc.kill("SIGTERM");
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(gw.proc.exitCode, null, "still finishing the request in flight");
    const exit = await gw.stop("SIGTERM");
    assert.deepEqual(exit, { code: 130, signal: null });
    assert.ok(Date.now() - t0 < 5000);
    await hanging;
    other.close();
  });
});

interface Exit {
  code: number | null;
  stdout: string;
  stderr: string;
}

function blockfork(args: string[], timeoutMs = 15_000): Promise<Exit> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [BIN, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    p.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    p.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      p.kill("SIGKILL");
      reject(new Error(`blockfork ${args.join(" ")} still running after ${timeoutMs} ms\n${stderr}`));
    }, timeoutMs);
    p.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

void describe("gateway: command line", () => {
  void test("--help documents every option and the exit statuses; blockfork --help lists gateway", async () => {
    const r = await blockfork(["gateway", "--help"]);
    assert.equal(r.code, 0);
    for (const opt of [
      "--volume",
      "--size",
      "--name",
      "--listen",
      "--token-file",
      "--tls-cert",
      "--tls-key",
      "--state-dir",
      "--log-level",
    ]) {
      assert.ok(r.stdout.includes(opt), `help does not mention ${opt}`);
    }
    assert.match(r.stdout, /Exit status: 0 .*1 .*2 /s);
    assert.match(r.stdout, /130/);
    const top = await blockfork(["--help"]);
    assert.match(top.stdout, /\bgateway\b/);
  });

  void test("usage errors exit 2 with a message saying what to do; nothing is created", async () => {
    const dir = tmp();
    const vol = join(dir, "v.img");
    const busy = createServer();
    await new Promise<void>((r) => busy.listen(0, "127.0.0.1", r));
    const port = (busy.address() as { port: number }).port;
    writeFileSync(join(dir, "empty-token"), "  \n");
    writeFileSync(join(dir, "small.img"), Buffer.alloc(4096));
    try {
      const cases: [string[], RegExp][] = [
        [["gateway"], /--volume PATH is required/],
        [["gateway", "--volume", vol], /does not exist; give --size/],
        [["gateway", "--volume", join(dir, "small.img"), "--size", "1M"], /is 4096 bytes but --size asks/],
        [["gateway", "--volume", vol, "--size", "1M", "--listen", "nowhere"], /is not HOST:PORT/],
        [["gateway", "--volume", vol, "--size", "1M", "--tls-cert", join(dir, "x")], /go together/],
        [
          ["gateway", "--volume", vol, "--size", "1M", "--token-file", join(dir, "missing")],
          /cannot read --token-file/,
        ],
        [["gateway", "--volume", vol, "--size", "1M", "--token-file", join(dir, "empty-token")], /is empty/],
        [["gateway", "--volume", vol, "--size", "1M", "--log-level", "loud"], /--log-level must be/],
        [["gateway", "--volume", vol, "--size", "1M", "--bogus"], /bogus/],
        [["gateway", "--volume", join(dir, "small.img"), "--listen", `127.0.0.1:${port}`], /is in use/],
      ];
      for (const [args, msg] of cases) {
        const r = await blockfork(args);
        assert.equal(r.code, 2, `${args.join(" ")}: exit ${r.code}\n${r.stderr}`);
        assert.match(r.stderr, msg, args.join(" "));
        assert.match(r.stderr, /blockfork gateway --help/);
      }
      assert.equal(existsSync(vol), false, "a refused command must not create the volume");
    } finally {
      busy.close();
    }
  });

  void test("a state directory of a volume of another size is refused (exit 2)", async () => {
    const dir = tmp();
    const gw = await start({ dir, size: "1M" });
    await ok(gw.client.flush(NAME, { source: "aa", generation: 1, size: MiB }), "flush");
    assert.equal((await gw.stop()).code, 0);
    rmSync(gw.volume);
    const r = await blockfork(["gateway", "--volume", gw.volume, "--size", "2M", "--listen", "127.0.0.1:0"]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(
      r.stderr,
      /state directory .* belongs to a volume of 1048576 bytes, not 2097152 .*give the state directory of/i,
    );
  });
});
