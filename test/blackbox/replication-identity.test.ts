// Black-box: the proxy replicates to the secondary its tracking log describes, and to no other.
// - The gateway restarted over another secondary (an empty file replacing the old one at the same
//   path; then a new state directory as well): the proxy sees the new secondary id, resyncs the
//   whole volume, and the files end equal. Before, it resynced nothing and called them in sync.
// - The proxy's state directory restored from a copy (a backup taken two runs ago): the gateway
//   refuses the reused generation, the proxy moves past it and resyncs the whole volume, and the
//   files end equal. Before, the gateway dropped the new writes as duplicates and the proxy cleared
//   their blocks.

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { execFileSync } from "node:child_process";
import { rmSync } from "node:fs";
import { join } from "node:path";
import { sha256File, startPair, writeThroughNbd } from "../helpers/replication.js";

const MiB = 1024 * 1024;

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
