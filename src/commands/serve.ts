// `blockfork serve`: serve a primary volume over NBD.

import { parseArgs } from "node:util";
import { readFileSync, mkdirSync } from "node:fs";
import { constants as osConstants } from "node:os";
import { basename, dirname, extname, resolve } from "node:path";
import { createSecureContext, DEFAULT_CIPHERS, type TLSSocket } from "node:tls";
import { X509Certificate } from "node:crypto";
import { Logger, parseLogLevel } from "../log.js";
import { errnoOf, UsageError } from "../errors.js";
import { parseSize, formatSize } from "../util/size.js";
import { FileVolume } from "../volume/file.js";
import { buildPrimaryStack, type PrimaryStackOptions } from "../stack.js";
import { DEFAULT_REGION, TrackingLog } from "../tracking/log.js";
import { extentsJson } from "../tracking/dirty-map.js";
import { GatewayLink, LINK_DEFAULTS } from "../forks/link.js";
import { verify } from "../forks/verify.js";
import { AdminServer, type AdminHandlers } from "../admin/server.js";
import { adminSocket } from "../admin/client.js";
import { Journal } from "../pit/journal.js";
import { journalNow } from "../pit/clock.js";
import { SnapshotProvider } from "../pit/provider.js";
import { parseDuration } from "../util/duration.js";
import { join } from "node:path";
import { checkBlockSizes, DEFAULT_BLOCK_SIZES, ExportRegistry, type BlockSizes } from "../nbd/exports.js";
import { NbdServer, parseListen } from "../nbd/server.js";
import type { TlsSettings } from "../nbd/handshake.js";
import { lockStateDir, tuneMallocForServers } from "../blockio/index.js";
import { claimStateDir, identityOf } from "../util/volume-identity.js";

