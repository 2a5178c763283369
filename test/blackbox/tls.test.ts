// TLS end to end with libnbd (gnutls) as the client: X.509 with --tls require and --tls on,
// client certificates (--tls-ca), server certificate verification over TCP, TLS-PSK, the
// TLS-required refusal on the wire, and the configuration errors of the --tls options.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { closeSync, existsSync, openSync, readFileSync, readSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { makeTestCerts, type TestCerts } from "../helpers/certs.js";
import { BIN, scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { nbdsh, run, type RunResult } from "../helpers/run.js";
import { RawClient, infoRequestData, isOptionError, optionBytes } from "../helpers/raw-client.js";
import { connect as tlsConnect, type TLSSocket } from "node:tls";
import { connect as netConnect } from "node:net";

const MiB = 1024 * 1024;
const NBD_OPT_EXPORT_NAME = 1;
const NBD_OPT_LIST = 3;
const NBD_OPT_GO = 7;
const NBD_OPT_STARTTLS = 5;
const NBD_REP_ACK = 1;
const NBD_REP_ERR_TLS_REQD = 0x80000005;

let certs: TestCerts;
let work: string;

before(async () => {
  work = scratchDir("blockfork-tls-");
  certs = await makeTestCerts(join(work, "certs"));
});
after(() => {
  rmSync(work, { recursive: true, force: true });
});

/** `serve` options for TLS (`mode`) with the test CA's server certificate, then `extra`. */
function x509(mode: "require" | "on", ...extra: string[]): string[] {
  return ["--tls", mode, "--tls-cert", certs.serverCert, "--tls-key", certs.serverKey, ...extra];
}

function sha256(b: Uint8Array): string {
  return createHash("sha256").update(b).digest("hex");
}

/** Bytes [offset, offset+length) of a file, read directly. */
function readRegion(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, "r");
  try {
    const b = Buffer.alloc(length);
    assert.equal(readSync(fd, b, 0, length, offset), length);
    return b;
  } finally {
    closeSync(fd);
  }
}

function certUri(srv: ServerHandle, dir: string): string {
  return `nbds+unix:///?socket=${srv.sock}&tls-certificates=${dir}`;
}

function pskUri(srv: ServerHandle, file: string, identity: string): string {
  return `nbds+unix://${identity}@/?socket=${srv.sock}&tls-psk-file=${file}`;
}

interface InfoJson {
  TLS: boolean;
  exports: { "export-name": string; "export-size": number; is_read_only: boolean }[];
}

async function nbdinfoJson(uri: string): Promise<InfoJson> {
  const r = await run("nbdinfo", ["--json", uri], { timeoutMs: 30_000 });
  return JSON.parse(r.stdout) as InfoJson;
}

/** A client that must fail; returns what it printed. */
async function mustFail(uri: string): Promise<RunResult> {
  const r = await run("nbdinfo", ["--size", uri], { allowFailure: true, timeoutMs: 30_000 });
  assert.notEqual(r.code, 0, `nbdinfo ${uri} succeeded but must fail:\n${r.stdout}`);
  return r;
}

const ROUND_TRIP = `
import nbd, os, hashlib, json
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(os.environ["URI"])
data = open(os.environ["DATA"], "rb").read()
off = int(os.environ["OFF"])
h.pwrite(data, off)
h.flush()
back = h.pread(len(data), off)
print(json.dumps({"tls": h.get_tls_negotiated(), "size": h.get_size(), "sha": hashlib.sha256(back).hexdigest()}))
h.shutdown()
`;

/**
 * Write 1 MiB of random data through `uri` at `offset`, read it back through the same connection,
 * and check it in the volume file too. Returns whether libnbd says TLS was negotiated.
 */
