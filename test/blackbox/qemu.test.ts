// Black-box tests of `blockfork serve` with qemu's NBD client: qemu-img (convert in and out,
// compare, map, info) and qemu-io (aio writes with patterns, flush, write -z with and without
// unmap, discard, read -v, small unaligned writes). Data is checked twice: by qemu reading it back
// through the server, and by reading the volume file behind the server.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import {
  closeSync,
  ftruncateSync,
  openSync,
  readFileSync,
  readSync,
  rmSync,
  statSync,
  writeSync,
} from "node:fs";
import { join } from "node:path";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { run, type RunResult } from "../helpers/run.js";

const MiB = 1024 * 1024;

/** Stop a server and fail unless it exited cleanly (status 0): a crash during the tests shows up here. */
async function stopClean(srv: ServerHandle): Promise<void> {
  const r = await srv.stop();
  assert.deepEqual(r, { code: 0, signal: null }, `the server did not exit cleanly; its log:\n${srv.log()}`);
}

function sha256(b: Buffer): string {
  return createHash("sha256").update(b).digest("hex");
}

/** Run qemu-io on the export with one -c per command; any failed command fails the test. */
function qemuIo(uri: string, cmds: string[]): Promise<RunResult> {
  return run("qemu-io", ["-f", "raw", uri, ...cmds.flatMap((c) => ["-c", c])], { timeoutMs: 60_000 });
}

/** One run of `qemu-img map --output=json`, adjacent entries of the same kind merged. */
interface MapEntry {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

async function qemuMap(uri: string): Promise<MapEntry[]> {
  const r = await run("qemu-img", ["map", "-f", "raw", "--output=json", uri], { timeoutMs: 60_000 });
  const out: MapEntry[] = [];
  for (const e of JSON.parse(r.stdout) as MapEntry[]) {
    const last = out[out.length - 1];
    if (last && last.data === e.data && last.zero === e.zero && last.start + last.length === e.start) {
      last.length += e.length;
    } else out.push({ start: e.start, length: e.length, data: e.data, zero: e.zero });
  }
  return out;
}

/** The part of a map inside [start, start+length), clipped. */
function clip(m: MapEntry[], start: number, length: number): MapEntry[] {
  const end = start + length;
  return m
    .filter((e) => e.start < end && e.start + e.length > start)
    .map((e) => {
      const s = Math.max(e.start, start);
      return { start: s, length: Math.min(e.start + e.length, end) - s, data: e.data, zero: e.zero };
    });
}

const DATA = { data: true, zero: false };
const HOLE = { data: false, zero: true };

/** Bytes of the volume file behind the server. */
function fileBytes(path: string, offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  const fd = openSync(path, "r");
  try {
    const n = readSync(fd, b, 0, length, offset);
    assert.equal(n, length);
  } finally {
    closeSync(fd);
  }
  return b;
}

/** Parse `read -v` output (lines "00100000:  11 22 ...  ascii") into bytes. */
function parseDump(stdout: string, offset: number, length: number): Buffer {
  const bytes: number[] = [];
  let expect = offset;
  for (const line of stdout.split("\n")) {
    const m = /^([0-9a-f]{8,}):\s+((?:[0-9a-f]{2} )+)/.exec(line);
    if (!m) continue;
    assert.equal(parseInt(m[1], 16), expect, `dump line at the wrong offset: ${line}`);
    const row = m[2].trim().split(" ");
    for (const h of row) bytes.push(parseInt(h, 16));
    expect += row.length;
  }
  assert.equal(bytes.length, length, `read -v dumped ${bytes.length} bytes, wanted ${length}`);
  return Buffer.from(bytes);
}

void describe("qemu-img against blockfork", () => {
  let srv: ServerHandle;
  let dir: string;
  let src: string;
  let srcSha: string;

  before(async () => {
    dir = scratchDir();
    // A 64 MiB image: random data at [0, 16M) and [40M, 44M), zeroes (holes) elsewhere.
    src = join(dir, "src.img");
    const fd = openSync(src, "w");
    ftruncateSync(fd, 64 * MiB);
    writeSync(fd, randomBytes(16 * MiB), 0, 16 * MiB, 0);
    writeSync(fd, randomBytes(4 * MiB), 0, 4 * MiB, 40 * MiB);
    closeSync(fd);
    srcSha = sha256(readFileSync(src));
    srv = await startServer({ size: "64M" });
  });
  after(async () => {
    try {
      await stopClean(srv);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  void test("qemu-img info sees a 64 MiB raw image", async () => {
    const r = await run("qemu-img", ["info", "--output=json", srv.uri]);
    const j = JSON.parse(r.stdout) as { "virtual-size": number; format: string };
    assert.equal(j["virtual-size"], 64 * MiB);
    assert.equal(j.format, "raw");
  });

  void test("qemu-img convert -n into the export and back out gives the same bytes", async () => {
    await run("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", src, srv.uri], { timeoutMs: 60_000 });
    assert.equal(sha256(readFileSync(srv.volume)), srcSha, "the volume file differs from the source");
    const out = join(dir, "out.img");
    await run("qemu-img", ["convert", "-f", "raw", "-O", "raw", srv.uri, out], { timeoutMs: 60_000 });
    assert.equal(sha256(readFileSync(out)), srcSha, "the image read back differs from the source");
    rmSync(out);
  });

  void test("qemu-img compare finds the export identical, then finds a one-sector change", async () => {
    const same = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", src, srv.uri], {
      allowFailure: true,
    });
    assert.equal(same.code, 0, `compare: ${same.stdout}${same.stderr}`);
    await qemuIo(srv.uri, ["write -P 0x01 20M 512"]);
    const diff = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", src, srv.uri], {
      allowFailure: true,
    });
    assert.equal(diff.code, 1, `compare after a change: ${diff.stdout}${diff.stderr}`);
    assert.match(diff.stdout, /offset 20971520/);
    await qemuIo(srv.uri, ["write -z -u 20M 4k"]);
    const again = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", src, srv.uri], {
      allowFailure: true,
    });
    assert.equal(again.code, 0, `compare after undoing the change: ${again.stdout}${again.stderr}`);
  });

  void test("qemu-img map shows the source's holes, and the holes a discard makes", async () => {
    assert.deepEqual(await qemuMap(srv.uri), [
      { start: 0, length: 16 * MiB, ...DATA },
      { start: 16 * MiB, length: 24 * MiB, ...HOLE },
      { start: 40 * MiB, length: 4 * MiB, ...DATA },
      { start: 44 * MiB, length: 20 * MiB, ...HOLE },
    ]);
    await qemuIo(srv.uri, ["discard 4M 1M", "discard 41M 64k"]);
    assert.deepEqual(await qemuMap(srv.uri), [
      { start: 0, length: 4 * MiB, ...DATA },
      { start: 4 * MiB, length: MiB, ...HOLE },
      { start: 5 * MiB, length: 11 * MiB, ...DATA },
      { start: 16 * MiB, length: 24 * MiB, ...HOLE },
      { start: 40 * MiB, length: MiB, ...DATA },
      { start: 41 * MiB, length: 64 * 1024, ...HOLE },
      { start: 41 * MiB + 64 * 1024, length: 3 * MiB - 64 * 1024, ...DATA },
      { start: 44 * MiB, length: 20 * MiB, ...HOLE },
    ]);
    assert.ok(fileBytes(srv.volume, 4 * MiB, MiB).equals(Buffer.alloc(MiB)), "discarded range is not zero");
  });
});