export const SERVE_HELP = `Usage: blockfork serve --volume PATH [options]

Serve a primary volume (a regular file or a block device) over the Network Block Device protocol.

Volume
  --volume PATH            file or block device to serve (required)
  --size SIZE              create PATH as a sparse file of SIZE (1G, 512M, bytes) if it does not
                           exist; if it exists, SIZE must match (nothing is ever truncated)
  --name NAME              export name (default: the file name without extension); the export
                           also answers to "" (the default export); at most 4096 bytes
  --description TEXT       shown by nbdinfo and NBD_OPT_LIST; at most 4096 bytes
  --read-only              refuse every write, trim and zero with EPERM
  --block-size MIN,PREF,MAX  advertised block sizes (default 1,4096,33554432; MAX at most
                           64M); requests not aligned to MIN, or longer than MAX, get EINVAL

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

Replication (forked writes to a gateway; see docs/gateway-api.md)
  --gateway URL            send every write, trim and zero to this gateway (http(s)://host:port)
  --gateway-token-file F   bearer token for the gateway
  --gateway-ca FILE        CA (PEM) that signed an https gateway's certificate
  --replication MODE       async (default): answer after the primary write, queue to the gateway;
                           sync: answer after the gateway applied it too (falls back to tracking
                           after --sync-timeout)
  --state-dir DIR          tracking log and admin socket (default: PATH.blockfork for files;
                           required for block devices)
  --tracking-mirror URL    while the gateway is down, send the dirty extents to this gateway too
  --tracking-mirror-token-file F
                           bearer token for the tracking mirror (default: the gateway's)
  --gateway-takeover       take the gateway's secondary over when another proxy owns it (a gateway
                           takes updates from one proxy): only when that proxy is gone for good;
                           this one then resyncs the whole volume
  --no-update-stream       send batches as POST requests instead of on an upgraded update stream
  --sync-timeout MS        sync mode: a write or FLUSH waits for the gateway at most MS, then the
                           link tracks and it completes (default 5000)
  --queue-size SIZE        async mode: queue bound before the link tracks (default 64M)
  --queue-age MS           async mode: oldest queued update before the link tracks (default 5000)
  --resync-rate SIZE       resync bandwidth per second (default: unlimited)
  --resync-concurrency N   ranges (4 MiB) read and sent in parallel during resync (default 8)
  --track-granularity SIZE bytes per dirty bit in a new tracking log (default 64K)
  --assume-clean           a NEW tracking log starts clean (no initial full copy): only when the
                           secondary is known to equal the primary (both new, or copied)
  --al-extents N           activity-log regions of 4 MiB kept hot (default 1024): after a crash
                           at most N x 4 MiB are resynced

Point-in-time snapshots (before-images journaled under --state-dir; see docs/pit-journal.md;
the --pit-* options need --pit)
  --pit                    journal before-images; serve read-only exports snap@<ISO-8601 time>
                           (without a zone: UTC) and snap@<bookmark> (blockfork mark NAME)
  --pit-retention DURATION keep points in time this long (default 24h; 90s, 30m, 7d ...)
  --pit-max-bytes SIZE     and at most this much journal (default 10G): an open snapshot holds
                           back the age limit, but over this size one that reads the oldest
                           segment is revoked (its reads fail with EIO)
  --pit-window MS          merge window: snapshots exist at its boundaries (default 1000)

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
  replication: ReplicationConfig | null;
  stateDir: string | undefined;
  pit: { retentionMs: number; maxBytes: number; windowMs: number } | null;
}

/** The gateway side of `serve`. */
interface ReplicationConfig {
  url: string;
  token: string | undefined;
  ca: Buffer | undefined;
  mode: "async" | "sync";
  mirror: string | undefined;
  syncTimeoutMs: number;
  queueBytes: number;
  queueAgeMs: number;
  resyncRate: number;
  resyncConcurrency: number;
  granularity: number | undefined;
  alExtents: number;
  assumeClean: boolean;
  updateStream: boolean;
  takeover: boolean;
  mirrorToken: string | undefined;
}

function gatewayUrl(text: string, what: string): string {
  let u: URL;
  try {
    u = new URL(text);
  } catch {
    throw new UsageError(`${what} "${text}" is not a URL (for example http://127.0.0.1:7070)`);
  }
  if (u.protocol !== "http:" && u.protocol !== "https:")
    throw new UsageError(`${what} must be http:// or https://`);
  // Only scheme, host and port are used: anything else would be dropped without a word.
  if ((u.pathname !== "/" && u.pathname !== "") || u.search !== "" || u.hash !== "")
    throw new UsageError(`${what} "${text}" has a path, query or fragment; give http(s)://host:port only`);
  if (u.username !== "" || u.password !== "")
    throw new UsageError(
      `${what} "${u.protocol}//...@${u.host}" has a user or password; tokens go in a token file (see --help)`,
    );
  return u.origin;
}

export function positiveInt(v: string, what: string): number {
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

/**
 * A CA file (PEM): refused unless it holds at least one certificate, every one of them valid PEM.
 * Given a key, an empty file or anything else, TLS would verify against nothing: with --tls-ca
 * every client certificate would then be refused or, worse, the mistake found only at run time.
 */
function readCaFile(file: string, option: string): Buffer {
  const pem = readConfigFile(file, `${option} file`);
  const blocks = pem
    .toString("latin1")
    .match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g);
  if (blocks === null) {
    throw new UsageError(
      `${option} ${file} holds no certificate (PEM, -----BEGIN CERTIFICATE-----); give the CA's certificate`,
    );
  }
  for (const b of blocks) {
    try {
      new X509Certificate(b);
    } catch (e) {
      throw new UsageError(`${option} ${file}: a certificate in it cannot be read: ${(e as Error).message}`);
    }
  }
  return pem;
}

