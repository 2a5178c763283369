// A full disk under `blockfork gateway`: the secondary is a sparse 64 MiB file on a 16 MiB tmpfs
// mounted for the test (root needed) with a filler file taking half of it. A batch that does not
// fit answers 507 ERR_NO_SPACE and acknowledges nothing; the gateway keeps serving health (503
// with the reason, then 200 once a write succeeds), status and writes that need no new space; once
// the filler is removed, the same batch resent applies. Then the gateway's --state-dir on a full
// tmpfs of its own: updates still apply, a flush answers 507 naming the state directory (not the
// secondary), health says why, and once space is freed the flush succeeds.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { KIND, type UpdateRecord } from "../../src/gateway/records.js";
import { startGateway, type GatewayHandle, unboot } from "../helpers/gateway.js";
import { mountTmpfs, scratchDir } from "../helpers/server.js";

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const NAME = "sec";
const ID = { source: "f011", generation: 1, size: SIZE };

let dir: string;
let mnt: string;
let unmount: (() => void) | undefined;
let gw: GatewayHandle | undefined;

before(() => {
  dir = scratchDir("blockfork-gw-full-");
  mnt = join(dir, "mnt");
  unmount = mountTmpfs(mnt, "16m");
  writeFileSync(join(mnt, "filler"), Buffer.alloc(8 * MiB, 1));
});

after(async () => {
  await gw?.stop("SIGKILL");
  unmount?.();
  rmSync(dir, { recursive: true, force: true });
});

function w(seq: number, offset: number, data: Buffer): UpdateRecord {
  return { kind: KIND.WRITE, seq, period: 0, offset, length: data.length, data };
}

void describe("gateway on a full disk", () => {
  void test("507 ERR_NO_SPACE, nothing acknowledged, the gateway keeps serving, a resend applies after space is freed", async () => {
    gw = await startGateway({ dir, volume: join(mnt, "sec.img"), stateDir: join(dir, "state") });
    const c = gw.client;
    const first = await c.updates(NAME, ID, [w(1, 0, Buffer.alloc(MiB, 1))]);
    assert.equal(first.status, 200, first.body.toString());

    // 10 MiB more do not fit in the 7 MiB left.
    const batch: UpdateRecord[] = [];
    for (let i = 0; i < 10; i++) batch.push(w(2 + i, (8 + i) * MiB, Buffer.alloc(MiB, 2 + i)));
    const full = await c.updates(NAME, ID, batch);
    assert.equal(full.status, 507, full.body.toString());
    const err = full.json<{ error: { code: string; message: string } }>().error;
    assert.equal(err.code, "ERR_NO_SPACE");
    assert.match(err.message, /ENOSPC/);

    const st = (await c.request("GET", "/status")).json<{
      sources: { source: string; appliedThrough: number; outOfOrder: number }[];
      counters: { errors: number };
    }>();
    const s = st.sources.find((x) => x.source === ID.source)!;
    assert.deepEqual([s.appliedThrough, s.outOfOrder], [1, 0], "nothing of the failed batch is acknowledged");
    assert.ok(st.counters.errors >= 1);

    const health = await c.request("GET", "/health");
    assert.equal(health.status, 503, "health says the gateway cannot apply updates right now");
    assert.match(health.json<{ reason: string }>().reason, /ENOSPC/);

    // A write over blocks already allocated needs no space: it works, and health recovers.
    const over = await c.updates(NAME, ID, [w(99, 0, Buffer.alloc(4096, 9))]);
    assert.equal(over.status, 200, over.body.toString());
    assert.equal((await c.request("GET", "/health")).status, 200);
    assert.equal((await c.flush(NAME, ID)).json().durableThrough, 1);

    // The same batch again: still full.
    assert.equal((await c.updates(NAME, ID, batch)).status, 507);
    // The operator frees space; the proxy resends; everything applies.
    rmSync(join(mnt, "filler"));
    const retry = await c.updates(NAME, ID, batch);
    assert.equal(retry.status, 200, retry.body.toString());
    assert.deepEqual(unboot(retry.json()), {
      applied: 10,
      duplicates: 0,
      appliedThrough: 11,
      durableThrough: 1,
    });
    const d = await c.data(NAME, 17 * MiB, MiB);
    assert.ok(d.body.every((b) => b === 11));
    const exit = await gw.stop();
    assert.deepEqual(exit, { code: 0, signal: null }, gw.log());
  });
});

void describe("gateway with its state directory on a full disk", () => {
  void test("updates apply, a flush answers 507 naming the state directory, health says why; freed, the flush succeeds", async () => {
    const stateMnt = join(dir, "statefs");
    const unmountState = mountTmpfs(stateMnt, "1m");
    try {
      const stateDir = join(stateMnt, "state");
      const g = await startGateway({ dir, volume: join(dir, "sec2.img"), stateDir });
      try {
        const c = g.client;
        // The source's first update makes it the secondary's owner, which is written down first:
        // that needs the room. Later updates need none.
        assert.equal((await c.updates("sec2", ID, [w(1, 0, Buffer.alloc(4096, 1))])).status, 200);
        try {
          execFileSync("dd", ["if=/dev/zero", `of=${join(stateMnt, "filler")}`, "bs=4k"], {
            stdio: "ignore",
          });
        } catch {
          // dd stops at ENOSPC: that is the point
        }
        const up = await c.updates("sec2", ID, [w(2, 0, Buffer.alloc(MiB, 1))]);
        assert.equal(up.status, 200, "applying updates needs no room in the state directory");
        const fl = await c.flush("sec2", ID);
        assert.equal(fl.status, 507, fl.body.toString());
        const err = fl.json<{ error: { code: string; message: string } }>().error;
        assert.equal(err.code, "ERR_NO_SPACE");
        assert.match(err.message, new RegExp(`state directory ${stateDir} is full .*free space there`));
        assert.doesNotMatch(err.message, /secondary's storage/);
        const health = await c.request("GET", "/health");
        assert.equal(health.status, 503);
        assert.match(health.json<{ reason: string }>().reason, /writing the state file failed: .*ENOSPC/);
        assert.match(g.log(), /writing the state file in the state directory .* failed: .*ENOSPC/);

        rmSync(join(stateMnt, "filler"));
        const again = await c.flush("sec2", ID);
        assert.equal(again.status, 200, again.body.toString());
        assert.equal(again.json<{ durableThrough: number }>().durableThrough, 2);
        assert.equal((await c.request("GET", "/health")).status, 200);
      } finally {
        await g.stop("SIGKILL");
      }
    } finally {
      unmountState();
    }
  });
});
