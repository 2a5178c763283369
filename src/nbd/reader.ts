// Exact-length reads over a stream, for the handshake (not the hot path: transmission parses
// chunks itself). Buffers at most `highWater` bytes ahead of what was asked for, pausing the
// stream beyond that, so a client cannot make us hold more than one message's worth.

import type { Duplex } from "node:stream";

/** The peer closed or the stream failed while a read was waiting. */
export class StreamClosedError extends Error {
  readonly code = "ERR_STREAM_CLOSED";
}

/** Reads exact byte counts from a Duplex. */
export class StreamReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private want = 0;
  private waiter: { resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private failure: Error | null = null;
  private attached = true;

  constructor(
    private readonly stream: Duplex,
    private readonly highWater = 64 * 1024,
  ) {
    stream.on("data", this.onData);
    stream.on("end", this.onEnd);
    stream.on("close", this.onEnd);
    stream.on("error", this.onError);
  }

  /** Resolve with exactly `n` bytes, or reject with StreamClosedError. */
  read(n: number): Promise<Buffer> {
    if (this.buffered >= n) return Promise.resolve(this.take(n));
    if (this.failure) return Promise.reject(this.failure);
    this.want = n;
    this.stream.resume();
    return new Promise<Buffer>((resolve, reject) => {
      this.waiter = { resolve, reject };
    });
  }

  /** Stop reading; return any bytes received but not yet consumed. */
  detach(): Buffer {
    if (this.attached) {
      this.attached = false;
      this.stream.off("data", this.onData);
      this.stream.off("end", this.onEnd);
      this.stream.off("close", this.onEnd);
      this.stream.off("error", this.onError);
      this.stream.pause();
    }
    const rest = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
    this.chunks = [];
    this.buffered = 0;
    return rest;
  }

  private take(n: number): Buffer {
    let out: Buffer;
    const first = this.chunks[0];
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      const all = Buffer.concat(this.chunks);
      out = all.subarray(0, n);
      this.chunks = all.length > n ? [all.subarray(n)] : [];
    }
    this.buffered -= n;
    return out;
  }

  private readonly onData = (chunk: Buffer): void => {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    if (this.waiter && this.buffered >= this.want) {
      const w = this.waiter;
      this.waiter = null;
      w.resolve(this.take(this.want));
    }
    if (!this.waiter && this.buffered > this.highWater) this.stream.pause();
  };

  private readonly onEnd = (): void => this.fail(new StreamClosedError("the client closed the connection"));

  private readonly onError = (e: Error): void =>
    this.fail(new StreamClosedError(`connection error: ${e.message}`, { cause: e }));

  private fail(e: Error): void {
    if (!this.failure) this.failure = e;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.reject(this.failure);
    }
  }
}