/** The token in --gateway-token-file, refused as the gateway refuses its --token-file. */
function gatewayToken(file: string): string {
  const token = readConfigFile(file, "gateway token file").toString("utf8").trim();
  if (token === "") throw new UsageError(`--gateway-token-file ${file} is empty; put the token in it`);
  if (/\s/.test(token)) {
    throw new UsageError(`the token in --gateway-token-file ${file} contains white space; use one word`);
  }
  return token;
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
      ...(ca !== undefined ? { ca: readCaFile(ca, "--tls-ca") } : {}),
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
      gateway: { type: "string" },
      "gateway-token-file": { type: "string" },
      "gateway-ca": { type: "string" },
      replication: { type: "string" },
      "state-dir": { type: "string" },
      "tracking-mirror": { type: "string" },
      "sync-timeout": { type: "string" },
      "queue-size": { type: "string" },
      "queue-age": { type: "string" },
      "resync-rate": { type: "string" },
      "resync-concurrency": { type: "string" },
      "track-granularity": { type: "string" },
      "al-extents": { type: "string" },
      "assume-clean": { type: "boolean", default: false },
      "gateway-takeover": { type: "boolean", default: false },
      "tracking-mirror-token-file": { type: "string" },
      "no-update-stream": { type: "boolean", default: false },
      pit: { type: "boolean", default: false },
      "pit-retention": { type: "string" },
      "pit-max-bytes": { type: "string" },
      "pit-window": { type: "string" },
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
  let replication: ReplicationConfig | null = null;
  if (values.gateway !== undefined) {
    const mode = values.replication ?? "async";
    if (mode !== "async" && mode !== "sync")
      throw new UsageError(`--replication must be async or sync, not "${mode}"`);
    if (mode === "async" && values["sync-timeout"] !== undefined) {
      throw new UsageError(
        "--sync-timeout needs --replication sync (an async write never waits for the gateway)",
      );
    }
    const granularity = values["track-granularity"]
      ? parseSize(values["track-granularity"], "--track-granularity")
      : undefined;
    if (granularity !== undefined && (granularity < 4096 || (granularity & (granularity - 1)) !== 0)) {
      throw new UsageError("--track-granularity must be a power of two of at least 4K");
    }
    if (granularity !== undefined && granularity > DEFAULT_REGION) {
      throw new UsageError(
        `--track-granularity must be at most ${DEFAULT_REGION / 1024 / 1024}M (an activity-log region)`,
      );
    }
    replication = {
      url: gatewayUrl(values.gateway, "--gateway"),
      token: values["gateway-token-file"] ? gatewayToken(values["gateway-token-file"]) : undefined,
      ca: values["gateway-ca"] ? readCaFile(values["gateway-ca"], "--gateway-ca") : undefined,
      mode,
      mirror: values["tracking-mirror"]
        ? gatewayUrl(values["tracking-mirror"], "--tracking-mirror")
        : undefined,
      syncTimeoutMs: values["sync-timeout"] ? positiveInt(values["sync-timeout"], "--sync-timeout") : 5000,
      queueBytes: values["queue-size"] ? parseSize(values["queue-size"], "--queue-size") : 64 * 1024 * 1024,
      queueAgeMs: values["queue-age"] ? positiveInt(values["queue-age"], "--queue-age") : 5000,
      resyncRate: values["resync-rate"] ? parseSize(values["resync-rate"], "--resync-rate") : 0,
      resyncConcurrency: values["resync-concurrency"]
        ? positiveInt(values["resync-concurrency"], "--resync-concurrency")
        : LINK_DEFAULTS.resyncConcurrency,
      granularity,
      alExtents: values["al-extents"] ? positiveInt(values["al-extents"], "--al-extents") : 1024,
      assumeClean: values["assume-clean"] === true,
      updateStream: values["no-update-stream"] !== true,
      takeover: values["gateway-takeover"] === true,
      mirrorToken: values["tracking-mirror-token-file"]
        ? gatewayToken(values["tracking-mirror-token-file"])
        : undefined,
    };
    if (replication.mirrorToken !== undefined && replication.mirror === undefined)
      throw new UsageError("--tracking-mirror-token-file needs --tracking-mirror URL");
  } else {
    for (const o of [
      "gateway-token-file",
      "gateway-ca",
      "replication",
      "tracking-mirror",
      "sync-timeout",
      "queue-size",
      "queue-age",
      "resync-rate",
      "resync-concurrency",
      "track-granularity",
      "al-extents",
    ] as const) {
      if (values[o] !== undefined) throw new UsageError(`--${o} needs --gateway URL`);
    }
    if (values["assume-clean"] === true) throw new UsageError("--assume-clean needs --gateway URL");
    if (values["no-update-stream"] === true) throw new UsageError("--no-update-stream needs --gateway URL");
    if (values["gateway-takeover"] === true) throw new UsageError("--gateway-takeover needs --gateway URL");
    if (values["tracking-mirror-token-file"] !== undefined)
      throw new UsageError("--tracking-mirror-token-file needs --gateway URL");
  }
  // bin/blockfork.js sets UV_THREADPOOL_SIZE from it before Node starts its pool; here it is
  // only checked, so that a bad value is an error instead of the default.
  if (values.threads !== undefined) {
    const t = positiveInt(values.threads, "--threads");
    if (t > 1024) throw new UsageError(`--threads must be at most 1024, got ${t}`);
  }
  if (values.pit !== true) {
    // As the --gateway-only options: one of them alone must not turn the journal on unasked.
    for (const o of ["pit-retention", "pit-max-bytes", "pit-window"] as const) {
      if (values[o] !== undefined) throw new UsageError(`--${o} needs --pit`);
    }
  }
  const pit = values.pit
    ? {
        retentionMs: values["pit-retention"]
          ? parseDuration(values["pit-retention"], "--pit-retention")
          : 24 * 3600_000,
        maxBytes: values["pit-max-bytes"]
          ? parseSize(values["pit-max-bytes"], "--pit-max-bytes")
          : 10 * 1024 ** 3,
        windowMs: values["pit-window"] ? positiveInt(values["pit-window"], "--pit-window") : 1000,
      }
    : null;
  if (pit && values["read-only"])
    throw new UsageError("--pit journals changes; a --read-only server makes none");
  return {
    replication,
    pit,
    stateDir: values["state-dir"],
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
  tuneMallocForServers();
  if (cfg.size !== undefined) mkdirSync(dirname(resolve(cfg.volume)), { recursive: true });
  const base = FileVolume.open(cfg.volume, {
    readOnly: cfg.readOnly,
    create: true,
    ...(cfg.size !== undefined ? { size: cfg.size } : {}),
    inlineWrites: cfg.inlineWrites,
    lock: true,
  });
  const parts: Parts = { base, tracking: null, link: null, admin: null, server: null, journal: null };
  try {
    return await run(cfg, parts);
  } catch (e) {
    await parts.link?.stop(0).catch(() => {});
    await parts.tracking?.close().catch(() => {});
    await parts.journal?.close().catch(() => {});
    await parts.admin?.close().catch(() => {});
    await base.close();
    throw e;
  }
}

interface Parts {
  base: FileVolume;
  tracking: TrackingLog | null;
  link: GatewayLink | null;
  admin: AdminServer | null;
  server: NbdServer | null;
  journal: Journal | null;
  /** The snap@ exports (with --pit): their open views. */
  snapshots?: SnapshotProvider;
  /** The state directory's lock (lockStateDir), held until exit. */
  stateLock?: number;
}

async function run(cfg: ServeConfig, parts: Parts): Promise<number> {
  const { base } = parts;
  const log = cfg.log;
  checkBlockSizes(cfg.blockSizes, base.size);
  const rep = cfg.replication;
  let stateDir = cfg.stateDir;
  if (stateDir === undefined && (rep !== null || cfg.pit !== null)) {
    if (base.file.isBlockDevice) {
      throw new UsageError("a block device needs --state-dir DIR for its tracking log and journal");
    }
    stateDir = `${resolve(cfg.volume)}.blockfork`;
  }
  // Before anything in it is opened: one server per state directory.
  if (stateDir !== undefined) {
    const dir = stateDir;
    inStateDir(dir, () => {
      parts.stateLock = lockStateDir(dir);
      const claim = claimStateDir(
        dir,
        identityOf(resolve(cfg.volume), base.file.fd, base.file.isBlockDevice, base.size),
      );
      if (claim === "replaced") {
        // Its tracking log and journal describe the file that was there before: a tracking log
        // would call blocks clean that differ on the secondary, a journal would serve snapshots
        // of blocks this file never held.
        throw new UsageError(
          `${resolve(cfg.volume)} is another file than the volume the state directory ${dir} ` +
            "describes (replaced at the same path: another inode or birth time); its tracking log " +
            "and journal describe the old file. Give a new --state-dir (a new tracking log resyncs " +
            "the whole volume; a new journal starts empty), or move this one away",
        );
      }
    });
  }
  if (cfg.pit !== null) {
    parts.journal = await Journal.open({
      dir: join(stateDir!, "journal"),
      volumeSize: base.size,
      windowMs: cfg.pit.windowMs,
      retentionMs: cfg.pit.retentionMs,
      maxBytes: cfg.pit.maxBytes,
      log: log.child("journal"),
    }).catch((e: unknown) => {
      throw stateDirFull(e, stateDir!);
    });
  }
  let fork: PrimaryStackOptions["fork"];
  if (rep !== null) {
    const tracking = await TrackingLog.open({
      dir: stateDir!,
      volumeSize: base.size,
      gateway: rep.url,
      ...(rep.granularity !== undefined ? { granularity: rep.granularity } : {}),
      alExtents: rep.alExtents,
      assumeClean: rep.assumeClean,
      log: log.child("tracking"),
    }).catch((e: unknown) => {
      throw stateDirFull(e, stateDir!);
    });
    parts.tracking = tracking;
    tracking.primaryFlush = () => base.flush();
    describeRecovery(tracking, log);
    const link = new GatewayLink(tracking, base, {
      ...LINK_DEFAULTS,
      url: rep.url,
      ...(rep.token !== undefined ? { token: rep.token } : {}),
      ...(rep.ca !== undefined ? { ca: rep.ca } : {}),
      mode: rep.mode,
      queueBytes: rep.queueBytes,
      queueAgeMs: rep.queueAgeMs,
      syncTimeoutMs: rep.syncTimeoutMs,
      resyncRate: rep.resyncRate,
      resyncConcurrency: rep.resyncConcurrency,
      updateStream: rep.updateStream,
      takeover: rep.takeover,
      ...(rep.mirror !== undefined ? { mirror: rep.mirror } : {}),
      ...(rep.mirrorToken !== undefined ? { mirrorToken: rep.mirrorToken } : {}),
      log: log.child("link"),
    });
    parts.link = link;
    fork = { tracking, link, mode: rep.mode };
  }
  const volume = buildPrimaryStack(base, {
    readOnly: cfg.readOnly,
    ...(fork ? { fork } : {}),
    ...(parts.journal ? { journal: parts.journal } : {}),
  });
  const registry = new ExportRegistry();
  registry.addStatic(
    { name: cfg.name, description: cfg.description ?? base.description, volume, blockSizes: cfg.blockSizes },
    true,
  );
  if (parts.journal) {
    parts.snapshots = new SnapshotProvider(parts.journal, base, cfg.blockSizes, log);
    registry.addProvider(parts.snapshots);
  }
  const server = new NbdServer({
    registry,
    tls: cfg.tls,
    log,
    handshakeTimeoutMs: cfg.handshakeTimeoutMs,
    maxConnections: cfg.maxConnections,
  });
  parts.server = server;

  if (stateDir !== undefined) {
    parts.admin = new AdminServer(adminHandlers(cfg, parts), log.child("admin"));
    await parts.admin.listen(adminSocket(stateDir));
  }

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
  parts.link?.start();
  printBanner(cfg, base.size, base.description, urls, tcp, unix);
  log.info(
    `serving ${base.description} (${base.size} bytes) as "${cfg.name}"${cfg.readOnly ? " read-only" : ""}` +
      (rep ? `, ${rep.mode} replication to ${rep.url}` : "") +
      (cfg.pit ? ", PIT journal on" : "") +
      (stateDir !== undefined ? `, state in ${stateDir}` : ""),
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
      void shutdown(parts, log).then(resolveExit);
    };
    process.on("SIGINT", onSignal);
    process.on("SIGTERM", onSignal);
  });
}

