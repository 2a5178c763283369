// Black-box tests against steps of the wall clock: the server runs under libfaketime
// (test/helpers/faketime.ts: only the wall clock is faked, the monotonic clock stays real), whose
// offset the test changes as `date -s` or an NTP step would change the host's clock.
// The PIT journal (`serve --pit`):
// - Forward an hour: writes after the step are stamped with the new wall time, so snap@T for a time
//   in the skipped hour shows the volume before them and snap@T after the step shows them (a clock
//   read from the monotonic clock alone lags an hour: both are refused as in the future).
// - Back an hour: timestamps hold where the wall clock had got to until it gets there again, so
//   the writes made meanwhile change no earlier point in time: the point before the steps keeps
//   its sha256.
//   The wall times of the coming hour (B's among them) pass twice, so snap@ them is refused with
//   NBD_REP_ERR_UNKNOWN naming the range (`blockfork snapshots` lists it); the bookmark taken at
//   B still shows B.
// - Restarted with the clock still an hour behind the journal's newest entry: the same hold (the
//   clock is seeded with that entry), a warning, the range kept (state file) and one more.
// Each step is logged.
// The fork (`serve --gateway --replication sync`): the clock set back an hour while a sync write
// waits for a gateway that does not answer; the write still completes after about --sync-timeout
// (timeouts run on the monotonic clock; on the wall clock it would wait out the hour).

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { rmSync } from "node:fs";
import { join } from "node:path";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import {
  exportSha,
  goReply,
  mark,
  MiB,
  pastBoundary,
  py,
  REP_ERR_UNKNOWN,
  sleep,
  snapshots,
  snapUri,
  waitForLog,
} from "../helpers/pit.js";
import { fakeClock, type FakeClock } from "../helpers/faketime.js";
import { startPair, type Pair } from "../helpers/replication.js";
import { nbdsh } from "../helpers/run.js";

const HOUR = 3_600_000;

