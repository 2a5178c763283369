// `blockfork serve`: serve a primary volume over NBD.

import { parseArgs } from "node:util";
import { readFileSync, mkdirSync } from "node:fs";
import { basename, dirname, extname, resolve } from "node:path";
import { createSecureContext, DEFAULT_CIPHERS, type TLSSocket } from "node:tls";
import { Logger, parseLogLevel } from "../log.js";
import { UsageError } from "../errors.js";
import { parseSize, formatSize } from "../util/size.js";
import { FileVolume } from "../volume/file.js";
import { buildPrimaryStack } from "../stack.js";
import { checkBlockSizes, DEFAULT_BLOCK_SIZES, ExportRegistry, type BlockSizes } from "../nbd/exports.js";
import { NbdServer, parseListen } from "../nbd/server.js";
import type { TlsSettings } from "../nbd/handshake.js";

export const SERVE_HELP = `Usage: blockfork serve --volume PATH [options]

Serve a primary volume (a regular file or a block device) over the Network Block Device protocol.

Volume
  --volume PATH            file or block device to serve (required)
  --size SIZE              create PATH as a sparse file of SIZE (1G, 512M, bytes) if it does not
                           exist; if it exists, SIZE must match (nothing is ever truncated)
  --name NAME              export name (default: the file name without extension); the export
                           also answers to "" (the default export)
  --description TEXT       shown by nbdinfo and NBD_OPT_LIST
  --read-only              refuse every write, trim and zero with EPERM
  --block-size MIN,PREF,MAX  advertised block sizes (default 1,4096,33554432); requests not
                           aligned to MIN, or longer than MAX, get EINVAL

Network
  --listen HOST:PORT       TCP address (default 127.0.0.1:10809; "none" for no TCP listener)
  --socket PATH            also listen on a unix socket
  --max-connections N      refuse connections beyond N (default 1024)
  --handshake-timeout SEC  drop clients that have not finished the handshake (default 10)

TLS
  --tls off|on|require     off: no TLS; on: clients may STARTTLS; require: clients must
                           (default: on when a certificate or PSK file is given, else off)
  --tls-cert FILE          server certificate (PEM)
  --tls-key FILE           its private key (PEM)
  --tls-ca FILE            CA (PEM) to verify client certificates (clients must present one)
  --tls-psk FILE           TLS-PSK keys, lines "identity:hexkey" (the nbdkit/qemu format)

Performance and logs
  --threads N              I/O thread pool size (default 8; UV_THREADPOOL_SIZE)
  --no-inline-writes       never write on the event-loop thread (always use the pool)
  --log-level LEVEL        error, warn, info (default) or debug

Exit status: 0 after a clean shutdown (SIGINT/SIGTERM); 1 on a fatal runtime error; 2 on a usage
or configuration error (the message says what to change). A second SIGINT/SIGTERM during shutdown
exits at once with status 130.
`;

interface ServeConfig {
  volume: string;
  size: number | undefined;
  name: string;
  description: string | undefined;
  readOnly: boolean;
  blockSizes: BlockSizes;
  listen: { host: string; port: number } | null;
  socket: string | undefined;
  maxConnections: number;
  handshakeTimeoutMs: number;
  tls: TlsSettings;
  inlineWrites: boolean;
  log: Logger;
}

function positiveInt(v: string, what: string): number {
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n <= 0)
    throw new UsageError(`${what} must be a positive integer, got "${v}"`);
  return n;
}

function readConfigFile(file: string, what: string): Buffer {
  try {
    return readFileSync(file);
  } catch (e) {
    throw new UsageError(`cannot read the ${what} ${file}: ${(e as Error).message}`);
  }
}

function loadPsk(file: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  for (const [i, raw] of readConfigFile(file, "PSK file").toString("utf8").split("\n").entries()) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const m = /^([^:]+):([0-9a-fA-F]+)$/.exec(line);
    if (!m || m[2].length % 2 !== 0) throw new UsageError(`${file}:${i + 1}: expected "identity:hexkey"`);
    keys.set(m[1], Buffer.from(m[2], "hex"));
  }
  if (keys.size === 0) throw new UsageError(`${file} holds no PSK keys`);
  return keys;
}

/**
 * TLS 1.3 suites usable with a PSK: gnutls (libnbd) binds its PSK to SHA-256, so a server that
 * picked TLS_AES_256_GCM_SHA384 would ignore the key. TLS 1.2 PSK suites follow for old clients.
 */
const PSK_TLS13 = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";
const PSK_TLS12 = "PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305";