/** `blockfork mark` waits at most this long for a new journal's first point in time. */
const MARK_WAIT_MAX_MS = 10_000;

const { ENOSPC, EDQUOT } = osConstants.errno;

/**
 * A full disk under the state directory while it is set up: the error names the directory and
 * what to do (LevelDB and plain writes alike only said ENOSPC). Other errors pass unchanged.
 */
function stateDirFull(e: unknown, dir: string): unknown {
  const msg = e instanceof Error ? e.message : String(e);
  const cause = (e as { cause?: unknown } | null)?.cause;
  const text = `${msg} ${cause instanceof Error ? cause.message : ""}`;
  const n = errnoOf(e);
  if (n === ENOSPC || n === EDQUOT || /no space left on device|ENOSPC|quota exceeded|EDQUOT/i.test(text)) {
    const why = cause instanceof Error && cause.message !== msg ? `${msg}: ${cause.message}` : msg;
    return new Error(
      `the state directory ${dir} is on a full disk (${why}): free space there, or give another --state-dir`,
    );
  }
  return e;
}

function inStateDir(dir: string, fn: () => void): void {
  try {
    fn();
  } catch (e) {
    throw stateDirFull(e, dir);
  }
}

function describeRecovery(t: TrackingLog, log: Logger): void {
  const r = t.recovery;
  const dirty = t.map.dirtyBytes;
  if (r.fullResync)
    log.warn(
      `tracking: the log could not be written in an earlier run (from ${r.fullResync.since}: ` +
        `${r.fullResync.reason}); everything (${dirty} bytes) will be resynced`,
    );
  else if (r.newLog)
    log.info(`tracking: new log (generation ${t.meta.generation}); the first resync copies ${dirty} bytes`);
  else if (r.gatewayChanged)
    log.warn(`tracking: the gateway changed; everything (${dirty} bytes) will be resynced`);
  else if (r.gatewayMoved)
    log.warn(
      `tracking: the gateway's URL changed (${r.gatewayMoved.from} -> ${t.meta.gateway}); the ` +
        `secondary it serves decides: the same one (id ${t.meta.secondary}) resyncs the ${dirty} ` +
        "bytes dirty, another one the whole volume",
    );
  else if (r.crashed) {
    log.warn(
      `tracking: the proxy did not shut down cleanly; ${r.alRegions} activity-log regions taken as dirty, ` +
        `${dirty} bytes to resync`,
    );
  } else log.info(`tracking: generation ${t.meta.generation}, ${dirty} bytes dirty`);
}

