// The handshake phase: fixed newstyle negotiation, option haggling, STARTTLS (after nbdkit
// server/protocol-handshake-newstyle.c and libnbd generator/states-newstyle-*.c).
//
// Notes on the design
// - One option at a time: the client must wait for our final reply before sending the next, so
//   the loop reads a 16-byte option header, then its data, answers, repeats.
// - Limits against abuse: at most MAX_OPTIONS options, plus OPTIONS_PER_LISTED for each export a
//   LIST answered with (a client such as nbdinfo --list asks INFO and LIST_META_CONTEXT of every
//   export it was given: that is not abuse); option data over MAX_OPTION_DATA is
//   answered with NBD_REP_ERR_TOO_BIG after being read (discarded), and over HARD_OPTION_DATA the
//   connection is dropped (reading it would be the attack). The whole handshake has a deadline
//   (enforced by the caller, which destroys the socket).
// - Errors the client can act on go back as option error replies with a message; violations of a
//   MUST (bad magic, unknown client flags, EXPORT_NAME we cannot honour) end the connection, as
//   the spec requires, with a log line saying why.
// - TLS modes (proto.md): off = NOTLS (STARTTLS gets ERR_POLICY), on = SELECTIVETLS with every
//   export available either way, require = FORCEDTLS (everything but STARTTLS and ABORT gets
//   ERR_TLS_REQD until TLS is up). After STARTTLS all negotiated state is forgotten.

import type { Duplex } from "node:stream";
import { TLSSocket, type SecureContext } from "node:tls";
import type { Socket } from "node:net";
import type { Logger } from "../log.js";
import type { VolumeCaps } from "../volume/volume.js";
import { isInfo, isOpen, type ExportRegistry, type OpenExport } from "./exports.js";
import { StreamReader } from "./reader.js";
import {
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContext,
  encodeOptionReply,
  encodeServerReplyData,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  IHAVEOPT,
  INFO,
  MAX_STRING,
  OPT,
  REP,
  TF,
  utf8Capped,
} from "./wire.js";

export const MAX_OPTIONS = 256;
/** Options a client may send per export a LIST told it of, on top of MAX_OPTIONS. */
export const OPTIONS_PER_LISTED = 4;
/** Time added to the handshake deadline per export a LIST told the client of, earned per option. */
export const DEADLINE_PER_LISTED_MS = 500;
/**
 * Replies queued for a client that does not read them: past this, the next option is read only
 * once the socket has drained (a client sending LISTs without reading would otherwise have the
 * server buffer every reply: gigabytes with a few thousand bookmarks).
 */
const REPLY_QUEUE_LIMIT = 256 * 1024;
export const MAX_OPTION_DATA = 64 * 1024;
export const HARD_OPTION_DATA = 16 * 1024 * 1024;
/** The id we give base:allocation in NBD_REP_META_CONTEXT. */
export const BASE_ALLOCATION_ID = 1;
export const BASE_ALLOCATION = "base:allocation";

const OPTION_NAMES: Record<number, string> = Object.fromEntries(Object.entries(OPT).map(([k, v]) => [v, k]));

/** Name of an option code for logs. */
export function optionName(code: number): string {
  return OPTION_NAMES[code] ?? `UNKNOWN(${code})`;
}

/** How the server does TLS. */
export interface TlsSettings {
  mode: "off" | "on" | "require";
  context?: SecureContext;
  /** Verify client certificates against the CA in the context. */
  verifyClients?: boolean;
  /** TLS-PSK: identity -> key. */
  pskCallback?: (socket: TLSSocket, identity: string) => Buffer | null;
}

/** What the handshake needs from the server. */
export interface HandshakeContext {
  registry: ExportRegistry;
  /** Label of this client session (for per-session state and logs). */
  client: string;
  tls: TlsSettings;
  log: Logger;
  shuttingDown(): boolean;
  /**
   * Give the handshake `ms` more than its deadline (not cumulative: the largest asked for counts).
   * Asked as a client goes on after a LIST: it may then ask INFO and LIST_META_CONTEXT of every
   * export listed, at a round trip each (about 0.2 s each for libnbd over TCP, where its small
   * writes wait for delayed ACKs).
   */
  extendDeadline?(ms: number): void;
}

/** The outcome of a successful handshake. */
export interface Negotiated {
  stream: Duplex;
  /** Bytes received after the final option (requests the client sent early). */
  leftover: Buffer;
  export: OpenExport;
  structured: boolean;
  /** base:allocation was selected for this export. */
  blockStatus: boolean;
  flags: number;
  tls: boolean;
}