type TlsArgs = {
  tls?: string | undefined;
  "tls-cert"?: string | undefined;
  "tls-key"?: string | undefined;
  "tls-ca"?: string | undefined;
  "tls-psk"?: string | undefined;
};

/** TLS settings from the command line; throws UsageError for contradictory or incomplete options. */
export function parseTls(values: TlsArgs): TlsSettings {
  const cert = values["tls-cert"];
  const key = values["tls-key"];
  const ca = values["tls-ca"];
  const psk = values["tls-psk"];
  if ((cert === undefined) !== (key === undefined))
    throw new UsageError("--tls-cert and --tls-key go together");
  if (ca !== undefined && cert === undefined) {
    throw new UsageError(
      "--tls-ca verifies client certificates and needs a server certificate (--tls-cert, --tls-key)",
    );
  }
  const any = cert !== undefined || psk !== undefined;
  const mode = values.tls ?? (any ? "on" : "off");
  if (mode !== "off" && mode !== "on" && mode !== "require") {
    throw new UsageError(`--tls must be off, on or require, not "${mode}"`);
  }
  if (mode === "off") {
    if (any || ca !== undefined)
      throw new UsageError("--tls off contradicts --tls-cert/--tls-psk/--tls-ca; drop one of them");
    return { mode };
  }
  if (!any) throw new UsageError(`--tls ${mode} needs --tls-cert and --tls-key (or --tls-psk)`);
  const settings: TlsSettings = { mode };
  // With a PSK, only SHA-256 TLS 1.3 suites (the default list would let TLS_AES_256_GCM_SHA384 win).
  const tls12 = DEFAULT_CIPHERS.split(":").filter((c) => !c.startsWith("TLS_"));
  const ciphers = psk === undefined ? undefined : [PSK_TLS13, ...tls12, PSK_TLS12].join(":");
  try {
    settings.context = createSecureContext({
      ...(cert !== undefined
        ? { cert: readConfigFile(cert, "certificate"), key: readConfigFile(key!, "key") }
        : {}),
      ...(ca !== undefined ? { ca: readConfigFile(ca, "CA file") } : {}),
      ...(ciphers !== undefined ? { ciphers } : {}),
      minVersion: "TLSv1.2",
    });
  } catch (e) {
    if (e instanceof UsageError) throw e;
    throw new UsageError(`cannot load the TLS certificate or key: ${(e as Error).message}`);
  }
  settings.verifyClients = ca !== undefined;
  if (psk !== undefined) {
    const keys = loadPsk(psk);
    settings.pskCallback = (_s: TLSSocket, identity: string) => keys.get(identity) ?? null;
  }
  return settings;
}

/** Parse `serve` arguments into a configuration; throws UsageError. */
export function parseServeArgs(argv: string[]): ServeConfig {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      volume: { type: "string" },
      size: { type: "string" },
      name: { type: "string" },
      description: { type: "string" },
      "read-only": { type: "boolean", default: false },
      "block-size": { type: "string" },
      listen: { type: "string" },
      socket: { type: "string" },
      "max-connections": { type: "string" },
      "handshake-timeout": { type: "string" },
      tls: { type: "string" },
      "tls-cert": { type: "string" },
      "tls-key": { type: "string" },
      "tls-ca": { type: "string" },
      "tls-psk": { type: "string" },
      threads: { type: "string" },
      "no-inline-writes": { type: "boolean", default: false },
      "log-level": { type: "string" },
    },
  });
  if (!values.volume) throw new UsageError("--volume PATH is required (a file or block device to serve)");
  const level = values["log-level"] ?? "info";
  const lvl = parseLogLevel(level);
  if (!lvl) throw new UsageError(`--log-level must be error, warn, info or debug, not "${level}"`);
  const log = Logger.create(lvl);

  let blockSizes = DEFAULT_BLOCK_SIZES;
  if (values["block-size"] !== undefined) {
    const parts = values["block-size"].split(",");
    if (parts.length !== 3)
      throw new UsageError("--block-size takes MIN,PREF,MAX (for example 512,4096,33554432)");
    const [minimum, preferred, maximum] = parts.map((p) => parseSize(p, "--block-size")) as [
      number,
      number,
      number,
    ];
    blockSizes = { minimum, preferred, maximum };
  }

  const tls = parseTls(values);
  const listen = values.listen === "none" ? null : parseListen(values.listen ?? "127.0.0.1:10809");
  if (listen === null && values.socket === undefined) {
    throw new UsageError("--listen none needs --socket PATH (otherwise nothing could connect)");
  }
  const volume = values.volume;
  return {
    volume,
    size: values.size !== undefined ? parseSize(values.size, "--size") : undefined,
    name: values.name ?? basename(volume, extname(volume)),
    description: values.description,
    readOnly: values["read-only"] === true,
    blockSizes,
    listen,
    socket: values.socket,
    maxConnections: values["max-connections"]
      ? positiveInt(values["max-connections"], "--max-connections")
      : 1024,
    handshakeTimeoutMs:
      1000 *
      (values["handshake-timeout"] ? positiveInt(values["handshake-timeout"], "--handshake-timeout") : 10),
    tls,
    inlineWrites: values["no-inline-writes"] !== true,
    log,
  };
}