function adminHandlers(cfg: ServeConfig, parts: Parts): AdminHandlers {
  const needLink = (): { tracking: TrackingLog; link: GatewayLink } => {
    if (!parts.tracking || !parts.link) throw new UsageError("this proxy has no --gateway");
    return { tracking: parts.tracking, link: parts.link };
  };
  return {
    status: () => {
      const t = parts.tracking;
      const [first, last] = t ? t.map.timeSpan() : [0, 0];
      return {
        volume: { path: resolve(cfg.volume), name: cfg.name, size: parts.base.size, readOnly: cfg.readOnly },
        nbd: { connections: parts.server?.connectionCount ?? 0 },
        link: parts.link?.status() ?? null,
        tracking: t
          ? {
              dirtyBytes: t.map.dirtyBytes,
              dirtyBlocks: t.map.dirtyBlocks,
              granularity: t.map.granularity,
              regionSize: t.map.regionSize,
              activeRegions: t.activeRegions,
              generation: t.meta.generation,
              source: t.meta.source,
              firstDirtied: first ? new Date(first).toISOString() : null,
              lastDirtied: last ? new Date(last).toISOString() : null,
              recovery: t.recovery,
              degraded: t.degraded,
              failure: t.error?.message ?? null,
            }
          : null,
      };
    },
    tracking: (limit: number) => {
      const { tracking } = needLink();
      const { extents, truncated } = tracking.map.extents(limit);
      return {
        dirtyBytes: tracking.map.dirtyBytes,
        granularity: tracking.map.granularity,
        truncated,
        extents: extentsJson(extents),
      };
    },
    verify: async (repair, progress, signal) => {
      const { tracking, link } = needLink();
      if (link.state === "tracking") {
        // Verify compares with the secondary: with the gateway away it could only fail midway.
        const why = link.status().lastError;
        throw new Error(
          `the gateway link is tracking${why ? ` (${why})` : ""}; verify needs the gateway: ` +
            "run it once `blockfork status` shows the link resyncing or streaming",
        );
      }
      return verify(parts.base, tracking, link, repair, progress, signal);
    },
    mark: async (name, replace) => {
      const j = parts.journal;
      if (!j) throw new UsageError("this proxy has no --pit journal");
      // Within the first merge window of a new or restarted journal no point exists yet: wait for
      // the first one (a second by default) rather than refuse; the bookmark is then that moment.
      const first = j.firstPointAt();
      if (first !== null && first - journalNow() <= MARK_WAIT_MAX_MS) {
        await new Promise((r) => setTimeout(r, first - journalNow() + 1));
      }
      const ts = j.mark(name, undefined, { replace });
      return { name, time: new Date(ts).toISOString(), export: `snap@${name}` };
    },
    snapshots: () => {
      const j = parts.journal;
      if (!j) throw new UsageError("this proxy has no --pit journal");
      const w = j.window();
      return {
        earliest: w.earliest === null ? null : new Date(w.earliest).toISOString(),
        latest: new Date(w.latest).toISOString(),
        windowMs: w.windowMs,
        stopped: w.stopped,
        journalBytes: j.bytes,
        segments: j.segmentCount,
        entries: j.index.length - j.index.first,
        bookmarks: [...j.listBookmarks()].map(([name, ts]) => ({
          name,
          time: new Date(ts).toISOString(),
          export: `snap@${name}`,
        })),
        passedTwice: j.passedTwice().map(([from, to]) => ({
          from: new Date(from).toISOString(),
          to: new Date(to).toISOString(),
        })),
        views: (parts.snapshots?.openViews() ?? []).map((v) => ({
          point: new Date(v.point).toISOString(),
          connections: v.connections,
          journalBlocks: v.journalBlocks,
          broken: v.broken,
        })),
      };
    },
    resync: async (full) => {
      const { tracking, link } = needLink();
      if (full) {
        tracking.map.markAll();
        link.markStale(0, tracking.map.volumeSize); // updates in flight must not clear any block
        await tracking.persist(true);
      }
      const probes = link.probes;
      // What there is to copy as asked (a resync already running may have copied it by the answer).
      const dirtyBytes = tracking.map.dirtyBytes;
      const running = link.state === "resyncing";
      link.requestResync();
      // While tracking that checks the gateway at once: answer with that check's outcome, not the
      // last one's (which may be 30 s old).
      for (let waited = 0; link.state === "tracking" && link.probes === probes && waited < 5000; waited += 50)
        await new Promise((r) => setTimeout(r, 50));
      return {
        started: true,
        running,
        dirtyBytes: link.state === "tracking" ? tracking.map.dirtyBytes : dirtyBytes,
        state: link.state,
        lastError: link.status().lastError,
      };
    },
  };
}

