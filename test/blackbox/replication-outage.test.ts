// Black-box replication under load: a real `blockfork gateway` and `blockfork serve --gateway`,
// fio (nbd engine) and nbdsh as clients.
// - The gateway is SIGKILLed and restarted three times during a 20 s fio randwrite (512 B to 64 KiB,
//   QD32): fio sees no error; while the gateway is down, `blockfork tracking show` has the blocks
//   written in that outage, timestamped between the kill and the restart; at the end the link
//   streams with 0 dirty bytes and the secondary file equals the primary file.
// - The proxy is SIGKILLed mid-load (fio with an fsync every 16 writes, nbdsh writing known
//   patterns then FLUSH, another nbdsh still writing): every pattern acknowledged before the
//   completed FLUSH is in the primary file; the restarted proxy reports the crash recovery; the
//   secondary converges to the primary.
// - nbdcopy writes sparse images (data and holes, so zero requests too) over a volume full of
//   data, once while the link streams and once while the gateway is down: each time the secondary
//   ends byte for byte equal to the image.

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { closeSync, ftruncateSync, openSync, readSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { nbdsh, run } from "../helpers/run.js";
import {
  background,
  fioClean,
  fioStart,
  sha256File,
  sleep,
  startPair,
  type Background,
  type FioRun,
  type Pair,
  type ProxyStatus,
  type TrackingShow,
} from "../helpers/replication.js";

const KiB = 1024;
const MiB = 1024 * KiB;

/** Write `data` at `offset` through NBD with nbdsh, then FLUSH; resolves once both are answered. */
async function nbdWrite(pair: Pair, items: { offset: number; data: Buffer }[]): Promise<void> {
  const manifest = items.map((it, i) => {
    const file = join(pair.dir, `pattern-${Date.now()}-${i}.bin`);
    writeFileSync(file, it.data);
    return [file, it.offset];
  });
  const code = [
    "import nbd, os, json",
    "h = nbd.NBD()",
    'h.connect_uri(os.environ["URI"])',
    `for f, off in json.loads(${JSON.stringify(JSON.stringify(manifest))}):`,
    '    h.pwrite(open(f, "rb").read(), off)',
    "h.flush()",
    'print("flushed")',
    "h.shutdown()",
  ].join("\n");
  const r = await nbdsh(pair.proxy!.uri, code, { timeoutMs: 60_000 });
  assert.match(r.stdout, /flushed/);
}

function readFile(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, "r");
  try {
    const b = Buffer.alloc(length);
    readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    closeSync(fd);
  }
}

void describe("replication: the gateway killed and restarted under fio", () => {
  void test("three SIGKILL outages during randwrite: no client error, timestamps in the outage, identical files", async () => {
    const pair = await startPair({ size: "256M" });
    let fio: FioRun | null = null;
    try {
      const gen = (await pair.status()).tracking!.generation;
      fio = fioStart(pair.proxy!.uri, pair.dir, [
        "--name=randwrite",
        "--rw=randwrite",
        "--bsrange=512-64k",
        "--iodepth=32",
        "--offset=0",
        "--size=192M",
        "--time_based",
        "--runtime=20",
      ]);
      const outages: {
        killAt: number;
        restartAt: number;
        offset: number;
        length: number;
        show: TrackingShow;
        status: ProxyStatus;
      }[] = [];
      for (let k = 0; k < 3; k++) {
        // The link is back from the previous outage (probing backs off to at most 5 s) ...
        const up = await pair.waitStatus(
          `the link to leave tracking after restart ${k}`,
          (s) => s.link!.state !== "tracking",
          15_000,
        );
        await sleep(1000);
        // ... and the gateway dies under load.
        assert.equal(fio.proc.exitCode, null, `fio is still running at kill ${k}`);
        const killAt = Date.now();
        await pair.killGateway("SIGKILL");
        await sleep(200);
        // A region fio never touches (nor its neighbours, so that its dirty extent stands alone),
        // clean before this outage: written now, through NBD.
        const offset = 200 * MiB + k * 8 * MiB + 3 * 4096;
        const length = 100 * KiB;
        await nbdWrite(pair, [{ offset, data: randomBytes(length) }]);
        await sleep(300);
        const show = await pair.trackingShow();
        const status = await pair.status();
        const restartAt = Date.now();
        await pair.restartGateway();
        assert.ok(status.link!.outages > up.link!.outages, `outage ${k}: the link did not fall`);
        outages.push({ killAt, restartAt, offset, length, show, status });
      }
      const r = await fio.done;
      assert.equal(fioClean(r), null, "fio must not see an error while the gateway dies");

      for (const [k, o] of outages.entries()) {
        assert.equal(o.status.link!.state, "tracking", `outage ${k}: status while the gateway is down`);
        assert.notEqual(o.status.link!.reason, "", `outage ${k}: the status says why`);
        assert.ok(o.show.dirtyBytes > 0);
        const ext = o.show.extents.find(
          (e) => e.offset <= o.offset && e.offset + e.length >= o.offset + o.length,
        );
        assert.ok(
          ext,
          `outage ${k}: no dirty extent covers the write at ${o.offset}: ${JSON.stringify(o.show.extents.slice(-5))}`,
        );
        const first = Date.parse(ext.firstDirtied);
        const last = Date.parse(ext.lastDirtied);
        const span = `${ext.firstDirtied}..${ext.lastDirtied}, outage ${new Date(o.killAt).toISOString()}..${new Date(o.restartAt).toISOString()}`;
        assert.ok(
          first >= o.killAt && first <= o.restartAt,
          `outage ${k}: firstDirtied not in the outage: ${span}`,
        );
        assert.ok(
          last >= first && last <= o.restartAt,
          `outage ${k}: lastDirtied not in the outage: ${span}`,
        );
        // And the status's span of the whole log reaches into the outage too.
        assert.ok(Date.parse(o.status.tracking!.lastDirtied!) >= o.killAt);
      }

      const end = await pair.waitSynced(60_000);
      // Three kills, three falls at least (a loaded machine may add a "too slow" one).
      assert.ok(end.link!.outages >= 3, `outages ${end.link!.outages}`);
      assert.equal(end.tracking!.generation, gen, "the proxy kept its generation (it never restarted)");
      assert.equal(end.link!.queue.updates, 0);
      const [a, b] = await Promise.all([sha256File(pair.primary), sha256File(pair.secondary)]);
      assert.equal(b, a, "the secondary file differs from the primary after the last resync");
    } finally {
      await fio?.kill();
      await pair.stop();
    }
  });
});

