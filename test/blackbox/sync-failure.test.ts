// A primary whose write-back fails: a loop device over a sparse 64 MiB file on a 4 MiB tmpfs, so
// the kernel cannot write back most of what the page cache accepted. Linux reports the error to
// one fdatasync and may drop the pages; the next fdatasync succeeds without them. The server must
// answer that FLUSH, and every later one, with EIO (never as if the writes were durable), keep
// serving reads and other connections, and say in its log what to do.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { rmSync, truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { nbdsh, run } from "../helpers/run.js";

void describe("a primary whose write-back fails", () => {
  let dir = "";
  let mnt = "";
  let dev = "";
  let srv: ServerHandle | null = null;

  before(async () => {
    dir = scratchDir("blockfork-syncfail-");
    mnt = join(dir, "tmpfs");
    await run("mkdir", [mnt]);
    await run("mount", ["-t", "tmpfs", "-o", "size=4m", "tmpfs", mnt]);
    const backing = join(mnt, "backing.img");
    writeFileSync(backing, "");
    truncateSync(backing, 64 * 1024 * 1024);
    dev = (await run("losetup", ["--find", "--show", backing])).stdout.trim();
    assert.match(dev, /^\/dev\/loop\d+$/);
    srv = await startServer({ volume: dev, size: null, dir, keepDir: true });
  });

  after(async () => {
    try {
      if (srv) await srv.stop();
    } finally {
      try {
        if (dev) await run("losetup", ["-d", dev]);
      } finally {
        try {
          if (mnt) await run("umount", [mnt]);
        } finally {
          rmSync(dir, { recursive: true, force: true });
        }
      }
    }
  });

  void test("the failed FLUSH and every later FLUSH and FUA write answer EIO; reads and other clients go on", async () => {
    const r = await nbdsh(
      srv!.uri,
      `
import errno, os
MiB = 1024 * 1024
def attempt(what, f):
    try:
        f()
        print(what, "ok")
    except nbd.Error as e:
        print(what, errno.errorcode.get(e.errnum, e.errnum))
h = nbd.NBD()
h.connect_uri(os.environ["URI"])
for i in range(8):
    h.pwrite(b"\\xab" * MiB, (8 + i) * MiB)
attempt("FLUSH1", lambda: h.flush())
attempt("FLUSH2", lambda: h.flush())
attempt("FUA", lambda: h.pwrite(b"\\xcd" * 4096, 0, nbd.CMD_FLAG_FUA))
attempt("READ", lambda: h.pread(4096, 8 * MiB))
h.shutdown()
g = nbd.NBD()
g.connect_uri(os.environ["URI"])
attempt("OTHER-FLUSH", lambda: g.flush())
attempt("OTHER-READ", lambda: g.pread(4096, 0))
g.shutdown()
`,
    );
    assert.equal(r.code, 0, r.stdout + r.stderr);
    // Without the sticky failure, FLUSH2 answered ok: the client was told its lost writes were durable.
    assert.match(r.stdout, /^FLUSH1 EIO$/m, r.stdout);
    assert.match(r.stdout, /^FLUSH2 EIO$/m, r.stdout);
    assert.match(r.stdout, /^FUA EIO$/m, r.stdout);
    assert.match(r.stdout, /^READ ok$/m, r.stdout);
    assert.match(r.stdout, /^OTHER-FLUSH EIO$/m, r.stdout);
    assert.match(r.stdout, /^OTHER-READ ok$/m, r.stdout);
    assert.match(srv!.log(), /an earlier sync failed .*check the storage, then restart/);
  });
});
