// Fault injection in `blockfork gateway`, by PUT /v1/fault and by the trigger file
// `<state-dir>/fault` (after nbdkit's test-error-triggered.sh): slow (every request but health
// waits), drop (the connection is destroyed without a reply), error (500 ERR_FAULT, nothing
// applied), down (503 everywhere, health included), clearing each, and /v1/fault itself never
// affected so a fault can always be cleared over the API.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { KIND, type UpdateRecord } from "../../src/gateway/records.js";
import { GatewayClient, startGateway, type GatewayHandle, type Reply } from "../helpers/gateway.js";

const SIZE = 16 * 1024 * 1024;
const NAME = "sec";
let gw: GatewayHandle;
let c: GatewayClient;
let faultFile: string;
before(async () => {
  gw = await startGateway({ size: "16M", token: "s3cret" });
  c = gw.client;
  faultFile = join(gw.stateDir, "fault");
});
after(async () => {
  await gw?.stop("SIGKILL");
});

let seq = 0;
const ID = { source: "fa01", generation: 1, size: SIZE };
function nextWrite(): UpdateRecord {
  seq++;
  return {
    kind: KIND.WRITE,
    seq,
    period: 0,
    offset: seq * 4096,
    length: 4096,
    data: Buffer.alloc(4096, seq),
  };
}

/** A request on its own connection (a dropped connection must not disturb the shared one). */
async function once(
  method: string,
  path: string,
  o: Parameters<GatewayClient["request"]>[2] = {},
): Promise<Reply> {
  const cl = new GatewayClient(gw.url, { token: gw.token });
  try {
    return await cl.request(method, path, { timeoutMs: 10_000, ...o });
  } finally {
    cl.close();
  }
}

/** What a request ends in: "status N" or the socket error code. */
async function outcome(method: string, path: string): Promise<string> {
  return once(method, path).then(
    (r) => `status ${r.status}`,
    (e: NodeJS.ErrnoException) => e.code ?? e.message,
  );
}