void describe("replication: the proxy killed mid-load", () => {
  // The default activity log covers the whole load; with --al-extents 2 regions are evicted all
  // the time, so after the crash most dirty blocks are known only from evicted regions' bits.
  for (const al of [null, 2]) {
    const name = al === null ? "default activity log" : `--al-extents ${al}`;
    void test(`SIGKILL under fio --fsync=16 and nbdsh (${name}): flushed writes are on the primary, crash recovery, convergence`, async () => {
      const pair = await startPair({
        size: "256M",
        ...(al === null ? {} : { proxyArgs: ["--al-extents", String(al)] }),
      });
      let fio: FioRun | null = null;
      let writer: Background | null = null;
      try {
        const before = await pair.status();
        fio = fioStart(pair.proxy!.uri, pair.dir, [
          "--name=fsync16",
          "--rw=randwrite",
          "--bsrange=4k-64k",
          "--iodepth=16",
          "--fsync=16",
          "--offset=0",
          "--size=128M",
          "--time_based",
          "--runtime=60",
        ]);
        await sleep(1000);
        // Known patterns, each acknowledged, then a FLUSH that completes.
        const patterns: { offset: number; data: Buffer }[] = [];
        for (let i = 0; i < 32; i++) {
          patterns.push({
            offset: 128 * MiB + i * 2 * MiB + (i % 7) * 4096,
            data: randomBytes(4096 * (1 + (i % 24))),
          });
        }
        await nbdWrite(pair, patterns);
        // Writes still going when the proxy dies (not flushed: no promise about them).
        writer = background(
          "nbdsh",
          [
            "-n",
            "-c",
            [
              "import nbd, os",
              "h = nbd.NBD()",
              'h.connect_uri(os.environ["URI"])',
              'print("writing", flush=True)',
              "i = 0",
              "while True:",
              "    h.pwrite(os.urandom(65536), 192 * 1024 * 1024 + (i % 900) * 65536)",
              "    i += 1",
            ].join("\n"),
          ],
          { URI: pair.proxy!.uri },
        );
        const t0 = Date.now();
        while (!writer.output().stdout.includes("writing") && Date.now() - t0 < 10_000) await sleep(20);
        await sleep(500);
        const killed = await pair.killProxy("SIGKILL");
        assert.equal(killed.signal, "SIGKILL");
        const fr = await fio.done;
        assert.notEqual(fr.code, 0, "fio cannot finish cleanly: its server died");
        await writer.done;

        for (const [i, p] of patterns.entries()) {
          assert.ok(
            readFile(pair.primary, p.offset, p.data.length).equals(p.data),
            `pattern ${i} at ${p.offset} (acknowledged before a completed FLUSH) is not in the primary file`,
          );
        }

        await pair.restartProxy();
        const st = await pair.status();
        const rec = st.tracking!.recovery;
        assert.equal(rec.crashed, true, JSON.stringify(rec));
        assert.equal(rec.newLog, false);
        assert.ok(rec.alRegions > 0, `the activity log held no region at the crash: ${JSON.stringify(rec)}`);
        assert.equal(st.tracking!.generation, before.tracking!.generation + 1);
        assert.equal(st.tracking!.source, before.tracking!.source);
        assert.match(pair.proxyLog(), /did not shut down cleanly; \d+ activity-log regions taken as dirty/);
        await pair.waitSynced(60_000);
        const [a, b] = await Promise.all([sha256File(pair.primary), sha256File(pair.secondary)]);
        assert.equal(b, a, "the secondary did not converge to the primary after the proxy crash");
      } finally {
        await fio?.kill();
        await writer?.kill();
        await pair.stop();
      }
    });
  }

  void test("a clean restart while the gateway is down keeps the dirty blocks and their times", async () => {
    const pair = await startPair({ size: "64M" });
    try {
      const before = await pair.status();
      await pair.killGateway("SIGKILL");
      const t0 = Date.now();
      const items = [0, 1, 2].map((i) => ({
        offset: (5 + i * 20) * MiB + i * 4096,
        data: randomBytes(96 * KiB),
      }));
      await nbdWrite(pair, items);
      const shown = await pair.trackingShow();
      assert.ok(shown.dirtyBytes > 0);
      const stopped = await pair.killProxy("SIGTERM");
      assert.deepEqual(stopped, { code: 0, signal: null }, pair.proxyLog().slice(-2000));
      await pair.restartProxy();
      const st = await pair.status();
      assert.deepEqual(st.tracking!.recovery, {
        newLog: false,
        crashed: false,
        alRegions: 0,
        gatewayChanged: false,
        gatewayMoved: null,
        fullResync: null,
      });
      assert.equal(st.tracking!.generation, before.tracking!.generation + 1);
      assert.equal(st.link!.state, "tracking");
      const again = await pair.trackingShow();
      assert.deepEqual(
        again.extents,
        shown.extents,
        "the dirty extents and their times survive a clean restart",
      );
      for (const e of again.extents) assert.ok(Date.parse(e.firstDirtied) >= t0);
      await pair.restartGateway();
      await pair.waitSynced();
      const [a, b] = await Promise.all([sha256File(pair.primary), sha256File(pair.secondary)]);
      assert.equal(b, a, "the secondary differs from the primary after the restart and resync");
    } finally {
      await pair.stop();
    }
  });
});

