// Black-box: what the gateway knows of its secondary as an image of the primary (DRBD's disk
// states: never fail over to an inconsistent secondary). A real `blockfork gateway` and
// `blockfork serve --gateway`; the gateway's /v1/status, /v1/health and sources.json are read.
// - The first resync of a primary full of data (rate-limited so it lasts): the secondary is
//   inconsistent while it runs, in sources.json too, and consistent once it is done; the proxy's
//   `blockfork status` shows what the gateway reported.
// - The proxy SIGKILLed during that resync: the secondary stays inconsistent, across a clean
//   restart of the gateway; the proxy back, it becomes consistent.
// - The gateway stopped cleanly under fio: sources.json says it stopped cleanly and consistent;
//   SIGKILLed under fio: restarted inconsistent ("did not stop cleanly"); consistent again once the
//   proxy has resynced, and the files are equal.

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { scratchDir } from "../helpers/server.js";
import {
  fioClean,
  fioStart,
  sha256File,
  sleep,
  startPair,
  type FioRun,
  type Pair,
} from "../helpers/replication.js";

interface Secondary {
  state: string;
  since: string;
  reason: string;
  source: string | null;
}

async function gatewaySecondary(pair: Pair): Promise<Secondary> {
  const r = await pair.gw!.client.request("GET", "/status");
  assert.equal(r.status, 200, r.body.toString());
  return r.json<{ secondary: Secondary }>().secondary;
}

/** sources.json as the gateway last wrote it. */
function stateFile(pair: Pair): { running: boolean; secondary: Secondary } {
  return JSON.parse(readFileSync(join(pair.gwStateDir, "sources.json"), "utf8")) as {
    running: boolean;
    secondary: Secondary;
  };
}

async function waitSecondary(pair: Pair, state: string, timeoutMs = 20_000): Promise<Secondary> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = await gatewaySecondary(pair);
    if (s.state === state) return s;
    if (Date.now() > deadline) {
      throw new Error(
        `the secondary stayed ${s.state} (${s.reason}) for ${timeoutMs} ms, not ${state}\n` +
          `gateway log:\n${pair.gw!.log().slice(-2000)}\nproxy log:\n${pair.proxyLog().slice(-2000)}`,
      );
    }
    await sleep(100);
  }
}

/**
 * A pair whose 32 MiB primary is full of random data, its first resync at 8 MiB/s (about 4 s);
 * stop() stops the pair and removes the primary's directory.
 */
async function slowFirstResync(): Promise<{ pair: Pair; stop: () => Promise<void> }> {
  const primaryDir = scratchDir("blockfork-cons-");
  const removeDir = (): void => rmSync(primaryDir, { recursive: true, force: true });
  writeFileSync(join(primaryDir, "prim.img"), randomBytes(32 * 1024 * 1024));
  let pair: Pair;
  try {
    pair = await startPair({
      size: "32M",
      primaryDir,
      waitSynced: false,
      proxyArgs: ["--resync-rate", "8M"],
    });
  } catch (e) {
    removeDir();
    throw e;
  }
  return {
    pair,
    stop: async () => {
      try {
        await pair.stop();
      } finally {
        removeDir();
      }
    },
  };
}