/** Transmission flags for a volume's capabilities. */
export function transmissionFlags(caps: VolumeCaps, structured: boolean): number {
  let f = TF.HAS_FLAGS;
  if (caps.readOnly) f |= TF.READ_ONLY;
  if (caps.flush) f |= TF.SEND_FLUSH;
  if (caps.fua && !caps.readOnly) f |= TF.SEND_FUA;
  if (caps.rotational) f |= TF.ROTATIONAL;
  if (caps.trim && !caps.readOnly) f |= TF.SEND_TRIM;
  if (caps.zero && !caps.readOnly) {
    f |= TF.SEND_WRITE_ZEROES;
    if (caps.fastZero) f |= TF.SEND_FAST_ZERO;
  }
  if (structured) f |= TF.SEND_DF;
  if (caps.multiConn) f |= TF.CAN_MULTI_CONN;
  if (caps.cache) f |= TF.SEND_CACHE;
  return f;
}

/** The client broke a MUST of the protocol: the connection ends. */
/** Client strings are decoded strictly: a name that is not UTF-8 must not match another one. */
const strictUtf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

/** A client string (export name, meta context query): UTF-8 without NUL (proto.md), or null. */
function clientString(data: Buffer, start: number, end: number): string | null {
  let text: string;
  try {
    text = strictUtf8.decode(data.subarray(start, end));
  } catch {
    return null;
  }
  return text.includes("\0") ? null : text;
}

const NOT_A_STRING = "is not UTF-8 without NUL bytes (proto.md's rule for strings)";

export class HandshakeAbort extends Error {
  readonly code = "ERR_NBD_HANDSHAKE";
}

class OptionError extends Error {
  constructor(
    readonly reply: number,
    message: string,
  ) {
    super(message);
  }
}

/** Run the handshake on a fresh connection; null when it ended without entering transmission. */
export async function negotiate(socket: Socket, ctx: HandshakeContext): Promise<Negotiated | null> {
  return new Negotiation(socket, ctx).run();
}

class Negotiation {
  private stream: Duplex;
  private reader: StreamReader;
  private tlsActive = false;
  /** Options this client may send (MAX_OPTIONS, more once a LIST told it of many exports). */
  private maxOptions = MAX_OPTIONS;
  /** More time the handshake may take after a LIST (DEADLINE_PER_LISTED_MS per export listed)... */
  private listedMs = 0;
  /** ...granted as the client goes on: DEADLINE_PER_LISTED_MS per option answered after it. */
  private grantedMs = 0;
  private fixed = false;
  private noZeroes = false;
  private structured = false;
  private metaExport: string | null = null;
  private metaSelected = false;
  private readonly log: Logger;

  constructor(
    private readonly socket: Socket,
    private readonly ctx: HandshakeContext,
  ) {
    this.stream = socket;
    this.reader = new StreamReader(socket);
    this.log = ctx.log;
  }

  async run(): Promise<Negotiated | null> {
    this.stream.write(encodeGreeting());
    const cflags = (await this.reader.read(4)).readUInt32BE(0);
    if (cflags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)) {
      throw new HandshakeAbort(`unknown client flags 0x${cflags.toString(16)}`);
    }
    this.fixed = (cflags & FLAG_C_FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (cflags & FLAG_C_NO_ZEROES) !== 0;

    for (let count = 1; ; count++) {
      if (this.grantedMs < this.listedMs && count > 1) {
        // Progress, not idling, earns the time: a client that stalls still meets the deadline.
        this.grantedMs = Math.min(this.listedMs, this.grantedMs + DEADLINE_PER_LISTED_MS);
        this.ctx.extendDeadline?.(this.grantedMs);
      }
      const backlog = this.drained();
      if (backlog) await backlog;
      const head = await this.reader.read(16);
      if (count > this.maxOptions)
        throw new HandshakeAbort(`more than ${this.maxOptions} options; giving up on this client`);
      if (!head.subarray(0, 8).equals(IHAVEOPT))
        throw new HandshakeAbort("bad option magic (expected IHAVEOPT)");
      const option = head.readUInt32BE(8);
      const length = head.readUInt32BE(12);
      if (length > HARD_OPTION_DATA) {
        throw new HandshakeAbort(`${optionName(option)} with ${length} bytes of data; dropping the client`);
      }
      const data = length > 0 ? await this.reader.read(length) : Buffer.alloc(0);
      this.log.debug(`option ${optionName(option)} (${length} bytes)`);

      if (!this.fixed && option !== OPT.EXPORT_NAME) {
        throw new HandshakeAbort(`${optionName(option)} from a client without fixed newstyle (cannot reply)`);
      }
      try {
        const done = await this.option(option, data);
        if (done === "abort") return null;
        if (done) return done;
      } catch (e) {
        if (!(e instanceof OptionError)) throw e;
        this.log.debug(`option ${optionName(option)} refused: ${e.message}`);
        this.reply(option, e.reply, utf8Capped(e.message));
      }
    }
  }

