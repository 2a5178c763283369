// Black-box tests of what `blockfork serve` advertises, read by libnbd's nbdinfo: sizes, flags,
// block sizes, metadata contexts, export names and descriptions (NBD_OPT_LIST), and the
// allocation map (--map, --map --totals) against holes made by real writes and trims.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { closeSync, openSync, rmSync, writeSync, ftruncateSync } from "node:fs";
import { join } from "node:path";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { nbdsh, run } from "../helpers/run.js";

const MiB = 1024 * 1024;

/** Stop a server and fail unless it exited cleanly (status 0): a crash during the tests shows up here. */
async function stopClean(srv: ServerHandle): Promise<void> {
  const r = await srv.stop();
  assert.deepEqual(r, { code: 0, signal: null }, `the server did not exit cleanly; its log:\n${srv.log()}`);
}

/** One export as `nbdinfo --json` prints it (the fields these tests read). */
interface NbdinfoExport {
  "export-name": string;
  description?: string;
  "export-size": number;
  contexts?: string[];
  is_rotational: boolean;
  is_read_only: boolean;
  can_cache: boolean;
  can_df: boolean;
  can_fast_zero: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_multi_conn: boolean;
  can_trim: boolean;
  can_zero: boolean;
  block_size_minimum: number;
  block_size_preferred: number;
  block_size_maximum: number;
}

interface NbdinfoJson {
  protocol: string;
  TLS: boolean;
  structured: boolean;
  exports: NbdinfoExport[];
}

async function info(uri: string, ...extra: string[]): Promise<NbdinfoJson> {
  const r = await run("nbdinfo", ["--json", ...extra, uri], { timeoutMs: 30_000 });
  return JSON.parse(r.stdout) as NbdinfoJson;
}

/** `nbdinfo --map` as [offset, length, flags] triples (the description column is checked too). */
async function map(uri: string): Promise<[number, number, number][]> {
  const r = await run("nbdinfo", ["--map", uri], { timeoutMs: 30_000 });
  return r.stdout
    .trim()
    .split("\n")
    .map((line) => {
      const m = /^\s*(\d+)\s+(\d+)\s+(\d+)\s+(.*)$/.exec(line);
      assert.ok(m, `unexpected nbdinfo --map line: ${line}`);
      const flags = Number(m[3]);
      assert.equal(m[4].trim(), flags === 3 ? "hole,zero" : flags === 0 ? "data" : m[4].trim());
      return [Number(m[1]), Number(m[2]), flags] as [number, number, number];
    });
}

/** `nbdinfo --can X` / `--is X`: true (exit 0) or false (exit 2); anything else fails. */
async function can(uri: string, what: string[]): Promise<boolean> {
  const r = await run("nbdinfo", [...what, uri], { allowFailure: true, timeoutMs: 30_000 });
  assert.ok(r.code === 0 || r.code === 2, `nbdinfo ${what.join(" ")} exited ${r.code}: ${r.stderr}`);
  return r.code === 0;
}

/** Write `len` random bytes at each offset and trim ranges, through the server (nbdsh). */
async function shape(uri: string, writes: [number, number][], trims: [number, number][] = []): Promise<void> {
  const code = [
    "import os",
    "h = nbd.NBD()",
    'h.connect_uri(os.environ["URI"])',
    ...writes.map(([off, len]) => `h.pwrite(os.urandom(${len}), ${off})`),
    ...trims.map(([off, len]) => `h.trim(${len}, ${off})`),
    "h.flush()",
    "h.shutdown()",
  ].join("\n");
  await nbdsh(uri, code);
}

