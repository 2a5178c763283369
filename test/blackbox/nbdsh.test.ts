// Black-box tests of `blockfork serve` through libnbd's Python binding (nbdsh): one test per
// command and flag, the error numbers the server promises, many requests in flight, read-only and
// block-size constrained exports, simple replies, and multi-conn. Each Python snippet uses the
// helpers of test/python/nbdcheck.py: server_error() proves with libnbd's debug stream that a bad
// request really reached the server (strict mode off) before comparing the errno.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ROOT, scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { nbdsh, run, type RunResult } from "../helpers/run.js";

const MiB = 1024 * 1024;

/** Stop a server and fail unless it exited cleanly (status 0): a crash during the tests shows up here. */
async function stopClean(srv: ServerHandle): Promise<void> {
  const r = await srv.stop();
  assert.deepEqual(r, { code: 0, signal: null }, `the server did not exit cleanly; its log:\n${srv.log()}`);
}
const PYLIB = join(ROOT, "test", "python");
const PRELUDE =
  'import os, sys, errno, random\nsys.path.insert(0, os.environ["PYLIB"])\nfrom nbdcheck import *\n';

/** Strip the common indentation of a template literal so Python sees column 0. */
function dedent(s: string): string {
  const lines = s.replace(/^\n/, "").split("\n");
  const indents = lines.filter((l) => l.trim() !== "").map((l) => /^ */.exec(l)![0].length);
  const cut = Math.min(...indents);
  return lines.map((l) => l.slice(cut)).join("\n");
}

/** Run a Python body (with nbdcheck's helpers) under nbdsh against `srv`; env adds variables. */
function py(
  srv: ServerHandle,
  body: string,
  env: Record<string, string> = {},
  uri = srv.uri,
): Promise<RunResult> {
  return nbdsh(uri, PRELUDE + dedent(body), {
    env: { PYLIB, VOL: srv.volume, ...env },
    timeoutMs: 60_000,
  });
}

function sha256(b: Buffer): string {
  return createHash("sha256").update(b).digest("hex");
}

