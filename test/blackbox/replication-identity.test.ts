// Black-box: the proxy replicates to the secondary its tracking log describes, and to no other.
// - The gateway restarted over another secondary (an empty file replacing the old one at the same
//   path; then a new state directory as well): the proxy sees the new secondary id, resyncs the
//   whole volume, and the files end equal. Before, it resynced nothing and called them in sync.
// - A second proxy (another primary) pointed at the same gateway is refused (409): the secondary
//   keeps the first one's data and the first goes on replicating. Restarted with
//   --gateway-takeover it takes the secondary over and resyncs it whole; the first is then refused
//   and says so, instead of calling a secondary it no longer owns in sync.
// - The proxy's state directory restored from a copy (a backup taken two runs ago): the gateway
//   refuses the reused generation, the proxy moves past it and resyncs the whole volume, and the
//   files end equal. Before, the gateway dropped the new writes as duplicates and the proxy cleared
//   their blocks.

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { execFileSync } from "node:child_process";
import { existsSync, rmSync } from "node:fs";
import { join } from "node:path";
import {
  cli,
  sha256File,
  startPair,
  writeThroughNbd,
  writeToUri,
  type Pair,
  type ProxyStatus,
} from "../helpers/replication.js";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";

const MiB = 1024 * 1024;

/** A second proxy at the pair's gateway: its own 64 MiB primary of random data, in bDir. */
function secondProxy(pair: Pair, bDir: string, extra: string[]): Promise<ServerHandle> {
  if (!existsSync(join(bDir, "b.img"))) {
    execFileSync("dd", ["if=/dev/urandom", `of=${join(bDir, "b.img")}`, "bs=1M", "count=64", "status=none"]);
  }
  return startServer({
    dir: bDir,
    keepDir: true,
    volume: join(bDir, "b.img"),
    size: "64M",
    args: ["--gateway", pair.url, "--state-dir", join(bDir, "state"), ...extra],
  });
}

