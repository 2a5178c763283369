// `blockfork gateway` over HTTPS: a self-signed certificate made with openssl, and one signed by
// the private CA of test/helpers/certs.ts. A client that trusts it gets health, updates and data
// (with the token); one that does not is refused by its own verification; plain HTTP on the TLS
// port gets no API reply; unreadable certificate files are a usage error (exit 2).

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { KIND } from "../../src/gateway/records.js";
import { makeTestCerts } from "../helpers/certs.js";
import { GatewayClient, startGateway, type GatewayHandle, unboot } from "../helpers/gateway.js";
import { run } from "../helpers/run.js";
import { BIN, scratchDir } from "../helpers/server.js";

const SIZE = 16 * 1024 * 1024;
const NAME = "sec";
const dir = scratchDir("blockfork-gw-tls-");
const handles: GatewayHandle[] = [];
let selfCert: string;
let selfKey: string;

before(async () => {
  selfCert = join(dir, "self-cert.pem");
  selfKey = join(dir, "self-key.pem");
  await run(
    "openssl",
    [
      "req",
      "-x509",
      "-newkey",
      "ec",
      "-pkeyopt",
      "ec_paramgen_curve:prime256v1",
      "-nodes",
      "-keyout",
      selfKey,
      "-out",
      selfCert,
      "-days",
      "2",
      "-subj",
      "/CN=localhost",
      "-addext",
      "subjectAltName=DNS:localhost,IP:127.0.0.1",
    ],
    { timeoutMs: 60_000 },
  );
});

after(async () => {
  for (const h of handles) await h.stop("SIGKILL");
  rmSync(dir, { recursive: true, force: true });
});

async function exercise(gw: GatewayHandle): Promise<void> {
  assert.match(gw.url, /^https:\/\/127\.0\.0\.1:\d+\/v1$/);
  const c = gw.client;
  const h = await c.request("GET", "/health", { token: null });
  assert.equal(h.status, 200);
  const id = { source: "715", generation: 1, size: SIZE };
  const data = Buffer.alloc(8192, 0x5a);
  const u = await c.updates(NAME, id, [
    { kind: KIND.WRITE, seq: 1, period: 0, offset: 4096, length: 8192, data },
  ]);
  assert.equal(u.status, 200, u.body.toString());
  assert.deepEqual(unboot((await c.flush(NAME, id)).json()), { durableThrough: 1, secondary: "unknown" });
  assert.deepEqual((await c.data(NAME, 4096, 8192)).body, data);
  assert.equal((await c.request("GET", "/status", { token: "wrong" })).status, 401);
}

void describe("gateway over TLS", () => {
  void test("a self-signed certificate: trusted clients work, others are refused", async () => {
    mkdirSync(join(dir, "self"));
    const gw = await startGateway({
      dir: join(dir, "self"),
      size: "16M",
      token: true,
      tls: { cert: selfCert, key: selfKey, ca: readFileSync(selfCert) },
    });
    handles.push(gw);
    await exercise(gw);

    const untrusting = new GatewayClient(gw.url);
    await assert.rejects(untrusting.request("GET", "/health"), (e: NodeJS.ErrnoException) => {
      assert.match(String(e.code), /SELF_SIGNED|UNABLE_TO_VERIFY/);
      return true;
    });
    untrusting.close();

    // Plain HTTP to the TLS port: no API reply.
    const plain = new GatewayClient(gw.url.replace("https:", "http:"));
    const r = await plain.request("GET", "/health").then(
      (x) => `status ${x.status}`,
      (e: NodeJS.ErrnoException) => e.code ?? e.message,
    );
    plain.close();
    assert.notEqual(r, "status 200", "plain HTTP must not reach the API");

    const exit = await gw.stop();
    assert.deepEqual(exit, { code: 0, signal: null }, gw.log());
  });

  void test("a certificate from a private CA", async () => {
    const certs = await makeTestCerts(join(dir, "ca"));
    const gw = await startGateway({
      dir: join(dir, "ca"),
      size: "16M",
      token: true,
      tls: { cert: certs.serverCert, key: certs.serverKey, ca: readFileSync(certs.caCert) },
    });
    handles.push(gw);
    await exercise(gw);
    assert.equal((await gw.stop()).code, 0);
  });

  void test("certificate files that cannot be loaded: exit 2", async () => {
    writeFileSync(join(dir, "garbage.pem"), "not a certificate\n");
    for (const [cert, key] of [
      [join(dir, "garbage.pem"), selfKey],
      [join(dir, "missing.pem"), selfKey],
      [selfCert, join(dir, "garbage.pem")],
    ]) {
      const r = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
        const p = spawn(
          process.execPath,
          [
            BIN,
            "gateway",
            "--volume",
            join(dir, "v.img"),
            "--size",
            "1M",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
          ],
          { stdio: ["ignore", "ignore", "pipe"] },
        );
        let stderr = "";
        p.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
        const t = setTimeout(() => p.kill("SIGKILL"), 15_000);
        p.on("close", (code) => {
          clearTimeout(t);
          resolve({ code, stderr });
        });
      });
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, /cannot load the TLS certificate or key/);
    }
  });
});
