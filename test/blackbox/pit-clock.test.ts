// Black-box test of the journal's clock against steps of the wall clock: `blockfork serve --pit`
// runs under libfaketime (LD_PRELOAD; only the wall clock is faked, the monotonic clock is real),
// whose offset the test changes through a timestamp file, as `date -s` or an NTP step would change
// the host's clock (the real clock of this shared machine is not touched).
// - Forward an hour: writes after the step are stamped with the new wall time, so snap@T for a time
//   in the skipped hour shows the volume before them and snap@T after the step shows them (a clock
//   read from the monotonic clock alone lags an hour: both are refused as in the future).
// - Back an hour: timestamps hold at the newest one until the wall clock reaches it, so the writes
//   made meanwhile change no earlier point in time: every recorded point keeps its sha256.
// - Restarted with the clock an hour behind the journal's newest entry: the same hold (the clock is
//   seeded with that entry), and a warning.
// Each step is logged.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { exportSha, MiB, pastBoundary, py, sleep, snapUri, waitForLog } from "../helpers/pit.js";

const LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
const HOUR = 3_600_000;
/** libfaketime rereads its timestamp file at most this often (s). */
const CACHE_S = 1;

void describe("journal timestamps follow steps of the wall clock", () => {
  let dir: string;
  let srv: ServerHandle;
  let offsetFile: string;
  /** The server's fake clock minus the real one (ms). */
  let offset = 0;

  async function setOffset(ms: number): Promise<void> {
    writeFileSync(offsetFile, `${ms >= 0 ? "+" : ""}${ms / 1000}\n`);
    offset = ms;
    await sleep(CACHE_S * 1000 + 500); // the server's libfaketime has reread the file
  }

  /** The server's wall clock now. */
  const fakeNow = (): number => Date.now() + offset;

  async function fill(letter: string, at: number): Promise<void> {
    await py(srv.uri, `h = connect()\nh.pwrite(b"${letter}" * MiB, ${at})\nh.flush()\nh.shutdown()\n`);
  }

  /** After the writes: past a window boundary (whole-second offsets keep boundaries aligned), T and sha. */
  async function point(): Promise<{ t: number; sha: string }> {
    await pastBoundary(1000);
    const t = fakeNow();
    return { t, sha: await exportSha(srv.uri) };
  }

  const start = (): Promise<ServerHandle> =>
    startServer({
      dir,
      size: "4M",
      args: ["--pit", "--state-dir", join(dir, "state")],
      env: {
        LD_PRELOAD: LIBFAKETIME,
        FAKETIME_TIMESTAMP_FILE: offsetFile,
        FAKETIME_CACHE_DURATION: String(CACHE_S),
        FAKETIME_DONT_FAKE_MONOTONIC: "1",
      },
    });

  before(async () => {
    assert.ok(
      existsSync(LIBFAKETIME),
      `${LIBFAKETIME} missing: apt-get install faketime (scripts/ensure-test-deps.sh)`,
    );
    dir = scratchDir("blockfork-pit-clock-");
    offsetFile = join(dir, "faketime.rc");
    writeFileSync(offsetFile, "+0\n");
    srv = await start();
  });

  after(async () => {
    await srv?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  void test("forward an hour, then back: every point stays exact, steps are logged", async () => {
    await pastBoundary(1000);
    await sleep(1000); // the journal's first point exists
    await fill("A", 0);
    const a = await point();

    await setOffset(HOUR);
    await fill("B", MiB);
    const b = await point();
    // A time in the skipped hour: after A, before B.
    assert.equal(
      await exportSha(snapUri(srv, new Date(a.t + HOUR / 2).toISOString())),
      a.sha,
      "snap@(skipped hour)",
    );
    assert.equal(await exportSha(snapUri(srv, new Date(b.t).toISOString())), b.sha, "snap@(after the step)");
    await waitForLog(srv, /journal: the wall clock jumped forward 3600\.\d s/);

    await setOffset(0);
    await fill("C", 2 * MiB); // stamped at the held time, after every earlier point
    await waitForLog(srv, /journal: the wall clock went back 3600\.\d s .*timestamps hold at/);
    await fill("D", 3 * MiB);
    for (const [name, p] of [
      ["A", a],
      ["B", b],
    ] as const) {
      assert.equal(
        await exportSha(snapUri(srv, new Date(p.t).toISOString())),
        p.sha,
        `snap@${name} after the step back`,
      );
    }
    assert.notEqual(await exportSha(srv.uri), b.sha, "C and D reached the primary");

    // A restart with the clock an hour behind the journal's newest entry: the same hold.
    await srv.stop();
    await setOffset(-HOUR);
    srv = await start();
    await waitForLog(srv, /journal: its newest entry .* is later than the wall clock/);
    await fill("E", 0);
    for (const [name, p] of [
      ["A", a],
      ["B", b],
    ] as const) {
      assert.equal(
        await exportSha(snapUri(srv, new Date(p.t).toISOString())),
        p.sha,
        `snap@${name} after the restart`,
      );
    }
  });
});