void describe("qemu-io against blockfork", () => {
  let srv: ServerHandle;

  before(async () => {
    srv = await startServer({ size: "64M" });
  });
  after(async () => {
    await stopClean(srv);
  });

  // 48 writes of 32-55 KiB at offsets that are 512-aligned but not 4 KiB-aligned.
  const writes = Array.from({ length: 48 }, (_, i) => ({
    offset: i * MiB + 512 * (2 * i + 1),
    length: 32 * 1024 + i * 512,
    pattern: (i * 5 + 1) & 0xff,
  }));

  void test("aio_write -P at many offsets, aio_flush, then read -P verifies every pattern", async () => {
    await qemuIo(srv.uri, [
      ...writes.map((w) => `aio_write -P ${w.pattern} ${w.offset} ${w.length}`),
      "aio_flush",
      ...writes.map((w) => `read -P ${w.pattern} ${w.offset} ${w.length}`),
    ]);
    // Behind the server: each range holds its pattern, and the bytes around it are untouched.
    for (const w of writes) {
      const got = fileBytes(srv.volume, w.offset - 512, w.length + 1024);
      assert.ok(got.subarray(0, 512).equals(Buffer.alloc(512)), `bytes before ${w.offset} changed`);
      assert.ok(
        got.subarray(512, 512 + w.length).equals(Buffer.alloc(w.length, w.pattern)),
        `range ${w.offset}`,
      );
      assert.ok(got.subarray(512 + w.length).equals(Buffer.alloc(512)), `bytes after ${w.offset} changed`);
    }
  });

  void test("read -v spot checks match the volume file", async () => {
    const spots = [
      [writes[3].offset - 8, 32],
      [writes[10].offset + writes[10].length - 20, 48],
      [writes[47].offset + 1000, 64],
      [0, 16],
      [63 * MiB, 16],
    ] as const;
    for (const [offset, length] of spots) {
      const r = await qemuIo(srv.uri, [`read -v ${offset} ${length}`]);
      const got = parseDump(r.stdout, offset, length);
      assert.ok(
        got.equals(fileBytes(srv.volume, offset, length)),
        `read -v ${offset} ${length}:\n${r.stdout}`,
      );
    }
    // and the first spot straddles zeroes and a pattern, so the check is not vacuous
    const first = parseDump((await qemuIo(srv.uri, [`read -v ${spots[0][0]} 32`])).stdout, spots[0][0], 32);
    assert.ok(first.subarray(0, 8).equals(Buffer.alloc(8)));
    assert.ok(first.subarray(8).equals(Buffer.alloc(24, writes[3].pattern)));
  });

  void test("write -z zeroes without deallocating; write -z -u unmaps", async () => {
    const base = 50 * MiB;
    await qemuIo(srv.uri, [`write -P 0x77 ${base} 1M`, "flush"]);
    const b0 = statSync(srv.volume).blocks;
    await qemuIo(srv.uri, [`write -z ${base + 64 * 1024} 128k`, "flush"]);
    const b1 = statSync(srv.volume).blocks;
    // NO_HOLE: nothing is deallocated (an extent split may cost one more metadata block).
    assert.ok(b1 >= b0 && b1 <= b0 + 8, `write -z changed the allocation: ${b0} -> ${b1} sectors`);
    await qemuIo(srv.uri, [`write -z -u ${base + 512 * 1024} 128k`, "flush"]);
    const freed = b1 - statSync(srv.volume).blocks;
    assert.ok(freed >= 248 && freed <= 256, `write -z -u freed ${freed} sectors, expected 256`);
    await qemuIo(srv.uri, [
      `read -P 0x77 ${base} 64k`,
      `read -P 0 ${base + 64 * 1024} 128k`,
      `read -P 0x77 ${base + 192 * 1024} 320k`,
      `read -P 0 ${base + 512 * 1024} 128k`,
      `read -P 0x77 ${base + 640 * 1024} 384k`,
    ]);
    const want = Buffer.alloc(MiB, 0x77);
    want.fill(0, 64 * 1024, 192 * 1024);
    want.fill(0, 512 * 1024, 640 * 1024);
    assert.ok(fileBytes(srv.volume, base, MiB).equals(want), "the volume file does not hold what was zeroed");
    const m = clip(await qemuMap(srv.uri), base + 512 * 1024, 128 * 1024);
    assert.deepEqual(m, [{ start: base + 512 * 1024, length: 128 * 1024, ...HOLE }]);
  });

  void test("discard punches a hole that reads as zeroes", async () => {
    const base = 56 * MiB;
    await qemuIo(srv.uri, [`write -P 0x66 ${base} 1M`, "flush"]);
    const b0 = statSync(srv.volume).blocks;
    await qemuIo(srv.uri, [`discard ${base + 256 * 1024} 256k`, `read -P 0 ${base + 256 * 1024} 256k`]);
    await qemuIo(srv.uri, [`read -P 0x66 ${base} 256k`, `read -P 0x66 ${base + 512 * 1024} 512k`]);
    const freed = b0 - statSync(srv.volume).blocks;
    assert.ok(freed >= 504 && freed <= 512, `discard freed ${freed} sectors, expected 512`);
    assert.deepEqual(clip(await qemuMap(srv.uri), base, MiB), [
      { start: base, length: 256 * 1024, ...DATA },
      { start: base + 256 * 1024, length: 256 * 1024, ...HOLE },
      { start: base + 512 * 1024, length: 512 * 1024, ...DATA },
    ]);
  });

  void test("write -P of 512-byte unaligned pieces lands exactly where asked", async () => {
    const base = 60 * MiB;
    const pieces = [
      { offset: base + 512, pattern: 0xa1 },
      { offset: base + 1024, pattern: 0xa2 }, // adjacent to the first
      { offset: base + 4096 - 512, pattern: 0xa3 }, // ends on a 4 KiB boundary
      { offset: base + 3 * 4096 + 1536, pattern: 0xa4 },
      { offset: base + 1234 * 512, pattern: 0xa5 },
    ];
    await qemuIo(
      srv.uri,
      pieces.map((p) => `write -P ${p.pattern} ${p.offset} 512`),
    );
    await qemuIo(
      srv.uri,
      pieces.map((p) => `read -P ${p.pattern} ${p.offset} 512`),
    );
    const span = 1235 * 512;
    const want = Buffer.alloc(span);
    for (const p of pieces) want.fill(p.pattern, p.offset - base, p.offset - base + 512);
    assert.ok(
      fileBytes(srv.volume, base, span).equals(want),
      "the volume file does not hold the 512-byte writes",
    );
    // Overwrite across two of them with an unaligned 512-byte write.
    await qemuIo(srv.uri, [`write -P 0xb0 ${base + 768} 512`, `read -P 0xb0 ${base + 768} 512`]);
    want.fill(0xb0, 768, 768 + 512);
    assert.ok(fileBytes(srv.volume, base, span).equals(want));
  });
});
