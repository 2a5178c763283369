// A full disk under the PIT journal. --state-dir is on a small tmpfs this test mounts (and
// unmounts); a filler file takes most of it. Overwriting the whole volume then needs more
// before-images than fit: the journal must stop, never the primary. While stopped: nbdsh and a
// verifying fio see no error and the data is on the primary (sha256 of what was written), the
// server logs "JOURNAL STOPPED" at error level, `blockfork snapshots` reports no window and the
// reason, snap@T is refused with that message, a snapshot opened before the stop fails its reads
// with EIO, `blockfork mark` is refused, and NBD_OPT_LIST no longer offers a bookmark taken
// before the stop (nothing it lists may fail to open; nbdinfo --list opens them all). Then the
// filler is removed: the journal restarts by itself (within ~10 s), points from before the
// restart stay refused, and new points in time after the restart are exact while more writes
// follow. Also: a crash while the journal is stopped offers no earlier point after the restart.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { rmSync } from "node:fs";
import { join } from "node:path";
import { mountTmpfs, scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { run } from "../helpers/run.js";
import {
  blockfork,
  exportSha,
  fio,
  goReply,
  listExports as rawList,
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

interface Setup {
  dir: string;
  stateDir: string;
  filler: string;
  args: string[];
  srv: ServerHandle;
}

/** A scratch dir, a 48 MiB tmpfs for --state-dir with a 24 MiB filler file, a --pit server. */
async function fullDiskSetup(): Promise<Setup> {
  const dir = scratchDir("blockfork-pit-full-");
  cleanups.push(() => Promise.resolve(rmSync(dir, { recursive: true, force: true })));
  const fs = join(dir, "statefs");
  const unmount = mountTmpfs(fs, "48M");
  cleanups.push(() => Promise.resolve(unmount()));
  const filler = join(fs, "filler");
  await run("dd", ["if=/dev/zero", `of=${filler}`, "bs=1M", "count=24", "status=none"]);
  const stateDir = join(fs, "state");
  const args = ["--pit", "--state-dir", stateDir];
  const srv = await startServer({ dir, size: "64M", args });
  cleanups.push(() => srv.stop("SIGKILL"));
  await pastBoundary(W);
  return { dir, stateDir, filler, args, srv };
}

/**
 * NBD_OPT_LIST (nbdinfo --list, which opens every export it lists) names exactly `want`, and every
 * export it names opens. Returns what is wrong (the caller reports it at the end of the test, so
 * that the rest of the scenario still runs).
 */
async function listedExportsOpen(srv: ServerHandle, want: string[], when: string): Promise<string[]> {
  const problems: string[] = [];
  const raw = await rawList(srv.sock);
  for (const n of raw) {
    const go = await goReply(srv.sock, n);
    if (go.type !== 1)
      problems.push(`${when}: NBD_OPT_LIST names "${n}", but it does not open: ${go.message}`);
  }
  if (JSON.stringify([...raw].sort()) !== JSON.stringify([...want].sort())) {
    problems.push(`${when}: NBD_OPT_LIST names ${JSON.stringify(raw)}, expected ${JSON.stringify(want)}`);
  }
  const list = await run("nbdinfo", ["--list", srv.uri], { allowFailure: true });
  if (list.code !== 0) problems.push(`${when}: nbdinfo --list exits ${list.code}: ${list.stderr.trim()}`);
  return problems;
}

/** Python: write 1 MiB of fresh random data at each MiB of the volume; prints WRITTEN <sha256>. */
const OVERWRITE = `
import hashlib
h = connect()
digest = hashlib.sha256()
for i in range(64):
    d = os.urandom(MiB)
    h.pwrite(d, i * MiB)
    digest.update(d)
h.flush()
print("WRITTEN", digest.hexdigest())
h.shutdown()
`;

void test(
  "a full disk stops the journal, never the primary; it restarts by itself when space returns",
  { timeout: 180_000 },
  async (t) => {
    const { dir, stateDir, filler, srv } = await fullDiskSetup();

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
    await mark(stateDir, "before-stop");
    const listing = await listedExportsOpen(srv, ["disk", "snap@before-stop"], "before the stop");

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
    listing.push(...(await listedExportsOpen(srv, ["disk"], "while the journal is stopped")));

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
    listing.push(
      ...(await listedExportsOpen(srv, ["disk"], "after the restart (the bookmark is before the stop)")),
    );

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
    assert.ok((await snapshots(stateDir)).bookmarks.some((b) => b.name === "after-restart"));
    listing.push(...(await listedExportsOpen(srv, ["disk", "snap@after-restart"], "at the end")));
    const stopped = await srv.stop();
    assert.deepEqual(stopped, { code: 0, signal: null }, `server exit:\n${srv.log()}`);
    assert.deepEqual(listing, [], "NBD_OPT_LIST offers bookmarks that can no longer be opened");
  },
);

void test(
  "a crash while the journal is stopped: after the restart no point from before it is offered",
  { timeout: 120_000 },
  async () => {
    const { dir, stateDir, filler, args, srv } = await fullDiskSetup();
    await py(srv.uri, OVERWRITE);
    const p1 = await recordPoint(srv, "data", W);
    assert.equal(await exportSha(snapUri(srv, p1.iso)), p1.sha);
    const r = await py(srv.uri, OVERWRITE);
    await waitForLog(srv, /JOURNAL STOPPED/, 5000);
    const written = /WRITTEN ([0-9a-f]{64})/.exec(r.stdout)![1];
    // Killed while stopped; the space comes back before the restart.
    assert.equal((await srv.stop("SIGKILL")).signal, "SIGKILL");
    // With no proxy, blockfork snapshots reads the journal: it says the journal was stopped.
    const offline = await snapshots(stateDir);
    assert.equal(
      offline.earliest,
      null,
      `offline, a stopped journal offers points: ${JSON.stringify(offline)}`,
    );
    assert.ok(offline.stopped !== null, JSON.stringify(offline));
    rmSync(filler);
    const restartedAt = Date.now();
    const srv2 = await startServer({ dir, volume: join(dir, "disk.img"), size: "64M", args });
    cleanups.push(() => srv2.stop("SIGKILL"));
    const warn = await waitForLog(
      srv2,
      /journal: it was stopped at (\S+Z); points in time from (\S+Z) on/,
      5000,
    );
    assert.match(warn, /^\S+ warn /);
    const from = Date.parse(/points in time from (\S+Z) on/.exec(warn)![1]);
    assert.ok(
      from >= restartedAt - W,
      `points are offered from ${new Date(from).toISOString()}, before the restart`,
    );
    assert.equal(
      await exportSha(srv2.uri),
      written,
      "the primary lost writes made while the journal was stopped",
    );
    const old = await goReply(srv2.sock, `snap@${p1.iso}`);
    assert.equal(
      old.type,
      REP_ERR_UNKNOWN,
      `snap@${p1.iso} (inexact: its changes were not journaled) is offered`,
    );
    // New points are exact.
    await pastBoundary(W);
    const p2 = await recordPoint(srv2, "after", W);
    await py(srv2.uri, OVERWRITE.replace("range(64)", "range(8)"));
    assert.equal(await exportSha(snapUri(srv2, p2.iso)), p2.sha);
    assert.equal((await snapshots(stateDir)).stopped, null);
    const stopped = await srv2.stop();
    assert.deepEqual(stopped, { code: 0, signal: null }, `server exit:\n${srv2.log()}`);
  },
);