void describe("nbdinfo against a read-write export", () => {
  let srv: ServerHandle;

  before(async () => {
    srv = await startServer({ size: "64M", args: ["--description", "primary test disk"] });
  });
  after(async () => {
    await stopClean(srv);
  });

  void test("--json reports the size, every capability flag and the default block sizes", async () => {
    const j = await info(srv.uri);
    assert.equal(j.protocol, "newstyle-fixed");
    assert.equal(j.TLS, false);
    assert.equal(j.structured, true);
    assert.equal(j.exports.length, 1);
    const e = j.exports[0];
    assert.equal(e["export-name"], "disk");
    assert.equal(e.description, "primary test disk");
    assert.equal(e["export-size"], 64 * MiB);
    assert.deepEqual(
      {
        is_read_only: e.is_read_only,
        is_rotational: e.is_rotational,
        can_flush: e.can_flush,
        can_fua: e.can_fua,
        can_trim: e.can_trim,
        can_zero: e.can_zero,
        can_fast_zero: e.can_fast_zero,
        can_cache: e.can_cache,
        can_df: e.can_df,
        can_multi_conn: e.can_multi_conn,
      },
      {
        is_read_only: false,
        is_rotational: false,
        can_flush: true,
        can_fua: true,
        can_trim: true,
        can_zero: true,
        can_fast_zero: true,
        can_cache: true,
        can_df: true,
        can_multi_conn: true,
      },
    );
    assert.deepEqual(
      [e.block_size_minimum, e.block_size_preferred, e.block_size_maximum],
      [1, 4096, 32 * MiB],
    );
    assert.ok(e.contexts?.includes("base:allocation"), `contexts: ${JSON.stringify(e.contexts)}`);
  });

  void test("--can and --is agree with the flags", async () => {
    assert.equal(await can(srv.uri, ["--can", "trim"]), true);
    assert.equal(await can(srv.uri, ["--can", "zero"]), true);
    assert.equal(await can(srv.uri, ["--can", "fua"]), true);
    assert.equal(await can(srv.uri, ["--can", "multi-conn"]), true);
    assert.equal(await can(srv.uri, ["--is", "read-only"]), false);
  });

  void test("--list --json lists the export with its description", async () => {
    const j = await info(srv.uri, "--list");
    assert.deepEqual(
      j.exports.map((e) => [e["export-name"], e.description]),
      [["disk", "primary test disk"]],
    );
    assert.equal(j.exports[0]["export-size"], 64 * MiB);
  });

  void test("--map and --map --totals match the data written and the holes trimmed", async () => {
    // A fresh volume is one hole.
    assert.deepEqual(await map(srv.uri), [[0, 64 * MiB, 3]]);
    await shape(
      srv.uri,
      [
        [MiB, 64 * 1024],
        [4 * MiB, MiB],
        [10 * MiB, 8192],
        [64 * MiB - 4096, 4096],
      ],
      [[4 * MiB + 256 * 1024, 256 * 1024]],
    );
    const want: [number, number, number][] = [
      [0, MiB, 3],
      [MiB, 64 * 1024, 0],
      [MiB + 64 * 1024, 3 * MiB - 64 * 1024, 3],
      [4 * MiB, 256 * 1024, 0],
      [4 * MiB + 256 * 1024, 256 * 1024, 3],
      [4 * MiB + 512 * 1024, 512 * 1024, 0],
      [5 * MiB, 5 * MiB, 3],
      [10 * MiB, 8192, 0],
      [10 * MiB + 8192, 54 * MiB - 8192 - 4096, 3],
      [64 * MiB - 4096, 4096, 0],
    ];
    assert.deepEqual(await map(srv.uri), want);

    const r = await run("nbdinfo", ["--map", "--totals", srv.uri], { timeoutMs: 30_000 });
    const totals = new Map<number, number>();
    for (const line of r.stdout.trim().split("\n")) {
      const m = /^\s*(\d+)\s+([\d.]+)%\s+(\d+)\s+(\S+)/.exec(line);
      assert.ok(m, `unexpected --totals line: ${line}`);
      totals.set(Number(m[3]), Number(m[1]));
    }
    const data = 64 * 1024 + 256 * 1024 + 512 * 1024 + 8192 + 4096;
    assert.deepEqual([...totals.entries()].sort(), [
      [0, data],
      [3, 64 * MiB - data],
    ]);
  });
});

