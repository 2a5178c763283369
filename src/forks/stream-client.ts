// The proxy's side of an update stream (docs/gateway-api.md, "The update stream"): one HTTP/1.1
// connection, upgraded to `blockfork-updates/1` through undici, that carries the link's batches as
// BATCH frames and brings their ACKs back (frames.ts).
//
// Notes on the design
// - Batches go out through the NBD server's OutputQueue: frame header and body slices are queued
//   in order and sent with one non-blocking send(2) when libuv has nothing queued for the socket,
//   else written through libuv (corked). The slices are the link's slabs and pooled buffers,
//   never copied in JS.
// - ACKs come back in any order (they carry the batch id); in practice the gateway answers in
//   order. A non-200 ACK rejects that batch with the gateway's JSON error, as a POST would.
// - The stream has no per-request timeout of its own: a timer checks that the stream made progress
//   within `timeoutMs` while batches are in flight (a batch answered, or a write of ours taken by
//   the socket), else the connection is destroyed. Age alone would count the time a batch waits
//   behind earlier ones in our own queue: a slow but moving link (a WAN) is not a stuck gateway.
//   A gateway that stops reading stops both. Any end of the connection rejects every batch in
//   flight and calls onClosed once: for the link, one failure.

import type { Duplex } from "node:stream";
import type { Dispatcher } from "undici";
import { OutputQueue } from "../nbd/output.js";
import { AckParser, BATCH_HEADER, encodeBatchHeader, STREAM_PROTOCOL, type Ack } from "../gateway/frames.js";
import { plainSocketFd } from "../util/onread.js";
import type { PieceLease } from "../volume/volume.js";

/** A batch the gateway refused (non-200 ACK): status and its JSON error. */
export class BatchRefused extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
    this.name = "BatchRefused";
  }
}

/** A piece of a batch body: bytes, or a record header followed by a file range (sendfile). */
export type BodyPart = Buffer | { head: Buffer; lease: PieceLease };

interface InFlight {
  resolve: (json: unknown) => void;
  reject: (e: Error) => void;
  at: number;
}

/** An open update stream. */
export class UpdateStream {
  /** Called once when the connection ends (not after close()). */
  onClosed: ((reason: string) => void) | null = null;
  private readonly out: OutputQueue;
  private readonly acks = new AckParser();
  private readonly inFlight = new Map<number, InFlight>();
  private nextId = 1;
  private closed = false;
  /** The last sign of life: a batch answered, or a write of ours completed. */
  private progressAt = performance.now();
  private readonly timer: NodeJS.Timeout;

  /**
   * Upgrade a connection of `dispatcher` (GET `path` with `headers`). Rejects when the gateway
   * does not switch protocols (an older gateway answers 404: the caller falls back to POST).
   */
  static async open(
    dispatcher: Dispatcher,
    path: string,
    headers: Record<string, string>,
    timeoutMs: number,
  ): Promise<UpdateStream> {
    const signal = AbortSignal.timeout(timeoutMs);
    const { socket, headers: h } = await dispatcher.upgrade({
      path,
      method: "GET",
      headers,
      protocol: STREAM_PROTOCOL,
      signal,
    });
    const proto = h.upgrade;
    if ((Array.isArray(proto) ? proto.join(",") : (proto ?? "")).toLowerCase() !== STREAM_PROTOCOL) {
      socket.destroy();
      throw new Error(`the gateway switched to ${JSON.stringify(proto)}, not ${STREAM_PROTOCOL}`);
    }
    return new UpdateStream(socket, timeoutMs);
  }

