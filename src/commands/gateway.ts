// `blockfork gateway`: apply the updates a proxy forwards to a secondary volume (docs/gateway-api.md).

import { parseArgs } from "node:util";
import { mkdirSync, readFileSync } from "node:fs";
import { basename, dirname, extname, join, resolve } from "node:path";
import { createSecureContext } from "node:tls";
import { Logger, parseLogLevel } from "../log.js";
import { UsageError } from "../errors.js";
import { formatSize, parseSize } from "../util/size.js";
import { FileVolume } from "../volume/file.js";
import { parseListen } from "../nbd/server.js";
import { Gateway } from "../gateway/gateway.js";
import { GatewayServer } from "../gateway/server.js";
import { FaultSwitch } from "../gateway/faults.js";
import { TrackingMirror } from "../gateway/mirror.js";
import {
  FAULT_FILE,
  StateWriter,
  loadSecondary,
  loadSources,
  prepareStateDir,
  secondaryId,
} from "../gateway/state.js";
import { claimStateDir, identityOf } from "../util/volume-identity.js";
import { lockStateDir, tuneMallocForServers } from "../blockio/index.js";
import { positiveInt } from "./serve.js";

export const GATEWAY_HELP = `Usage: blockfork gateway --volume PATH [options]

Run a gateway: an HTTP service that applies the writes a blockfork proxy forwards to a secondary
volume (a regular file or a block device). The API is described in docs/gateway-api.md.

Volume
  --volume PATH            secondary file or block device (required)
  --size SIZE              create PATH as a sparse file of SIZE (1G, 512M, bytes) if it does not
                           exist; if it exists, SIZE must match (nothing is ever truncated). It
                           must equal the primary's size: proxies send theirs with every batch
  --name NAME              volume name in the API paths (/v1/volumes/NAME/...; default: the file
                           name without extension)
  --state-dir DIR          idempotency state and the secondary's consistency (sources.json), the
                           fault trigger file "fault" and the tracking-mirror documents (default:
                           PATH.gateway next to the volume; required for a block device)

Whether the secondary is a crash-consistent image of the primary (usable for a failover) is in
GET /v1/status ("secondary": consistent, inconsistent with why and since when, or unknown).

Network
  --listen HOST:PORT       TCP address (default 127.0.0.1:7070; port 0 picks a free port, printed
                           on the first line of output)
  --token-file FILE        require "Authorization: Bearer TOKEN" on every request but
                           GET /v1/health; TOKEN is the file's content, trimmed
  --tls-cert FILE          serve HTTPS with this certificate (PEM) ...
  --tls-key FILE           ... and its private key (PEM)
  --max-streams N          update streams served at once (default 64; one per proxy link). A
                           stream may hold a frame's body (up to 64 MiB) while it arrives, so
                           this bounds that memory; more are refused with 503 until one ends

Logs
  --log-level LEVEL        error, warn, info (default) or debug (one line per request)

Fault injection (tests): PUT /v1/fault, or write a mode word (slow, drop, error, down) or the
same JSON into DIR/fault; removing the file clears the fault.

Exit status: 0 after a clean shutdown (SIGINT/SIGTERM: stop accepting, finish the requests in
flight, fdatasync the volume, write the state); 1 on a fatal runtime error; 2 on a usage or
configuration error (the message says what to change). A second SIGINT/SIGTERM during shutdown
exits at once with status 130.
`;

interface GatewayConfig {
  volume: string;
  size: number | undefined;
  name: string;
  stateDir: string | undefined;
  listen: { host: string; port: number };
  token: string | null;
  tls: { cert: Buffer; key: Buffer } | undefined;
  maxStreams: number;
  log: Logger;
}

