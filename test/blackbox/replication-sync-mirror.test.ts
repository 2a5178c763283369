// Black-box replication: sync mode and the tracking mirror.
// - `--replication sync`: after every acknowledged write (nbdsh pwrite of a random pattern), the
//   gateway's data endpoint returns the same bytes at once; a slow gateway costs a write at most
//   about --sync-timeout, a dead one nothing; writes always succeed; status says tracking and why;
//   after the gateway returns, the files converge.
// - `--tracking-mirror URL` (a second gateway): while the main gateway is down, GET
//   /v1/tracking/{volumeId} on the mirror (volumeId: status .tracking.source) has the dirty extents
//   with timestamps, including writes made while the link tracks; after the resync it says 0 dirty.
// - A mirror with a token of its own (`--tracking-mirror-token-file`) gets the extents; with the
//   gateway's token instead, `blockfork status` shows the mirror FAILING with the 401 and the hint.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { nbdsh } from "../helpers/run.js";
import { startGateway, type GatewayHandle } from "../helpers/gateway.js";
import {
  fioClean,
  fioStart,
  sha256File,
  sleep,
  startPair,
  writeThroughNbd,
  cli,
  type FioRun,
  type Pair,
} from "../helpers/replication.js";

const MiB = 1024 * 1024;
const SYNC_TIMEOUT = 1000;

/** pwrite each (offset, data) with nbdsh, timing each call; returns the seconds per write. */
async function timedWrites(pair: Pair, items: { offset: number; data: Buffer }[]): Promise<number[]> {
  const manifest = items.map((it, i) => {
    const file = join(pair.dir, `w-${Date.now()}-${i}.bin`);
    writeFileSync(file, it.data);
    return [file, it.offset];
  });
  const code = [
    "import nbd, os, json, time",
    "h = nbd.NBD()",
    'h.connect_uri(os.environ["URI"])',
    "out = []",
    `for f, off in json.loads(${JSON.stringify(JSON.stringify(manifest))}):`,
    '    data = open(f, "rb").read()',
    "    t = time.monotonic()",
    "    h.pwrite(data, off)",
    "    out.append(time.monotonic() - t)",
    "print(json.dumps(out))",
    "h.shutdown()",
  ].join("\n");
  const r = await nbdsh(pair.proxy!.uri, code, { timeoutMs: 120_000 });
  return JSON.parse(r.stdout.trim().split("\n").pop()!) as number[];
}

void describe("replication: sync mode", () => {
  let pair: Pair;
  before(async () => {
    pair = await startPair({
      size: "64M",
      proxyArgs: ["--replication", "sync", "--sync-timeout", String(SYNC_TIMEOUT)],
    });
  });
  after(async () => {
    await pair.stop();
  });

  void test("every acknowledged write reads back from the gateway's data endpoint at once", async () => {
    const st = await pair.status();
    assert.equal(st.link!.mode, "sync");
    const code = `
import nbd, os, random, urllib.request
h = nbd.NBD()
h.connect_uri(os.environ["URI"])
size = h.get_size()
rnd = random.Random(1234)
base = os.environ["DATA"]
bad = []
for i in range(60):
    n = rnd.choice([512, 4096, 3 * 4096 + 512, 65536, 70000, 300 * 1024])
    off = rnd.randrange(0, size - n) // 512 * 512
    data = os.urandom(n)
    h.pwrite(data, off)
    got = urllib.request.urlopen(f"{base}?offset={off}&length={n}").read()
    if got != data:
        bad.append((i, off, n))
print("checked", 60, "bad", bad)
h.shutdown()
`;
    const r = await nbdsh(pair.proxy!.uri, code, {
      env: { DATA: `${pair.gw!.url}/volumes/sec/data` },
      timeoutMs: 120_000,
    });
    assert.match(r.stdout, /checked 60 bad \[\]/, r.stdout + r.stderr);
  });

  void test("a slow gateway: the write succeeds after about --sync-timeout and the link tracks, saying why", async () => {
    await pair.waitSynced();
    await pair.setFault({ mode: "slow", delayMs: 8000 });
    try {
      const times = await timedWrites(pair, [{ offset: 5 * MiB, data: randomBytes(8192) }]);
      const s = times[0];
      assert.ok(
        s >= (SYNC_TIMEOUT / 1000) * 0.9 && s < SYNC_TIMEOUT / 1000 + 3,
        `a sync write to a slow gateway took ${s.toFixed(2)} s with --sync-timeout ${SYNC_TIMEOUT}`,
      );
      const st = await pair.waitStatus(
        "the sync timeout as the reason",
        (x) => x.link!.outages > 0 && /sync-timeout 1000/.test(x.link!.reason),
        10_000,
      );
      assert.notEqual(st.link!.state, "streaming");
    } finally {
      await pair.setFault({ mode: "none" });
    }
    await pair.waitSynced();
  });

  void test("a dead gateway: writes succeed (within --sync-timeout), status says tracking; back: identical files", async () => {
    await pair.waitSynced();
    await pair.killGateway("SIGKILL");
    const items = Array.from({ length: 10 }, (_, i) => ({
      offset: (3 + i * 5) * MiB + i * 4096,
      data: randomBytes(4096 * (1 + i)),
    }));
    const times = await timedWrites(pair, items);
    for (const [i, s] of times.entries()) {
      assert.ok(s < SYNC_TIMEOUT / 1000 + 2, `write ${i} took ${s.toFixed(2)} s with the gateway dead`);
    }
    const st = await pair.status();
    assert.equal(st.link!.state, "tracking");
    assert.match(st.link!.reason, /failed|ECONNREFUSED|closed/);
    assert.ok(st.tracking!.dirtyBytes >= items.reduce((n, it) => n + it.data.length, 0));
    await pair.restartGateway();
    await pair.waitSynced();
    const [a, b] = await Promise.all([sha256File(pair.primary), sha256File(pair.secondary)]);
    assert.equal(b, a, "the secondary differs from the primary after the sync-mode outage");
  });
});

