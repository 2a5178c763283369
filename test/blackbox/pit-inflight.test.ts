// Black-box test: a snapshot reply that waits in the socket while the primary is overwritten.
//
// A client (libnbd through nbdsh) sends several 1 MiB reads of snap@before and does not read the
// replies; the server sends what the socket takes and queues the rest. Another client then
// overwrites those blocks of the primary (each overwrite first journals the before-image). Only
// then are the replies read: they must hold the contents from before, byte for byte. This is the
// case that rules out sendfile(2) of the primary for snapshot replies: the kernel would still be
// holding the primary's page-cache pages when the overwrite lands in them.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { rmSync } from "node:fs";
import { join } from "node:path";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { mark, pastBoundary, py, snapUri } from "../helpers/pit.js";

void describe("a snapshot reply waiting in the socket while the primary changes", () => {
  let dir: string;
  let stateDir: string;
  let srv: ServerHandle;

  before(async () => {
    dir = scratchDir("blockfork-pit-inflight-");
    stateDir = join(dir, "state");
    srv = await startServer({ dir, size: "32M", args: ["--pit", "--state-dir", stateDir] });
    await pastBoundary(1000);
  });

  after(async () => {
    try {
      const r = await srv.stop();
      assert.deepEqual(r, { code: 0, signal: null }, `the server did not exit cleanly:\n${srv.log()}`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  void test("replies sent before the overwrite hold the old contents", { timeout: 120_000 }, async () => {
    // The "before" contents: a seeded pattern over the first 16 MiB, then a bookmark.
    await py(
      srv.uri,
      `
      h = connect()
      rnd = random.Random(7)
      old = rnd.randbytes(16 << 20)
      for off in range(0, len(old), 1 << 20):
          h.pwrite(old[off:off + (1 << 20)], off)
      h.flush()
      `,
    );
    await pastBoundary(1000);
    await mark(stateDir, "before");
    const r = await py(
      snapUri(srv, "before"),
      `
      import time
      rnd = random.Random(7)
      old = rnd.randbytes(16 << 20)
      h = connect()
      w = connect(os.environ["PRIMARY"])
      for rnd_ in range(3):
          # Twelve 1 MiB reads sent, their replies not read yet: some sit in the socket, the rest
          # wait in the server's queue.
          offs = [((rnd_ * 5 + i) % 16) << 20 for i in range(12)]
          bufs = [nbd.Buffer(1 << 20) for _ in offs]
          cookies = [h.aio_pread(b, o) for b, o in zip(bufs, offs)]
          time.sleep(0.5)
          # Overwrite every block those replies cover (the journal keeps the before-images).
          for o in sorted(set(offs)):
              w.pwrite(bytes([0xE0 + rnd_]) * (1 << 20), o)
          w.flush()
          for c in cookies:
              while not h.aio_command_completed(c):
                  h.poll(-1)
          for b, o in zip(bufs, offs):
              got = b.to_bytearray()
              if got != old[o:o + (1 << 20)]:
                  bad = next(i for i in range(len(got)) if got[i] != old[o + i])
                  raise SystemExit(f"round {rnd_}: snapshot read at {o} differs from the old contents at +{bad}: {got[bad]:#x} vs {old[o + bad]:#x}")
      print("ok")
      `,
      { PRIMARY: srv.uri },
    );
    assert.match(r.stdout, /ok/);
  });
});
