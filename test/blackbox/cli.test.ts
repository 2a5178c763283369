// The `blockfork` command line as a user meets it: help and version, usage errors (exit 2 with a
// message naming what is wrong, nothing on disk touched), the startup banner, TCP listening, and a
// second server on a socket that is in use.

import { test, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { BIN, mountTmpfs, scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { run } from "../helpers/run.js";

const dirs: string[] = [];
const servers: ServerHandle[] = [];
after(async () => {
  for (const s of servers) await s.stop("SIGKILL");
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

function tmp(): string {
  const d = scratchDir("blockfork-cli-");
  dirs.push(d);
  return d;
}

interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Run `blockfork ARGS` that is expected to exit by itself (kill it after timeoutMs). */
function blockfork(args: string[], timeoutMs = 15_000): Promise<Exit> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [BIN, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    p.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    p.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      p.kill("SIGKILL");
      reject(
        new Error(`blockfork ${args.join(" ")} still running after ${timeoutMs} ms\n${stdout}\n${stderr}`),
      );
    }, timeoutMs);
    p.on("error", reject);
    p.on("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/** Expect a usage error: exit 2, a message that matches `msg`, and the pointer to --help. */
async function usageError(args: string[], msg: RegExp): Promise<Exit> {
  const r = await blockfork(args);
  assert.equal(r.code, 2, `blockfork ${args.join(" ")}: exit ${r.code}, want 2\nstderr: ${r.stderr}`);
  assert.match(r.stderr, msg, `blockfork ${args.join(" ")}: stderr does not say what is wrong`);
  return r;
}

function sha256(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

/** `serve` arguments that would work if nothing else were wrong. */
function serveArgs(dir: string, extra: string[]): string[] {
  return ["serve", "--listen", "none", "--socket", join(dir, "nbd.sock"), ...extra];
}

void test("blockfork --help and no command", async () => {
  const r = await blockfork(["--help"]);
  assert.equal(r.code, 0);
  assert.match(r.stdout, /Usage: blockfork COMMAND/);
  assert.match(r.stdout, /\bserve\b/);
  assert.match(r.stdout, /--version/);
  const none = await blockfork([]);
  assert.equal(none.code, 2, "no command is a usage error");
  assert.match(none.stdout + none.stderr, /Usage: blockfork COMMAND/);
});

void test("blockfork --version prints the package version", async () => {
  const pkg = JSON.parse(readFileSync(join(BIN, "../../package.json"), "utf8")) as { version: string };
  const r = await blockfork(["--version"]);
  assert.equal(r.code, 0);
  assert.equal(r.stdout.trim(), `blockfork ${pkg.version}`);
});

void test("serve --help mentions every option", async () => {
  const r = await blockfork(["serve", "--help"]);
  assert.equal(r.code, 0);
  const options = [
    "--volume",
    "--size",
    "--name",
    "--description",
    "--read-only",
    "--block-size",
    "--listen",
    "--socket",
    "--max-connections",
    "--handshake-timeout",
    "--tls",
    "--tls-cert",
    "--tls-key",
    "--tls-ca",
    "--tls-psk",
    "--threads",
    "--no-inline-writes",
    "--log-level",
  ];
  for (const o of options)
    assert.match(r.stdout, new RegExp(`(^|\\s)${o}(\\s|$)`, "m"), `serve --help lacks ${o}`);
  assert.match(r.stdout, /Exit status/);
  // Every option the help names is accepted by the parser (no option documented but refused):
  // an unknown one is refused with "unknown option", so --help's list must not trigger that.
  const dir = tmp();
  for (const o of options.filter((x) => !["--volume", "--read-only", "--no-inline-writes"].includes(x))) {
    const e = await blockfork(["serve", "--volume", join(dir, "none.img"), o, "1x/bad"]);
    assert.notEqual(e.code, 0, `${o} with a bad value and a missing volume: exit 0\n${e.stderr}`);
    assert.doesNotMatch(e.stderr, /unknown option/i, `${o} is documented but not accepted`);
  }
});

void test("unknown command and unknown option exit 2 naming them", async () => {
  const c = await blockfork(["frobnicate"]);
  assert.equal(c.code, 2);
  assert.match(c.stderr, /unknown command "frobnicate"/);
  const dir = tmp();
  await usageError(
    serveArgs(dir, ["--volume", join(dir, "a.img"), "--size", "1M", "--frobnicate"]),
    /--frobnicate/,
  );
  assert.equal(existsSync(join(dir, "a.img")), false, "a rejected command line must not create the volume");
});

void test("unknown options of every command: one line naming the option and its --help, exit 2", async () => {
  const dir = tmp();
  for (const args of [
    ["resync", "--bogus", "--state-dir", dir],
    ["status", "--bogus"],
    ["mark", "x", "-q", "--state-dir", dir],
    ["gateway", "--bogus"],
    ["serve", "--bogus"],
  ]) {
    const r = await blockfork(args);
    assert.equal(r.code, 2, `${args.join(" ")}: exit ${r.code}\n${r.stderr}`);
    const opt = args.find((a) => a.startsWith("-") && a !== "--state-dir")!;
    assert.equal(
      r.stderr,
      `blockfork ${args[0]}: unknown option ${opt} (see "blockfork ${args[0]} --help")\n`,
    );
  }
  // A usage error says where the help is once, not twice.
  const m = await usageError(["mark", "a", "b", "--state-dir", dir], /unexpected argument "b"/);
  assert.equal(m.stderr.split("--help").length - 1, 1, m.stderr);
  // The gateway's example address is the gateway's port, not NBD's.
  const g = await usageError(
    ["gateway", "--volume", join(dir, "g.img"), "--size", "1M", "--listen", "localhost"],
    /--listen "localhost" is not HOST:PORT \(for example 127\.0\.0\.1:7070\)/,
  );
  assert.doesNotMatch(g.stderr, /10809/);
});

void test("missing --volume exits 2", async () => {
  const dir = tmp();
  await usageError(serveArgs(dir, ["--size", "1M"]), /--volume/);
});

void test("size mismatch with an existing file exits 2 and leaves the file untouched", async () => {
  const dir = tmp();
  const vol = join(dir, "existing.img");
  writeFileSync(vol, randomBytes(3 * 1024 * 1024));
  const before = sha256(vol);
  for (const size of ["4M", "2M", "3145727"]) {
    await usageError(serveArgs(dir, ["--volume", vol, "--size", size]), /3145728 bytes but --size asks for/);
    assert.equal(statSync(vol).size, 3 * 1024 * 1024, `--size ${size} changed the size`);
    assert.equal(sha256(vol), before, `--size ${size} changed the contents`);
  }
});

void test("a missing file without --size exits 2 and is not created", async () => {
  const dir = tmp();
  const vol = join(dir, "missing.img");
  await usageError(serveArgs(dir, ["--volume", vol]), /does not exist; give --size/);
  assert.equal(existsSync(vol), false);
});

void test("an empty existing file exits 2", async () => {
  const dir = tmp();
  const vol = join(dir, "empty.img");
  writeFileSync(vol, "");
  await usageError(serveArgs(dir, ["--volume", vol]), /empty/);
});

void test("bad --size values exit 2", async () => {
  const dir = tmp();
  const vol = join(dir, "v.img");
  for (const bad of ["12Q", "0", "lots", "1.5", "9999999P"]) {
    await usageError(serveArgs(dir, ["--volume", vol, "--size", bad]), /--size/);
    assert.equal(existsSync(vol), false, `--size ${bad} created the volume`);
  }
});

void test("bad --block-size values exit 2", async () => {
  const dir = tmp();
  const vol = join(dir, "v.img");
  for (const bad of ["512,4096", "3,4096,1M", "4096,512,1M", "a,b,c", "512,4096,33554432,1"]) {
    await usageError(
      serveArgs(dir, ["--volume", vol, "--size", "1M", "--block-size", bad]),
      /block size|--block-size/,
    );
  }
});

void test("an export name or description over 4096 bytes (the NBD limit for strings) exits 2", async () => {
  const dir = tmp();
  const base = serveArgs(dir, ["--volume", join(dir, "v.img"), "--size", "1M"]);
  await usageError([...base, "--name", "n".repeat(4097)], /export name longer than 4096 bytes/);
  await usageError(
    [...base, "--description", "d".repeat(5000)],
    /export description longer than 4096 bytes.*--description/,
  );
});

void test("a volume on a read-only file system, a --gateway URL with a path or a user: exit 2 saying what to do", async () => {
  const dir = tmp();
  const ro = join(dir, "ro");
  const unmount = mountTmpfs(ro, "4M");
  try {
    writeFileSync(join(ro, "v.img"), Buffer.alloc(1024 * 1024));
    execFileSync("mount", ["-o", "remount,ro", ro]);
    await usageError(
      ["serve", "--volume", join(ro, "v.img"), "--socket", join(dir, "s.sock"), "--listen", "none"],
      /read-only file system: serve it with --read-only/,
    );
    await usageError(
      ["gateway", "--volume", join(ro, "v.img"), "--state-dir", join(dir, "gw"), "--listen", "127.0.0.1:0"],
      /read-only file system/,
    );
    // A state directory there: the same, about --state-dir.
    for (const sd of [ro, join(ro, "sd")]) {
      await usageError(
        serveArgs(dir, ["--volume", join(dir, "w.img"), "--size", "1M", "--pit", "--state-dir", sd]),
        /read-only file system: give --state-dir a writable directory/,
      );
      await usageError(
        [
          "gateway",
          "--volume",
          join(dir, "g.img"),
          "--size",
          "1M",
          "--state-dir",
          sd,
          "--listen",
          "127.0.0.1:0",
        ],
        /read-only file system: give --state-dir a writable directory/,
      );
    }
  } finally {
    unmount();
  }
  const base = serveArgs(dir, [
    "--volume",
    join(dir, "v.img"),
    "--size",
    "1M",
    "--state-dir",
    join(dir, "st"),
  ]);
  for (const url of ["http://127.0.0.1:7070/v1", "http://127.0.0.1:7070/?x=1"])
    await usageError([...base, "--gateway", url], /has a path, query or fragment/);
  await usageError(
    [...base, "--gateway", "http://u:p@127.0.0.1:7070"],
    /user or password; tokens go in a token file/,
  );
});

void test("bad --listen values exit 2", async () => {
  const dir = tmp();
  const vol = join(dir, "v.img");
  for (const bad of ["127.0.0.1:99999", "localhost", "127.0.0.1:port", ":-1"]) {
    await usageError(["serve", "--volume", vol, "--size", "1M", "--listen", bad], /--listen/);
  }
  await usageError(["serve", "--volume", vol, "--size", "1M", "--listen", "none"], /--socket/);
});

void test("other bad option values exit 2", async () => {
  const dir = tmp();
  const base = serveArgs(dir, ["--volume", join(dir, "v.img"), "--size", "1M"]);
  await usageError([...base, "--max-connections", "0"], /--max-connections/);
  await usageError([...base, "--handshake-timeout", "1.5"], /--handshake-timeout/);
  await usageError([...base, "--log-level", "loud"], /--log-level/);
  await usageError([...base, "--tls", "maybe"], /--tls/);
  await usageError(
    [
      "serve",
      "--listen",
      "none",
      "--volume",
      join(dir, "v.img"),
      "--size",
      "1M",
      "--socket",
      join(dir, "no", "s.sock"),
    ],
    /cannot listen on .*: the directory .*no does not exist/,
  );
  await usageError([...base, "--threads", "0"], /--threads must be a positive integer/);
});

void test("a directory as the volume exits 2 with a message", async () => {
  const dir = tmp();
  const d = join(dir, "adir");
  mkdirSync(d);
  // Read-only takes another open path; both must be configuration errors, not crashes.
  await usageError(
    serveArgs(dir, ["--volume", d, "--read-only"]),
    /is a directory; give a file or a block device/,
  );
  await usageError(serveArgs(dir, ["--volume", d]), /adir/);
});

void test("a volume that another blockfork serves or gateways is refused (flock), and free again after it exits", async () => {
  const srv = await startServer({ size: "8M", keepDir: true });
  servers.push(srv);
  dirs.push(srv.dir);
  const dir = tmp();
  const before = sha256(srv.volume);
  // A second writer, a read-only server and a gateway on the same file: all refused, file untouched.
  await usageError(serveArgs(dir, ["--volume", srv.volume]), /is in use: another blockfork serve or gateway/);
  await usageError(serveArgs(dir, ["--volume", srv.volume, "--read-only"]), /is in use/);
  await usageError(
    ["gateway", "--volume", srv.volume, "--listen", "127.0.0.1:0", "--state-dir", join(dir, "gw")],
    /is in use/,
  );
  assert.equal(sha256(srv.volume), before);
  assert.equal(existsSync(join(dir, "nbd.sock")), false, "a refused server left its socket behind");
  // kill -9 releases the lock with the process: a new server takes the volume at once.
  const { code, signal } = await srv.stop("SIGKILL");
  assert.ok(code !== null || signal === "SIGKILL");
  const again = await startServer({ volume: srv.volume, size: null, dir });
  servers.push(again);
  const info = await run("nbdinfo", ["--size", again.uri]);
  assert.equal(info.stdout.trim(), String(8 * 1024 * 1024));
});

void test("a state directory that another blockfork uses is refused before anything in it is opened", async () => {
  // A second serve used to open (and recover) the journal of the running one before it found the
  // admin socket taken: recovery cleared the header of the record being appended as if torn.
  const dir = tmp();
  const state = join(dir, "state");
  const srv = await startServer({ size: "8M", keepDir: true, args: ["--pit", "--state-dir", state] });
  servers.push(srv);
  dirs.push(srv.dir);
  await run("nbdsh", ["-u", srv.uri, "-c", "h.pwrite(b'x' * 65536, 0); h.flush()"]);
  // Whoever can connect to the admin socket can resync or mark: the owner only, whatever the umask.
  assert.equal(statSync(join(state, "admin.sock")).mode & 0o777, 0o600);
  const journal = join(state, "journal");
  const files = (): string =>
    readdirSync(journal)
      .sort()
      .map((f) => `${f}:${sha256(join(journal, f))}`)
      .join(" ");
  const before = files();
  const other = join(dir, "other.img");
  await usageError(
    serveArgs(dir, ["--volume", other, "--size", "8M", "--pit", "--state-dir", state]),
    /the state directory .*state is in use by another blockfork process .*stop that process first, or give another --state-dir/,
  );
  await usageError(
    ["gateway", "--volume", other, "--listen", "127.0.0.1:0", "--state-dir", state],
    /is in use by another blockfork process/,
  );
  assert.equal(files(), before, "the refused server changed the running one's journal");
  assert.doesNotMatch(srv.log(), /torn/);

  // Stopped, the directory still belongs to its volume: another volume of the same size is refused
  // (its snapshots would have served the first volume's before-images), the same file moved is not.
  assert.deepEqual(await srv.stop(), { code: 0, signal: null }, srv.log());
  await usageError(
    serveArgs(dir, ["--volume", other, "--pit", "--state-dir", state]),
    /the state directory .*state belongs to the volume .*disk\.img, not .*other\.img: .*Give the state directory of .*other\.img, or a new one/,
  );
  const moved = join(dir, "moved.img");
  renameSync(srv.volume, moved);
  const again = await startServer({
    volume: moved,
    size: null,
    dir: tmp(),
    args: ["--pit", "--state-dir", state],
  });
  servers.push(again);
  const info = await run("nbdinfo", ["--size", again.uri]);
  assert.equal(info.stdout.trim(), String(8 * 1024 * 1024));
  // Another file at the same path (replaced: a new inode or birth time) is not the volume either.
  assert.deepEqual(await again.stop(), { code: 0, signal: null }, again.log());
  copyFileSync(moved, `${moved}.new`);
  renameSync(`${moved}.new`, moved);
  await usageError(
    serveArgs(dir, ["--volume", moved, "--pit", "--state-dir", state]),
    /is another file than the volume the state directory .*state describes \(replaced at the same path.*Give a new --state-dir/,
  );
});

void test("the banner prints nbd URIs and client command lines; TCP listening works", async () => {
  const srv = await startServer({ args: ["--listen", "127.0.0.1:0", "--name", "bannerdisk"], size: "8M" });
  servers.push(srv);
  const deadline = Date.now() + 10_000;
  while (!/nbd-client 127\.0\.0\.1 \d+/.test(srv.stdout()) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
  }
  const out = srv.stdout();
  const m = /nbd:\/\/127\.0\.0\.1:(\d+)\/bannerdisk/.exec(out);
  assert.ok(m, `no TCP URI in the banner:\n${out}`);
  const port = Number(m[1]);
  assert.ok(port > 0 && port < 65536);
  assert.ok(out.includes(`nbd+unix:///bannerdisk?socket=${srv.sock}`), `no unix URI in the banner:\n${out}`);
  assert.match(out, /^\s+nbdinfo '.+'$/m);
  assert.match(out, /^\s+qemu-img info '.+'$/m);
  assert.ok(
    out.includes(`nbd-client -u ${srv.sock} /dev/nbd0 -N bannerdisk`),
    `no unix nbd-client line:\n${out}`,
  );
  assert.ok(
    out.includes(`nbd-client 127.0.0.1 ${port} /dev/nbd0 -N bannerdisk`),
    `no TCP nbd-client line:\n${out}`,
  );

  // The URIs it prints work with a real client.
  const tcp = await run("nbdinfo", ["--json", `nbd://127.0.0.1:${port}/bannerdisk`]);
  const info = JSON.parse(tcp.stdout) as { exports: { "export-name": string; "export-size": number }[] };
  assert.equal(info.exports[0]["export-name"], "bannerdisk");
  assert.equal(info.exports[0]["export-size"], 8 * 1024 * 1024);
  const byDefault = await run("nbdinfo", ["--size", `nbd://127.0.0.1:${port}`]);
  assert.equal(byDefault.stdout.trim(), String(8 * 1024 * 1024));
  const unix = await run("nbdinfo", ["--size", `nbd+unix:///bannerdisk?socket=${srv.sock}`]);
  assert.equal(unix.stdout.trim(), String(8 * 1024 * 1024));
  const r = await srv.stop();
  assert.equal(r.code, 0);
});

void test("a TCP port already in use is a configuration error (exit 2)", async () => {
  const holder = await startServer({ args: ["--listen", "127.0.0.1:0"], size: "1M" });
  servers.push(holder);
  const deadline = Date.now() + 10_000;
  while (!/nbd:\/\/127\.0\.0\.1:\d+/.test(holder.stdout()) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
  }
  const port = /nbd:\/\/127\.0\.0\.1:(\d+)/.exec(holder.stdout())?.[1];
  assert.ok(port, holder.stdout());
  const dir = tmp();
  await usageError(
    ["serve", "--volume", join(dir, "v.img"), "--size", "1M", "--listen", `127.0.0.1:${port}`],
    new RegExp(`127\\.0\\.0\\.1:${port}`),
  );
  await holder.stop();
});

void test("a second server on the same --socket exits 2 and the first keeps serving", async () => {
  const first = await startServer({ size: "4M" });
  servers.push(first);
  const dir = tmp();
  const r = await usageError(
    ["serve", "--volume", join(dir, "other.img"), "--size", "4M", "--listen", "none", "--socket", first.sock],
    /another server is listening/,
  );
  assert.ok(r.stderr.includes(first.sock));
  assert.equal(existsSync(first.sock), true, "the losing server removed the winner's socket");
  const info = await run("nbdinfo", ["--size", first.uri]);
  assert.equal(info.stdout.trim(), String(4 * 1024 * 1024));
  assert.equal((await first.stop()).code, 0);
});

void test("a stale socket file from a killed server is replaced", async () => {
  const dir = tmp();
  const first = await startServer({ dir, size: "4M" });
  assert.equal((await first.stop("SIGKILL")).signal, "SIGKILL");
  assert.equal(existsSync(first.sock), true, "a killed server leaves its socket file behind");
  const second = await startServer({ dir, size: "4M" });
  servers.push(second);
  const info = await run("nbdinfo", ["--size", second.uri]);
  assert.equal(info.stdout.trim(), String(4 * 1024 * 1024));
  assert.equal((await second.stop()).code, 0);
  assert.equal(existsSync(second.sock), false);
});

void test("a path that is not a socket is not taken over", async () => {
  const dir = tmp();
  const notSock = join(dir, "not-a-socket");
  writeFileSync(notSock, "precious");
  await usageError(
    ["serve", "--volume", join(dir, "v.img"), "--size", "1M", "--listen", "none", "--socket", notSock],
    /not a socket/,
  );
  assert.equal(readFileSync(notSock, "utf8"), "precious");
});