/** Parse `gateway` arguments into a configuration; throws UsageError. */
export function parseGatewayArgs(argv: string[]): GatewayConfig {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      volume: { type: "string" },
      size: { type: "string" },
      name: { type: "string" },
      listen: { type: "string" },
      "token-file": { type: "string" },
      "tls-cert": { type: "string" },
      "tls-key": { type: "string" },
      "state-dir": { type: "string" },
      "log-level": { type: "string" },
      "max-streams": { type: "string" },
    },
  });
  if (!values.volume) {
    throw new UsageError("--volume PATH is required (the secondary file or block device to write to)");
  }
  const level = values["log-level"] ?? "info";
  const lvl = parseLogLevel(level);
  if (!lvl) throw new UsageError(`--log-level must be error, warn, info or debug, not "${level}"`);

  let token: string | null = null;
  if (values["token-file"] !== undefined) {
    try {
      token = readFileSync(values["token-file"], "utf8").trim();
    } catch (e) {
      throw new UsageError(`cannot read --token-file: ${(e as Error).message}`);
    }
    if (token === "")
      throw new UsageError(`--token-file ${values["token-file"]} is empty; put the token in it`);
    if (/\s/.test(token)) {
      throw new UsageError(`the token in ${values["token-file"]} contains white space; use one word`);
    }
  }

  let tls: GatewayConfig["tls"];
  if ((values["tls-cert"] === undefined) !== (values["tls-key"] === undefined)) {
    throw new UsageError("--tls-cert and --tls-key go together");
  }
  if (values["tls-cert"] !== undefined) {
    try {
      tls = { cert: readFileSync(values["tls-cert"]), key: readFileSync(values["tls-key"]!) };
      createSecureContext({ ...tls, minVersion: "TLSv1.2" }); // fail now, not at the first client
    } catch (e) {
      throw new UsageError(`cannot load the TLS certificate or key: ${(e as Error).message}`);
    }
  }

  const name = values.name ?? basename(values.volume, extname(values.volume));
  if (name === "" || name.includes("/")) {
    throw new UsageError(`--name must be a non-empty name without "/", not ${JSON.stringify(name)}`);
  }
  return {
    volume: values.volume,
    size: values.size !== undefined ? parseSize(values.size, "--size") : undefined,
    name,
    stateDir: values["state-dir"],
    listen: parseListen(values.listen ?? "127.0.0.1:7070", "127.0.0.1:7070"),
    token,
    tls,
    maxStreams:
      values["max-streams"] !== undefined ? positiveInt(values["max-streams"], "--max-streams") : 64,
    log: Logger.create(lvl),
  };
}

