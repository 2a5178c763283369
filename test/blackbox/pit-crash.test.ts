// kill -9 during writes: phases of writes as in pit.test.ts (nbdcopy, nbdsh with unaligned writes,
// trims and zero writes, fio on several connections) with a reference point (time + sha256 of the
// primary) after each and a bookmark; then a heavy fio write load, and SIGKILL of the server in the
// middle of it. Restarted on the same volume and --state-dir, the server must log the journal it
// recovered, serve every earlier point exactly (sha256) and the bookmark, keep the earliest point,
// and go on journaling: a point taken after the restart is exact too, while more writes follow.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { run } from "../helpers/run.js";
import {
  exportSha,
  fio,
  fioLoad,
  mark,
  MiB,
  pastBoundary,
  py,
  recordPoint,
  sleep,
  snapshots,
  snapUri,
  type Background,
  type PitPoint,
} from "../helpers/pit.js";

const W = 1000;

const cleanups: (() => Promise<unknown>)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

async function checkPoints(srv: ServerHandle, points: PitPoint[], when: string): Promise<void> {
  const got: string[] = [];
  for (const p of points) got.push(`${p.label} ${p.iso} ${await exportSha(snapUri(srv, p.iso))}`);
  assert.deepEqual(
    got,
    points.map((p) => `${p.label} ${p.iso} ${p.sha}`),
    `${when}: snapshots differ from their reference images\nserver log:\n${srv.log().slice(-3000)}`,
  );
}

void test(
  "SIGKILL under a write load: every earlier point is still exact after the restart",
  { timeout: 180_000 },
  async () => {
    const dir = scratchDir("blockfork-pit-crash-");
    cleanups.push(() => Promise.resolve(rmSync(dir, { recursive: true, force: true })));
    const stateDir = join(dir, "state");
    const args = ["--pit", "--state-dir", stateDir];
    let srv = await startServer({ dir, size: "64M", args });
    cleanups.push(() => srv.stop("SIGKILL"));
    await pastBoundary(W);

    const points: PitPoint[] = [];
    points.push(await recordPoint(srv, "empty", W));
    const file = join(dir, "random.bin");
    writeFileSync(file, randomBytes(12 * MiB));
    await run("nbdcopy", [file, srv.uri]);
    points.push(await recordPoint(srv, "nbdcopy", W));
    await py(
      srv.uri,
      `
    h = connect()
    rnd = random.Random(5)
    for i in range(300):
        h.pwrite(os.urandom(rnd.choice([1, 511, 512, 4097, 20000])), rnd.randrange(0, 40 * MiB))
    h.trim(1 * MiB, 3 * MiB + 17)
    h.zero(2 * MiB, 6 * MiB, nbd.CMD_FLAG_NO_HOLE)
    h.zero(4 * MiB, 9 * MiB)
    h.flush()
    h.shutdown()
    `,
    );
    points.push(await recordPoint(srv, "nbdsh", W));
    await mark(stateDir, "precrash");
    await fio(srv.uri, dir, [
      "--name=multi",
      "--rw=randwrite",
      "--bsrange=4k-64k",
      "--iodepth=8",
      "--numjobs=3",
      "--size=64M",
      "--io_size=4M",
      "--randrepeat=0",
    ]);
    points.push(await recordPoint(srv, "fio", W));
    await checkPoints(srv, points, "before the crash");

    // A heavy load, and SIGKILL in the middle of it.
    const load: Background = fioLoad(srv.uri, dir, [
      "--name=load",
      "--rw=randwrite",
      "--bsrange=4k-128k",
      "--iodepth=16",
      "--numjobs=2",
      "--size=64M",
      "--time_based",
      "--runtime=60",
      "--randrepeat=0",
    ]);
    cleanups.push(() => load.stop("SIGKILL"));
    await sleep(3000);
    const before = srv.log();
    assert.match(before, /export "disk"[\s\S]*export "disk"/, "fio's connections did not reach the server");
    const killed = await srv.stop("SIGKILL");
    assert.equal(killed.signal, "SIGKILL");
    const fioEnd = await load.stop("SIGKILL");
    assert.notEqual(fioEnd.code, 0, "fio did not notice that its server died");

    // With no proxy, blockfork snapshots reads the journal itself (the admin socket is stale).
    const offline = await snapshots(stateDir);
    assert.equal(offline.windowMs, W);
    assert.ok(
      offline.earliest !== null && Date.parse(offline.earliest) <= points[0].ms,
      JSON.stringify(offline),
    );
    assert.ok(
      Date.parse(offline.latest) >= points[3].ms,
      `offline: the last change ${offline.latest} is before the last point`,
    );
    assert.deepEqual(
      offline.bookmarks.map((b) => b.name),
      ["precrash"],
    );
    assert.ok(offline.entries > 0);

    // Restart on the same volume and state directory (another --pit-window: a journal keeps its own).
    srv = await startServer({
      dir,
      volume: join(dir, "disk.img"),
      size: "64M",
      args: [...args, "--pit-window", "500"],
    });
    const recovered = /journal: (\d+) segments, (\d+) entries, points in time from (\S+Z)/.exec(srv.log());
    assert.ok(recovered, `the restart does not report the recovered journal:\n${srv.log()}`);
    assert.ok(Number(recovered[2]) > 0);
    assert.equal(
      Number(recovered[2]),
      offline.entries,
      "the restart recovered another number of entries than the offline look",
    );
    assert.match(srv.log(), /keeps its merge window of 1000 ms/);
    assert.ok(
      Date.parse(recovered[3]) <= points[0].ms,
      `points now start at ${recovered[3]}, after the first point`,
    );
    const s = await snapshots(stateDir);
    assert.equal(s.earliest, recovered[3]);
    assert.equal(s.windowMs, W, "the journal's merge window changed with --pit-window");
    assert.deepEqual(
      s.bookmarks.map((b) => b.name),
      ["precrash"],
    );
    await checkPoints(srv, points, "after the restart");
    assert.equal(await exportSha(snapUri(srv, "precrash")), points[2].sha, "snap@precrash after the restart");

    // The journal goes on: new writes, a new point, more writes, all points exact.
    await pastBoundary(W);
    await py(
      srv.uri,
      `
    h = connect()
    for i in range(200):
        h.pwrite(os.urandom(4096 + i), random.randrange(0, 60 * MiB))
    h.zero(MiB, 0)
    h.shutdown()
    `,
    );
    points.push(await recordPoint(srv, "after-restart", W));
    await fio(srv.uri, dir, [
      "--name=more",
      "--rw=randwrite",
      "--bs=4k",
      "--iodepth=8",
      "--size=64M",
      "--io_size=8M",
    ]);
    const latest = await exportSha(srv.uri);
    assert.ok(!points.some((p) => p.sha === latest), "the last fio wrote nothing");
    await checkPoints(srv, points, "after more writes");
    const r = await srv.stop();
    assert.deepEqual(r, { code: 0, signal: null }, `server exit after the restart:\n${srv.log()}`);
  },
);
