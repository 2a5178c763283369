// Black-box replication administration and configuration, through the `blockfork` CLI:
// - `verify` reports 0 mismatches when in sync; a block of the secondary file corrupted behind the
//   gateway's back makes it exit 3 naming that extent; `verify --repair` marks it dirty, the link
//   resyncs it, and the files are equal again. `resync --full` completes and leaves them equal.
//   `status` (and the other admin commands) without a running proxy exit 1 with a clear message.
// - Bad configuration exits 2 with a message: --replication bogus, --gateway notaurl, a missing
//   --gateway-token-file, a tracking log of another volume size in --state-dir, a state directory in
//   use by another proxy. A wrong token is not fatal: the proxy serves NBD, and status shows the link
//   tracking with a 401 hint.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { closeSync, openSync, rmSync, writeSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { nbdsh } from "../helpers/run.js";
import { scratchDir, startServer } from "../helpers/server.js";
import {
  cli,
  fioClean,
  fioStart,
  sha256File,
  startPair,
  writeThroughNbd,
  type FioRun,
  type Pair,
} from "../helpers/replication.js";

const KiB = 1024;
const MiB = 1024 * KiB;
const G = 64 * KiB;

interface VerifyResult {
  checkedBytes: number;
  blocks: number;
  mismatchedBlocks: number;
  skippedBlocks: number;
  mismatches: { offset: number; length: number }[];
  repaired: boolean;
}

/** Write `data` at `offset` into a file directly (behind the gateway's back). */
function poke(path: string, offset: number, data: Buffer): void {
  const fd = openSync(path, "r+");
  try {
    writeSync(fd, data, 0, data.length, offset);
  } finally {
    closeSync(fd);
  }
}

async function assertIdentical(pair: Pair, what: string): Promise<void> {
  const [a, b] = await Promise.all([sha256File(pair.primary), sha256File(pair.secondary)]);
  assert.equal(b, a, `${what}: the secondary file differs from the primary`);
}

