// Black-box test of shared snapshot views: `blockfork serve --pit` on a private unix socket, a
// point in time taken after writing the volume through nbdcopy, then the whole volume rewritten.
// nbdinfo --list asks NBD_OPT_INFO of the bookmark (no view may be built for that); nbdcopy with
// 4 connections reads snap@<time> with the point's sha256 through one view (the server logs
// each view it builds); two connections held open to snap@NAME and snap@<time> of one point show
// as one view with 2 connections in `blockfork snapshots --json`, and none once they close.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { run } from "../helpers/run.js";
import {
  blockfork,
  mark,
  pastBoundary,
  recordPoint,
  snapshots,
  snapUri,
  type PitPoint,
} from "../helpers/pit.js";
import { infoRequestData, RawClient } from "../helpers/raw-client.js";

const W = 1000;
const SIZE = 16 * 1024 * 1024;
const BUILT = /: built the view at /;

void describe("snapshot views shared by the connections to one point", () => {
  let dir: string;
  let stateDir: string;
  let srv: ServerHandle;
  let point: PitPoint;

  const builds = (): string[] =>
    srv
      .log()
      .split("\n")
      .filter((l) => BUILT.test(l));

  before(async () => {
    dir = scratchDir("blockfork-pit-shared-");
    stateDir = join(dir, "state");
    srv = await startServer({
      dir,
      size: "16M",
      args: ["--pit", "--state-dir", stateDir, "--log-level", "debug"],
    });
    await pastBoundary(W);
    const img = join(dir, "a.img");
    writeFileSync(img, randomBytes(SIZE));
    await run("nbdcopy", [img, srv.uri], { timeoutMs: 60_000 });
    point = await recordPoint(srv, "written", W);
    await mark(stateDir, "m");
    writeFileSync(img, randomBytes(SIZE)); // every block changes: the view maps all of them
    await run("nbdcopy", [img, srv.uri], { timeoutMs: 60_000 });
  });

  after(async () => {
    try {
      const r = await srv.stop();
      assert.deepEqual(r, { code: 0, signal: null }, `the server did not exit cleanly:\n${srv.log()}`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  void test("nbdinfo: INFO builds no view (--list asks it alone), INFO then GO build one", async () => {
    const infos = (): number =>
      srv
        .log()
        .split("\n")
        .filter((l) => l.includes("option INFO")).length;
    const r = await run("nbdinfo", ["--list", "--json", srv.uri], { timeoutMs: 30_000 });
    const listed = (JSON.parse(r.stdout) as { exports: { "export-name": string; "export-size": number }[] })
      .exports;
    const snap = listed.find((e) => e["export-name"] === "snap@m");
    assert.ok(snap, `snap@m not listed: ${r.stdout}`);
    assert.equal(snap["export-size"], SIZE);
    assert.ok(infos() >= 1, "nbdinfo --list asked no INFO");
    assert.deepEqual(builds(), [], "INFO built a view");
    const asked = infos();
    const one = await run("nbdinfo", ["--json", snapUri(srv, "m")], { timeoutMs: 30_000 });
    const e = (JSON.parse(one.stdout) as { exports: { "export-size": number; is_read_only: boolean }[] })
      .exports[0];
    assert.equal(e["export-size"], SIZE);
    assert.equal(e.is_read_only, true);
    assert.equal(builds().length, 1, `views built for nbdinfo snap@m:\n${builds().join("\n")}`);
    assert.ok(infos() > asked, "nbdinfo asked no INFO before its GO");
  });

  void test("nbdcopy with 4 connections reads the point's sha256 through one view", async () => {
    const before = builds().length;
    const out = join(dir, "snap.img");
    // Threads too: nbdcopy opens no more connections than threads (one per core by default).
    await run("nbdcopy", ["--threads=4", "--connections=4", snapUri(srv, point.iso), out], {
      timeoutMs: 60_000,
    });
    const sha = createHash("sha256").update(readFileSync(out)).digest("hex");
    rmSync(out);
    assert.equal(sha, point.sha, "snap@ the point does not read what the volume held then");
    const opened = srv
      .log()
      .split("\n")
      .filter((l) => l.includes(`export "snap@${point.iso}"`));
    assert.equal(opened.length, 4, `nbdcopy opened ${opened.length} connections:\n${srv.log()}`);
    const built = builds().slice(before);
    assert.equal(built.length, 1, `views built for one nbdcopy:\n${built.join("\n")}`);
    assert.match(built[0], /\(4096 blocks from the journal, [\d.]+ ms\); views open: 1$/);
  });

  void test("`blockfork snapshots --json` counts one view with its connections, none once they close", async () => {
    const go = async (name: string): Promise<RawClient> => {
      const c = await RawClient.connect(srv.sock);
      await c.greeting();
      c.sendClientFlags(3);
      const rs = await c.option(7, infoRequestData(name));
      assert.equal(rs[rs.length - 1].type, 1, `GO ${name} was refused`);
      return c;
    };
    const a = await go("snap@m");
    // A bookmark ends its merge window: a time 1 ms after it (its ISO time is cut to the ms)
    // shows the same point.
    const s0 = await snapshots(stateDir);
    const markMs = Date.parse(s0.bookmarks.find((x) => x.name === "m")!.time!);
    const b = await go(`snap@${new Date(markMs + 1).toISOString()}`);
    const s = await snapshots(stateDir);
    assert.equal(s.views?.length, 1, JSON.stringify(s.views));
    assert.equal(s.views[0].connections, 2);
    assert.equal(s.views[0].journalBlocks, 4096);
    assert.equal(s.views[0].broken, null);
    const text = await blockfork(["snapshots", "--state-dir", stateDir]);
    assert.match(text.stdout, /^view {6}\S+Z: 2 connections, 4096 blocks from the journal$/m);
    await a.disconnect();
    await b.disconnect();
    for (let i = 0; i < 50 && ((await snapshots(stateDir)).views?.length ?? 0) > 0; i++)
      await new Promise((r) => setTimeout(r, 100));
    assert.deepEqual((await snapshots(stateDir)).views, []);
  });
});