/** Poll `fn` until it returns true (the trigger file is looked at every 100 ms). */
async function eventually(fn: () => Promise<boolean>, what: string, timeoutMs = 3000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await fn())) {
    if (Date.now() > deadline) throw new Error(`not within ${timeoutMs} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
}

async function applied(): Promise<number> {
  const st = (await c.request("GET", "/status")).json<{
    sources: { source: string; appliedThrough: number }[];
  }>();
  return st.sources.find((s) => s.source === ID.source)?.appliedThrough ?? 0;
}

async function clear(): Promise<void> {
  const r = await c.setFault({ mode: "none" });
  assert.equal(r.status, 200, r.body.toString());
}

void describe("faults over the API", () => {
  void test("slow: requests wait delayMs, health does not", async () => {
    const r = await c.setFault({ mode: "slow", delayMs: 400 });
    assert.deepEqual(r.json(), { mode: "slow", delayMs: 400, probability: 1, origin: "api" });
    const slow = await timed(async () => assert.equal((await once("GET", "/status")).status, 200));
    assert.ok(slow >= 390, `status took ${slow} ms`);
    const upd = await timed(async () => assert.equal((await c.updates(NAME, ID, [nextWrite()])).status, 200));
    assert.ok(upd >= 390, `updates took ${upd} ms`);
    const health = await timed(async () => assert.equal((await once("GET", "/health")).status, 200));
    assert.ok(health < 300, `health took ${health} ms`);
    const fault = await timed(async () =>
      assert.equal((await c.request("GET", "/fault")).json().mode, "slow"),
    );
    assert.ok(fault < 300, "/v1/fault is never slowed");
    await clear();
    const fast = await timed(() => once("GET", "/status"));
    assert.ok(fast < 300, `after clearing, status took ${fast} ms`);
  });

  void test("drop: connections are destroyed without a reply; probability 0 drops nothing", async () => {
    await c.setFault({ mode: "drop" });
    for (const path of ["/status", "/health", `/volumes/${NAME}/data?offset=0&length=1`]) {
      assert.equal(await outcome("GET", path), "ECONNRESET", path);
    }
    const before = await applied().catch(() => -1); // the shared connection may have been dropped too
    assert.equal(before, -1, "status is dropped as well");
    assert.equal((await c.request("GET", "/fault")).json().mode, "drop", "/v1/fault still answers");
    await c.setFault({ mode: "drop", probability: 0 });
    assert.equal(await outcome("GET", "/status"), "status 200");
    await clear();
  });

  void test("error: 500 ERR_FAULT and nothing applied; health stays ok", async () => {
    const start = await applied();
    await c.setFault({ mode: "error" });
    const r = await c.updates(NAME, ID, [nextWrite()]);
    assert.equal(r.status, 500);
    assert.equal(r.json<{ error: { code: string } }>().error.code, "ERR_FAULT");
    assert.equal((await once("GET", "/health")).status, 200);
    await clear();
    assert.equal(await applied(), start, "the refused batch was not applied");
    // The proxy resends the batch: now it applies (the same seq, never seen before).
    seq--;
    const again = await c.updates(NAME, ID, [nextWrite()]);
    assert.equal(again.status, 200);
    assert.equal(again.json().applied, 1);
  });

  void test("down: 503 ERR_FAULT everywhere, health included; /v1/fault clears it", async () => {
    await c.setFault({ mode: "down" });
    const h = await once("GET", "/health", { token: null });
    assert.equal(h.status, 503);
    const hb = h.json<{ ok: boolean; reason: string; error: { code: string } }>();
    assert.equal(hb.ok, false);
    assert.match(hb.reason, /down/);
    assert.equal(hb.error.code, "ERR_FAULT");
    for (const r of [
      await once("GET", "/status"),
      await c.updates(NAME, ID, [nextWrite()]),
      await c.flush(NAME, ID),
    ]) {
      assert.equal(r.status, 503);
      assert.equal(r.json<{ error: { code: string } }>().error.code, "ERR_FAULT");
    }
    seq--;
    assert.equal((await c.request("GET", "/fault")).status, 200);
    await clear();
    assert.equal((await once("GET", "/health")).status, 200);
  });

  void test("status reports the active fault", async () => {
    await c.setFault({ mode: "error", probability: 0 });
    const st = (await c.request("GET", "/status")).json<{ fault: Record<string, unknown> }>();
    assert.deepEqual(st.fault, { mode: "error", delayMs: 0, probability: 0, origin: "api" });
    await clear();
  });
});

void describe("faults by the trigger file", () => {
  void test("down, then removed", async () => {
    writeFileSync(faultFile, "down\n");
    await eventually(
      async () => (await once("GET", "/health")).status === 503,
      "health 503 after writing down",
    );
    const f = (await c.request("GET", "/fault")).json();
    assert.equal(f.mode, "down");
    assert.equal(f.origin, "file");
    rmSync(faultFile);
    await eventually(
      async () => (await once("GET", "/health")).status === 200,
      "health 200 after removing it",
    );
  });

  void test("error as JSON: updates fail until the file is removed", async () => {
    writeFileSync(faultFile, '{"mode": "error"}');
    await eventually(async () => {
      const r = await c.updates(NAME, ID, [nextWrite()]);
      if (r.status !== 500) return false; // applied before the file was seen
      seq--; // refused: the seq is sent again later
      return true;
    }, "updates answered 500");
    rmSync(faultFile);
    await eventually(async () => {
      const r = await c.updates(NAME, ID, [nextWrite()]);
      if (r.status === 200) return true;
      seq--;
      return false;
    }, "updates apply again");
    assert.equal(await applied(), seq, "no seq lost");
  });

  void test("slow with a delay, changed in place to drop, then removed", async () => {
    writeFileSync(faultFile, '{"mode":"slow","delayMs":300}');
    await eventually(async () => (await timed(() => once("GET", "/status"))) >= 290, "status slowed");
    writeFileSync(faultFile, "drop");
    await eventually(async () => (await outcome("GET", "/status")) === "ECONNRESET", "status dropped");
    rmSync(faultFile);
    await eventually(async () => (await outcome("GET", "/status")) === "status 200", "status back");
    const quick = await timed(() => once("GET", "/status"));
    assert.ok(quick < 250, `status took ${quick} ms`);
  });

  void test("a file that is not a fault changes nothing and is reported in the log", async () => {
    writeFileSync(faultFile, "meltdown");
    await new Promise((r) => setTimeout(r, 250));
    await once("GET", "/status"); // the file is looked at when a request comes
    assert.equal((await c.request("GET", "/fault")).json().mode, "none");
    assert.match(gw.log(), /ignoring the fault trigger file/);
    rmSync(faultFile);
  });
});