/** Run `blockfork gateway`; resolves with the exit status. */
export async function gateway(argv: string[]): Promise<number> {
  const cfg = parseGatewayArgs(argv);
  tuneMallocForServers();
  const log = cfg.log;
  if (cfg.size !== undefined) mkdirSync(dirname(resolve(cfg.volume)), { recursive: true });
  const volume = FileVolume.open(cfg.volume, {
    create: true,
    lock: true,
    ...(cfg.size !== undefined ? { size: cfg.size } : {}),
  });
  let server: GatewayServer;
  let gw: Gateway;
  let mirror: TrackingMirror;
  let stateDir: string;
  try {
    if (cfg.stateDir === undefined && volume.file.isBlockDevice) {
      throw new UsageError(
        `${cfg.volume} is a block device: give --state-dir DIR on a persistent file system for the gateway's state`,
      );
    }
    stateDir = resolve(cfg.stateDir ?? `${resolve(cfg.volume)}.gateway`);
    prepareStateDir(stateDir);
    lockStateDir(stateDir);
    const claim = claimStateDir(
      stateDir,
      identityOf(resolve(cfg.volume), volume.file.fd, volume.file.isBlockDevice, volume.size),
      {
        holds: "its idempotency state and the secondary's id and consistency describe that volume",
        fresh: "(proxies then resync the whole volume to it)",
      },
    );
    const identity = { name: cfg.name, size: volume.size };
    gw = new Gateway(volume, log, loadSources(stateDir, identity));
    gw.secondaryId = secondaryId(stateDir, claim !== "same");
    const previous = loadSecondary(stateDir);
    if (claim === "replaced") {
      log.warn(
        `${resolve(cfg.volume)} is another file than the secondary this state directory described ` +
          `(replaced at the same path): it is a new secondary (id ${gw.secondaryId}), which proxies resync whole`,
      );
      previous.secondary = {
        state: "unknown",
        since: new Date().toISOString(),
        reason: "a new secondary file replaced the one this state directory described",
        source: null,
      };
      previous.running = false;
    }
    gw.attachState(
      new StateWriter(
        stateDir,
        identity,
        () => gw.snapshots(),
        () => ({ running: gw.running, secondary: gw.secondaryToRecord, owner: gw.owner }),
      ),
    );
    await gw.start(previous);
    mirror = new TrackingMirror(stateDir);
    server = new GatewayServer({
      gateway: gw,
      name: cfg.name,
      path: resolve(cfg.volume),
      token: cfg.token,
      faults: new FaultSwitch(join(stateDir, FAULT_FILE), log),
      mirror,
      log,
      maxStreams: cfg.maxStreams,
      ...(cfg.tls ? { tls: cfg.tls } : {}),
    });
    const addr = await server.listen(cfg.listen.host, cfg.listen.port).catch((e: NodeJS.ErrnoException) => {
      const where = `${cfg.listen.host}:${cfg.listen.port}`;
      if (e.code === "EADDRINUSE")
        throw new UsageError(`${where} is in use; choose another --listen address`);
      if (e.code === "EADDRNOTAVAIL")
        throw new UsageError(`${where} is not an address of this host (--listen)`);
      throw e;
    });
    const host = addr.host.includes(":") ? `[${addr.host}]` : addr.host;
    const url = `${cfg.tls ? "https" : "http"}://${host}:${addr.port}/v1`;
    process.stdout.write(
      `blockfork gateway: ${url} serving ${volume.description} (${formatSize(volume.size)}) as "${cfg.name}"\n` +
        `  state: ${stateDir}${cfg.token !== null ? "; token required" : ""}\n` +
        `  health: curl ${cfg.tls ? "-k " : ""}${url}/health\n`,
    );
    log.info(`gateway for ${volume.description} (${volume.size} bytes) as "${cfg.name}" on ${url}`);
  } catch (e) {
    await volume.close();
    throw e;
  }

  return new Promise<number>((resolveExit) => {
    let stopping = false;
    const onSignal = (sig: NodeJS.Signals): void => {
      if (stopping) {
        log.warn(`second ${sig}: exiting at once`);
        process.exit(130);
      }
      stopping = true;
      log.info(`${sig}: shutting down (finishing requests in flight; ${sig} again to exit at once)`);
      void shutdown(server, gw, mirror, volume, log).then((status) => {
        process.off("SIGINT", onSignal);
        process.off("SIGTERM", onSignal);
        // Everything is closed, so the process ends by itself; should anything still hold the
        // event loop (a client's half-dead socket), end it anyway.
        setTimeout(() => process.exit(status), 2000).unref();
        resolveExit(status);
      });
    };
    process.on("SIGINT", onSignal);
    process.on("SIGTERM", onSignal);
  });
}

async function shutdown(
  server: GatewayServer,
  gw: Gateway,
  mirror: TrackingMirror,
  volume: FileVolume,
  log: Logger,
): Promise<number> {
  let status = 0;
  const quiet = await server.quiesce();
  if (!quiet) log.warn("some requests were still in flight after 30 s; closing anyway");
  await mirror.settle();
  gw.stop();
  try {
    await gw.syncAll();
    log.info("volume flushed (fdatasync) and state written");
  } catch (e) {
    log.error(`final flush failed: ${(e as Error).message}`);
    status = 1;
  }
  server.closeAll();
  await volume.close();
  log.info("stopped");
  return status;
}