/** Run `blockfork serve`; resolves with the exit status. */
export async function serve(argv: string[]): Promise<number> {
  const cfg = parseServeArgs(argv);
  const log = cfg.log;
  if (cfg.size !== undefined) mkdirSync(dirname(resolve(cfg.volume)), { recursive: true });
  const base = FileVolume.open(cfg.volume, {
    readOnly: cfg.readOnly,
    create: true,
    ...(cfg.size !== undefined ? { size: cfg.size } : {}),
    inlineWrites: cfg.inlineWrites,
  });
  checkBlockSizes(cfg.blockSizes, base.size);
  const volume = buildPrimaryStack(base, { readOnly: cfg.readOnly });
  const registry = new ExportRegistry();
  registry.addStatic(
    { name: cfg.name, description: cfg.description ?? base.description, volume, blockSizes: cfg.blockSizes },
    true,
  );
  const server = new NbdServer({
    registry,
    tls: cfg.tls,
    log,
    handshakeTimeoutMs: cfg.handshakeTimeoutMs,
    maxConnections: cfg.maxConnections,
  });

  const urls: string[] = [];
  let tcp: string | null = null;
  let unix: string | null = null;
  const scheme = cfg.tls.mode === "require" ? "nbds" : "nbd";
  if (cfg.listen) {
    tcp = await server.listen(cfg.listen);
    urls.push(`${scheme}://${tcp}/${encodeURIComponent(cfg.name)}`);
  }
  if (cfg.socket) {
    unix = resolve(await server.listen({ path: cfg.socket }));
    urls.push(`${scheme}+unix:///${encodeURIComponent(cfg.name)}?socket=${unix}`);
  }
  printBanner(cfg, base.size, base.description, urls, tcp, unix);
  log.info(
    `serving ${base.description} (${base.size} bytes) as "${cfg.name}"${cfg.readOnly ? " read-only" : ""}`,
  );

  return new Promise<number>((resolveExit) => {
    let stopping = false;
    const onSignal = (sig: NodeJS.Signals): void => {
      if (stopping) {
        log.warn(`second ${sig}: exiting at once`);
        process.exit(130);
      }
      stopping = true;
      log.info(`${sig}: shutting down (finishing in-flight requests; ${sig} again to exit at once)`);
      void shutdown(server, base, log).then(resolveExit);
    };
    process.on("SIGINT", onSignal);
    process.on("SIGTERM", onSignal);
  });
}

async function shutdown(server: NbdServer, base: FileVolume, log: Logger): Promise<number> {
  let status = 0;
  const quiet = await server.quiesce();
  if (!quiet) log.warn("some requests were still in flight after 30 s; closing anyway");
  try {
    await base.flush();
    log.info("volume flushed (fdatasync)");
  } catch (e) {
    log.error(`final flush failed: ${(e as Error).message}`);
    status = 1;
  }
  await server.closeAll();
  await base.close();
  log.info("stopped");
  return status;
}

function printBanner(
  cfg: ServeConfig,
  size: number,
  description: string,
  urls: string[],
  tcp: string | null,
  unix: string | null,
): void {
  const lines = [`blockfork: serving ${description} (${formatSize(size)}) as export "${cfg.name}"`];
  for (const u of urls) lines.push(`  ${u}`);
  lines.push("attach it with:");
  const first = urls[0];
  lines.push(`  nbdinfo '${first}'`);
  lines.push(`  qemu-img info '${first}'`);
  if (unix)
    lines.push(`  nbd-client -u ${unix} /dev/nbd0 -N ${cfg.name}        (as root; -b 4096 for 4K sectors)`);
  if (tcp) {
    const [host, port] = [tcp.slice(0, tcp.lastIndexOf(":")), tcp.slice(tcp.lastIndexOf(":") + 1)];
    lines.push(`  nbd-client ${host} ${port} /dev/nbd0 -N ${cfg.name}`);
  }
  process.stdout.write(lines.join("\n") + "\n");
}