async function roundTrip(srv: ServerHandle, uri: string, offset: number): Promise<boolean> {
  const data = randomBytes(MiB);
  const file = join(work, `data-${offset}.bin`);
  writeFileSync(file, data);
  const r = await nbdsh(uri, ROUND_TRIP, { env: { DATA: file, OFF: String(offset) }, timeoutMs: 60_000 });
  const out = JSON.parse(r.stdout) as { tls: boolean; size: number; sha: string };
  assert.equal(out.sha, sha256(data), "data read back over the connection differs");
  assert.equal(
    sha256(readRegion(srv.volume, offset, MiB)),
    sha256(data),
    "the volume file does not hold the data",
  );
  return out.tls;
}

/** Count of connections that reached transmission, and of failed TLS handshakes, in the log. */
function counts(srv: ServerHandle): { exports: number; tls: number; tlsFailed: number } {
  const log = srv.log();
  return {
    exports: (log.match(/\] export "/g) ?? []).length,
    tls: (log.match(/\] export ".*, TLS\)/g) ?? []).length,
    tlsFailed: (log.match(/TLS handshake failed/g) ?? []).length,
  };
}

/** Wait (up to 10 s) until the server's log satisfies `ok`: its stderr arrives asynchronously. */
async function logSettles(srv: ServerHandle, ok: (c: ReturnType<typeof counts>) => boolean): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!ok(counts(srv))) {
    if (Date.now() > deadline) assert.fail(`the server log never showed the expected lines:\n${srv.log()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

void describe("--tls require with an X.509 certificate", () => {
  let srv: ServerHandle;
  before(async () => {
    srv = await startServer({
      size: "16M",
      args: x509("require"),
    });
  });
  after(async () => {
    await srv.stop();
  });

  void test("the banner advertises nbds URIs", () => {
    assert.match(srv.stdout(), /nbds\+unix:\/\/\/disk\?socket=/);
    assert.doesNotMatch(srv.stdout(), /\bnbd\+unix:/);
  });

  void test("nbdinfo --json over TLS shows the export", async () => {
    const info = await nbdinfoJson(certUri(srv, certs.clientNoCertDir));
    assert.equal(info.TLS, true);
    assert.equal(info.exports.length, 1);
    assert.equal(info.exports[0]["export-name"], "disk");
    assert.equal(info.exports[0]["export-size"], 16 * MiB);
    assert.equal(info.exports[0].is_read_only, false);
  });

  void test("data round trip over TLS (nbdsh write, flush, read; volume file checked)", async () => {
    const before = counts(srv);
    assert.equal(await roundTrip(srv, certUri(srv, certs.clientNoCertDir), 3 * MiB + 512), true);
    await logSettles(srv, (c) => c.tls === before.tls + 1);
  });

  void test("nbdcopy in and out over TLS", async () => {
    const src = join(work, "copy-in.bin");
    const data = randomBytes(16 * MiB);
    writeFileSync(src, data);
    const uri = certUri(srv, certs.clientNoCertDir);
    await run("nbdcopy", [src, uri], { timeoutMs: 60_000 });
    const dst = join(work, "copy-out.bin");
    await run("nbdcopy", [uri, dst], { timeoutMs: 60_000 });
    assert.equal(sha256(readRegion(dst, 0, 16 * MiB)), sha256(data));
    assert.equal(sha256(readRegion(srv.volume, 0, 16 * MiB)), sha256(data));
  });

  void test("a plaintext libnbd client is refused", async () => {
    const before = counts(srv);
    const r = await run("nbdinfo", ["--size", srv.uri], {
      allowFailure: true,
      env: { LIBNBD_DEBUG: "1" },
      timeoutMs: 30_000,
    });
    assert.notEqual(r.code, 0, "nbdinfo without TLS got through");
    assert.match(r.stderr, /server error message: this server requires TLS/);
    assert.equal(counts(srv).exports, before.exports, "a plaintext client reached transmission");
  });

  void test("plaintext writes do not reach the volume", async () => {
    const off = 9 * MiB;
    const before = readRegion(srv.volume, off, 4096);
    const r = await nbdsh(
      srv.uri,
      `import nbd, os\nh = nbd.NBD()\nh.connect_uri(os.environ["URI"])\nh.pwrite(b"x" * 4096, ${off})\n`,
      { allowFailure: true },
    );
    assert.notEqual(r.code, 0);
    assert.deepEqual(readRegion(srv.volume, off, 4096), before);
  });

  void test("on the wire: GO and LIST get NBD_REP_ERR_TLS_REQD, EXPORT_NAME is dropped", async () => {
    const c = await RawClient.connect(srv.sock);
    try {
      await c.greeting();
      c.sendClientFlags(3);
      for (const [opt, data] of [
        [NBD_OPT_GO, infoRequestData("")],
        [NBD_OPT_LIST, Buffer.alloc(0)],
        [NBD_OPT_GO, infoRequestData("disk")],
      ] as const) {
        const replies = await c.option(opt, data);
        const last = replies[replies.length - 1];
        assert.equal(replies.length, 1, `option ${opt}: the server sent replies before its refusal`);
        assert.ok(isOptionError(last.type));
        assert.equal(last.type, NBD_REP_ERR_TLS_REQD, `option ${opt}: reply 0x${last.type.toString(16)}`);
        assert.match(last.data.toString("utf8"), /TLS/);
      }
      c.sendOption(NBD_OPT_EXPORT_NAME, Buffer.from("disk"));
      const rest = await c.readToEnd(10_000);
      assert.equal(rest.length, 0, "EXPORT_NAME without TLS must end the connection without an export reply");
    } finally {
      c.destroy();
    }
  });
});

void describe("a client gone right after the STARTTLS reply", () => {
  let srv: ServerHandle;
  before(async () => {
    srv = await startServer({
      size: "16M",
      args: x509("require", "--max-connections", "1", "--handshake-timeout", "60"),
    });
  });
  after(async () => {
    await srv.stop();
  });

  void test("frees its connection slot at once, not at the handshake timeout", async () => {
    const a = await RawClient.connect(srv.sock);
    await a.greeting();
    a.sendClientFlags(3);
    const replies = await a.option(NBD_OPT_STARTTLS, Buffer.alloc(0));
    assert.equal(replies[replies.length - 1].type, NBD_REP_ACK);
    a.destroy(); // before any TLS handshake
    // With one connection allowed, the next client is refused until the slot is free.
    const deadline = Date.now() + 5000;
    for (;;) {
      const b = await RawClient.connect(srv.sock);
      try {
        await b.greeting(1000);
        break;
      } catch (e) {
        if (Date.now() > deadline) {
          assert.fail(
            `the slot was still taken 5 s later (the handshake timeout is 60 s): ${(e as Error).message}`,
          );
        }
      } finally {
        b.destroy();
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  });
});

void describe("--tls on (TLS optional)", () => {
  let srv: ServerHandle;
  before(async () => {
    srv = await startServer({
      size: "16M",
      args: x509("on"),
    });
  });
  after(async () => {
    await srv.stop();
  });

  void test("plaintext and TLS clients both work, on the same data", async () => {
    const plain = await nbdinfoJson(srv.uri);
    assert.equal(plain.TLS, false);
    assert.equal(plain.exports[0]["export-size"], 16 * MiB);
    const tls = await nbdinfoJson(certUri(srv, certs.clientNoCertDir));
    assert.equal(tls.TLS, true);
    assert.equal(await roundTrip(srv, srv.uri, 0), false);
    assert.equal(await roundTrip(srv, certUri(srv, certs.clientNoCertDir), MiB), true);
    // What one wrote, the other reads.
    const cross = await nbdsh(
      certUri(srv, certs.clientNoCertDir),
      `import nbd, os, hashlib\nh = nbd.NBD()\nh.set_uri_allow_local_file(True)\nh.connect_uri(os.environ["URI"])\nprint(hashlib.sha256(h.pread(${2 * MiB}, 0)).hexdigest())\n`,
    );
    assert.equal(cross.stdout.trim(), sha256(readRegion(srv.volume, 0, 2 * MiB)));
  });
});

void describe("--tls-ca: client certificates", () => {
  let srv: ServerHandle;
  before(async () => {
    srv = await startServer({
      size: "16M",
      args: x509("require", "--tls-ca", certs.caCert),
    });
  });
  after(async () => {
    await srv.stop();
  });

  void test("a client without a certificate fails the TLS handshake", async () => {
    const before = counts(srv);
    await mustFail(certUri(srv, certs.clientNoCertDir));
    await logSettles(srv, (c) => c.tlsFailed === before.tlsFailed + 1);
    assert.equal(counts(srv).exports, before.exports);
  });

  void test("a client certificate from another CA is refused", async () => {
    const before = counts(srv);
    await mustFail(certUri(srv, certs.rogueClientDir));
    await logSettles(srv, (c) => c.tlsFailed === before.tlsFailed + 1);
    assert.equal(counts(srv).exports, before.exports);
  });

  void test("a certificate from another CA sent all the same is refused (libnbd sends only one the server's CA list names; this client does not pick)", async () => {
    const before = counts(srv);
    // By hand: greeting, flags, STARTTLS, then TLS with the rogue certificate, then GO.
    const raw = netConnect(srv.sock);
    let t: TLSSocket | null = null;
    try {
      const outcome = await new Promise<string>((resolve) => {
        let buf = Buffer.alloc(0);
        let stage = 0;
        const onData = (d: Buffer): void => {
          buf = Buffer.concat([buf, d]);
          if (stage === 0 && buf.length >= 18) {
            buf = buf.subarray(18);
            stage = 1;
            const flags = Buffer.alloc(4);
            flags.writeUInt32BE(3);
            raw.write(Buffer.concat([flags, optionBytes(NBD_OPT_STARTTLS)]));
          }
          if (stage === 1 && buf.length >= 20) {
            if (buf.readUInt32BE(12) !== 1)
              return resolve(`STARTTLS answered 0x${buf.readUInt32BE(12).toString(16)}`);
            stage = 2;
            raw.off("data", onData);
            const sock = tlsConnect({
              socket: raw,
              rejectUnauthorized: false,
              cert: readFileSync(join(certs.rogueClientDir, "client-cert.pem")),
              key: readFileSync(join(certs.rogueClientDir, "client-key.pem")),
            });
            t = sock;
            let got = Buffer.alloc(0);
            sock.on("secureConnect", () => sock.write(optionBytes(NBD_OPT_GO, infoRequestData(""))));
            sock.on("data", (x: Buffer) => {
              got = Buffer.concat([got, x]);
              if (got.length >= 20) resolve(`option reply 0x${got.readUInt32BE(12).toString(16)}`);
            });
            sock.on("error", (e: Error) => resolve(`error: ${e.message}`));
            sock.on("close", () => resolve("closed"));
          }
        };
        raw.on("data", onData);
        raw.on("error", (e) => resolve(`error: ${e.message}`));
        raw.on("close", () => resolve("closed"));
      });
      assert.doesNotMatch(
        outcome,
        /option reply|STARTTLS/,
        "the server answered GO over TLS with a rogue certificate",
      );
      await logSettles(srv, (x) => x.tlsFailed === before.tlsFailed + 1);
      assert.equal(counts(srv).exports, before.exports);
      assert.match(srv.log(), /client certificate refused: .*it must chain to --tls-ca/);
    } finally {
      (t as TLSSocket | null)?.destroy();
      raw.destroy();
    }
  });

  void test("a client with a certificate from the CA gets in and moves data", async () => {
    const info = await nbdinfoJson(certUri(srv, certs.clientDir));
    assert.equal(info.TLS, true);
    assert.equal(info.exports[0]["export-size"], 16 * MiB);
    assert.equal(await roundTrip(srv, certUri(srv, certs.clientDir), 5 * MiB), true);
  });

  void test("plaintext is still refused", async () => {
    await mustFail(srv.uri);
  });
});

void describe("server certificate over TCP (libnbd verifies the peer on TCP)", () => {
  let srv: ServerHandle;
  let port = 0;
  before(async () => {
    srv = await startServer({
      size: "16M",
      args: x509("require", "--listen", "127.0.0.1:0"),
    });
    const deadline = Date.now() + 10_000;
    while (!/nbds:\/\/127\.0\.0\.1:\d+/.test(srv.stdout()) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 50));
    }
    port = Number(/nbds:\/\/127\.0\.0\.1:(\d+)/.exec(srv.stdout())?.[1] ?? 0);
  });
  after(async () => {
    await srv.stop();
  });

  void test("a client trusting our CA verifies the certificate for localhost", async () => {
    assert.ok(port > 0, `no TCP URI in the banner:\n${srv.stdout()}`);
    const info = await nbdinfoJson(`nbds://localhost:${port}/?tls-certificates=${certs.clientNoCertDir}`);
    assert.equal(info.TLS, true);
    assert.equal(info.exports[0]["export-size"], 16 * MiB);
  });

  void test("a client trusting another CA rejects the server", async () => {
    const before = counts(srv);
    const r = await mustFail(`nbds://localhost:${port}/?tls-certificates=${certs.untrustingDir}`);
    assert.match(r.stderr, /certificate|verif/i);
    assert.equal(counts(srv).exports, before.exports);
  });
});