void describe("nbdsh against a read-write export", () => {
  let srv: ServerHandle;
  const SIZE = 128 * MiB;
  /** Every test works in its own 4 MiB region so that they do not see each other's data. */
  const region = (n: number): string => String(n * 4 * MiB);

  before(async () => {
    srv = await startServer({ size: "128M" });
  });
  after(async () => {
    await stopClean(srv);
  });

  void test("pread and pwrite at unaligned offsets land at the right place in the volume", async () => {
    await py(
      srv,
      `
      R = int(os.environ["REGION"])
      h = connect()
      rnd = random.Random(1)
      spots = [(1, 1), (4095, 2), (4097, 4093), (65535, 65537), (MiB + 3, 100000), (3 * MiB - 1, 1)]
      written = {}
      for off, n in spots:
          data = rnd.randbytes(n)
          h.pwrite(data, R + off)
          written[off] = data
      fd = os.open(os.environ["VOL"], os.O_RDONLY)
      for off, data in written.items():
          got = h.pread(len(data), R + off)
          assert sha(got) == sha(data), "readback at +%d differs" % off
          assert sha(os.pread(fd, len(data), R + off)) == sha(data), "volume file at +%d differs" % off
      # One read spanning several writes and the zeroes between them.
      img = bytearray(3 * MiB)
      for off, data in written.items():
          img[off:off + len(data)] = data
      assert sha(h.pread(3 * MiB, R)) == sha(img)
      assert sha(os.pread(fd, 3 * MiB, R)) == sha(img)
      h.shutdown()
      `,
      { REGION: region(0) },
    );
  });

  void test("pwrite with FUA and flush succeed and the data is in the volume", async () => {
    await py(
      srv,
      `
      R = int(os.environ["REGION"])
      h = connect()
      assert h.can_fua() and h.can_flush()
      a = os.urandom(256 * 1024)
      h.pwrite(a, R + 12345, nbd.CMD_FLAG_FUA)
      b = os.urandom(777)
      h.pwrite(b, R + MiB + 1)
      h.flush()
      h.flush()  # a flush with nothing to flush succeeds too
      fd = os.open(os.environ["VOL"], os.O_RDONLY)
      assert sha(h.pread(len(a), R + 12345)) == sha(a)
      assert sha(os.pread(fd, len(a), R + 12345)) == sha(a)
      assert sha(os.pread(fd, len(b), R + MiB + 1)) == sha(b)
      h.shutdown()
      `,
      { REGION: region(1) },
    );
  });

  void test("trim punches a hole: block status shows it, reads give zeroes, the file frees blocks", async () => {
    await py(
      srv,
      `
      R = int(os.environ["REGION"])
      h = connect()
      data = os.urandom(MiB)
      h.pwrite(data, R)
      h.flush()
      expect_map(h, [(R, MiB, 0)], MiB, R)
      blocks = os.stat(os.environ["VOL"]).st_blocks
      h.trim(256 * 1024, R + 256 * 1024)
      expect_map(h, [(R, 256 * 1024, 0), (R + 256 * 1024, 256 * 1024, 3), (R + 512 * 1024, 512 * 1024, 0)], MiB, R)
      assert h.pread(256 * 1024, R + 256 * 1024) == bytes(256 * 1024)
      assert sha(h.pread(256 * 1024, R)) == sha(data[:256 * 1024])
      assert sha(h.pread(512 * 1024, R + 512 * 1024)) == sha(data[512 * 1024:])
      # 512 sectors of data; the extent tree may take one 4 KiB block more for the split extent.
      freed = blocks - os.stat(os.environ["VOL"]).st_blocks
      assert 504 <= freed <= 512, "trim freed %d sectors, expected 512" % freed
      # trim with FUA is allowed too
      h.trim(4096, R + MiB - 4096, nbd.CMD_FLAG_FUA)
      assert h.pread(4096, R + MiB - 4096) == bytes(4096)
      h.shutdown()
      `,
      { REGION: region(2) },
    );
  });

  void test("zero without NO_HOLE punches a hole and reads back zeroes", async () => {
    await py(
      srv,
      `
      R = int(os.environ["REGION"])
      h = connect()
      data = os.urandom(MiB)
      h.pwrite(data, R)
      h.flush()
      blocks = os.stat(os.environ["VOL"]).st_blocks
      h.zero(128 * 1024, R + 64 * 1024)
      assert h.pread(128 * 1024, R + 64 * 1024) == bytes(128 * 1024)
      assert sha(h.pread(64 * 1024, R)) == sha(data[:64 * 1024])
      assert sha(h.pread(MiB - 192 * 1024, R + 192 * 1024)) == sha(data[192 * 1024:])
      expect_map(h, [(R, 64 * 1024, 0), (R + 64 * 1024, 128 * 1024, 3), (R + 192 * 1024, MiB - 192 * 1024, 0)], MiB, R)
      freed = blocks - os.stat(os.environ["VOL"]).st_blocks
      assert 248 <= freed <= 256, "zero freed %d sectors, expected 256" % freed
      # unaligned zeroing: partial blocks are zeroed, not lost
      h.zero(1000, R + 300001)
      want = bytearray(data)
      want[64 * 1024:192 * 1024] = bytes(128 * 1024)
      want[300001:301001] = bytes(1000)
      assert sha(h.pread(MiB, R)) == sha(want)
      h.zero(4096, R + MiB - 4096, nbd.CMD_FLAG_FUA)
      want[MiB - 4096:] = bytes(4096)
      assert sha(h.pread(MiB, R)) == sha(want)
      h.shutdown()
      `,
      { REGION: region(3) },
    );
  });

  void test("zero with NO_HOLE keeps the blocks allocated and reads back zeroes", async () => {
    await py(
      srv,
      `
      R = int(os.environ["REGION"])
      h = connect()
      data = os.urandom(MiB)
      h.pwrite(data, R)
      h.flush()
      blocks = os.stat(os.environ["VOL"]).st_blocks
      h.zero(256 * 1024, R + 256 * 1024, nbd.CMD_FLAG_NO_HOLE)
      want = bytearray(data)
      want[256 * 1024:512 * 1024] = bytes(256 * 1024)
      assert sha(h.pread(MiB, R)) == sha(want)
      h.flush()
      after = os.stat(os.environ["VOL"]).st_blocks
      # Nothing deallocated (the extent tree may grow by a block when the extent is split).
      assert blocks <= after <= blocks + 8, "NO_HOLE zero changed the allocation: %d -> %d sectors" % (blocks, after)
      fd = os.open(os.environ["VOL"], os.O_RDONLY)
      assert sha(os.pread(fd, MiB, R)) == sha(want)
      h.shutdown()
      `,
      { REGION: region(4) },
    );
  });

  void test("zero with FAST_ZERO (with and without NO_HOLE) succeeds on a file", async () => {
    await py(
      srv,
      `
      R = int(os.environ["REGION"])
      h = connect()
      assert h.can_fast_zero()
      data = os.urandom(MiB)
      h.pwrite(data, R)
      h.zero(128 * 1024, R, nbd.CMD_FLAG_FAST_ZERO)
      h.zero(128 * 1024, R + 512 * 1024, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
      want = bytearray(data)
      want[0:128 * 1024] = bytes(128 * 1024)
      want[512 * 1024:640 * 1024] = bytes(128 * 1024)
      assert sha(h.pread(MiB, R)) == sha(want)
      h.shutdown()
      `,
      { REGION: region(5) },
    );
  });

  void test("cache succeeds and does not change the data", async () => {
    await py(
      srv,
      `
      R = int(os.environ["REGION"])
      h = connect()
      assert h.can_cache()
      data = os.urandom(2 * MiB)
      h.pwrite(data, R)
      h.cache(2 * MiB, R)
      h.cache(1, R + 17)
      h.cache(4 * MiB, R)  # past the written data, still inside the export
      assert sha(h.pread(2 * MiB, R)) == sha(data)
      h.shutdown()
      `,
      { REGION: region(6) },
    );
  });

  void test("block_status with and without REQ_ONE describes data and holes exactly", async () => {
    await py(
      srv,
      `
      R = int(os.environ["REGION"])
      h = connect()
      assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
      h.pwrite(os.urandom(64 * 1024), R + MiB)
      h.pwrite(os.urandom(8192), R + 2 * MiB)
      full = [(R, MiB, 3), (R + MiB, 64 * 1024, 0), (R + MiB + 64 * 1024, MiB - 64 * 1024, 3),
              (R + 2 * MiB, 8192, 0), (R + 2 * MiB + 8192, 2 * MiB - 8192, 3)]
      got = extents(h, 4 * MiB, R)
      assert got == full, "block status: %r" % got
      one = extents(h, 4 * MiB, R, nbd.CMD_FLAG_REQ_ONE)
      assert one == [(R, MiB, 3)], "REQ_ONE: %r" % one
      one = extents(h, 4 * MiB, R + MiB, nbd.CMD_FLAG_REQ_ONE)
      assert one == [(R + MiB, 64 * 1024, 0)], "REQ_ONE at data: %r" % one
      # A request that ends inside an extent is answered up to its end.
      one = extents(h, 4096, R + 4096, nbd.CMD_FLAG_REQ_ONE)
      assert one == [(R + 4096, 4096, 3)], "REQ_ONE short: %r" % one
      short = extents(h, 16384, R + MiB + 60 * 1024)
      assert short == [(R + MiB + 60 * 1024, 4096, 0), (R + MiB + 64 * 1024, 12288, 3)], "short: %r" % short
      h.shutdown()
      `,
      { REGION: region(7) },
    );
  });

  void test("structured reads send holes as OFFSET_HOLE and DF reads come in one chunk", async () => {
    await py(
      srv,
      `
      R = int(os.environ["REGION"])
      h = connect()
      data = os.urandom(64 * 1024)
      h.pwrite(data, R + MiB)
      want = bytearray(4 * MiB)
      want[MiB:MiB + 64 * 1024] = data

      def read_chunks(flags):
          chunks = []
          img = bytearray(4 * MiB)
          def cb(sub, off, status, err):
              chunks.append((off - R, len(sub), status))
              img[off - R:off - R + len(sub)] = sub
              return 0
          buf = h.pread_structured(4 * MiB, R, cb, flags)
          assert sha(buf) == sha(want), "read data differs"
          assert sha(img) == sha(want), "chunks do not add up to the data"
          covered = sorted(chunks)
          pos = 0
          for off, n, _ in covered:
              assert off == pos, "chunks leave a gap or overlap at %d: %r" % (pos, covered)
              pos += n
          assert pos == 4 * MiB
          return covered

      chunks = read_chunks(0)
      holes = [(o, n) for o, n, s in chunks if s == nbd.READ_HOLE]
      assert (0, MiB) in holes, "no OFFSET_HOLE for the leading hole: %r" % chunks
      assert any(s == nbd.READ_DATA and o <= MiB and o + n >= MiB + 64 * 1024 for o, n, s in chunks), chunks
      chunks = read_chunks(nbd.CMD_FLAG_DF)
      assert chunks == [(0, 4 * MiB, nbd.READ_DATA)], "DF read came in pieces: %r" % chunks
      h.shutdown()
      `,
      { REGION: region(8) },
    );
  });

  void test("256 aio reads and writes in flight at once, unaligned sizes, all correct", async () => {
    await py(
      srv,
      `
      R = int(os.environ["REGION"])
      N = 256
      SLOT = 64 * 1024
      h = connect()
      rnd = random.Random(7)
      order = list(range(N))
      rnd.shuffle(order)
      plan = []
      for slot in order:
          n = rnd.randint(1, SLOT - 1)
          off = R + slot * SLOT + rnd.randint(0, SLOT - n)
          plan.append((off, rnd.randbytes(n)))
      bufs = [nbd.Buffer.from_bytearray(bytearray(d)) for _, d in plan]
      cookies = [h.aio_pwrite(b, off) for b, (off, _) in zip(bufs, plan)]
      assert h.aio_in_flight() == N, "only %d writes in flight" % h.aio_in_flight()
      while h.aio_in_flight() > 0:
          h.poll(-1)
      for c in cookies:
          assert h.aio_command_completed(c)
      rbufs = [nbd.Buffer(len(d)) for _, d in plan]
      cookies = [h.aio_pread(b, off) for b, (off, _) in zip(rbufs, plan)]
      assert h.aio_in_flight() == N
      while h.aio_in_flight() > 0:
          h.poll(-1)
      for c in cookies:
          assert h.aio_command_completed(c)
      for b, (off, d) in zip(rbufs, plan):
          assert sha(b.to_bytearray()) == sha(d), "aio read at %d differs" % off
      # And mixed: reads of the first half while the second half is rewritten.
      fresh = [(off, rnd.randbytes(len(d))) for off, d in plan[N // 2:]]
      wbufs = [nbd.Buffer.from_bytearray(bytearray(d)) for _, d in fresh]
      rbufs = [nbd.Buffer(len(d)) for _, d in plan[:N // 2]]
      cookies = [h.aio_pread(b, off) for b, (off, _) in zip(rbufs, plan[:N // 2])]
      cookies += [h.aio_pwrite(b, off) for b, (off, _) in zip(wbufs, fresh)]
      while h.aio_in_flight() > 0:
          h.poll(-1)
      for c in cookies:
          assert h.aio_command_completed(c)
      for b, (off, d) in zip(rbufs, plan[:N // 2]):
          assert sha(b.to_bytearray()) == sha(d)
      for off, d in fresh:
          assert sha(h.pread(len(d), off)) == sha(d)
      h.shutdown()
      `,
      { REGION: region(9) }, // uses 16 MiB: regions 9..12
    );
  });

  void test("multi-conn: write on one connection, flush on a second, read on a third", async () => {
    await py(
      srv,
      `
      R = int(os.environ["REGION"])
      h1, h2, h3 = connect(), connect(), connect()
      for h in (h1, h2, h3):
          assert h.can_multi_conn()
      data = os.urandom(3 * MiB + 5)
      h1.pwrite(data, R + 7)
      h2.flush()
      assert sha(h3.pread(len(data), R + 7)) == sha(data)
      # and the other way round, overlapping what h1 wrote
      more = os.urandom(4096)
      h3.pwrite(more, R + MiB)
      h1.flush()
      want = bytearray(data)
      want[MiB - 7:MiB - 7 + 4096] = more
      assert sha(h2.pread(len(want), R + 7)) == sha(want)
      for h in (h1, h2, h3):
          h.shutdown()
      `,
      { REGION: region(13) },
    );
  });

  void test("with structured replies off, reads, writes and errors still work", async () => {
    await py(
      srv,
      `
      R = int(os.environ["REGION"])
      h = connect(strict=False, structured=False, meta=False)
      assert not h.get_structured_replies_negotiated()
      assert not h.can_df()
      data = os.urandom(MiB + 3)
      h.pwrite(data, R + 65537)
      want = bytearray(4 * MiB)
      want[65537:65537 + len(data)] = data
      # large reads over data and holes: no OFFSET_HOLE without structured replies
      assert sha(h.pread(4 * MiB, R)) == sha(want)
      assert sha(h.pread(100, R + 65537 + MiB - 50)) == sha(want[65537 + MiB - 50:65537 + MiB + 50])
      h.zero(4096, R + 65536 * 2)
      h.trim(65536, R + 512 * 1024)
      want[131072:131072 + 4096] = bytes(4096)
      want[512 * 1024:512 * 1024 + 65536] = bytes(65536)
      h.flush()
      assert sha(h.pread(4 * MiB, R)) == sha(want)
      size = h.get_size()
      server_error(h, errno.EINVAL, h.pread, 4096, size - 100)
      server_error(h, errno.ENOSPC, h.pwrite, bytes(4096), size - 100)
      server_error(h, errno.EINVAL, h.pread, 4096, 0, nbd.CMD_FLAG_DF)
      server_error(h, errno.EINVAL, h.block_status, 4096, 0, lambda *a: 0)
      assert sha(h.pread(4 * MiB, R)) == sha(want)
      h.shutdown()
      `,
      { REGION: region(14) },
    );
  });

  void test("errors: past the end, zero length, unknown flags, too long, no metadata context", async () => {
    await py(
      srv,
      `
      W = int(os.environ["REGION"])  # nothing is ever written here
      h = connect(strict=False)
      size = h.get_size()
      assert size == int(os.environ["SIZE"])
      cb = lambda *a: 0
      EINVAL, ENOSPC = errno.EINVAL, errno.ENOSPC
      # Reads, CACHE and BLOCK_STATUS past the end: EINVAL.
      server_error(h, EINVAL, h.pread, 4096, size - 2048)
      server_error(h, EINVAL, h.pread, 1, size)
      server_error(h, EINVAL, h.pread, 512, 1 << 62)
      server_error(h, EINVAL, h.pread, 4096, (1 << 64) - 2048)
      server_error(h, EINVAL, h.cache, 4096, size - 2048)
      server_error(h, EINVAL, h.cache, 1, size)
      server_error(h, EINVAL, h.block_status, 4096, size - 2048, cb)
      server_error(h, EINVAL, h.block_status, 1, size, cb)
      # TRIM past the end: EINVAL ("a read or trim request", proto.md).
      server_error(h, EINVAL, h.trim, 4096, size - 2048)
      server_error(h, EINVAL, h.trim, 4096, (1 << 64) - 2048)
      # WRITE and WRITE_ZEROES past the end: ENOSPC.
      server_error(h, ENOSPC, h.pwrite, os.urandom(4096), size - 2048)
      server_error(h, ENOSPC, h.pwrite, b"x", size)
      server_error(h, ENOSPC, h.pwrite, b"x" * 512, 1 << 62)
      server_error(h, ENOSPC, h.zero, 4096, size - 2048)
      server_error(h, ENOSPC, h.zero, 1, size, nbd.CMD_FLAG_NO_HOLE)
      # The part inside the export was not touched by the refused writes.
      assert h.pread(2048, size - 2048) == bytes(2048)
      # Zero-length requests: EINVAL.
      server_error(h, EINVAL, h.pread, 0, 0)
      server_error(h, EINVAL, h.pwrite, b"", 0)
      server_error(h, EINVAL, h.trim, 0, 0)
      server_error(h, EINVAL, h.zero, 0, 0)
      server_error(h, EINVAL, h.cache, 0, 0)
      server_error(h, EINVAL, h.block_status, 0, 0, cb)
      # Unknown or misplaced flags: EINVAL.
      server_error(h, EINVAL, h.pread, 4096, 0, 0x100)
      server_error(h, EINVAL, h.pread, 4096, 0, nbd.CMD_FLAG_REQ_ONE)
      server_error(h, EINVAL, h.pread, 4096, 0, nbd.CMD_FLAG_NO_HOLE)
      server_error(h, EINVAL, h.pwrite, b"y" * 4096, W, nbd.CMD_FLAG_NO_HOLE)
      server_error(h, EINVAL, h.pwrite, b"y" * 4096, W, nbd.CMD_FLAG_DF)
      server_error(h, EINVAL, h.pwrite, b"y" * 4096, W, 0x8000)
      server_error(h, EINVAL, h.flush, 0x100)
      server_error(h, EINVAL, h.trim, 4096, W, nbd.CMD_FLAG_NO_HOLE)
      server_error(h, EINVAL, h.trim, 4096, W, nbd.CMD_FLAG_FAST_ZERO)
      server_error(h, EINVAL, h.zero, 4096, W, nbd.CMD_FLAG_REQ_ONE)
      server_error(h, EINVAL, h.zero, 4096, W, nbd.CMD_FLAG_DF)
      server_error(h, EINVAL, h.cache, 4096, 0, nbd.CMD_FLAG_REQ_ONE)
      server_error(h, EINVAL, h.block_status, 4096, 0, cb, nbd.CMD_FLAG_NO_HOLE)
      server_error(h, EINVAL, h.block_status, 4096, 0, cb, 0x100)
      # The refused writes wrote nothing.
      assert h.pread(4096, W) == bytes(4096)
      # Longer than the maximum block size (default 32 MiB): EINVAL.
      assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
      server_error(h, EINVAL, h.pread, 32 * MiB + 1, 0)
      h.pread(32 * MiB, 0)
      h.shutdown()
      # BLOCK_STATUS without base:allocation negotiated: EINVAL.
      h = connect(strict=False, meta=False)
      assert h.get_structured_replies_negotiated()
      assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
      server_error(h, EINVAL, h.block_status, 4096, 0, cb)
      h.pread(4096, 0)
      h.shutdown()
      `,
      { SIZE: String(SIZE), REGION: region(31) },
    );
  });

  void test("refused large WRITEs (too long, past the end) are drained and the connection goes on", async () => {
    // libnbd reads replies while it is still sending a large payload; a reply that arrives before
    // the whole request was sent matches no command it knows, and it drops the connection.
    await py(
      srv,
      `
      R = int(os.environ["REGION"])
      h = connect(strict=False)
      before = h.pread(MiB, R)
      big = os.urandom(32 * MiB + 4096)
      server_error(h, errno.EINVAL, h.pwrite, big, R)
      server_error(h, errno.EINVAL, h.pwrite, big[:32 * MiB + 1], R)
      server_error(h, errno.ENOSPC, h.pwrite, big[:4 * MiB], h.get_size() - 2 * MiB)
      assert h.pread(MiB, R) == before, "the refused write changed the export"
      # The payload bytes were not taken for requests: the next commands work normally.
      data = os.urandom(32 * MiB)
      h.pwrite(data, R)
      assert sha(h.pread(32 * MiB, R)) == sha(data)
      # Interleave: a refused oversized write between aio requests.
      small = os.urandom(4096)
      c1 = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(small)), R)
      server_error(h, errno.EINVAL, h.pwrite, big, R)
      while h.aio_in_flight() > 0:
          h.poll(-1)
      assert h.aio_command_completed(c1)
      assert h.pread(4096, R) == small
      h.shutdown()
      `,
      { REGION: region(16) }, // 36 MiB: regions 16..25
    );
  });

  void test("reads and block status over 2048 extents (more than one extents call returns)", async () => {
    await py(
      srv,
      `
      R = int(os.environ["REGION"])
      h = connect()
      want = bytearray(8 * MiB)
      for i in range(0, 8 * MiB, 8192):
          d = os.urandom(4096)
          h.pwrite(d, R + i)
          want[i:i + 4096] = d
      assert sha(h.pread(8 * MiB, R)) == sha(want)
      img = bytearray(8 * MiB)
      def cb(sub, off, status, err):
          img[off - R:off - R + len(sub)] = sub
          return 0
      assert sha(h.pread_structured(8 * MiB, R, cb)) == sha(want)
      assert sha(img) == sha(want)
      expect_map(h, [(R + i, 4096, 0 if i % 8192 == 0 else 3) for i in range(0, 8 * MiB, 4096)], 8 * MiB, R)
      h.shutdown()
      `,
      { REGION: region(28) }, // 8 MiB: regions 28..29
    );
  });

  void test("FUA is accepted on every command once SEND_FUA is advertised", async () => {
    // proto.md: with NBD_FLAG_SEND_FUA the server MUST accept the bit on all commands.
    await py(
      srv,
      `
      W = int(os.environ["REGION"])
      h = connect(strict=False)
      F = nbd.CMD_FLAG_FUA
      data = os.urandom(8192)
      h.pwrite(data, W, F)
      assert h.pread(8192, W, F) == data
      assert h.pread(8192, W, F | nbd.CMD_FLAG_DF) == data
      h.cache(8192, W, F)
      h.flush(F)
      assert extents(h, 8192, W, F) == [(W, 8192, 0)]
      h.zero(4096, W, F | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
      h.trim(4096, W + 4096, F)
      assert h.pread(8192, W) == bytes(8192)
      h.shutdown()
      `,
      { REGION: region(26) },
    );
  });

  void test("old handshakes (newstyle without FIXED, with and without NO_ZEROES) reach the export", async () => {
    await py(
      srv,
      `
      R = int(os.environ["REGION"])
      for flags in (0, nbd.HANDSHAKE_FLAG_NO_ZEROES, nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE):
          h = nbd.NBD()
          h.set_handshake_flags(flags)
          h.connect_uri(os.environ["URI"])
          want = "newstyle-fixed" if flags & nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE else "newstyle"
          assert h.get_protocol() == want, (flags, h.get_protocol())
          assert h.get_size() == int(os.environ["SIZE"])
          assert h.can_trim() and h.can_flush() and h.can_multi_conn() and not h.is_read_only()
          d = os.urandom(5000)
          h.pwrite(d, R + 12345 + flags)
          assert h.pread(5000, R + 12345 + flags) == d
          h.shutdown()
      # EXPORT_NAME with the export's own name works too.
      h = nbd.NBD()
      h.set_handshake_flags(0)
      h.connect_uri(os.environ["URI_NAMED"])
      assert h.get_size() == int(os.environ["SIZE"])
      h.shutdown()
      `,
      { REGION: region(27), SIZE: String(SIZE), URI_NAMED: srv.uriFor("disk") },
    );
  });

  void test("option mode: LIST, INFO, LIST_META_CONTEXT, then GO", async () => {
    await py(
      srv,
      `
      h = nbd.NBD()
      h.set_opt_mode(True)
      h.connect_uri(os.environ["URI"])
      listed = []
      n = h.opt_list(lambda name, desc: listed.append((name, desc)) or 0)
      assert n == 1 and listed == [("disk", "file " + os.environ["VOL"])], listed
      ctxs = []
      h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
      assert ctxs == ["base:allocation"], ctxs
      h.set_export_name("no-such-export")
      try:
          h.opt_info()
          raise AssertionError("INFO for an unknown export succeeded")
      except nbd.Error:
          pass
      h.set_export_name("disk")
      h.set_full_info(True)
      h.opt_info()
      assert h.get_size() == int(os.environ["SIZE"])
      assert h.get_canonical_export_name() == "disk"
      assert h.get_export_description() == "file " + os.environ["VOL"]
      h.opt_go()
      assert h.aio_is_ready()
      h.pread(512, 0)
      h.shutdown()
      `,
      { SIZE: String(SIZE) },
    );
  });

  void test("export size and canonical name over the wire", async () => {
    const r = await py(
      srv,
      `
      h = nbd.NBD()
      h.set_full_info(True)
      h.connect_uri(os.environ["URI"])
      print(h.get_size())
      print(h.get_canonical_export_name())
      h.shutdown()
      `,
    );
    assert.deepEqual(r.stdout.trim().split("\n"), [String(SIZE), "disk"]);
  });
});