void describe("journal timestamps follow steps of the wall clock", () => {
  let dir: string;
  let srv: ServerHandle;
  let clock: FakeClock;

  const stateDir = (): string => join(dir, "state");
  const start = (): Promise<ServerHandle> =>
    startServer({ dir, size: "4M", args: ["--pit", "--state-dir", stateDir()], env: clock.env });

  async function fill(letter: string, at: number): Promise<void> {
    await py(srv.uri, `h = connect()\nh.pwrite(b"${letter}" * MiB, ${at})\nh.flush()\nh.shutdown()\n`);
  }

  /** After the writes: past a window boundary (whole-second offsets keep boundaries aligned), T and sha. */
  async function point(): Promise<{ t: number; sha: string }> {
    await pastBoundary(1000);
    const t = clock.now();
    return { t, sha: await exportSha(srv.uri) };
  }

  /** snap@t is refused as a time that passed twice, naming the range. */
  async function assertTwice(t: number, what: string): Promise<void> {
    const r = await goReply(srv.sock, `snap@${new Date(t).toISOString()}`);
    assert.equal(r.type, REP_ERR_UNKNOWN, `${what}: ${r.message}`);
    assert.match(r.message, /the wall clock went back, so the times from \S+ to \S+ passed twice/, what);
  }

  async function assertPoints(points: [string, { t: number; sha: string }][], when: string): Promise<void> {
    for (const [name, p] of points) {
      assert.equal(await exportSha(snapUri(srv, new Date(p.t).toISOString())), p.sha, `snap@${name} ${when}`);
    }
  }

  before(async () => {
    dir = scratchDir("blockfork-clock-pit-");
    clock = fakeClock(dir);
    srv = await start();
  });

  after(async () => {
    await srv?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  void test("forward an hour, back, restarted behind: points exact, times passed twice refused, steps logged", async () => {
    await pastBoundary(1000);
    await sleep(1000); // the journal's first point exists
    await fill("A", 0);
    const a = await point();

    await clock.set(HOUR);
    await fill("B", MiB);
    const b = await point();
    await mark(stateDir(), "b");
    // A time in the skipped hour: after A, before B.
    await assertPoints(
      [
        ["(the skipped hour)", { t: a.t + HOUR / 2, sha: a.sha }],
        ["B", b],
      ],
      "after the step forward",
    );
    await waitForLog(srv, /journal: the wall clock jumped forward 3600\.\d s/);
    assert.deepEqual((await snapshots(stateDir())).passedTwice, [], "a step forward repeats no time");

    // Back an hour: the wall times from now to an hour on (B's among them) will pass again.
    await clock.set(0);
    await fill("C", 2 * MiB); // stamped at the held time, after every earlier point
    await waitForLog(srv, /journal: the wall clock went back 3600\.\d s .*timestamps hold at/);
    await fill("D", 3 * MiB);
    await assertPoints([["A", a]], "after the step back");
    await assertTwice(b.t, "B's time after the step back");
    assert.equal(await exportSha(snapUri(srv, "b")), b.sha, "snap@b (the bookmark) after the step back");
    const twice = (await snapshots(stateDir())).passedTwice;
    assert.equal(twice.length, 1, JSON.stringify(twice));
    assert.ok(Date.parse(twice[0].from) <= b.t && b.t <= Date.parse(twice[0].to), JSON.stringify(twice));
    assert.notEqual(await exportSha(srv.uri), b.sha, "C and D reached the primary");

    // Restarted still about an hour behind the journal's newest entry (held since the step back):
    // that range is kept, another is added; A's time is before both.
    await srv.stop();
    srv = await start();
    await waitForLog(srv, /journal: its newest entry .* is later than the wall clock/);
    await fill("E", 0);
    await assertPoints([["A", a]], "after the restart");
    await assertTwice(b.t, "B's time after the restart");
    assert.equal(await exportSha(snapUri(srv, "b")), b.sha, "snap@b (the bookmark) after the restart");
    assert.equal((await snapshots(stateDir())).passedTwice.length, 2);
  });
});

void describe("replication timeouts across a step of the wall clock", () => {
  const SYNC_TIMEOUT = 3000;
  let clockDir: string;
  let clock: FakeClock;
  let pair: Pair;

  before(async () => {
    clockDir = scratchDir("blockfork-clock-sync-");
    clock = fakeClock(clockDir);
    pair = await startPair({
      size: "16M",
      proxyArgs: ["--replication", "sync", "--sync-timeout", String(SYNC_TIMEOUT)],
      proxyEnv: clock.env,
    });
  });

  after(async () => {
    await pair?.stop();
    rmSync(clockDir, { recursive: true, force: true });
  });

  void test("a sync write waiting on a stuck gateway when the clock goes back: done after --sync-timeout", async () => {
    await pair.setFault({ mode: "slow", delayMs: 30_000 });
    const code = [
      "import nbd, os, time",
      "h = nbd.NBD()",
      'h.connect_uri(os.environ["URI"])',
      "t = time.monotonic()",
      `h.pwrite(bytes.fromhex("${randomBytes(4096).toString("hex")}"), 1048576)`,
      'print("took", time.monotonic() - t)',
      "h.shutdown()",
    ].join("\n");
    try {
      const write = nbdsh(pair.proxy!.uri, code, { timeoutMs: 60_000 });
      await sleep(200); // the write waits for the gateway
      clock.setNoWait(-HOUR); // the proxy sees it within two seconds, before the 3 s timeout
      const r = await write;
      const took = Number(/took ([\d.]+)/.exec(r.stdout)?.[1]);
      assert.ok(
        took < SYNC_TIMEOUT / 1000 + 3,
        `the write took ${took} s with --sync-timeout ${SYNC_TIMEOUT} (the gateway holds it 30 s)`,
      );
      const st = await pair.status();
      assert.match(st.link!.reason, /sync-timeout 3000/);
    } finally {
      await pair.setFault({ mode: "none" });
    }
    await pair.waitSynced();
  });
});
