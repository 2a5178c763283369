// TLS material for black-box tests, made with the openssl command line: a private CA, a server
// certificate for localhost / 127.0.0.1, a client certificate, a second (untrusted) CA with its own
// client certificate, and a PSK file. Client directories are laid out the way libnbd (gnutls)
// reads a `tls-certificates=DIR`: ca-cert.pem, and for client authentication client-cert.pem and
// client-key.pem.

import { mkdirSync, copyFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { run } from "./run.js";

/** Paths of the generated material. */
export interface TestCerts {
  dir: string;
  /** CA certificate that signed the server and client certificates. */
  caCert: string;
  serverCert: string;
  serverKey: string;
  /** libnbd certificates directory with only ca-cert.pem (no client identity). */
  clientNoCertDir: string;
  /** libnbd certificates directory with ca-cert.pem, client-cert.pem, client-key.pem. */
  clientDir: string;
  /** Like clientDir, but the client certificate comes from another CA the server does not trust. */
  rogueClientDir: string;
  /** libnbd certificates directory whose ca-cert.pem is the other CA: it cannot verify the server. */
  untrustingDir: string;
  /** PSK file ("identity:hexkey" lines) and the identity in it. */
  pskFile: string;
  pskIdentity: string;
  /** A PSK file with the same identity but another key. */
  wrongPskFile: string;
}

async function openssl(args: string[], cwd: string): Promise<void> {
  await run("openssl", args, { cwd, timeoutMs: 60_000 });
}

const EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];

async function makeCa(dir: string, name: string): Promise<void> {
  await openssl(
    [
      "req",
      "-x509",
      ...EC,
      "-keyout",
      `${name}-key.pem`,
      "-out",
      `${name}-cert.pem`,
      "-days",
      "7",
      "-subj",
      `/CN=blockfork test ${name}`,
      "-addext",
      "basicConstraints=critical,CA:TRUE",
      "-addext",
      "keyUsage=critical,keyCertSign,cRLSign",
    ],
    dir,
  );
}

async function makeLeaf(dir: string, ca: string, name: string, cn: string, ext: string): Promise<void> {
  writeFileSync(join(dir, `${name}.ext`), ext);
  await openssl(
    ["req", "-new", ...EC, "-keyout", `${name}-key.pem`, "-out", `${name}.csr`, "-subj", `/CN=${cn}`],
    dir,
  );
  await openssl(
    [
      "x509",
      "-req",
      "-in",
      `${name}.csr`,
      "-CA",
      `${ca}-cert.pem`,
      "-CAkey",
      `${ca}-key.pem`,
      "-CAcreateserial",
      "-out",
      `${name}-cert.pem`,
      "-days",
      "7",
      "-extfile",
      `${name}.ext`,
    ],
    dir,
  );
}

/** Generate a CA, server and client certificates and PSK files under dir. */
export async function makeTestCerts(dir: string): Promise<TestCerts> {
  mkdirSync(dir, { recursive: true });
  await makeCa(dir, "ca");
  await makeCa(dir, "rogue-ca");
  await makeLeaf(
    dir,
    "ca",
    "server",
    "localhost",
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n" +
      "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
  );
  const clientExt =
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";
  await makeLeaf(dir, "ca", "client", "blockfork-test-client", clientExt);
  await makeLeaf(dir, "rogue-ca", "rogue-client", "blockfork-rogue-client", clientExt);

  const clientNoCertDir = join(dir, "client-nocert");
  const clientDir = join(dir, "client");
  const rogueClientDir = join(dir, "client-rogue");
  const untrustingDir = join(dir, "client-untrusting");
  mkdirSync(untrustingDir);
  copyFileSync(join(dir, "rogue-ca-cert.pem"), join(untrustingDir, "ca-cert.pem"));
  for (const d of [clientNoCertDir, clientDir, rogueClientDir]) {
    mkdirSync(d);
    copyFileSync(join(dir, "ca-cert.pem"), join(d, "ca-cert.pem"));
  }
  copyFileSync(join(dir, "client-cert.pem"), join(clientDir, "client-cert.pem"));
  copyFileSync(join(dir, "client-key.pem"), join(clientDir, "client-key.pem"));
  copyFileSync(join(dir, "rogue-client-cert.pem"), join(rogueClientDir, "client-cert.pem"));
  copyFileSync(join(dir, "rogue-client-key.pem"), join(rogueClientDir, "client-key.pem"));

  const pskIdentity = "blockfork-test";
  const pskFile = join(dir, "keys.psk");
  writeFileSync(pskFile, `# test keys\n${pskIdentity}:${randomBytes(32).toString("hex")}\n`, { mode: 0o600 });
  const wrongPskFile = join(dir, "wrong.psk");
  writeFileSync(wrongPskFile, `${pskIdentity}:${randomBytes(32).toString("hex")}\n`, { mode: 0o600 });

  return {
    dir,
    caCert: join(dir, "ca-cert.pem"),
    serverCert: join(dir, "server-cert.pem"),
    serverKey: join(dir, "server-key.pem"),
    clientNoCertDir,
    clientDir,
    rogueClientDir,
    untrustingDir,
    pskFile,
    pskIdentity,
    wrongPskFile,
  };
}