void describe("replication admin: verify and resync", () => {
  let pair: Pair;
  before(async () => {
    pair = await startPair({ size: "64M" });
    await writeThroughNbd(pair, 8 * MiB, randomBytes(4 * MiB));
    await pair.waitSynced();
  });
  after(async () => {
    await pair.stop();
  });

  void test("in sync: verify finds 0 mismatches over every block (exit 0)", async () => {
    const r = await cli(["verify", "--state-dir", pair.stateDir, "--json"]);
    assert.equal(r.code, 0, r.stderr);
    const v = JSON.parse(r.stdout) as VerifyResult;
    assert.equal(v.mismatchedBlocks, 0);
    assert.equal(v.blocks, (64 * MiB) / G);
    assert.equal(v.checkedBytes, 64 * MiB);
    assert.deepEqual(v.mismatches, []);
    const t = await cli(["verify", "--state-dir", pair.stateDir]);
    assert.equal(t.code, 0, t.stderr);
    assert.match(t.stdout, /1024 blocks, 0 differ/);
  });

  void test("a block corrupted behind the gateway: verify exits 3 naming it; --repair resyncs it", async () => {
    // 4 KiB of garbage inside block 144 (at 9 MiB, within the data written above) and 1 byte in a
    // hole (block 700): the gateway reads its file through the page cache, so it sees both.
    poke(pair.secondary, 9 * MiB + 8192, randomBytes(4096));
    poke(pair.secondary, 700 * G + 123, Buffer.from([0x5a]));
    const r = await cli(["verify", "--state-dir", pair.stateDir, "--json"]);
    assert.equal(r.code, 3, `verify must exit 3 on mismatches: ${r.stdout}${r.stderr}`);
    const v = JSON.parse(r.stdout) as VerifyResult;
    assert.equal(v.mismatchedBlocks, 2);
    assert.deepEqual(v.mismatches, [
      { offset: 9 * MiB, length: G },
      { offset: 700 * G, length: G },
    ]);
    assert.equal(v.repaired, false);
    const text = await cli(["verify", "--state-dir", pair.stateDir]);
    assert.equal(text.code, 3);
    assert.match(text.stdout, /2 differ/);
    assert.match(text.stdout, new RegExp(`differs: offset ${9 * MiB}, length ${G}`));
    // Nothing was repaired by looking.
    assert.equal((await pair.status()).tracking!.dirtyBytes, 0);

    const fix = await cli(["verify", "--state-dir", pair.stateDir, "--repair", "--json"]);
    assert.equal(fix.code, 0, fix.stdout + fix.stderr);
    const f = JSON.parse(fix.stdout) as VerifyResult;
    assert.equal(f.repaired, true);
    assert.equal(f.mismatchedBlocks, 2);
    await pair.waitSynced();
    await assertIdentical(pair, "after verify --repair");
    const again = await cli(["verify", "--state-dir", pair.stateDir, "--json"]);
    assert.equal(again.code, 0);
    assert.equal((JSON.parse(again.stdout) as VerifyResult).mismatchedBlocks, 0);
  });

  void test("resync --full copies every block and leaves the files equal", async () => {
    poke(pair.secondary, 0, randomBytes(512));
    poke(pair.secondary, 63 * MiB + 5, randomBytes(100));
    const r = await cli(["resync", "--state-dir", pair.stateDir, "--full"], 120_000);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /resync started: 64\.0 MiB dirty/);
    assert.match(r.stdout, /resync complete: .* copied; streaming/);
    const st = await pair.waitSynced();
    assert.equal(st.link!.resync.totalBytes, 64 * MiB);
    assert.ok(st.link!.resync.doneBytes >= 64 * MiB, `resync copied ${st.link!.resync.doneBytes} bytes`);
    await assertIdentical(pair, "after resync --full");
  });

  void test("tracking show lists the dirty extents with their times while the gateway is down", async () => {
    await pair.killGateway("SIGKILL");
    try {
      const t0 = Date.now();
      await writeThroughNbd(pair, 20 * MiB + 100 * KiB, randomBytes(200 * KiB));
      const show = await pair.trackingShow();
      assert.equal(show.granularity, G);
      assert.deepEqual(
        show.extents.map((e) => [e.offset, e.length]),
        [[20 * MiB + G, 4 * G]], // 100 KiB..300 KiB into 20 MiB: blocks 1 to 4
      );
      assert.equal(show.dirtyBytes, 4 * G);
      const e = show.extents[0];
      assert.ok(Date.parse(e.firstDirtied) >= t0 && Date.parse(e.lastDirtied) <= Date.now());
      const text = await cli(["tracking", "show", "--state-dir", pair.stateDir]);
      assert.equal(text.code, 0);
      assert.match(text.stdout, new RegExp(`${20 * MiB + G}\\s+${4 * G}\\s+${e.firstDirtied}`));
      assert.match(text.stdout, /1 extents, 262144 bytes dirty/);
      // A resync cannot run without the gateway: the command says so and exits 1.
      const rs = await cli(["resync", "--state-dir", pair.stateDir], 30_000);
      assert.equal(rs.code, 1, rs.stdout + rs.stderr);
      assert.match(rs.stdout, /the gateway is not reachable .*keeps tracking .*resyncs when it returns/);
      // Neither can verify: it says why (it used to take the whole proxy down with an unhandled
      // rejection of its gateway request), and the proxy serves on.
      const v = await cli(["verify", "--state-dir", pair.stateDir], 30_000);
      assert.equal(v.code, 1, v.stdout + v.stderr);
      assert.match(v.stderr, /the gateway link is tracking .*verify needs the gateway/);
      assert.equal((await pair.status()).link?.state, "tracking");
      // Long enough for the link's health checks to back off to 5 s apart.
      await new Promise((r) => setTimeout(r, 6000));
    } finally {
      await pair.restartGateway();
    }
    // Asked right after the gateway returned, a resync checks the gateway at once instead of
    // reporting the last (failed) check and leaving it to the backoff.
    const rs = await cli(["resync", "--state-dir", pair.stateDir], 30_000);
    assert.equal(rs.code, 0, rs.stdout + rs.stderr);
    assert.match(rs.stdout, /resync complete: .*; streaming/);
    await pair.waitSynced();
    await assertIdentical(pair, "after the outage of the tracking show test");
  });

  void test("stray arguments and a bad bookmark name are usage errors (exit 2)", async () => {
    for (const args of [
      ["resync", "--state-dir", pair.stateDir, "full"],
      ["verify", "--state-dir", pair.stateDir, "repair"],
      ["status", "--state-dir", pair.stateDir, "extra"],
    ]) {
      const r = await cli(args);
      assert.equal(r.code, 2, `${args.join(" ")}: ${r.stdout}${r.stderr}`);
      assert.match(r.stderr, /unexpected argument "(full|repair|extra)"/);
    }
    // Without --pit the proxy cannot mark: the proxy's usage error is the caller's (exit 2, not 1).
    const m = await cli(["mark", "x", "--state-dir", pair.stateDir]);
    assert.equal(m.code, 2, m.stdout + m.stderr);
    assert.match(m.stderr, /no --pit journal/);
  });

  void test("status, tracking, verify and resync without a running proxy: exit 1, saying so", async () => {
    const dir = scratchDir("blockfork-noproxy-");
    try {
      // A state directory whose proxy was SIGKILLed: its admin socket is left behind, nobody answers.
      const stale = join(dir, "stale");
      const srv = await startServer({
        dir,
        keepDir: true,
        volume: join(dir, "v.img"),
        size: "16M",
        args: ["--gateway", "http://127.0.0.1:9", "--state-dir", stale],
      });
      await srv.stop("SIGKILL");
      for (const args of [
        ["status", "--state-dir", join(dir, "never")],
        ["status", "--state-dir", stale],
        ["status", "--state-dir", stale, "--json"],
        ["tracking", "show", "--state-dir", stale],
        ["verify", "--state-dir", stale],
        ["resync", "--state-dir", stale],
      ]) {
        const r = await cli(args);
        assert.match(r.stderr, /no proxy is running with --state-dir/, args.join(" "));
        assert.match(
          r.stderr,
          /without --gateway, --pit or --state-dir has no state directory/,
          args.join(" "),
        );
        assert.equal(r.stdout, "", args.join(" "));
        assert.equal(
          r.code,
          1,
          `blockfork ${args.join(" ")} exited ${r.code} (its help says 1 when no proxy answers)`,
        );
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

void describe("replication admin: streaming under load", () => {
  let pair: Pair;
  before(async () => {
    pair = await startPair({ size: "64M" });
  });
  after(async () => {
    await pair.stop();
  });

  // A load the secondary can absorb: unthrottled, fio offers more than this machine's disk takes
  // for primary and secondary together, and the async queue overflows to tracking, as it must
  // (that path has its own tests); here the link must stream the whole time.
  const load = (): FioRun =>
    fioStart(pair.proxy!.uri, pair.dir, [
      "--name=load",
      "--rw=randwrite",
      "--bsrange=4k-64k",
      "--rate=64m",
      "--iodepth=32",
      "--time_based",
      "--runtime=6",
    ]);

  void test("fio while the link streams (no outage): afterwards 0 dirty bytes and identical files", async () => {
    const fio = load();
    try {
      assert.equal(fioClean(await fio.done), null);
    } finally {
      await fio.kill();
    }
    const st = await pair.waitSynced(20_000).catch(async (e: Error) => {
      const show = await pair.trackingShow();
      throw new Error(
        `${e.message.split("\n")[0]}: still dirty: ${JSON.stringify(show.extents)} ` +
          `(the link streamed the whole time; its log: ${pair.proxyLog().slice(-800)})`,
      );
    });
    assert.equal(st.link!.outages, 0);
    await assertIdentical(pair, "after the load");
  });

  void test("verify while fio writes: blocks in flight are skipped, never reported as mismatches", async () => {
    const fio = load();
    try {
      let skipped = 0;
      let runs = 0;
      while (fio.proc.exitCode === null && runs < 4) {
        const r = await cli(["verify", "--state-dir", pair.stateDir, "--json"]);
        const v = JSON.parse(r.stdout) as VerifyResult;
        assert.equal(r.code, 0, `verify run ${runs} under load: ${JSON.stringify(v.mismatches.slice(0, 5))}`);
        assert.equal(v.mismatchedBlocks, 0);
        skipped += v.skippedBlocks;
        runs++;
      }
      assert.ok(runs >= 2, `only ${runs} verify runs during the load`);
      assert.ok(skipped > 0, "verify never met a block in flight: the load did not overlap it");
      assert.equal(fioClean(await fio.done), null);
    } finally {
      await fio.kill();
    }
  });
});

void describe("replication configuration", () => {
  let dir: string;
  before(() => {
    dir = scratchDir("blockfork-replconf-");
  });
  after(() => {
    rmSync(dir, { recursive: true, force: true });
  });

  const serveArgs = (extra: string[], volume = "p.img", size = "64M"): string[] => [
    "serve",
    "--volume",
    join(dir, volume),
    "--size",
    size,
    "--listen",
    "none",
    "--socket",
    join(dir, "nbd.sock"),
    ...extra,
  ];

  void test("bad options exit 2 with a message", async () => {
    // As the gateway's --token-file: an empty token (or two words) can never match the gateway's.
    const emptyToken = join(dir, "empty-token");
    writeFileSync(emptyToken, "\n");
    const twoWordToken = join(dir, "two-words");
    writeFileSync(twoWordToken, "a b\n");
    const cases: [string[], RegExp][] = [
      [
        ["--gateway", "http://127.0.0.1:9", "--replication", "bogus"],
        /--replication must be async or sync, not "bogus"/,
      ],
      [["--gateway", "notaurl"], /--gateway "notaurl" is not a URL/],
      [["--gateway", "ftp://127.0.0.1:9"], /--gateway must be http:\/\/ or https:\/\//],
      [
        ["--gateway", "http://127.0.0.1:9", "--gateway-token-file", join(dir, "missing-token")],
        /cannot read the gateway token file .*missing-token/,
      ],
      [
        ["--gateway", "http://127.0.0.1:9", "--gateway-token-file", emptyToken],
        /--gateway-token-file .*empty-token is empty; put the token in it/,
      ],
      [
        ["--gateway", "http://127.0.0.1:9", "--gateway-token-file", twoWordToken],
        /the token in --gateway-token-file .*two-words contains white space/,
      ],
      [["--replication", "sync"], /--replication needs --gateway URL/],
      [["--no-update-stream"], /--no-update-stream needs --gateway URL/],
      [
        ["--gateway", "http://127.0.0.1:9", "--replication", "sync", "--sync-timeout", "0"],
        /--sync-timeout must be a positive integer/,
      ],
      [
        ["--gateway", "http://127.0.0.1:9", "--sync-timeout", "3000"],
        /--sync-timeout needs --replication sync \(an async write never waits for the gateway\)/,
      ],
      [
        ["--gateway", "http://127.0.0.1:9", "--track-granularity", "8M"],
        /--track-granularity must be at most 4M \(an activity-log region\)/,
      ],
      [["--queue-size", "1G"], /--queue-size needs --gateway URL/],
      [["--al-extents", "8"], /--al-extents needs --gateway URL/],
    ];
    for (const [extra, message] of cases) {
      const r = await cli(serveArgs([...extra, "--state-dir", join(dir, "st-bad")]), 20_000);
      assert.equal(r.code, 2, `serve ${extra.join(" ")} exited ${r.code}: ${r.stderr}`);
      assert.match(r.stderr, message, extra.join(" "));
    }
  });

  void test("a tracking log of another volume size, and a state directory in use: exit 2", async () => {
    const stateDir = join(dir, "st");
    // A proxy for a 64 MiB volume leaves its tracking log in stateDir (the gateway need not exist).
    const first = await startServer({
      dir,
      keepDir: true,
      volume: join(dir, "a.img"),
      size: "64M",
      args: ["--gateway", "http://127.0.0.1:9", "--state-dir", stateDir],
    });
    try {
      // While it runs, a second proxy on the same state directory is refused.
      const busy = await cli(
        serveArgs(["--gateway", "http://127.0.0.1:9", "--state-dir", stateDir], "b.img", "64M").map((a) =>
          a === join(dir, "nbd.sock") ? join(dir, "nbd2.sock") : a,
        ),
        20_000,
      );
      assert.equal(busy.code, 2, busy.stderr);
      assert.match(busy.stderr, /the state directory .* is in use by another blockfork process/);
    } finally {
      const r = await first.stop();
      assert.deepEqual(r, { code: 0, signal: null }, first.log());
    }
    const other = await cli(
      serveArgs(["--gateway", "http://127.0.0.1:9", "--state-dir", stateDir], "c.img", "128M"),
      20_000,
    );
    assert.equal(other.code, 2, other.stderr);
    assert.match(other.stderr, /belongs to a volume of 67108864 bytes, not 134217728/);
  });

  void test("batches go on the update stream, or as POSTs with --no-update-stream; both converge", async () => {
    // status says which transport the link uses, and how much of a resync left from the page
    // cache (only possible on the stream). The gateway logs each HTTP request at debug level ("POST /v1/volumes/NAME/updates -> 200") and
    // each accepted stream ("update stream from source ..."); the flushes, always POSTs, show that
    // request logging was on. The first resync (64 MiB) and a write after it must take one path only.
    for (const post of [false, true]) {
      const pair = await startPair({
        size: "64M",
        gatewayArgs: ["--log-level", "debug"],
        ...(post ? { proxyArgs: ["--no-update-stream"] } : {}),
      });
      try {
        await writeThroughNbd(pair, 5 * MiB, randomBytes(256 * KiB));
        // A whole resync range (4 MiB, aligned) of data the page cache holds (just written), then a
        // full resync: on the stream that range goes by sendfile, as POST bodies from buffers.
        await writeThroughNbd(pair, 8 * MiB, randomBytes(4 * MiB));
        await pair.waitSynced();
        const r = await cli(["resync", "--state-dir", pair.stateDir, "--full"], 120_000);
        assert.equal(r.code, 0, r.stderr);
        const st = await pair.waitSynced();
        await assertIdentical(pair, post ? "with --no-update-stream" : "on the update stream");
        assert.equal(st.link!.transport, post ? "post" : "stream");
        assert.equal(st.link!.resync.doneBytes, 64 * MiB);
        if (post) assert.equal(st.link!.resync.pageCacheBytes, 0);
        else
          assert.ok(
            st.link!.resync.pageCacheBytes >= 4 * MiB,
            `${st.link!.resync.pageCacheBytes} bytes from the page cache`,
          );
        const text = await cli(["status", "--state-dir", pair.stateDir]);
        assert.match(text.stdout, post ? /batches as POST requests/ : /batches on the update stream/);
        const log = pair.gw!.log();
        assert.match(log, /POST \/v1\/volumes\/[^/ ]+\/flush -> 200/, "request logging is on");
        const posts = (log.match(/POST \/v1\/volumes\/[^/ ]+\/updates -> 200/g) ?? []).length;
        const streams = (log.match(/update stream from source/g) ?? []).length;
        if (post) {
          assert.ok(posts > 0, "--no-update-stream sent no POST .../updates");
          assert.equal(streams, 0, "--no-update-stream opened an update stream");
        } else {
          assert.equal(posts, 0, "batches were POSTed although the gateway offers the stream");
          assert.ok(streams > 0, "no update stream was opened");
        }
      } finally {
        await pair.stop();
      }
    }
  });

  void test("--resync-rate bounds the resync bandwidth", async () => {
    // A new log resyncs all 64 MiB at 16 MiB/s: about 4 s instead of a fraction of one.
    const t0 = Date.now();
    const pair = await startPair({ size: "64M", proxyArgs: ["--resync-rate", "16M"] });
    try {
      const took = (Date.now() - t0) / 1000;
      const st = await pair.status();
      assert.equal(st.link!.resync.totalBytes, 64 * MiB);
      assert.ok(took >= 2.5, `the first resync of 64 MiB at --resync-rate 16M took ${took.toFixed(1)} s`);
      const rate = st.link!.resync.bytesPerSecond;
      assert.ok(rate <= 16 * MiB * 1.5, `status reports ${rate} bytes/s with --resync-rate 16M`);
      await assertIdentical(pair, "after a throttled resync");
    } finally {
      await pair.stop();
    }
  });

  void test("a wrong token: NBD keeps working, status shows tracking with a 401 hint", async () => {
    const pair = await startPair({
      size: "64M",
      token: true,
      proxyToken: "not-the-token",
      waitSynced: false,
    });
    try {
      const data = randomBytes(128 * KiB);
      const file = join(pair.dir, "w.bin");
      writeFileSync(file, data);
      const r = await nbdsh(
        pair.proxy!.uri,
        [
          "import nbd, os",
          "h = nbd.NBD()",
          'h.connect_uri(os.environ["URI"])',
          `d = open(${JSON.stringify(file)}, "rb").read()`,
          "h.pwrite(d, 3 * 1024 * 1024)",
          "h.flush()",
          'print("same" if h.pread(len(d), 3 * 1024 * 1024) == d else "differs")',
          "h.shutdown()",
        ].join("\n"),
      );
      assert.match(r.stdout, /same/);
      const st = await pair.waitStatus(
        "tracking with a 401",
        (s) => s.link!.state === "tracking" && /401/.test(s.link!.reason),
        20_000,
      );
      assert.match(st.link!.reason, /check --gateway-token-file/);
      assert.equal(st.tracking!.dirtyBytes, 64 * MiB, "nothing reached the secondary");
      // The link retries (health answers, so it tries to resync and gets 401 again): between two
      // status calls it may be "resyncing" for a moment. Sample the text until it shows tracking.
      let text = await cli(["status", "--state-dir", pair.stateDir]);
      for (let i = 0; i < 100 && !/link\s+tracking since /.test(text.stdout); i++) {
        await new Promise((r) => setTimeout(r, 100));
        text = await cli(["status", "--state-dir", pair.stateDir]);
      }
      assert.equal(text.code, 0);
      assert.match(text.stdout, /link\s+tracking since .*401/);
      // The gateway accepted nothing from this proxy.
      const gs = await pair.gw!.client.request("GET", "/status");
      assert.equal(gs.status, 200);
      assert.deepEqual(gs.json<{ sources: unknown[] }>().sources, []);
    } finally {
      await pair.stop();
    }
  });
});

void describe("replication admin: a proxy stopped during verify", () => {
  let pair: Pair;
  before(async () => {
    pair = await startPair({ size: "4G" });
  });
  after(async () => {
    await pair.stop();
  });

  void test("SIGTERM while verify runs: the proxy exits 0, verify exits 1 saying it stopped", async () => {
    const v = cli(["verify", "--state-dir", pair.stateDir], 60_000);
    await new Promise((r) => setTimeout(r, 700));
    const stopped = await pair.killProxy("SIGTERM");
    const r = await v;
    assert.deepEqual(stopped, { code: 0, signal: null }, pair.proxyLog());
    assert.doesNotMatch(pair.proxyLog(), /Uncaught|triggerUncaughtException|ClientClosedError/);
    assert.equal(r.code, 1, r.stdout + r.stderr);
    assert.match(r.stderr, /verify stopped: the proxy is shutting down|the proxy closed the connection/);
    // It shut down cleanly: the next start does not report a crash.
    await pair.restartProxy();
    await pair.waitSynced();
    assert.doesNotMatch(pair.proxyLog(), /did not shut down cleanly/);
  });
});