async function shutdown(parts: Parts, log: Logger): Promise<number> {
  let status = 0;
  const server = parts.server!;
  // First the admin endpoint: a verify in progress stops (its client is told why) before the link
  // and the tracking log it uses are stopped and closed below.
  await parts.admin?.close();
  const quiet = await server.quiesce();
  if (!quiet) log.warn("some requests were still in flight after 30 s; closing anyway");
  try {
    await parts.base.flush();
    log.info("volume flushed (fdatasync)");
  } catch (e) {
    log.error(`final flush failed: ${(e as Error).message}`);
    parts.tracking?.primaryFailed(e as Error);
    status = 1;
  }
  if (parts.link) {
    await parts.link.stop();
    log.info(`gateway link stopped (${parts.link.status().state})`);
  }
  if (parts.tracking) {
    try {
      await parts.tracking.close();
      const d = parts.tracking.degraded;
      if (d) {
        log.warn(
          `tracking log not saved (it failed at ${d.since}: ${d.reason}); the next start resyncs the whole volume`,
        );
      } else log.info(`tracking log saved (${parts.tracking.map.dirtyBytes} bytes dirty)`);
    } catch (e) {
      log.error(`saving the tracking log failed: ${(e as Error).message}`);
      status = 1;
    }
  }
  // Connections first: a snapshot reply lent as file pieces (journal images) may still be queued,
  // and its view copies what is lent when its connection ends; both read the journal's segment
  // files, so the journal closes them only after that.
  await server.closeAll();
  if (parts.journal) {
    await parts.journal.close();
    log.info("journal closed");
  }
  await parts.base.close();
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