void describe("TLS-PSK (--tls-psk)", () => {
  let srv: ServerHandle;
  before(async () => {
    srv = await startServer({ size: "16M", args: ["--tls", "require", "--tls-psk", certs.pskFile] });
  });
  after(async () => {
    await srv.stop();
  });

  void test("the right identity and key: nbdinfo and a data round trip", async () => {
    const uri = pskUri(srv, certs.pskFile, certs.pskIdentity);
    const info = await nbdinfoJson(uri);
    assert.equal(info.TLS, true);
    assert.equal(info.exports[0]["export-size"], 16 * MiB);
    assert.equal(await roundTrip(srv, uri, 7 * MiB), true);
  });

  void test("a wrong key is refused", async () => {
    const before = counts(srv);
    await mustFail(pskUri(srv, certs.wrongPskFile, certs.pskIdentity));
    await logSettles(srv, (c) => c.tlsFailed === before.tlsFailed + 1);
    assert.equal(counts(srv).exports, before.exports);
  });

  void test("an unknown identity is refused", async () => {
    const other = join(work, "other-identity.psk");
    const key = /^[^#:]+:([0-9a-f]+)$/m.exec(readFileSync(certs.pskFile, "utf8"))?.[1];
    assert.ok(key);
    writeFileSync(other, `stranger:${key}\n`, { mode: 0o600 });
    const before = counts(srv);
    await mustFail(pskUri(srv, other, "stranger"));
    await logSettles(srv, (c) => c.tlsFailed === before.tlsFailed + 1);
    assert.equal(counts(srv).exports, before.exports);
  });

  void test("plaintext and certificate clients are refused", async () => {
    const before = counts(srv);
    await mustFail(srv.uri);
    await mustFail(certUri(srv, certs.clientNoCertDir));
    assert.equal(counts(srv).exports, before.exports);
  });
});

void describe("TLS-PSK and a certificate on one server", () => {
  let srv: ServerHandle;
  before(async () => {
    srv = await startServer({
      size: "16M",
      args: x509("require", "--tls-psk", certs.pskFile, "--log-level", "debug"),
    });
  });
  after(async () => {
    await srv.stop();
  });

  void test("an X.509 client works", async () => {
    assert.equal(await roundTrip(srv, certUri(srv, certs.clientNoCertDir), 0), true);
  });

  void test("a PSK client works", async () => {
    const uri = pskUri(srv, certs.pskFile, certs.pskIdentity);
    const r = await run("nbdinfo", ["--size", uri], { allowFailure: true, timeoutMs: 30_000 });
    assert.equal(
      r.code,
      0,
      `a PSK client cannot connect when the server also has a certificate:\n${r.stderr}\nserver log:\n${srv.log()}`,
    );
    assert.equal(r.stdout.trim(), String(16 * MiB));
    assert.equal(await roundTrip(srv, uri, 2 * MiB), true);
  });
});

/** `blockfork serve ARGS` must refuse to start: exit 2 with a message matching msg. */
async function refuses(args: string[], msg: RegExp): Promise<void> {
  const dir = scratchDir("blockfork-tls-cli-");
  const sock = join(dir, "nbd.sock");
  try {
    const p = spawn(
      process.execPath,
      [
        BIN,
        "serve",
        "--volume",
        join(dir, "v.img"),
        "--size",
        "1M",
        "--listen",
        "none",
        "--socket",
        sock,
        ...args,
      ],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    let out = "";
    let err = "";
    p.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
    p.stderr.setEncoding("utf8").on("data", (d: string) => (err += d));
    const code = await new Promise<number | null>((resolve) => {
      const t = setTimeout(() => {
        p.kill("SIGKILL");
        resolve(null);
      }, 10_000);
      p.on("close", (c) => {
        clearTimeout(t);
        resolve(c);
      });
    });
    assert.notEqual(code, null, `serve ${args.join(" ")} started serving instead of refusing:\n${out}`);
    assert.equal(code, 2, `serve ${args.join(" ")}: exit ${code}, want 2\n${err}`);
    assert.match(err, msg);
    assert.equal(existsSync(sock), false, "a refused configuration must not leave a socket");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

void describe("TLS configuration errors exit 2", () => {
  void test("--tls require or on without a certificate or PSK", async () => {
    await refuses(["--tls", "require"], /--tls require needs --tls-cert/);
    await refuses(["--tls", "on"], /--tls on needs --tls-cert/);
  });

  void test("--tls-cert without --tls-key", async () => {
    await refuses(["--tls-cert", certs.serverCert], /--tls-cert and --tls-key go together/);
  });

  void test("--tls off with a certificate", async () => {
    await refuses(
      ["--tls", "off", "--tls-cert", certs.serverCert, "--tls-key", certs.serverKey],
      /--tls off contradicts/,
    );
  });

  void test("an unknown --tls mode", async () => {
    await refuses(["--tls", "maybe"], /--tls must be off, on or require/);
  });

  void test("unreadable or malformed certificate files", async () => {
    await refuses(["--tls-cert", join(work, "nope.pem"), "--tls-key", certs.serverKey], /nope\.pem/);
    await refuses(["--tls-cert", certs.serverKey, "--tls-key", certs.serverKey], /TLS certificate or key/);
    await refuses(["--tls-cert", certs.serverCert, "--tls-key", join(certs.dir, "client-key.pem")], /TLS/);
  });

  void test("a malformed PSK file", async () => {
    const bad = join(work, "bad.psk");
    writeFileSync(bad, "identity-without-key\n");
    await refuses(["--tls-psk", bad], /expected "identity:hexkey"/);
    const empty = join(work, "empty.psk");
    writeFileSync(empty, "# nothing\n");
    await refuses(["--tls-psk", empty], /no PSK keys/);
  });

  void test("a missing PSK file", async () => {
    await refuses(["--tls-psk", join(work, "missing.psk")], /missing\.psk/);
  });

  void test("--tls-key without --tls-cert", async () => {
    await refuses(["--tls-key", certs.serverKey], /--tls-cert/);
  });

  void test("--tls-ca without a certificate", async () => {
    await refuses(["--tls-ca", certs.caCert], /--tls-ca/);
  });

  void test("a CA file that holds no certificate (a key, an empty file): --tls-ca and --gateway-ca", async () => {
    const dir = scratchDir("blockfork-tls-ca-");
    try {
      const empty = join(dir, "empty.pem");
      writeFileSync(empty, "");
      const x = ["--tls", "require", "--tls-cert", certs.serverCert, "--tls-key", certs.serverKey];
      for (const bad of [certs.serverKey, empty]) {
        await refuses([...x, "--tls-ca", bad], /--tls-ca .* holds no certificate/);
        await refuses(
          ["--gateway", "https://127.0.0.1:1", "--state-dir", join(dir, "st"), "--gateway-ca", bad],
          /--gateway-ca .* holds no certificate/,
        );
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