interface MirrorDoc {
  volumeId: string;
  source: string;
  linkState: string;
  dirtyBytes: number;
  extentCount: number;
  extents: { offset: number; length: number; firstDirtied: string; lastDirtied: string }[];
}

void describe("replication: tracking mirror", () => {
  let mirror: GatewayHandle;
  let pair: Pair;
  let source: string;
  before(async () => {
    mirror = await startGateway({ size: "1M" });
    pair = await startPair({
      size: "64M",
      proxyArgs: ["--tracking-mirror", mirror.url.replace(/\/v1$/, "")],
    });
    source = (await pair.status()).tracking!.source;
  });
  after(async () => {
    try {
      await pair.stop();
    } finally {
      await mirror.stop();
    }
  });

  async function doc(): Promise<MirrorDoc | null> {
    const r = await mirror.client.request("GET", `/tracking/${source}`);
    if (r.status === 404) return null;
    assert.equal(r.status, 200, r.body.toString());
    return r.json<MirrorDoc>();
  }

  async function pollDoc(ok: (d: MirrorDoc) => boolean, timeoutMs = 5000): Promise<MirrorDoc | null> {
    const deadline = Date.now() + timeoutMs;
    let d = await doc();
    while ((d === null || !ok(d)) && Date.now() < deadline) {
      await sleep(150);
      d = await doc();
    }
    return d;
  }

  const covers = (d: MirrorDoc, offset: number): MirrorDoc["extents"][number] | undefined =>
    d.extents.find((e) => e.offset <= offset && offset < e.offset + e.length);

  void test("with the gateway down, the mirror has the dirty extents with their times, writes while tracking too", async () => {
    const st = await pair.status();
    assert.equal(st.link!.mirror, mirror.url.replace(/\/v1$/, ""));
    await pair.killGateway("SIGKILL");
    try {
      const t0 = Date.now();
      await timedWrites(pair, [{ offset: 10 * MiB + 4096, data: randomBytes(4096) }]);
      await pair.waitStatus("tracking", (s) => s.link!.state === "tracking", 10_000);
      const first = await pollDoc(
        (d) => d.linkState === "tracking" && covers(d, 10 * MiB + 4096) !== undefined,
      );
      assert.ok(first !== null, "the mirror has no document for this proxy");
      assert.equal(first.volumeId, source);
      assert.equal(first.source, source);
      assert.equal(first.linkState, "tracking");
      const e1 = covers(first, 10 * MiB + 4096);
      assert.ok(
        e1,
        `the write before the link noticed is not in the mirror: ${JSON.stringify(first.extents)}`,
      );
      assert.ok(Date.parse(e1.firstDirtied) >= t0 && Date.parse(e1.lastDirtied) <= Date.now());
      assert.equal(first.extentCount, first.extents.length);
      assert.ok(first.dirtyBytes >= 4096);
      // The link tracks; a write now must reach the mirror too.
      await sleep(1200);
      const t1 = Date.now();
      await timedWrites(pair, [{ offset: 40 * MiB, data: randomBytes(8192) }]);
      const later = await pollDoc((d) => covers(d, 40 * MiB) !== undefined);
      const e2 = later === null ? undefined : covers(later, 40 * MiB);
      assert.ok(
        e2,
        `a write made while the link tracks is not in the mirror 5 s later: ${JSON.stringify(later)}`,
      );
      assert.ok(
        Date.parse(e2.firstDirtied) >= t1,
        `${e2.firstDirtied} is before the write (${new Date(t1).toISOString()})`,
      );
    } finally {
      await pair.restartGateway();
    }
    await pair.waitSynced();
  });

  void test("after the gateway returns and the resync completes (under load), the mirror says 0 dirty", async () => {
    await pair.waitSynced();
    let fio: FioRun | null = null;
    try {
      fio = fioStart(pair.proxy!.uri, pair.dir, [
        "--name=load",
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--rate=32m", // within what the secondary absorbs, so the link can stream again under it
        "--iodepth=8",
        "--size=32M",
        "--time_based",
        "--runtime=10",
      ]);
      await sleep(500);
      await pair.killGateway("SIGKILL");
      const during = await pollDoc((d) => d.linkState === "tracking" && d.dirtyBytes > 0);
      assert.ok(
        during !== null && during.dirtyBytes > 0,
        `mirror during the outage: ${JSON.stringify(during)}`,
      );
      await sleep(1000);
      await pair.restartGateway();
      // The link streams again while fio keeps writing (the mirror is updated as blocks clear).
      await pair.waitStatus("streaming under load", (s) => s.link!.state === "streaming", 20_000);
      assert.equal(fio.proc.exitCode, null, "fio still runs when the link streams again");
      const r = await fio.done;
      assert.equal(fioClean(r), null);
      await pair.waitSynced();
      const d = await pollDoc((x) => x.dirtyBytes === 0 && x.linkState === "streaming");
      assert.equal(d?.linkState, "streaming");
      assert.equal(
        d?.dirtyBytes,
        0,
        `the proxy streams with 0 dirty bytes but 5 s later the mirror still says ${d?.dirtyBytes} ` +
          `(${d?.extents.length} extents)`,
      );
      assert.equal(d?.extents.length, 0);
    } finally {
      await fio?.kill();
      if (!pair.gw) await pair.restartGateway();
    }
  });
});

