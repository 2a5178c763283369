// Large trims and zero writes on a PIT-journaled volume (what mkfs, blkdiscard and fstrim send):
// a 768 MiB volume with some data; WRITE_ZEROES of 600 MiB (may trim), TRIM of the whole volume and
// WRITE_ZEROES with NO_HOLE of 600 MiB. Each request must succeed, the server must keep serving,
// and the reference points taken between them (sha256 of the whole volume) must stay exact.
// Then a long zero request (600 MiB of data to journal) on one connection while another
// connection writes 4 KiB blocks one by one: every window boundary that falls inside the long
// request must show exactly the small writes that completed before it, and none begun after it.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { run } from "../helpers/run.js";
import { scratchDir, startServer } from "../helpers/server.js";
import { exportSha, pastBoundary, py, recordPoint, snapUri, type PitPoint } from "../helpers/pit.js";

const W = 1000;
const cleanups: (() => Promise<unknown>)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

void test("zero and trim requests of hundreds of MiB on a --pit server", { timeout: 150_000 }, async () => {
  const dir = scratchDir("blockfork-pit-large-");
  cleanups.push(() => Promise.resolve(rmSync(dir, { recursive: true, force: true })));
  const srv = await startServer({ dir, size: "768M", args: ["--pit", "--state-dir", `${dir}/state`] });
  cleanups.push(() => srv.stop("SIGKILL"));
  await pastBoundary(W);
  const points: PitPoint[] = [];

  const step = async (label: string, code: string): Promise<void> => {
    try {
      await py(srv.uri, `h = connect()\n${code}\nh.shutdown()\n`);
    } catch (e) {
      const state =
        srv.proc.exitCode !== null ? `the server exited (${srv.proc.exitCode})` : "the server runs";
      throw new Error(`${label}: ${(e as Error).message}\n${state}; its log:\n${srv.log().slice(-3000)}`);
    }
    points.push(await recordPoint(srv, label, W));
  };
  await step(
    "data",
    "for i in range(32):\n    h.pwrite(os.urandom(MiB), 100 * MiB + i * 3 * MiB)\nh.pwrite(os.urandom(MiB), 700 * MiB)",
  );
  await step("zero-600M", "h.zero(600 * MiB, 64 * MiB)");
  await step("data-again", "for i in range(16):\n    h.pwrite(os.urandom(MiB), 200 * MiB + i * 5 * MiB)");
  await step("trim-all", "h.trim(h.get_size(), 0)");
  await step("data-3", "h.pwrite(os.urandom(8 * MiB), 0)\nh.pwrite(os.urandom(8 * MiB), 500 * MiB)");
  await step("zero-600M-no-hole", "h.zero(600 * MiB, 4 * MiB, nbd.CMD_FLAG_NO_HOLE)");
  assert.equal(new Set(points.map((p) => p.sha)).size, points.length, "a step changed nothing");
  const got: string[] = [];
  for (const p of points) got.push(`${p.label} ${await exportSha(snapUri(srv, p.iso))}`);
  assert.deepEqual(
    got,
    points.map((p) => `${p.label} ${p.sha}`),
  );
  const r = await srv.stop();
  assert.deepEqual(r, { code: 0, signal: null }, `server exit:\n${srv.log()}`);
});

void test(
  "points inside a long zero request show exactly the other connection's earlier writes",
  { timeout: 150_000 },
  async () => {
    const WS = 100; // small windows: many boundaries fall inside the long request
    const dir = scratchDir("blockfork-pit-large-");
    cleanups.push(() => Promise.resolve(rmSync(dir, { recursive: true, force: true })));
    const srv = await startServer({
      dir,
      size: "768M",
      args: ["--pit", "--state-dir", join(dir, "state"), "--pit-window", String(WS)],
    });
    cleanups.push(() => srv.stop("SIGKILL"));
    const MiB = 1024 * 1024;
    const SMALL_AT = 700 * MiB;
    // Data everywhere, so that the long request has 600 MiB of before-images to journal.
    const fill = randomBytes(768 * MiB);
    const file = join(dir, "fill.bin");
    writeFileSync(file, fill);
    await run("nbdcopy", [file, srv.uri], { timeoutMs: 60_000 });
    rmSync(file);
    const done = join(dir, "large-done");
    const smallWriter = py(
      srv.uri,
      `
    import hashlib, json, time
    h = connect()
    out = []
    k = 0
    while not os.path.exists(os.environ["DONE"]) and k < 16000:
        d = os.urandom(4096)
        t0 = time.time()
        h.pwrite(d, ${SMALL_AT} + k * 4096)
        t1 = time.time()
        out.append([k, t0 * 1000, t1 * 1000, hashlib.sha256(d).hexdigest()])
        k += 1
        time.sleep(0.01)
    h.shutdown()
    print("SMALL", json.dumps(out))
    `,
      { DONE: done },
    );
    await new Promise((r) => setTimeout(r, 300));
    const largeStart = Date.now();
    await py(srv.uri, "h = connect()\nh.zero(600 * MiB, 0)\nh.shutdown()\n");
    const largeEnd = Date.now();
    writeFileSync(done, "");
    const out = (await smallWriter).stdout;
    const small = JSON.parse(/^SMALL (.*)$/m.exec(out)![1]) as [number, number, number, string][];
    const boundaries: number[] = [];
    for (let p = Math.ceil(largeStart / WS) * WS; p < largeEnd; p += WS) boundaries.push(p);
    assert.ok(boundaries.length >= 3, `the long request took only ${largeEnd - largeStart} ms`);
    assert.ok(small.length >= 20, `only ${small.length} small writes during the long request`);
    const oldSha = (k: number): string =>
      createHash("sha256")
        .update(fill.subarray(SMALL_AT + k * 4096, SMALL_AT + (k + 1) * 4096))
        .digest("hex");
    const MARGIN = 30; // ms of clock difference between nbdsh and the server
    const wrong: string[] = [];
    let checked = 0;
    for (const p of boundaries) {
      const r = await py(
        snapUri(srv, new Date(p).toISOString()),
        `
      import hashlib
      h = connect()
      n = ${small.length}
      buf = h.pread(n * 4096, ${SMALL_AT})
      print("SHAS", " ".join(hashlib.sha256(buf[i * 4096:(i + 1) * 4096]).hexdigest() for i in range(n)))
      h.shutdown()
      `,
      );
      const shas = /^SHAS (.*)$/m.exec(r.stdout)![1].split(" ");
      for (const [k, t0, t1, sha] of small) {
        let want: string;
        if (t1 < p - MARGIN) want = sha;
        else if (t0 > p + MARGIN) want = oldSha(k);
        else continue; // in flight at p
        checked++;
        if (shas[k] !== want) {
          wrong.push(
            `snap@${new Date(p).toISOString()}: block ${k} written ${(t0 - p).toFixed(0)}..${(t1 - p).toFixed(0)} ms from the point reads ${want === sha ? "old" : "new"} contents`,
          );
        }
      }
    }
    assert.ok(checked > 0);
    assert.deepEqual(
      wrong.slice(0, 10),
      [],
      `${wrong.length} of ${checked} checks wrong over ${boundaries.length} points`,
    );
    const stopped = await srv.stop();
    assert.deepEqual(stopped, { code: 0, signal: null }, `server exit:\n${srv.log()}`);
  },
);
