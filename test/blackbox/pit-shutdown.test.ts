// Black-box test: snapshot replies still queued when the server is told to stop (SIGTERM).
//
// A client sends sixteen 1 MiB reads of snap@before, whose blocks have all been overwritten since
// (so the replies are lent as journal images), and does not read the replies. The server gets
// SIGTERM; only then does the client read. The journal's segment files must stay open until the
// connections are closed: when the journal closed first, sending a queued reply read a closed
// descriptor (EBADF) and the process died (exit 1). Every reply must arrive and hold the old
// contents, and the server must exit 0. (Before the stream was ended only once the reply queue had
// handed everything over, a graceful close cut off some of the queued replies: 3 of 16 here.)

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { rmSync } from "node:fs";
import { join } from "node:path";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { mark, pastBoundary, py, snapUri } from "../helpers/pit.js";

void describe("a snapshot reply queued when the server stops", () => {
  let dir: string;
  let stateDir: string;
  let srv: ServerHandle;

  before(async () => {
    dir = scratchDir("blockfork-pit-shutdown-");
    stateDir = join(dir, "state");
    // The server takes every request of the test at once (it stops reading requests while over
    // 2 MiB of replies are queued, and does not answer the unread ones when it stops).
    srv = await startServer({
      dir,
      size: "32M",
      args: ["--pit", "--state-dir", stateDir],
      env: { ...process.env, BF_MAX_QUEUED: String(64 << 20) },
    });
    await pastBoundary(1000);
  });

  after(() => rmSync(dir, { recursive: true, force: true }));

  void test(
    "is sent whole, with the old contents, before the journal closes",
    { timeout: 120_000 },
    async () => {
      await py(
        srv.uri,
        `
      h = connect()
      old = random.Random(7).randbytes(16 << 20)
      for off in range(0, len(old), 1 << 20):
          h.pwrite(old[off:off + (1 << 20)], off)
      h.flush()
      `,
      );
      await pastBoundary(1000);
      await mark(stateDir, "before");
      await py(srv.uri, `h = connect(); h.pwrite(b"\\xee" * (16 << 20), 0); h.flush()`);
      const r = await py(
        snapUri(srv, "before"),
        `
      import signal, time
      old = random.Random(7).randbytes(16 << 20)
      h = connect()
      offs = [i << 20 for i in range(16)]
      bufs = [nbd.Buffer(1 << 20) for _ in offs]
      cookies = [h.aio_pread(b, o) for b, o in zip(bufs, offs)]
      time.sleep(0.5)  # the server has lent them all; the socket holds a few, the rest are queued
      os.kill(int(os.environ["SERVER_PID"]), signal.SIGTERM)
      time.sleep(1.0)  # the server shuts down meanwhile, as far as it goes without us
      # Every reply arrives (a failed command raises nbd.Error: the script fails) and is old data.
      for c, b, o in zip(cookies, bufs, offs):
          while not h.aio_command_completed(c):
              h.poll(-1)
          assert b.to_bytearray() == old[o:o + (1 << 20)], f"the snapshot read at {o} is not the old contents"
      print(f"all {len(offs)} replies hold the old contents")
      `,
        { SERVER_PID: String(srv.proc.pid) },
      );
      assert.match(
        r.stdout,
        /^all 16 replies hold the old contents$/m,
        `${r.stdout}${r.stderr}\n${srv.log()}`,
      );
      const exit = await srv.stop();
      assert.deepEqual(exit, { code: 0, signal: null }, `the server did not exit cleanly:\n${srv.log()}`);
    },
  );
});
