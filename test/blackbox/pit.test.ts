// Black-box tests of point-in-time snapshots: `blockfork serve --pit` on a private unix socket,
// written through real clients in phases (nbdcopy; nbdsh with 512-byte and odd-offset writes,
// trims, zero writes with and without NO_HOLE, FUA; fio and nbdsh on several connections at once,
// fio trims). After each phase the test waits past a merge-window boundary, takes the time T and
// the sha256 of the primary (nbdcopy | sha256sum). Later, while a background fio keeps writing,
// every snap@T must have exactly that sha256 (also for other spellings of T and other times in the
// same window). Then: bookmarks (`blockfork mark`, snap@NAME, NBD_OPT_LIST through nbdinfo
// --list), EPERM for every write-type command on a snapshot, BLOCK_STATUS on snapshots, times
// outside the window refused with NBD_REP_ERR_UNKNOWN and a message naming the available range,
// and `blockfork snapshots` (text and JSON, also with no proxy running).

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { run } from "../helpers/run.js";
import {
  blockfork,
  exportSha,
  fio,
  fioJobs,
  fioLoad,
  goReply,
  mark,
  MiB,
  pastBoundary,
  py,
  recordPoint,
  REP_ERR_UNKNOWN,
  sleep,
  snapshots,
  snapUri,
  type Background,
  type PitPoint,
} from "../helpers/pit.js";

const W = 1000;

/** The same instant written with a UTC offset of `minutes` (e.g. 2026-01-01T02:00:00.000+02:00). */
function withOffset(ms: number, minutes: number): string {
  const local = new Date(ms + minutes * 60_000).toISOString().slice(0, -1);
  const sign = minutes >= 0 ? "+" : "-";
  const a = Math.abs(minutes);
  return `${local}${sign}${String(Math.floor(a / 60)).padStart(2, "0")}:${String(a % 60).padStart(2, "0")}`;
}

const RANGE_RE =
  /outside the journal's window; available: (\d{4}-\d\d-\d\dT[\d:.]+Z) to (\d{4}-\d\d-\d\dT[\d:.]+Z) \(in steps of 1000 ms\)/;