  /** Null, or a promise that settles once the replies queued are under REPLY_QUEUE_LIMIT again. */
  private drained(): Promise<void> | null {
    const s = this.stream;
    if (s.writableLength <= REPLY_QUEUE_LIMIT || s.destroyed) return null;
    return new Promise<void>((resolve) => {
      const done = (): void => {
        s.off("drain", done);
        s.off("close", done);
        s.off("error", done);
        resolve();
      };
      s.on("drain", done);
      s.on("close", done);
      s.on("error", done);
    });
  }

  private reply(option: number, type: number, data?: Buffer): void {
    this.stream.write(encodeOptionReply(option, type, data));
  }

  /** Handle one option; a Negotiated result ends the handshake, "abort" ends the session. */
  private async option(option: number, data: Buffer): Promise<Negotiated | "abort" | undefined> {
    if (option === OPT.ABORT) {
      this.reply(option, REP.ACK);
      return "abort";
    }
    if (this.ctx.shuttingDown()) {
      if (option === OPT.EXPORT_NAME) throw new HandshakeAbort("EXPORT_NAME during shutdown");
      throw new OptionError(REP.ERR_SHUTDOWN, "the server is shutting down");
    }
    const tlsRequired = this.ctx.tls.mode === "require" && !this.tlsActive;
    if (tlsRequired && option !== OPT.STARTTLS) {
      if (option === OPT.EXPORT_NAME)
        throw new HandshakeAbort("EXPORT_NAME without TLS on a server that requires TLS");
      throw new OptionError(REP.ERR_TLS_REQD, "this server requires TLS: use STARTTLS first");
    }
    if (data.length > MAX_OPTION_DATA) {
      // EXPORT_NAME gets no option reply (proto.md): a reply would leave the client out of step.
      if (option === OPT.EXPORT_NAME) throw new HandshakeAbort("EXPORT_NAME with a name over 64 KiB");
      throw new OptionError(REP.ERR_TOO_BIG, "option data too large");
    }
    switch (option) {
      case OPT.EXPORT_NAME:
        return this.exportName(data);
      case OPT.LIST:
        return this.list(data);
      case OPT.STARTTLS:
        return this.startTls(data);
      case OPT.INFO:
      case OPT.GO:
        return this.infoOrGo(option, data);
      case OPT.STRUCTURED_REPLY:
        if (data.length !== 0) throw new OptionError(REP.ERR_INVALID, "STRUCTURED_REPLY takes no data");
        this.structured = true;
        this.reply(option, REP.ACK);
        return undefined;
      case OPT.LIST_META_CONTEXT:
      case OPT.SET_META_CONTEXT:
        return this.metaContext(option, data);
      default:
        throw new OptionError(REP.ERR_UNSUP, `option ${option} is not supported`);
    }
  }

  private async exportName(data: Buffer): Promise<Negotiated> {
    if (data.length > MAX_STRING) throw new HandshakeAbort("EXPORT_NAME longer than 4096 bytes");
    const name = clientString(data, 0, data.length);
    if (name === null) throw new HandshakeAbort(`EXPORT_NAME: the name ${NOT_A_STRING}`);
    const opened = await this.ctx.registry.open(name, this.ctx.client);
    if (!isOpen(opened)) throw new HandshakeAbort(`EXPORT_NAME "${name}": ${opened.message}`);
    const blockStatus = this.metaSelected && this.metaExport === name;
    const flags = transmissionFlags(opened.volume.caps(), this.structured);
    this.stream.write(encodeExportNameReply(opened.volume.size, flags, this.noZeroes));
    return this.finish(opened, flags, blockStatus);
  }

  private list(data: Buffer): undefined {
    if (data.length !== 0) throw new OptionError(REP.ERR_INVALID, "LIST takes no data");
    const exports = this.ctx.registry.list();
    for (const e of exports) {
      this.reply(OPT.LIST, REP.SERVER, encodeServerReplyData(e.name, e.description));
    }
    // Fixed, not cumulative: another LIST does not extend them further.
    this.maxOptions = Math.max(this.maxOptions, MAX_OPTIONS + OPTIONS_PER_LISTED * exports.length);
    this.listedMs = Math.max(this.listedMs, DEADLINE_PER_LISTED_MS * exports.length);
    this.reply(OPT.LIST, REP.ACK);
    return undefined;
  }

