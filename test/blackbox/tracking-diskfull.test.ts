// The proxy's tracking log on a full disk. --state-dir is on a small tmpfs this test mounts (and
// unmounts), then fills. With no room the log cannot record dirty marks, and yet:
// - the primary's writes go on: no client sees an error (before, every write failed with EIO
//   until a restart);
// - the proxy says so once, at error level, and `blockfork status` shows it (JSON and text);
// - replication goes on from memory: the gateway killed and restarted, the link resyncs and the
//   secondary equals the primary;
// - a crash in that state loses no replication: writes during a second outage, then kill -9 of
//   the proxy with `--al-extents 2` (the stored activity log covers at most 2 of the 16 regions
//   written). After the filler is removed, the restart finds the full-resync mark, resyncs the
//   whole volume, clears the mark, and the secondary equals the primary (sha256). Without the mark
//   the blocks outside those 2 regions would stay stale on the secondary;
// - a start on a full disk exits 1 naming the state directory and what to do.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { rmSync, statfsSync } from "node:fs";
import { join } from "node:path";
import { readFullResyncMark } from "../../src/tracking/log.js";
import { mountTmpfs, scratchDir } from "../helpers/server.js";
import { nbdsh, run } from "../helpers/run.js";
import { cli, sha256File, startPair, type Pair } from "../helpers/replication.js";

const MiB = 1024 * 1024;

let dir: string;
let mnt: string;
let unmount: (() => void) | undefined;
let pair: Pair | undefined;

before(() => {
  dir = scratchDir("blockfork-track-full-");
  mnt = join(dir, "statefs");
  unmount = mountTmpfs(mnt, "8m");
});

after(async () => {
  await pair?.stop();
  unmount?.();
  rmSync(dir, { recursive: true, force: true });
});

/** Write 1 MiB of fresh random data at each MiB of the 64 MiB volume, then FLUSH. */
const OVERWRITE = `
h = nbd.NBD()
h.connect_uri(os.environ["URI"])
for i in range(64):
    h.pwrite(os.urandom(1024 * 1024), i * 1024 * 1024)
h.flush()
h.shutdown()
`;

async function overwrite(p: Pair, when: string): Promise<void> {
  const r = await nbdsh(p.proxy!.uri, "import nbd, os\n" + OVERWRITE, { allowFailure: true });
  assert.equal(
    r.code,
    0,
    `${when}: the client's writes failed:\n${r.stderr}\nproxy log:\n${p.proxyLog().slice(-2000)}`,
  );
}

async function assertSame(p: Pair, when: string): Promise<void> {
  const [a, b] = await Promise.all([sha256File(p.primary), sha256File(p.secondary)]);
  assert.equal(b, a, `${when}: the secondary differs from the primary`);
}

void test("a full state directory: writes and replication go on, and a crash then resyncs everything", async () => {
  const stateDir = join(mnt, "state");
  const p = (pair = await startPair({ size: "64M", stateDir, proxyArgs: ["--al-extents", "2"] }));
  // A clean stop and start: the stored bitmap is now all clean (the new log stored it all dirty,
  // and a lazy persist of the cleared bits may not have run yet), so that only the mark can make
  // the last restart resync the blocks written after the disk filled.
  await p.killProxy("SIGTERM");
  await p.restartProxy();
  assert.equal((await p.status()).tracking!.dirtyBytes, 0);

  // Fill the state directory's file system to the last block.
  await run("dd", ["if=/dev/zero", `of=${join(mnt, "filler")}`, "bs=64k"], { allowFailure: true });
  assert.equal(statfsSync(mnt).bavail, 0, "the filler should leave no free block");

  // An outage while the disk is full: the writes need dirty marks that cannot be stored.
  await p.killGateway();
  await overwrite(p, "first outage");
  const s1 = await p.waitStatus("the tracking log reported as failed", (s) => !!s.tracking?.degraded);
  assert.match(s1.tracking!.degraded!.reason, /No space left on device|ENOSPC/);
  const text = await cli(["status", "--state-dir", stateDir]);
  assert.match(text.stdout, /^tracking {2}FAILED at .*the next start resyncs the whole volume$/m);
  const failures = p.proxyLog().match(/error \[tracking\] tracking log failed: .*/g) ?? [];
  assert.equal(failures.length, 1, `one error line, not one per write:\n${failures.join("\n")}`);
  assert.match(failures[0], /full-resync mark is set, so the next start resyncs the whole volume/);
  assert.doesNotMatch(p.proxyLog(), /failed: tracking log|NBD error EIO/);
  assert.notEqual(readFullResyncMark(stateDir), null, "the mark is on disk");

  // Replication from memory: the gateway returns, the link resyncs what the outage dirtied.
  await p.restartGateway();
  await p.waitSynced();
  await assertSame(p, "after the resync from memory");

  // A second outage, then a crash of the proxy with the disk still full.
  await p.killGateway();
  await overwrite(p, "second outage");
  const dirty = (await p.status()).tracking!.dirtyBytes;
  assert.equal(dirty, 64 * MiB, "the second outage dirtied the whole volume");
  await p.killProxy("SIGKILL");
  rmSync(join(mnt, "filler"));

  await p.restartGateway();
  await p.restartProxy();
  await p.waitSynced();
  await assertSame(p, "after the restart's full resync");
  assert.match(
    p.proxyLog(),
    /tracking: the log could not be written in an earlier run .*everything \(67108864 bytes\)/,
  );
  const s2 = await p.status();
  assert.notEqual(s2.tracking!.recovery.fullResync, null);
  assert.equal(s2.tracking!.degraded, null);
  assert.equal(
    readFullResyncMark(stateDir),
    null,
    "the mark is cleared once the log holds everything as dirty",
  );

  // Starting on a full disk: exit 1, naming the directory and what to do (it said only ENOSPC).
  await p.killProxy("SIGTERM");
  await run("dd", ["if=/dev/zero", `of=${join(mnt, "filler")}`, "bs=4k"], { allowFailure: true });
  const args = ["--volume", p.primary, "--socket", join(dir, "late.sock"), "--listen", "none"];
  const r = await cli(["serve", ...args, "--gateway", p.url, "--state-dir", stateDir], 30_000);
  assert.equal(r.code, 1, r.stderr);
  assert.match(
    r.stderr,
    /the state directory .*statefs\/state is on a full disk \(.*(No space left on device|ENOSPC).*\): free space there, or give another --state-dir/,
  );
});