void describe("PIT snapshots against reference images", () => {
  let dir: string;
  let stateDir: string;
  let srv: ServerHandle;
  const points: PitPoint[] = [];
  let load: Background | null = null;
  let bookmarkTime = "";

  before(async () => {
    dir = scratchDir("blockfork-pit-");
    stateDir = join(dir, "state");
    srv = await startServer({ dir, size: "64M", args: ["--pit", "--state-dir", stateDir] });
    // The first exact point is the first window boundary after the journal began.
    await pastBoundary(W);
  });

  after(async () => {
    try {
      await load?.stop("SIGKILL");
      const r = await srv.stop();
      assert.deepEqual(r, { code: 0, signal: null }, `the server did not exit cleanly:\n${srv.log()}`);
      assert.match(srv.log(), /journal closed/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  void test(
    "phases of writes through real clients, a reference point after each",
    { timeout: 120_000 },
    async () => {
      points.push(await recordPoint(srv, "empty", W));
      assert.equal(
        points[0].sha,
        (await run("bash", ["-c", "head -c 67108864 /dev/zero | sha256sum"])).stdout.slice(0, 64),
        "a new volume is not all zeroes",
      );

      // 1. nbdcopy: 16 MiB of random data at the start.
      const file = join(dir, "random.bin");
      writeFileSync(file, randomBytes(16 * MiB));
      await run("nbdcopy", [file, srv.uri]);
      points.push(await recordPoint(srv, "nbdcopy", W));

      // 2. nbdsh: unaligned and 512-byte writes, trims, zero writes with and without NO_HOLE, FUA.
      await py(
        srv.uri,
        `
      h = connect()
      rnd = random.Random(2)
      for i in range(300):
          off = rnd.randrange(0, 24 * MiB)
          n = rnd.choice([1, 7, 511, 512, 513, 4095, 4097, 12345, 65537])
          h.pwrite(os.urandom(n), off)
      for i in range(100):
          h.pwrite(os.urandom(512), rnd.randrange(0, 24 * MiB // 512) * 512)
      h.trim(2 * MiB, 1 * MiB)
      h.trim(70001, 5000)
      h.zero(3 * MiB + 7, 5 * MiB)
      h.zero(4 * MiB, 9 * MiB + 4095, nbd.CMD_FLAG_NO_HOLE)
      h.zero(MiB, 40 * MiB, nbd.CMD_FLAG_NO_HOLE)
      h.pwrite(os.urandom(4096), 30 * MiB, nbd.CMD_FLAG_FUA)
      h.pwrite(os.urandom(1000), h.get_size() - 1000)
      h.flush()
      h.shutdown()
      `,
      );
      points.push(await recordPoint(srv, "nbdsh", W));
      bookmarkTime = await mark(stateDir, "phase2");

      // 3. Several connections at once: fio with three writers and a trimmer, two nbdsh writers.
      const writer = (seed: number): Promise<unknown> =>
        py(
          srv.uri,
          `
        h = connect()
        rnd = random.Random(${seed})
        for i in range(400):
            h.pwrite(os.urandom(rnd.choice([512, 1000, 4096, 8192])), rnd.randrange(0, 48 * MiB - 8192))
        h.shutdown()
        `,
        );
      const [jobs] = await Promise.all([
        fio(srv.uri, dir, [
          "--name=multi",
          "--rw=randwrite",
          "--bsrange=4k-64k",
          "--iodepth=8",
          "--numjobs=3",
          "--size=48M",
          "--io_size=6M",
          "--norandommap",
          "--randrepeat=0",
          "--name=trims",
          "--rw=randtrim",
          "--bs=64k",
          "--size=48M",
          "--io_size=2M",
          "--randrepeat=0",
        ]),
        writer(31),
        writer(32),
      ]);
      assert.equal(jobs.length, 4);
      assert.ok(
        jobs.filter((j) => j.jobname === "multi").every((j) => j.write.io_bytes >= 6 * MiB),
        JSON.stringify(jobs.map((j) => [j.jobname, j.write.io_bytes])),
      );
      assert.equal(jobs.find((j) => j.jobname === "trims")?.trim.io_bytes, 2 * MiB);
      points.push(await recordPoint(srv, "concurrent", W));

      // 4. Zero most of the data again (NO_HOLE) and punch the rest; new data at the end.
      await py(
        srv.uri,
        `
      h = connect()
      h.zero(8 * MiB, 0, nbd.CMD_FLAG_NO_HOLE)
      h.trim(16 * MiB, 8 * MiB)
      h.pwrite(os.urandom(3 * MiB + 5), 60 * MiB)
      h.shutdown()
      `,
      );
      points.push(await recordPoint(srv, "zeroed", W));

      const shas = new Set(points.map((p) => p.sha));
      assert.equal(shas.size, points.length, "two phases left the same image: a phase wrote nothing");
    },
  );

  void test(
    "every snap@T has its reference sha256 while a background fio keeps writing",
    { timeout: 120_000 },
    async () => {
      assert.equal(points.length, 5, "the phases test did not record its points");
      load = fioLoad(srv.uri, dir, [
        "--name=bg",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=4",
        "--numjobs=2",
        "--size=64M",
        "--time_based",
        "--runtime=120",
        "--rate=4m",
        "--randrepeat=0",
      ]);
      let latest = "";
      try {
        await new Promise((r) => setTimeout(r, 1500));
        latest = await exportSha(srv.uri);
        assert.ok(!points.some((p) => p.sha === latest), "the background fio has not changed the primary");
        for (let round = 0; round < 2; round++) {
          const got: string[] = [];
          for (const p of points)
            got.push(`${p.label} snap@${p.iso} ${await exportSha(snapUri(srv, p.iso))}`);
          assert.deepEqual(
            got,
            points.map((p) => `${p.label} snap@${p.iso} ${p.sha}`),
            `round ${round}: snapshots differ from their reference images`,
          );
        }
        // Other times of the same window, and other spellings of the same instant.
        for (const p of points.slice(1, 3)) {
          const start = Math.floor(p.ms / W) * W;
          for (const t of [
            new Date(start).toISOString(),
            new Date(start + W - 1).toISOString(),
            withOffset(p.ms, 120),
            withOffset(p.ms, -330),
          ]) {
            assert.equal(await exportSha(snapUri(srv, t)), p.sha, `snap@${t} (the window of ${p.label})`);
          }
        }
      } catch (e) {
        await load.stop("SIGKILL");
        load = null;
        throw e;
      }
      const r = await load.stop("SIGINT");
      load = null;
      const jobs = fioJobs(r);
      for (const j of jobs) {
        assert.equal(j.error, 0, `background fio job ${j.jobname}: error ${j.error}\n${r.stderr}`);
        assert.ok(j.write.io_bytes > 0, "the background fio wrote nothing");
      }
      // The load went on during the checks: the primary is not any earlier image.
      assert.ok(!points.some((p) => p.sha === latest));
    },
  );

  void test("a bookmark: blockfork mark, snap@NAME, NBD_OPT_LIST", async () => {
    assert.match(bookmarkTime, /^bookmark "phase2" at (\S+Z): export snap@phase2\n$/);
    const at = Date.parse(/ at (\S+Z):/.exec(bookmarkTime)![1]);
    assert.ok(at >= points[2].ms && at - points[2].ms < 5000, `bookmark time ${at} vs point ${points[2].ms}`);
    assert.equal(await exportSha(snapUri(srv, "phase2")), points[2].sha, "snap@phase2");

    const list = await run("nbdinfo", ["--list", srv.uri]);
    const names = [...list.stdout.matchAll(/^export="([^"]*)":/gm)].map((m) => m[1]);
    assert.deepEqual(names.sort(), ["disk", "snap@phase2"], list.stdout);
    const snap = list.stdout.slice(list.stdout.indexOf('export="snap@phase2"'));
    assert.match(snap, /description: bookmark: the primary at \S+Z/);
    assert.match(snap, /export-size: 67108864/);
    assert.match(snap, /is_read_only: true/);
    assert.match(snap, /can_trim: false/);
    assert.match(snap, /can_zero: false/);
    assert.match(snap, /can_cache: true/);
    const prim = list.stdout.slice(
      list.stdout.indexOf('export="disk"'),
      list.stdout.indexOf('export="snap@'),
    );
    assert.match(prim, /is_read_only: false/);

    const bad = await blockfork(["mark", "bad name", "--state-dir", stateDir]);
    assert.notEqual(bad.code, 0, "a bad bookmark name was accepted");
    assert.match(bad.stderr, /must be 1-64 letters/);
    const names2 = (await snapshots(stateDir)).bookmarks.map((b) => b.name);
    assert.deepEqual(names2, ["phase2"]);
  });

  void test("every write-type command on a snapshot gets EPERM; reads still match", async () => {
    for (const name of [`snap@${points[1].iso}`, "snap@phase2"]) {
      await py(
        srv.uriFor(name),
        `
        h = connect(strict=False)
        assert h.is_read_only() == 1
        assert h.can_trim() == 0 and h.can_zero() == 0
        server_error(h, errno.EPERM, h.pwrite, b"x" * 4096, 0)
        server_error(h, errno.EPERM, h.pwrite, b"y" * 1, 12345)
        server_error(h, errno.EPERM, h.trim, 4096, 0)
        server_error(h, errno.EPERM, h.zero, 4096, 0)
        server_error(h, errno.EPERM, h.zero, 65536, 8192, nbd.CMD_FLAG_NO_HOLE)
        # The connection goes on: reads, CACHE and flush work.
        h.pread(4096, 0)
        assert h.can_cache() == 1
        h.cache(1048576, 0)
        h.flush()
        h.shutdown()
        `,
      );
    }
    assert.equal(await exportSha(snapUri(srv, points[1].iso)), points[1].sha);
    assert.equal(await exportSha(snapUri(srv, "phase2")), points[2].sha);
  });

  void test("BLOCK_STATUS on snapshots: covers the export, ZERO only where the snapshot reads zeroes", async () => {
    // The empty volume's snapshot: everything reads as zeroes, so every extent must say so.
    await py(
      snapUri(srv, points[0].iso),
      `
      h = connect()
      m = full_map(h)
      assert sum(ln for _, ln, _ in m) == h.get_size(), m[:5]
      bad = [e for e in m if not e[2] & nbd.STATE_ZERO]
      assert not bad, "extents of the empty volume's snapshot not flagged ZERO: %r" % bad[:5]
      h.shutdown()
      `,
    );
    for (const p of points.slice(1)) {
      await py(
        snapUri(srv, p.iso),
        `
        h = connect()
        m = full_map(h)
        assert sum(ln for _, ln, _ in m) == h.get_size()
        data = 0
        for off, ln, fl in m:
            if fl & nbd.STATE_ZERO:
                pos = off
                while pos < off + ln:
                    n = min(8 * MiB, off + ln - pos)
                    assert h.pread(n, pos) == bytes(n), "extent (%d, %d, %d) flagged ZERO has data" % (off, ln, fl)
                    pos += n
            else:
                data += ln
        assert data > 0, "no data extents in a snapshot with data: %r" % m[:10]
        h.shutdown()
        `,
      );
    }
  });

  void test("times outside the window are refused with NBD_REP_ERR_UNKNOWN naming the range", async () => {
    const s = await snapshots(stateDir);
    assert.ok(s.earliest !== null, "no window");
    const earliest = Date.parse(s.earliest);
    assert.ok(earliest <= points[0].ms, `earliest ${s.earliest} is after the first point`);
    const cases = [
      "2001-01-01T00:00:00Z",
      new Date(earliest - 1).toISOString(),
      new Date(Date.now() + 3_600_000).toISOString(),
    ];
    for (const t of cases) {
      const r = await goReply(srv.sock, `snap@${t}`);
      assert.equal(r.type, REP_ERR_UNKNOWN, `snap@${t}: reply 0x${r.type.toString(16)} ${r.message}`);
      const m = RANGE_RE.exec(r.message);
      assert.ok(m, `snap@${t}: the message does not name the range: "${r.message}"`);
      assert.equal(m[1], s.earliest, "the range starts at the earliest point");
      assert.ok(Math.abs(Date.parse(m[2]) - Date.now()) < 5000, `the range ends now, not at ${m[2]}`);
      assert.ok(r.message.startsWith(`snap@${t} `), r.message);
    }
    // The earliest point itself is served.
    assert.equal((await goReply(srv.sock, `snap@${s.earliest}`)).type, 1, "snap@<earliest> refused");
    // Unknown bookmarks and garbage.
    const nb = await goReply(srv.sock, "snap@nosuch");
    assert.equal(nb.type, REP_ERR_UNKNOWN);
    assert.match(nb.message, /no bookmark "nosuch" \(and not an ISO-8601 time\); available: /);
    const junk = await goReply(srv.sock, "snap@2026-13-45T99:00:00Z");
    assert.equal(junk.type, REP_ERR_UNKNOWN);
    assert.match(junk.message, /there is no month 13; available: /);
    // Near-misses that Date.parse would read in the server's zone, or roll over to another day,
    // name what is wrong instead of opening another point in time.
    const today = s.earliest.slice(0, 10);
    for (const [t, why] of [
      [`${today} 1:02:03`, /is not an ISO-8601 time: use YYYY-MM-DD/],
      [`${today}T23:59:59 `, /is not an ISO-8601 time/],
      ["2026-02-30T00:00:04Z", /2026-02-30: there is no such day \(February 2026 has 28 days\)/],
    ] as const) {
      const r = await goReply(srv.sock, `snap@${t}`);
      assert.equal(r.type, REP_ERR_UNKNOWN, `snap@${t} opened`);
      assert.match(r.message, why, r.message);
    }
    // What a real client shows (libnbd prints the server's message in its debug output).
    const info = await run("nbdinfo", [snapUri(srv, "2001-01-01T00:00:00Z")], {
      allowFailure: true,
      env: { LIBNBD_DEBUG: "1" },
    });
    assert.notEqual(info.code, 0, "nbdinfo opened a snapshot from 2001");
    assert.match(
      info.stderr,
      /server error message: snap@2001-01-01T00:00:00Z is outside the journal's window; available: /,
    );
  });

  void test("blockfork snapshots: text and JSON", async () => {
    const j = await snapshots(stateDir);
    assert.equal(j.windowMs, W);
    assert.equal(j.stopped, null);
    assert.ok(
      j.earliest !== null && Date.parse(j.earliest) % W === 0,
      `earliest ${j.earliest} not on a window boundary`,
    );
    assert.ok(Math.abs(Date.parse(j.latest) - Date.now()) < 5000);
    assert.ok(j.segments >= 1);
    assert.ok(
      j.journalBytes > 16 * MiB,
      `journal ${j.journalBytes} bytes: it must hold the nbdcopy phase's images`,
    );
    assert.ok(j.entries >= 4096, `${j.entries} entries`);
    assert.deepEqual(
      j.bookmarks.map((b) => [b.name, b.export]),
      [["phase2", "snap@phase2"]],
    );
    const t = await blockfork(["snapshots", "--state-dir", stateDir]);
    assert.equal(t.code, 0, t.stderr);
    const lines = t.stdout.trimEnd().split("\n");
    assert.match(lines[0], /^window {4}(\S+Z) \.\. (\S+Z) \(snap@<time>, in steps of 1000 ms\)$/);
    assert.equal(/^window {4}(\S+Z)/.exec(lines[0])![1], j.earliest);
    assert.match(
      lines[1],
      new RegExp(`^journal {3}[\\d.]+ MiB in ${j.segments} segments, \\d+ before-images$`),
    );
    assert.match(lines[2], /^bookmark {2}snap@phase2 +\S+Z$/);
    assert.equal(lines.length, 3);
  });

  void test("mark without a proxy exits 1, as its help says; snapshots without a journal says so", async () => {
    const nowhere = join(dir, "no-proxy");
    mkdirSync(nowhere);
    const r = await blockfork(["mark", "x", "--state-dir", nowhere]);
    assert.match(r.stderr, /no proxy is running with --state-dir/);
    assert.equal(
      r.code,
      1,
      `blockfork mark with no proxy: exit ${r.code} (its help: "1 when no proxy answers")`,
    );
    const s = await blockfork(["snapshots", "--state-dir", nowhere]);
    assert.notEqual(s.code, 0);
    assert.match(s.stderr, /no proxy is running with --state-dir .* and it holds no journal/);
  });
});

void describe("PIT command line and bookmark names", () => {
  let dir: string;
  let stateDir: string;
  let srv: ServerHandle;

  before(async () => {
    dir = scratchDir("blockfork-pit-names-");
    stateDir = join(dir, "state");
    srv = await startServer({ dir, size: "64M", args: ["--pit", "--state-dir", stateDir] });
    await pastBoundary(W);
  });
  after(async () => {
    try {
      await srv.stop();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  void test("PIT options that make no sense are usage errors (exit 2)", async () => {
    const vol = join(dir, "other.img");
    for (const [args, msg] of [
      [["--pit", "--read-only"], /--pit journals changes; a --read-only server makes none/],
      [["--pit", "--pit-window", "0"], /--pit-window must be a positive integer/],
      [["--pit", "--pit-window", "abc"], /--pit-window must be a positive integer/],
      [["--pit", "--pit-retention", "soon"], /--pit-retention "soon" is not a duration/],
      [["--pit", "--pit-max-bytes", "lots"], /--pit-max-bytes/],
      // Without --pit they must not turn the journal on unasked (as --replication without --gateway).
      [["--pit-window", "500"], /--pit-window needs --pit/],
      [["--pit-retention", "1h"], /--pit-retention needs --pit/],
      [["--pit-max-bytes", "1G"], /--pit-max-bytes needs --pit/],
    ] as [string[], RegExp][]) {
      const r = await blockfork([
        "serve",
        "--volume",
        vol,
        "--size",
        "64M",
        "--listen",
        "none",
        "--socket",
        join(dir, "x.sock"),
        ...args,
      ]);
      assert.equal(r.code, 2, `serve ${args.join(" ")}: exit ${r.code}\n${r.stderr}`);
      assert.match(r.stderr, msg);
    }
  });

  void test("a bookmark whose name reads as a date is refused (exit 2, saying why); snap@ that name stays a time", async () => {
    // snap@2020-01-01 must keep meaning that time: a bookmark of that name would hide it.
    const r = await blockfork(["mark", "2020-01-01", "--state-dir", stateDir]);
    assert.equal(r.code, 2, r.stdout + r.stderr);
    assert.match(r.stderr, /bookmark name "2020-01-01" reads as a time .*choose another/);
    const bad = await blockfork(["mark", "no/slash", "--state-dir", stateDir]);
    assert.equal(bad.code, 2, bad.stdout + bad.stderr);
    assert.match(bad.stderr, /must be 1-64 letters, digits/);
    const s = await blockfork(["snapshots", "--state-dir", stateDir, "--json"]);
    assert.equal(s.code, 0, s.stderr);
    const names = (JSON.parse(s.stdout) as { bookmarks: { name: string }[] }).bookmarks.map((b) => b.name);
    assert.ok(!names.includes("2020-01-01") && !names.includes("no/slash"), names.join(" "));
    const go = await goReply(srv.sock, "snap@2020-01-01");
    assert.equal(go.type, REP_ERR_UNKNOWN, `snap@2020-01-01: reply 0x${go.type.toString(16)} ${go.message}`);
    assert.match(go.message, RANGE_RE, "snap@2020-01-01 is read as a time outside the window");
  });

  void test("mark refuses a name already taken (exit 2, saying when); --replace moves it", async () => {
    const timeOf = async (name: string) =>
      (await snapshots(stateDir)).bookmarks.find((b) => b.name === name)?.time ?? null;
    const first = await blockfork(["mark", "kept", "--state-dir", stateDir]);
    assert.equal(first.code, 0, first.stderr);
    const t1 = await timeOf("kept");
    assert.ok(t1 !== null);
    await sleep(20);
    const again = await blockfork(["mark", "kept", "--state-dir", stateDir]);
    assert.equal(again.code, 2, again.stdout + again.stderr);
    assert.match(again.stderr, new RegExp(`bookmark "kept" exists \\(at ${t1}\\); pass --replace`));
    assert.equal(await timeOf("kept"), t1, "the refused mark moved the bookmark");
    const moved = await blockfork(["mark", "kept", "--replace", "--state-dir", stateDir]);
    assert.equal(moved.code, 0, moved.stderr);
    const t2 = await timeOf("kept");
    assert.ok(t2 !== null && Date.parse(t2) > Date.parse(t1), `${t1} -> ${t2}`);
  });
});

/** Write the first MiB of `srv`'s volume full of `letter`, then FLUSH. */
async function fillFirstMiB(srv: ServerHandle, letter: string): Promise<void> {
  await py(srv.uri, `h = connect()\nh.pwrite(b"${letter}" * MiB, 0)\nh.flush()\nh.shutdown()\n`);
}

/** The merge window of the first-window tests. */
const FW = 6000;

/**
 * A new 16 MiB volume with a journal of FW windows, started just after a window boundary: its
 * first window then lasts most of FW from the start.
 */
async function startInFirstWindow(prefix: string): Promise<{ d: string; sd: string; s: ServerHandle }> {
  const d = scratchDir(prefix);
  const sd = join(d, "state");
  await pastBoundary(FW);
  const s = await startServer({
    dir: d,
    size: "16M",
    args: ["--pit", "--state-dir", sd, "--pit-window", `${FW}`],
  });
  return { d, sd, s };
}

void describe("mark in the first merge window of a new journal", () => {
  void test("waits for the first point in time instead of refusing; snap@ that bookmark is exact", async () => {
    const { d, sd, s } = await startInFirstWindow("blockfork-pit-first-");
    try {
      await fillFirstMiB(s, "A");
      const before = await snapshots(sd);
      assert.equal(before.earliest, null, "still in the first merge window: no point exists yet");
      const t0 = Date.now();
      const r = await blockfork(["mark", "first", "--state-dir", sd]);
      const waited = Date.now() - t0;
      assert.equal(r.code, 0, r.stdout + r.stderr);
      const m = /^bookmark "first" at (\S+Z): export snap@first\n$/.exec(r.stdout);
      assert.ok(m, r.stdout);
      const after = await snapshots(sd);
      assert.ok(
        after.earliest !== null && Date.parse(m[1]) >= Date.parse(after.earliest),
        `${m[1]} vs ${after.earliest}`,
      );
      assert.ok(waited > 100 && waited < FW + 2000, `mark took ${waited} ms`);
      await fillFirstMiB(s, "B");
      const want = createHash("sha256")
        .update(Buffer.alloc(MiB, "A"))
        .update(Buffer.alloc(15 * MiB))
        .digest("hex");
      assert.equal(await exportSha(snapUri(s, "first")), want, "snap@first holds A, not the later B");
    } finally {
      await s.stop();
      rmSync(d, { recursive: true, force: true });
    }
  });
});

void describe("blockfork snapshots with no proxy, after changes only in the first merge window", () => {
  void test("the window is the first point in time, not one that ends before it begins", async () => {
    const { d, sd, s } = await startInFirstWindow("blockfork-pit-offline-");
    try {
      await fillFirstMiB(s, "A");
      assert.equal((await snapshots(sd)).earliest, null, "still in the first merge window");
      await s.stop();
      const offline = await snapshots(sd);
      assert.ok(offline.offline === true && offline.entries > 0, JSON.stringify(offline));
      assert.ok(
        offline.earliest !== null && Date.parse(offline.latest) >= Date.parse(offline.earliest),
        `window ${offline.earliest} .. ${offline.latest}`,
      );
    } finally {
      await s.stop();
      rmSync(d, { recursive: true, force: true });
    }
  });
});