void describe("replication: the secondary the tracking log describes", () => {
  void test("the gateway back over another secondary (replaced file, then new state directory): a whole resync", async () => {
    const pair = await startPair({ size: "64M" });
    try {
      await writeThroughNbd(pair, 0, randomBytes(4 * MiB));
      await pair.waitSynced();
      assert.equal(await sha256File(pair.secondary), await sha256File(pair.primary));
      const idOf = async (): Promise<string> =>
        (await pair.gw!.client.request("GET", "/health")).json<{ secondaryId: string }>().secondaryId;
      const first = await idOf();
      assert.match(first, /^[0-9a-f]{16}$/);

      // An empty file at the same path: the gateway's state directory is the old one.
      await pair.killGateway("SIGTERM");
      rmSync(pair.secondary);
      execFileSync("truncate", ["-s", "64M", pair.secondary]);
      await pair.restartGateway();
      assert.match(pair.gw!.log(), /another file than the secondary this state directory described/);
      const second = await idOf();
      assert.notEqual(second, first, "a new secondary gets a new id");
      await pair.waitSynced(60_000);
      assert.equal(await sha256File(pair.secondary), await sha256File(pair.primary), "replaced file");

      // A new state directory and a new file.
      await pair.killGateway("SIGTERM");
      rmSync(pair.gwStateDir, { recursive: true });
      rmSync(pair.secondary);
      await pair.restartGateway();
      assert.notEqual(await idOf(), second);
      await writeThroughNbd(pair, 8 * MiB, randomBytes(64 * 1024));
      await pair.waitSynced(60_000);
      assert.equal(await sha256File(pair.secondary), await sha256File(pair.primary), "new state directory");
      const said = pair.proxyLog().match(/the gateway serves another secondary/g) ?? [];
      assert.equal(said.length, 2, pair.proxyLog().slice(-3000));
      assert.match(pair.proxyLog(), /resyncing the whole volume/);
    } finally {
      await pair.stop();
    }
  });

  void test("the same gateway under another URL (localhost for 127.0.0.1): no whole resync, its secondary id says it is the same", async () => {
    const pair = await startPair({ size: "64M" });
    try {
      await writeThroughNbd(pair, 0, randomBytes(MiB));
      await pair.waitSynced();
      await pair.killProxy("SIGTERM");
      const before = pair.proxyLog().length;
      pair.url = pair.url.replace("127.0.0.1", "localhost");
      await pair.restartProxy();
      await writeThroughNbd(pair, 4 * MiB, randomBytes(64 * 1024));
      await pair.waitSynced(60_000);
      const log = pair.proxyLog().slice(before);
      assert.match(log, /the gateway's URL changed \(http:\/\/127\.0\.0\.1:\d+ -> http:\/\/localhost:\d+\)/);
      assert.doesNotMatch(log, /everything \(\d+ bytes\) will be resynced|resyncing the whole volume/, log);
      for (const m of log.matchAll(/resync: (\d+) bytes dirty/g)) {
        assert.ok(Number(m[1]) < 64 * MiB, `a resync of ${m[1]} bytes after a URL change:\n${log}`);
      }
      assert.equal(await sha256File(pair.secondary), await sha256File(pair.primary));
    } finally {
      await pair.stop();
    }
  });

  void test("a second proxy at the same gateway is refused; with --gateway-takeover it takes the secondary over, and the first is refused", async () => {
    const pair = await startPair({ size: "64M" });
    const bDir = scratchDir("blockfork-second-");
    let b: ServerHandle | null = null;
    const bStatus = async (): Promise<ProxyStatus> => {
      const r = await cli(["status", "--state-dir", join(bDir, "state"), "--json"]);
      assert.equal(r.code, 0, r.stderr);
      return JSON.parse(r.stdout) as ProxyStatus;
    };
    const startB = (extra: string[]): Promise<ServerHandle> => secondProxy(pair, bDir, extra);
    try {
      await writeThroughNbd(pair, 0, randomBytes(2 * MiB));
      await pair.waitSynced();
      b = await startB([]);
      let st = await bStatus();
      for (let i = 0; i < 100 && !/replica of another proxy/.test(st.link!.lastError); i++) {
        await new Promise((r) => setTimeout(r, 100));
        st = await bStatus();
      }
      assert.notEqual(st.link!.state, "streaming");
      assert.match(st.link!.lastError, /replica of another proxy .*--gateway-takeover/);
      await writeThroughNbd(pair, 4 * MiB, randomBytes(64 * 1024));
      await pair.waitSynced();
      assert.equal(await sha256File(pair.secondary), await sha256File(pair.primary), "A still owns it");

      await b.stop();
      b = await startB(["--gateway-takeover"]);
      for (let i = 0; i < 600; i++) {
        st = await bStatus();
        if (st.link!.state === "streaming" && st.tracking!.dirtyBytes === 0) break;
        await new Promise((r) => setTimeout(r, 100));
      }
      assert.equal(st.link!.state, "streaming", JSON.stringify(st.link));
      assert.match(b.log(), /taking the secondary over from source .*resyncing the whole volume/);
      assert.equal(
        await sha256File(pair.secondary),
        await sha256File(join(bDir, "b.img")),
        "B's replica now",
      );
      // A, idle, hears of it: the gateway ended its update stream, and its probe is refused.
      let a = await pair.waitStatus("A refused", (s) =>
        /took the gateway's secondary over|replica of another proxy/.test(s.link!.lastError),
      );
      assert.notEqual(a.link!.state, "streaming");
      assert.equal(a.link!.secondary ?? null, null, "A does not show B's secondary as its own");
      await writeThroughNbd(pair, 8 * MiB, randomBytes(64 * 1024));
      a = await pair.status();
      assert.notEqual(a.link!.state, "streaming");
      assert.ok(a.tracking!.dirtyBytes > 0, "A keeps what it could not send dirty");
      assert.match(pair.gw!.log(), /took the secondary over from source/);
    } finally {
      await b?.stop();
      rmSync(bDir, { recursive: true, force: true });
      await pair.stop();
    }
  });

  void test("two live proxies both started with --gateway-takeover take the secondary at most once each, not back and forth for ever", async () => {
    // As when a supervisor restarts the old proxy with the same unit file while the new one runs.
    const pair = await startPair({ size: "64M", proxyArgs: ["--gateway-takeover"] });
    const bDir = scratchDir("blockfork-second-");
    let b: ServerHandle | null = null;
    try {
      b = await secondProxy(pair, bDir, ["--gateway-takeover"]);
      // Both keep writing for a while; each write needs the secondary.
      for (let i = 1; i <= 6; i++) {
        await writeThroughNbd(pair, i * 64 * 1024, randomBytes(64 * 1024));
        await writeToUri(b.uri, bDir, 8 * MiB + i * 64 * 1024, randomBytes(64 * 1024));
        await new Promise((r) => setTimeout(r, 1500));
      }
      await new Promise((r) => setTimeout(r, 3000));
      const takeovers = (pair.gw!.log().match(/took the secondary over from source/g) ?? []).length;
      // B takes it from A; A, which never took it from anyone, takes it back once; then B stops.
      assert.ok(takeovers >= 1 && takeovers <= 2, `${takeovers} takeovers:\n${pair.gw!.log().slice(-3000)}`);
      const settled = (pair.gw!.log().match(/took the secondary over from source/g) ?? []).length;
      await new Promise((r) => setTimeout(r, 6000));
      assert.equal(
        (pair.gw!.log().match(/took the secondary over from source/g) ?? []).length,
        settled,
        "no more takeovers once settled",
      );
      const stopped = /took the gateway's secondary over after this one/;
      assert.ok(
        stopped.test(b.log()) || stopped.test(pair.proxyLog()),
        `one of them says it stops replicating:\nA: ${pair.proxyLog().slice(-1500)}\nB: ${b.log().slice(-1500)}`,
      );
    } finally {
      await b?.stop();
      rmSync(bDir, { recursive: true, force: true });
      await pair.stop();
    }
  });

  void test("the proxy's state directory restored from an older copy: the reused generation is refused, a whole resync follows", async () => {
    const pair = await startPair({ size: "64M" });
    try {
      await pair.killProxy("SIGTERM");
      const backup = join(pair.dir, "state-backup");
      execFileSync("cp", ["-a", pair.stateDir, backup]);
      await pair.restartProxy(); // generation +1, as the backup will be again
      await pair.waitSynced();
      await writeThroughNbd(pair, 1 * MiB, randomBytes(64 * 1024));
      await pair.waitSynced();
      await pair.killProxy("SIGTERM");
      rmSync(pair.stateDir, { recursive: true });
      execFileSync("cp", ["-a", backup, pair.stateDir]);
      await pair.restartProxy();
      await writeThroughNbd(pair, 10 * MiB, randomBytes(64 * 1024));
      await pair.waitSynced(60_000);
      assert.match(pair.proxyLog(), /refused a (batch|flush) as stale .* from another process/);
      assert.match(pair.proxyLog(), /moving to generation \d+ and resyncing the whole volume/);
      assert.equal(await sha256File(pair.secondary), await sha256File(pair.primary));
    } finally {
      await pair.stop();
    }
  });
});