void describe("replication: a tracking mirror with a token of its own", () => {
  void test("--tracking-mirror-token-file reaches it; without it, blockfork status shows the mirror failing", async () => {
    const mirror = await startGateway({ size: "1M", token: true });
    const tokenFile = join(mirror.dir, "token");
    const url = mirror.url.replace(/\/v1$/, "");
    for (const withToken of [true, false]) {
      const pair = await startPair({
        size: "64M",
        token: true, // the main gateway's token differs from the mirror's
        proxyArgs: [
          "--tracking-mirror",
          url,
          ...(withToken ? ["--tracking-mirror-token-file", tokenFile] : []),
        ],
      });
      try {
        const source = (await pair.status()).tracking!.source;
        await pair.killGateway("SIGKILL");
        await writeThroughNbd(pair, 0, randomBytes(64 * 1024));
        if (withToken) {
          let r = await mirror.client.request("GET", `/tracking/${source}`);
          for (let i = 0; i < 50 && (r.status !== 200 || r.json<MirrorDoc>().dirtyBytes === 0); i++) {
            await sleep(100);
            r = await mirror.client.request("GET", `/tracking/${source}`);
          }
          assert.equal(r.status, 200, r.body.toString());
          assert.ok(r.json<MirrorDoc>().dirtyBytes > 0);
        } else {
          const st = await pair.waitStatus(
            "the mirror failing",
            (s) => (s.link!.mirrorError ?? "") !== "",
            10_000,
          );
          assert.match(st.link!.mirrorError!, /PUT answered 401 \(check --tracking-mirror-token-file\)/);
          const text = await cli(["status", "--state-dir", pair.stateDir]);
          assert.match(text.stdout, new RegExp(`mirror +${url}: FAILING \\(PUT answered 401`));
        }
      } finally {
        await pair.stop();
      }
    }
    await mirror.stop();
  });
});