void describe("nbdsh against a --read-only export", () => {
  let srv: ServerHandle;
  let image: Buffer;
  const dir = scratchDir();
  const volume = join(dir, "ro.img");

  before(async () => {
    image = Buffer.alloc(16 * MiB);
    randomBytes(4 * MiB).copy(image, 0);
    randomBytes(MiB).copy(image, 9 * MiB);
    writeFileSync(volume, image);
    srv = await startServer({ dir, volume, size: null, args: ["--read-only"] });
  });
  after(async () => {
    try {
      await stopClean(srv);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  void test("advertises read-only without trim, zero or FUA, and serves the file's data", async () => {
    await py(
      srv,
      `
      h = connect()
      assert h.is_read_only()
      assert not h.can_trim() and not h.can_zero() and not h.can_fua() and not h.can_fast_zero()
      assert h.get_size() == 16 * MiB
      fd = os.open(os.environ["VOL"], os.O_RDONLY)
      for off, n in [(0, 4 * MiB), (12345, 678), (9 * MiB - 1, MiB + 2), (0, 16 * MiB)]:
          assert sha(h.pread(n, off)) == sha(os.pread(fd, n, off)), "read at %d differs from the file" % off
      h.flush()
      h.cache(MiB, 0)
      got = extents(h, 16 * MiB, 0)
      assert got[0][0] == 0 and got[0][2] == 0, got
      h.shutdown()
      `,
    );
  });

  void test("refuses every write-type command with EPERM and the file stays unchanged", async () => {
    await py(
      srv,
      `
      h = connect(strict=False)
      before = h.pread(4 * MiB, 0)
      server_error(h, errno.EPERM, h.pwrite, os.urandom(4096), 0)
      server_error(h, errno.EPERM, h.pwrite, b"z", 12345)
      server_error(h, errno.EPERM, h.trim, MiB, 0)
      server_error(h, errno.EPERM, h.zero, MiB, 0)
      server_error(h, errno.EPERM, h.zero, MiB, 0, nbd.CMD_FLAG_NO_HOLE)
      assert h.pread(4 * MiB, 0) == before
      h.pread(1, 0)
      h.shutdown()
      `,
    );
    assert.equal(sha256(readFileSync(volume)), sha256(image));
  });

  void test("a refused 4 MiB WRITE gets EPERM and the connection goes on", async () => {
    await py(
      srv,
      `
      h = connect(strict=False)
      server_error(h, errno.EPERM, h.pwrite, os.urandom(4 * MiB), 0)
      assert sha(h.pread(4 * MiB, 0)) == sha(os.pread(os.open(os.environ["VOL"], os.O_RDONLY), 4 * MiB, 0))
      h.shutdown()
      `,
    );
    assert.equal(sha256(readFileSync(volume)), sha256(image));
  });
});

void describe("nbdsh against --block-size 512,4096,1048576", () => {
  let srv: ServerHandle;

  before(async () => {
    srv = await startServer({ size: "64M", args: ["--block-size", "512,4096,1048576"] });
  });
  after(async () => {
    await stopClean(srv);
  });

  void test("advertises the block sizes", async () => {
    await py(
      srv,
      `
      h = connect()
      got = [h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)]
      assert got == [512, 4096, MiB], got
      h.shutdown()
      `,
    );
  });

  void test("rejects requests not aligned to 512 with EINVAL", async () => {
    await py(
      srv,
      `
      h = connect(strict=False)
      cb = lambda *a: 0
      EINVAL = errno.EINVAL
      for off, n in [(0, 100), (100, 512), (256, 1024), (512, 513)]:
          server_error(h, EINVAL, h.pread, n, off)
          server_error(h, EINVAL, h.pwrite, os.urandom(n), off)
          server_error(h, EINVAL, h.trim, n, off)
          server_error(h, EINVAL, h.zero, n, off)
          server_error(h, EINVAL, h.cache, n, off)
          server_error(h, EINVAL, h.block_status, n, off, cb)
      assert h.pread(4096, 0) == bytes(4096), "a refused write changed the export"
      h.shutdown()
      `,
    );
  });

  void test("rejects reads longer than 1 MiB with EINVAL", async () => {
    await py(
      srv,
      `
      h = connect(strict=False)
      server_error(h, errno.EINVAL, h.pread, MiB + 512, 0)
      server_error(h, errno.EINVAL, h.pread, 2 * MiB, 0)
      server_error(h, errno.EINVAL, h.pread, 64 * MiB, 0)
      h.pread(MiB, 0)
      h.shutdown()
      `,
    );
  });

  void test("rejects writes longer than 1 MiB with EINVAL and keeps the connection", async () => {
    await py(
      srv,
      `
      h = connect(strict=False)
      server_error(h, errno.EINVAL, h.pwrite, os.urandom(MiB + 512), 0)
      server_error(h, errno.EINVAL, h.pwrite, os.urandom(4 * MiB), MiB)
      assert h.pread(MiB, 0) == bytes(MiB)
      assert h.pread(MiB, MiB) == bytes(MiB)
      h.shutdown()
      `,
    );
  });

  void test("accepts aligned requests up to the maximum, and trim/zero beyond it", async () => {
    await py(
      srv,
      `
      h = connect()
      a = os.urandom(512)
      h.pwrite(a, 3 * 512)
      b = os.urandom(MiB)
      h.pwrite(b, 8 * MiB)
      assert h.pread(512, 3 * 512) == a
      assert sha(h.pread(MiB, 8 * MiB)) == sha(b)
      h.cache(512, 512)
      c = os.urandom(8 * MiB)
      for i in range(8):
          h.pwrite(c[i * MiB:(i + 1) * MiB], 16 * MiB + i * MiB)
      h.trim(4 * MiB, 16 * MiB)
      h.zero(2 * MiB, 20 * MiB + 512)
      want = bytearray(c)
      want[0:4 * MiB] = bytes(4 * MiB)
      want[4 * MiB + 512:6 * MiB + 512] = bytes(2 * MiB)
      got = b"".join(h.pread(MiB, 16 * MiB + i * MiB) for i in range(8))
      assert sha(got) == sha(want)
      ext = extents(h, 4 * MiB, 16 * MiB)
      assert ext[0] == (16 * MiB, 4 * MiB, 3), ext
      h.shutdown()
      `,
    );
  });
});

void describe("nbdsh against --block-size 65536,65536,33554432 over a file with a small hole", () => {
  // proto.md: block status descriptor lengths are "an integer multiple of any advertised minimum
  // block size"; the file's holes are 4 KiB filesystem blocks.
  let srv: ServerHandle;
  const dir = scratchDir();
  const volume = join(dir, "holes.img");

  before(async () => {
    writeFileSync(volume, randomBytes(4 * MiB));
    await run("fallocate", ["-p", "-o", "4096", "-l", "8192", volume]); // a hole inside block 0
    await run("fallocate", ["-p", "-o", String(MiB), "-l", String(MiB), volume]); // 16 whole blocks
    srv = await startServer({ volume, size: null, dir, args: ["--block-size", "65536,65536,33554432"] });
  });
  after(async () => {
    await stopClean(srv);
    rmSync(dir, { recursive: true, force: true });
  });

  void test("every descriptor is a multiple of 64 KiB; mixed blocks are data, whole hole blocks holes", async () => {
    await py(
      srv,
      `
      h = connect()
      assert h.get_block_size(nbd.SIZE_MINIMUM) == 65536
      for req_one in (0, nbd.CMD_FLAG_REQ_ONE):
          got = []
          h.block_status(4 * MiB, 0, lambda meta, off, ents, err: got.extend(ents) or 0, req_one)
          lengths = got[0::2]
          assert all(n % 65536 == 0 for n in lengths), (req_one, got)
          if req_one:
              assert got == [MiB, 0], got
          else:
              assert got == [MiB, 0, MiB, 3, 2 * MiB, 0], got
      h.shutdown()
      `,
    );
  });
});

void describe("nbdsh: a connection ends when the client ends it", () => {
  // With --max-connections 1 the next client is admitted only once the server has let go of the
  // previous connection. A close races with the next connect, so each attempt gets 2 s of retries;
  // a server that holds the connection until some grace timer expires fails here.
  const admitNext = (disc: boolean): string => `
      import time
      for i in range(4):
          deadline = time.monotonic() + 2
          while True:
              try:
                  h = connect()
                  break
              except nbd.Error as e:
                  assert time.monotonic() < deadline, "connection %d not admitted within 2 s: %s" % (i, e.string)
                  time.sleep(0.05)
          d = os.urandom(4096)
          h.pwrite(d, i * 4096)
          assert h.pread(4096, i * 4096) == d
          ${disc ? "h.shutdown()  # NBD_CMD_DISC" : "pass  # no DISC: deleting the handle closes the socket"}
          del h
      `;

  /** Run `fn` against a fresh server; a failure of `fn` is reported before any failure to stop. */
  async function withServer(args: string[], fn: (srv: ServerHandle) => Promise<unknown>): Promise<void> {
    const srv = await startServer({ size: "16M", args });
    let ok = false;
    try {
      await fn(srv);
      ok = true;
    } finally {
      if (ok) await stopClean(srv);
      else await srv.stop();
    }
  }

  void test("after NBD_CMD_DISC", async () => {
    await withServer(["--max-connections", "1"], (srv) => py(srv, admitNext(true)));
  });

  void test("after a close without DISC", async () => {
    await withServer(["--max-connections", "1"], (srv) => py(srv, admitNext(false)));
  });
});