void describe("replication: nbdcopy of sparse images", () => {
  /** A 64 MiB sparse image: random islands of data, the rest holes. */
  function image(path: string, seed: number): void {
    const fd = openSync(path, "w");
    try {
      for (let i = 0; i < 24; i++) {
        const offset = ((seed * 7919 + i * 104729) % 60) * MiB + ((i * 13) % 16) * 4096;
        writeSync(fd, randomBytes(64 * KiB * (1 + (i % 9))), 0, undefined, offset);
      }
      ftruncateSync(fd, 64 * MiB);
    } finally {
      closeSync(fd);
    }
  }

  void test("streaming and during an outage: holes and data reach the secondary byte for byte", async () => {
    const pair = await startPair({ size: "64M" });
    try {
      // Fill the whole volume with data first, so that holes must be written as zeroes.
      const full = join(pair.dir, "full.img");
      writeFileSync(full, randomBytes(64 * MiB));
      await run("nbdcopy", [full, pair.proxy!.uri], { timeoutMs: 60_000 });
      const a = join(pair.dir, "a.img");
      image(a, 1);
      await run("nbdcopy", [a, pair.proxy!.uri], { timeoutMs: 60_000 });
      await pair.waitSynced();
      const want = await sha256File(a);
      assert.equal(await sha256File(pair.primary), want, "nbdcopy wrote the image to the primary");
      assert.equal(await sha256File(pair.secondary), want, "the secondary equals the image (streaming)");

      await pair.killGateway("SIGKILL");
      const b = join(pair.dir, "b.img");
      image(b, 2);
      await run("nbdcopy", [b, pair.proxy!.uri], { timeoutMs: 60_000 });
      const st = await pair.status();
      assert.equal(st.link!.state, "tracking");
      assert.ok(st.tracking!.dirtyBytes > 0);
      await pair.restartGateway();
      await pair.waitSynced();
      const wantB = await sha256File(b);
      assert.equal(await sha256File(pair.primary), wantB);
      assert.equal(await sha256File(pair.secondary), wantB, "the secondary equals the image (after resync)");
    } finally {
      await pair.stop();
    }
  });
});