  private async startTls(data: Buffer): Promise<undefined> {
    if (data.length !== 0) throw new OptionError(REP.ERR_INVALID, "STARTTLS takes no data");
    if (this.tlsActive) throw new OptionError(REP.ERR_INVALID, "TLS is already active");
    const tls = this.ctx.tls;
    if (tls.mode === "off" || !tls.context) {
      throw new OptionError(REP.ERR_POLICY, "TLS is not enabled on this server (see --tls)");
    }
    const leftover = this.reader.detach();
    if (leftover.length > 0) throw new HandshakeAbort("data sent after STARTTLS before its reply");
    await new Promise<void>((resolve) =>
      this.socket.write(encodeOptionReply(OPT.STARTTLS, REP.ACK), () => resolve()),
    );
    const secure = new TLSSocket(this.socket, {
      isServer: true,
      ...(tls.context ? { secureContext: tls.context } : {}),
      requestCert: tls.verifyClients === true,
      rejectUnauthorized: tls.verifyClients === true,
      ...(tls.pskCallback ? { pskCallback: tls.pskCallback } : {}),
    });
    await new Promise<void>((resolve, reject) => {
      const off = (): void => {
        secure.off("secure", onSecure);
        secure.off("error", onError);
        secure.off("close", onClose);
        secure.off("end", onClose);
      };
      const onError = (e: Error): void => {
        off();
        reject(new HandshakeAbort(`TLS handshake failed: ${e.message}`));
      };
      // A client gone before the TLS handshake: no error comes, only the end of the stream (else
      // the connection slot stayed taken until the handshake timeout).
      const onClose = (): void => {
        off();
        reject(new HandshakeAbort("the client closed the connection during the TLS handshake"));
      };
      const onSecure = (): void => {
        off();
        // A TLSSocket made by hand (not by a tls.Server) checks nothing of the client's
        // certificate: OpenSSL's verify callback in Node accepts every chain and leaves the verdict
        // to JavaScript, which only tls.Server runs (onServerSocketSecure). So a certificate that
        // does not chain to --tls-ca would be let in. Ask for the verdict here (fail closed).
        if (tls.verifyClients === true) {
          const why = clientCertError(secure);
          if (why !== null) {
            secure.destroy();
            reject(
              new HandshakeAbort(
                `TLS handshake failed: client certificate refused: ${why} (it must chain to --tls-ca)`,
              ),
            );
            return;
          }
        }
        resolve();
      };
      secure.once("secure", onSecure);
      secure.once("error", onError);
      secure.once("close", onClose);
      secure.once("end", onClose);
    });
    this.stream = secure;
    this.reader = new StreamReader(secure);
    this.tlsActive = true;
    // proto.md: no negotiation state survives STARTTLS.
    this.structured = false;
    this.metaExport = null;
    this.metaSelected = false;
    this.log.debug(`TLS established (${secure.getProtocol() ?? "?"}, ${secure.getCipher()?.name ?? "?"})`);
    return undefined;
  }

  private async infoOrGo(option: number, data: Buffer): Promise<Negotiated | undefined> {
    if (data.length < 6) throw new OptionError(REP.ERR_INVALID, "INFO/GO data too short");
    const nameLen = data.readUInt32BE(0);
    if (nameLen > data.length - 6)
      throw new OptionError(REP.ERR_INVALID, "INFO/GO name length exceeds the data");
    if (nameLen > MAX_STRING) throw new OptionError(REP.ERR_INVALID, "export name longer than 4096 bytes");
    const name = clientString(data, 4, 4 + nameLen);
    if (name === null) throw new OptionError(REP.ERR_INVALID, `the export name ${NOT_A_STRING}`);
    const nInfo = data.readUInt16BE(4 + nameLen);
    if (data.length !== 6 + nameLen + 2 * nInfo) {
      throw new OptionError(REP.ERR_INVALID, "INFO/GO length does not match its information requests");
    }
    const requested = new Set<number>();
    for (let i = 0; i < nInfo; i++) requested.add(data.readUInt16BE(6 + nameLen + 2 * i));

    // INFO only describes the export: a snapshot answers it without building its pointer map.
    const opened =
      option === OPT.INFO
        ? await this.ctx.registry.info(name)
        : await this.ctx.registry.open(name, this.ctx.client);
    if ("message" in opened) {
      // The client may not show the message (nbdinfo prints only the error's errno): log it.
      this.log.info(`export ${JSON.stringify(name)} refused: ${opened.message}`);
      throw new OptionError(REP.ERR_UNKNOWN, opened.message);
    }
    const info = isOpen(opened)
      ? { ...opened, size: opened.volume.size, caps: opened.volume.caps() }
      : opened;
    const flags = transmissionFlags(info.caps, this.structured);
    this.reply(option, REP.INFO, encodeInfoExport(info.size, flags));
    if (requested.has(INFO.NAME)) this.reply(option, REP.INFO, encodeInfoString(INFO.NAME, info.name));
    if (requested.has(INFO.DESCRIPTION) && info.description) {
      this.reply(option, REP.INFO, encodeInfoString(INFO.DESCRIPTION, info.description));
    }
    // Always sent: the constraints are enforced whether or not the client asked.
    const b = info.blockSizes;
    this.reply(option, REP.INFO, encodeInfoBlockSize(b.minimum, b.preferred, b.maximum));
    this.reply(option, REP.ACK);
    if (!isOpen(opened)) return undefined;
    const blockStatus = this.metaSelected && this.metaExport === name;
    return this.finish(opened, flags, blockStatus);
  }

