// Large trims and zero writes on a PIT-journaled volume (what mkfs, blkdiscard and fstrim send):
// a 768 MiB volume with some data; WRITE_ZEROES of 600 MiB (may trim), TRIM of the whole volume and
// WRITE_ZEROES with NO_HOLE of 600 MiB. Each request must succeed, the server must keep serving,
// and the reference points taken between them (sha256 of the whole volume) must stay exact.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { rmSync } from "node:fs";
import { scratchDir, startServer } from "../helpers/server.js";
import { exportSha, pastBoundary, py, recordPoint, snapUri, type PitPoint } from "../helpers/pit.js";

const W = 1000;
const cleanups: (() => Promise<unknown>)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

void test("zero and trim requests of hundreds of MiB on a --pit server", { timeout: 150_000 }, async () => {
  const dir = scratchDir("blockfork-pit-large-");
  cleanups.push(() => Promise.resolve(rmSync(dir, { recursive: true, force: true })));
  const srv = await startServer({ dir, size: "768M", args: ["--pit", "--state-dir", `${dir}/state`] });
  cleanups.push(() => srv.stop("SIGKILL"));
  await pastBoundary(W);
  const points: PitPoint[] = [];

  const step = async (label: string, code: string): Promise<void> => {
    try {
      await py(srv.uri, `h = connect()\n${code}\nh.shutdown()\n`);
    } catch (e) {
      const state =
        srv.proc.exitCode !== null ? `the server exited (${srv.proc.exitCode})` : "the server runs";
      throw new Error(`${label}: ${(e as Error).message}\n${state}; its log:\n${srv.log().slice(-3000)}`);
    }
    points.push(await recordPoint(srv, label, W));
  };
  await step(
    "data",
    "for i in range(32):\n    h.pwrite(os.urandom(MiB), 100 * MiB + i * 3 * MiB)\nh.pwrite(os.urandom(MiB), 700 * MiB)",
  );
  await step("zero-600M", "h.zero(600 * MiB, 64 * MiB)");
  await step("data-again", "for i in range(16):\n    h.pwrite(os.urandom(MiB), 200 * MiB + i * 5 * MiB)");
  await step("trim-all", "h.trim(h.get_size(), 0)");
  await step("data-3", "h.pwrite(os.urandom(8 * MiB), 0)\nh.pwrite(os.urandom(8 * MiB), 500 * MiB)");
  await step("zero-600M-no-hole", "h.zero(600 * MiB, 4 * MiB, nbd.CMD_FLAG_NO_HOLE)");
  assert.equal(new Set(points.map((p) => p.sha)).size, points.length, "a step changed nothing");
  const got: string[] = [];
  for (const p of points) got.push(`${p.label} ${await exportSha(snapUri(srv, p.iso))}`);
  assert.deepEqual(
    got,
    points.map((p) => `${p.label} ${p.sha}`),
  );
  const r = await srv.stop();
  assert.deepEqual(r, { code: 0, signal: null }, `server exit:\n${srv.log()}`);
});