void describe("nbdinfo against --read-only and --block-size exports", () => {
  const servers: ServerHandle[] = [];
  const dirs: string[] = [];
  after(async () => {
    const stopped = await Promise.allSettled(servers.map(stopClean));
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
    for (const r of stopped) if (r.status === "rejected") throw r.reason;
  });

  void test("--read-only advertises read-only, no trim, zero or FUA", async () => {
    // --read-only never creates a volume: make one first.
    const dir = scratchDir();
    dirs.push(dir);
    const volume = join(dir, "ro.img");
    const fd = openSync(volume, "w");
    ftruncateSync(fd, 64 * MiB);
    closeSync(fd);
    const srv = await startServer({ dir, volume, size: null, args: ["--read-only"] });
    servers.push(srv);
    const e = (await info(srv.uri)).exports[0];
    assert.equal(e.is_read_only, true);
    assert.equal(e.can_trim, false);
    assert.equal(e.can_zero, false);
    assert.equal(e.can_fast_zero, false);
    assert.equal(e.can_fua, false);
    assert.equal(e.can_cache, true);
    assert.equal(e.can_df, true);
    assert.equal(e["export-size"], 64 * MiB);
    assert.equal(await can(srv.uri, ["--is", "read-only"]), true);
    assert.equal(await can(srv.uri, ["--can", "trim"]), false);
    assert.equal(await can(srv.uri, ["--can", "zero"]), false);
  });

  void test("--block-size 512,4096,1048576 is advertised as given", async () => {
    const srv = await startServer({ size: "64M", args: ["--block-size", "512,4096,1048576"] });
    servers.push(srv);
    const e = (await info(srv.uri)).exports[0];
    assert.deepEqual([e.block_size_minimum, e.block_size_preferred, e.block_size_maximum], [512, 4096, MiB]);
  });

  void test("--block-size 4096,65536,4M is advertised as given", async () => {
    const srv = await startServer({ size: "64M", args: ["--block-size", "4096,65536,4M"] });
    servers.push(srv);
    const e = (await info(srv.uri)).exports[0];
    assert.deepEqual(
      [e.block_size_minimum, e.block_size_preferred, e.block_size_maximum],
      [4096, 65536, 4 * MiB],
    );
  });
});

void describe("nbdinfo: export names and existing volumes", () => {
  const servers: ServerHandle[] = [];
  const dirs: string[] = [];
  after(async () => {
    const stopped = await Promise.allSettled(servers.map(stopClean));
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
    for (const r of stopped) if (r.status === "rejected") throw r.reason;
  });

  void test("the default name is the file name without extension, and '' reaches it", async () => {
    const dir = scratchDir();
    dirs.push(dir);
    const srv = await startServer({ dir, volume: join(dir, "data.raw"), size: "16M" });
    servers.push(srv);
    assert.equal((await info(srv.uriFor("data"))).exports[0]["export-name"], "data");
    assert.equal((await info(srv.uri)).exports[0]["export-name"], "data");
    const list = await info(srv.uri, "--list");
    assert.deepEqual(
      list.exports.map((e) => e["export-name"]),
      ["data"],
    );
    const bad = await run("nbdinfo", ["--json", srv.uriFor("data.raw")], { allowFailure: true });
    assert.notEqual(bad.code, 0, "an unknown export name must be refused");
  });

  void test("--name and --description set what clients see, and '' still reaches the export", async () => {
    const srv = await startServer({
      size: "16M",
      args: ["--name", "alpha", "--description", "the alpha disk"],
    });
    servers.push(srv);
    const j = await info(srv.uriFor("alpha"));
    assert.equal(j.exports[0]["export-name"], "alpha");
    assert.equal(j.exports[0].description, "the alpha disk");
    assert.equal((await info(srv.uri)).exports[0]["export-name"], "alpha");
    const list = await info(srv.uri, "--list");
    assert.deepEqual(
      list.exports.map((e) => [e["export-name"], e.description]),
      [["alpha", "the alpha disk"]],
    );
    const bad = await run("nbdinfo", ["--json", srv.uriFor("disk")], { allowFailure: true });
    assert.notEqual(bad.code, 0, "the file name is not an export name once --name is given");
  });

  void test("an existing file without --size is served at its own size, holes and all", async () => {
    const dir = scratchDir();
    dirs.push(dir);
    const volume = join(dir, "old.img");
    const size = 5 * MiB + 1000;
    const fd = openSync(volume, "w");
    ftruncateSync(fd, size);
    writeSync(fd, randomBytes(4096), 0, 4096, MiB);
    writeSync(fd, randomBytes(1000), 0, 1000, 5 * MiB);
    closeSync(fd);
    const srv = await startServer({ dir, volume, size: null });
    servers.push(srv);
    const r = await run("nbdinfo", ["--size", srv.uri]);
    assert.equal(r.stdout.trim(), String(size));
    assert.equal((await info(srv.uri)).exports[0]["export-size"], size);
    assert.deepEqual(await map(srv.uri), [
      [0, MiB, 3],
      [MiB, 4096, 0],
      [MiB + 4096, 4 * MiB - 4096, 3],
      [5 * MiB, 1000, 0],
    ]);
  });
});