  private async metaContext(option: number, data: Buffer): Promise<undefined> {
    const set = option === OPT.SET_META_CONTEXT;
    if (set) this.metaSelected = false; // replaced even when this request fails
    if (!this.structured) throw new OptionError(REP.ERR_INVALID, "negotiate STRUCTURED_REPLY first");
    if (data.length < 8) throw new OptionError(REP.ERR_INVALID, "meta context data too short");
    const nameLen = data.readUInt32BE(0);
    if (nameLen > MAX_STRING || 4 + nameLen + 4 > data.length) {
      throw new OptionError(REP.ERR_INVALID, "bad export name length");
    }
    const name = clientString(data, 4, 4 + nameLen);
    if (name === null) throw new OptionError(REP.ERR_INVALID, `the export name ${NOT_A_STRING}`);
    let at = 4 + nameLen;
    const nQueries = data.readUInt32BE(at);
    at += 4;
    const queries: string[] = [];
    for (let i = 0; i < nQueries; i++) {
      if (at + 4 > data.length)
        throw new OptionError(REP.ERR_INVALID, "query list runs past the option data");
      const qLen = data.readUInt32BE(at);
      at += 4;
      if (qLen > MAX_STRING) throw new OptionError(REP.ERR_INVALID, "a query longer than 4096 bytes");
      if (at + qLen > data.length) throw new OptionError(REP.ERR_INVALID, "query runs past the option data");
      const q = clientString(data, at, at + qLen);
      if (q === null) throw new OptionError(REP.ERR_INVALID, `a query ${NOT_A_STRING}`);
      queries.push(q);
      at += qLen;
    }
    if (at !== data.length) throw new OptionError(REP.ERR_INVALID, "trailing bytes after the queries");
    for (const q of queries) {
      if (!q.includes(":")) throw new OptionError(REP.ERR_INVALID, `query "${q}" has no namespace`);
    }
    const known = await this.ctx.registry.info(name);
    if (!isInfo(known)) throw new OptionError(REP.ERR_UNKNOWN, known.message);

    // base:allocation is the only context. LIST: no queries or "base:" list it; SET: only the
    // exact name selects it. Unknown namespaces and leaves are ignored, as the spec requires.
    const match = set
      ? queries.includes(BASE_ALLOCATION)
      : queries.length === 0 || queries.includes("base:") || queries.includes(BASE_ALLOCATION);
    if (match)
      this.reply(option, REP.META_CONTEXT, encodeMetaContext(set ? BASE_ALLOCATION_ID : 0, BASE_ALLOCATION));
    if (set) {
      this.metaExport = name;
      this.metaSelected = match;
    }
    this.reply(option, REP.ACK);
    return undefined;
  }

  private finish(opened: OpenExport, flags: number, blockStatus: boolean): Negotiated {
    return {
      stream: this.stream,
      leftover: this.reader.detach(),
      export: opened,
      structured: this.structured,
      blockStatus,
      flags,
      tls: this.tlsActive,
    };
  }
}

/**
 * Why the TLS client's certificate is not acceptable, or null when it chains to the CA. Node
 * exposes OpenSSL's verdict only on the socket's handle (what tls.Server itself reads); without
 * it, or without a certificate, the answer is a refusal.
 */
function clientCertError(secure: TLSSocket): string | null {
  const cert = secure.getPeerCertificate();
  if (!cert || Object.keys(cert).length === 0) return "none presented";
  const handle = (secure as unknown as { _handle?: { verifyError?: () => Error | null } })._handle;
  if (typeof handle?.verifyError !== "function")
    return "this Node.js cannot tell whether it chains to the CA";
  const e = handle.verifyError();
  return e === null ? null : e.message;
}
