// A full disk under the PIT journal. --state-dir is on a small tmpfs this test mounts (and
// unmounts); a filler file takes most of it. Overwriting the whole volume then needs more
// before-images than fit: the journal must stop, never the primary. While stopped: nbdsh and a
// verifying fio see no error and the data is on the primary (sha256 of what was written), the
// server logs "JOURNAL STOPPED" at error level, `blockfork snapshots` reports no window and the
// reason, snap@T is refused with that message, a snapshot opened before the stop fails its reads
// with EIO, and `blockfork mark` is refused. Then the filler is removed: the journal restarts by
// itself (within ~10 s), points from before the restart stay refused, and new points in time
// after the restart are exact while more writes follow.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { run } from "../helpers/run.js";
import {
  blockfork,
  exportSha,
  fio,
  goReply,
  mark,
  pastBoundary,
  py,
  recordPoint,
  REP_ERR_UNKNOWN,
  sleep,
  snapshots,
  snapUri,
  waitForLog,
  type PitPoint,
} from "../helpers/pit.js";

const W = 1000;

const cleanups: (() => Promise<unknown>)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

void test(
  "a full disk stops the journal, never the primary; it restarts by itself when space returns",
  { timeout: 180_000 },
  async (t) => {
    const dir = scratchDir("blockfork-pit-full-");
    cleanups.push(() => Promise.resolve(rmSync(dir, { recursive: true, force: true })));
    const fs = join(dir, "statefs");
    mkdirSync(fs);
    await run("mount", ["-t", "tmpfs", "-o", "size=48M", "tmpfs", fs]);
    cleanups.push(() => run("umount", [fs]));
    const filler = join(fs, "filler");
    await run("dd", ["if=/dev/zero", `of=${filler}`, "bs=1M", "count=24", "status=none"]);
    const stateDir = join(fs, "state");
    const srv: ServerHandle = await startServer({
      dir,
      size: "64M",
      args: ["--pit", "--state-dir", stateDir],
    });
    cleanups.push(async () => {
      const r = await srv.stop();
      assert.deepEqual(r, { code: 0, signal: null }, `server exit:\n${srv.log()}`);
    });
    await pastBoundary(W);

    // Data everywhere (before-images of holes are zero images: they fit), and a point.
    await py(
      srv.uri,
      `
    h = connect()
    for i in range(64):
        h.pwrite(os.urandom(MiB), i * MiB)
    h.shutdown()
    `,
    );
    const p1 = await recordPoint(srv, "data", W);
    assert.equal(await exportSha(snapUri(srv, p1.iso)), p1.sha);

    // A snapshot held open across the stop, and an overwrite of the whole volume: 64 MiB of images
    // do not fit in the ~24 MiB left. Every primary write must succeed.
    const r = await py(
      srv.uri,
      `
    import hashlib
    snap = connect(uri=os.environ["SNAP"])
    first = snap.pread(MiB, 0)
    h = connect()
    digest = hashlib.sha256()
    for i in range(64):
        d = os.urandom(MiB)
        h.pwrite(d, i * MiB)
        digest.update(d)
    h.flush()
    print("WRITTEN", digest.hexdigest())
    try:
        snap.pread(MiB, 0)
        print("OPEN-SNAPSHOT-READ ok")
    except nbd.Error as e:
        print("OPEN-SNAPSHOT-READ", errno.errorcode.get(e.errnum, e.errnum))
    snap.shutdown()
    h.shutdown()
    `,
      { SNAP: snapUri(srv, p1.iso) },
    );
    const written = /WRITTEN ([0-9a-f]{64})/.exec(r.stdout)?.[1];
    assert.ok(written, r.stdout + r.stderr);
    const stopLine = await waitForLog(srv, /JOURNAL STOPPED/, 5000);
    assert.match(stopLine, /^\S+ error .*JOURNAL STOPPED: .*Primary writes continue WITHOUT before-images/);
    assert.equal(await exportSha(srv.uri), written, "the primary does not hold what was written");
    assert.match(r.stdout, /OPEN-SNAPSHOT-READ EIO/, "a snapshot open across the stop must fail its reads");

    // Stopped: more writes (fio with verification, nbdsh), all fine.
    await fio(srv.uri, dir, [
      "--name=while-stopped",
      "--rw=randwrite",
      "--bs=4k",
      "--iodepth=8",
      "--size=64M",
      "--io_size=8M",
      "--verify=crc32c",
      "--randrepeat=0",
    ]);
    const s = await snapshots(stateDir);
    assert.equal(s.earliest, null, `a stopped journal offers points: ${JSON.stringify(s)}`);
    assert.ok(s.stopped !== null, JSON.stringify(s));
    assert.match(s.stopped.reason, /ENOSPC/);
    const text = await blockfork(["snapshots", "--state-dir", stateDir]);
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stdout, /^window {4}none \(journal stopped at \S+Z: ENOSPC.*\)$/m);
    const refused = await goReply(srv.sock, `snap@${p1.iso}`);
    assert.equal(refused.type, REP_ERR_UNKNOWN);
    assert.match(refused.message, /no point in time is available: the journal stopped at \S+Z \(ENOSPC/);
    const m = await blockfork(["mark", "during", "--state-dir", stateDir]);
    assert.equal(m.code, 1, `mark while stopped: exit ${m.code}\n${m.stderr}`);
    assert.match(m.stderr, /the journal is stopped/);

    // Free the space: the journal restarts by itself (it retries every 5 s).
    const freedAt = Date.now();
    rmSync(filler);
    const restart = await waitForLog(srv, /journal restarted; points in time from (\S+Z) on/, 12_000);
    const from = Date.parse(/points in time from (\S+Z) on/.exec(restart)![1]);
    assert.ok(from >= freedAt - W, "the restart offers points from before the space came back");
    t.diagnostic(`the journal restarted ${Date.now() - freedAt} ms after the space was freed`);
    await sleep(Math.max(0, from - Date.now()) + 50);
    const s2 = await snapshots(stateDir);
    assert.equal(s2.stopped, null);
    assert.equal(s2.earliest, new Date(from).toISOString());
    const old = await goReply(srv.sock, `snap@${p1.iso}`);
    assert.equal(old.type, REP_ERR_UNKNOWN, "a point from before the stop is offered again");
    assert.match(old.message, /outside the journal's window; available: /);

    // New points after the restart are exact, while more writes follow.
    const points: PitPoint[] = [];
    await pastBoundary(W);
    await py(
      srv.uri,
      `
    h = connect()
    for i in range(300):
        h.pwrite(os.urandom(4096), random.randrange(0, 16 * MiB // 4096) * 4096)
    h.zero(MiB, 20 * MiB)
    h.shutdown()
    `,
    );
    points.push(await recordPoint(srv, "after-restart-1", W));
    await py(
      srv.uri,
      `
    h = connect()
    for i in range(8):
        h.pwrite(os.urandom(MiB), i * MiB)
    h.shutdown()
    `,
    );
    points.push(await recordPoint(srv, "after-restart-2", W));
    await py(srv.uri, "h = connect()\nh.pwrite(os.urandom(4 * MiB), 0)\nh.shutdown()\n");
    for (const p of points)
      assert.equal(await exportSha(snapUri(srv, p.iso)), p.sha, `snap@${p.iso} (${p.label})`);
    await mark(stateDir, "after-restart");
    assert.deepEqual(
      (await snapshots(stateDir)).bookmarks.map((b) => b.name),
      ["after-restart"],
    );
  },
);