void describe("replication: the secondary's consistency at the gateway", () => {
  void test("first resync: inconsistent while it runs (durably), consistent when done, shown by blockfork status", async () => {
    const { pair, stop } = await slowFirstResync();
    try {
      const st = await pair.status();
      const source = st.tracking!.source;
      const during = await waitSecondary(pair, "inconsistent", 10_000);
      assert.equal((await pair.status()).link!.state, "resyncing", "inconsistent while the resync runs");
      assert.match(during.reason, new RegExp(`source ${source} is resyncing`));
      assert.equal(during.source, source);
      const onDisk = stateFile(pair);
      assert.equal(onDisk.secondary.state, "inconsistent", "recorded in sources.json");
      assert.equal(onDisk.running, true);
      const health = await pair.gw!.client.request("GET", "/health");
      assert.equal(health.json<{ secondary: string }>().secondary, "inconsistent");

      await pair.waitSynced(60_000);
      const after = await waitSecondary(pair, "consistent", 10_000);
      assert.match(after.reason, new RegExp(`in sync with source ${source} through seq \\d+`));
      assert.equal(stateFile(pair).secondary.state, "consistent", "recorded in sources.json");
      const px = await pair.waitStatus(
        "the proxy to show the secondary consistent",
        (s) => s.link?.secondary === "consistent",
      );
      assert.equal(px.link!.secondary, "consistent");
      assert.equal(await sha256File(pair.secondary), await sha256File(pair.primary));
      assert.match(pair.gw!.log(), /secondary INCONSISTENT: .* do not fail over to it/);
      assert.match(pair.gw!.log(), /secondary CONSISTENT: in sync with source/);
    } finally {
      await stop();
    }
  });

  void test("the proxy killed during the resync: still inconsistent after a clean gateway restart; consistent once the proxy is back", async () => {
    const { pair, stop } = await slowFirstResync();
    try {
      const during = await waitSecondary(pair, "inconsistent", 10_000);
      await pair.killProxy("SIGKILL");
      await sleep(500);
      assert.equal((await gatewaySecondary(pair)).state, "inconsistent", "nobody says otherwise");
      await pair.killGateway("SIGTERM");
      const file = stateFile(pair);
      assert.equal(file.running, false, "a clean stop");
      assert.equal(file.secondary.state, "inconsistent");
      await pair.restartGateway();
      const back = await gatewaySecondary(pair);
      assert.deepEqual(back, during, "the same state, since the same time");
      await pair.restartProxy();
      await pair.waitSynced(60_000);
      await waitSecondary(pair, "consistent", 10_000);
      assert.equal(await sha256File(pair.secondary), await sha256File(pair.primary));
    } finally {
      await stop();
    }
  });

  void test("gateway stopped cleanly, then SIGKILLed, under fio: unclean stop is inconsistent until the proxy resyncs", async () => {
    const pair = await startPair({ size: "64M" });
    let fio: FioRun | null = null;
    try {
      await waitSecondary(pair, "consistent", 10_000);
      fio = fioStart(pair.proxy!.uri, pair.dir, [
        "--name=w",
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--iodepth=16",
        "--size=64M",
        "--time_based",
        "--runtime=12",
      ]);
      await sleep(2000);
      await pair.killGateway("SIGTERM");
      const clean = stateFile(pair);
      assert.equal(clean.running, false);
      assert.equal(clean.secondary.state, "consistent", "streaming in order, stopped cleanly");
      await sleep(1000);
      await pair.restartGateway();
      await pair.waitStatus("streaming again", (s) => s.link?.state === "streaming", 30_000);
      await waitSecondary(pair, "consistent", 15_000);
      await sleep(1000);
      await pair.killGateway("SIGKILL");
      assert.equal(stateFile(pair).running, true, "killed: no clean stop recorded");
      await pair.restartGateway();
      // Said at the start, before it listens (the proxy may have resynced by the time we ask); its
      // stderr may reach us a moment after the banner on stdout.
      const said = /secondary INCONSISTENT: the gateway did not stop cleanly/;
      for (let i = 0; i < 50 && !said.test(pair.gw!.log()); i++) await sleep(100);
      assert.match(pair.gw!.log(), said);
      assert.equal(fioClean(await fio.done), null, "fio saw no error");
      await pair.waitSynced(60_000);
      await waitSecondary(pair, "consistent", 15_000);
      assert.equal(await sha256File(pair.secondary), await sha256File(pair.primary));
    } finally {
      await fio?.kill();
      await pair.stop();
    }
  });

  void test("POST transport, idle: a gateway killed and restarted is noticed without a write, resynced, consistent again", async () => {
    const pair = await startPair({ size: "32M", proxyArgs: ["--no-update-stream"] });
    try {
      await waitSecondary(pair, "consistent", 10_000);
      await pair.killGateway("SIGKILL");
      await pair.restartGateway();
      // No write follows: the idle link looks at the gateway's health, sees another boot, resyncs
      // what it had not seen durable, and claims again.
      await waitSecondary(pair, "consistent", 30_000);
      const st = await pair.waitSynced();
      assert.ok(st.link!.outages >= 1, "the restart was noticed");
      assert.equal(await sha256File(pair.secondary), await sha256File(pair.primary));
    } finally {
      await pair.stop();
    }
  });
});