  private constructor(
    private readonly sock: Duplex,
    private readonly timeoutMs: number,
  ) {
    const fd = plainSocketFd(sock);
    this.out = new OutputQueue(sock, fd);
    this.out.onSpace = () => (this.progressAt = performance.now());
    this.out.onReadError = (e) => (this.leaseReadError ??= e instanceof Error ? e : new Error(String(e)));
    this.zeroCopy = fd >= 0;
    sock.on("data", (chunk: Buffer) => this.onData(chunk));
    sock.on("error", (e: Error & { code?: string }) =>
      this.end(
        e.code === "EPIPE" || e.code === "ECONNRESET"
          ? `the gateway closed the update stream (${e.code})`
          : `update stream: ${e.message}`,
      ),
    );
    sock.on("end", () => this.end("the gateway closed the update stream"));
    sock.on("close", () => this.end("the update stream closed"));
    sock.resume();
    this.timer = setInterval(() => this.checkTimeout(), Math.min(1000, Math.max(50, timeoutMs / 4)));
    this.timer.unref();
  }

  /** File ranges can be sent from the page cache (a plain socket, not TLS). */
  readonly zeroCopy: boolean;

  /**
   * The first error reading a file range while it was sent (the stream then ends): the primary
   * failed, not the gateway. The page cache can hold pages whose read failed, and cachestat
   * counts them, so a range that looked cached can still fail here.
   */
  leaseReadError: Error | null = null;

  /**
   * Send one batch (`chunks` are its body, `bytes` long) with the given floor. Resolves with the
   * gateway's JSON answer; rejects with BatchRefused (non-200) or an Error (the stream ended).
   * The chunks must stay unchanged until the promise settles.
   */
  send(chunks: readonly BodyPart[], bytes: number, floor: number): Promise<unknown> {
    if (this.closed) return Promise.reject(new Error("the update stream is closed"));
    const id = this.nextId;
    this.nextId = (this.nextId + 1) >>> 0 || 1;
    const head = Buffer.allocUnsafe(BATCH_HEADER);
    encodeBatchHeader(head, 0, id, floor, bytes);
    const p = new Promise<unknown>((resolve, reject) => {
      this.inFlight.set(id, { resolve, reject, at: performance.now() });
    });
    this.out.pushExternal(head);
    for (const c of chunks) {
      if (Buffer.isBuffer(c)) this.out.pushExternal(c);
      else this.out.pushLease(c.head, c.lease);
    }
    this.out.flush();
    return p;
  }

  /** Close the connection; batches in flight are rejected. */
  close(): void {
    this.end("the update stream was closed by the proxy", false);
  }

  private onData(chunk: Buffer): void {
    let acks: Ack[];
    try {
      acks = this.acks.push(chunk);
    } catch (e) {
      this.end(`update stream: ${(e as Error).message}`);
      return;
    }
    for (const a of acks) {
      const f = this.inFlight.get(a.id);
      if (f === undefined) continue;
      this.inFlight.delete(a.id);
      this.progressAt = performance.now();
      if (a.status === 200) f.resolve(a.json);
      else {
        const err = (a.json as { error?: { code?: string; message?: string } } | null)?.error;
        const detail = err ? `${err.code ?? ""}: ${err.message ?? ""}` : JSON.stringify(a.json).slice(0, 300);
        const hint = a.status === 401 ? " (check --gateway-token-file)" : "";
        f.reject(new BatchRefused(a.status, `batch ${a.id} answered ${a.status} ${detail}${hint}`));
      }
    }
  }

  private checkTimeout(): void {
    const first = this.inFlight.values().next();
    if (first.done === true) return;
    const age = performance.now() - Math.max(first.value.at, this.progressAt);
    if (age > this.timeoutMs) {
      this.end(
        `no progress on the update stream within ${this.timeoutMs} ms: no batch answered, nothing sent (the gateway is stuck)`,
      );
    }
  }

  private end(reason: string, notify = true): void {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.timer);
    // Destroyed before the batches are rejected: their buffers go back to the link's pools, and no
    // write still queued in libuv may send them afterwards.
    this.sock.destroy();
    this.out.discard();
    const err = new Error(reason);
    for (const f of this.inFlight.values()) f.reject(err);
    this.inFlight.clear();
    if (notify) this.onClosed?.(reason);
  }
}
