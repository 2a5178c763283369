// Re-open a plain socket so that the kernel reads straight into buffers we choose (Node's
// documented `onread` option of new net.Socket()): the NBD receiver and the gateway's update
// stream use it to read large payloads into their final buffers, with no 64 KiB allocation per
// read and no copy out of a stream chunk.

import { Socket } from "node:net";
import type { Duplex } from "node:stream";
import { TLSSocket } from "node:tls";
import { dupFd } from "../blockio/index.js";

/** The file descriptor of a plain (non-TLS) net.Socket, or -1 (reads a Node internal, fail-safe). */
export function plainSocketFd(stream: Duplex): number {
  if (!(stream instanceof Socket) || stream instanceof TLSSocket) return -1;
  const fd = (stream as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  return typeof fd === "number" && fd >= 0 ? fd : -1;
}

/** Where reads go: `buffer()` names the next buffer, `callback(n, buf)` gets what was read into it. */
export interface OnRead {
  buffer: () => Buffer;
  callback: (nread: number, buf: Buffer) => boolean;
}

/** A socket re-opened with onread, and the bytes the old one had already buffered. */
export interface Reopened {
  socket: Socket;
  fd: number;
  leftover: Buffer;
}

/**
 * Take over a plain socket's descriptor: a duplicate under a new socket that reads with `onread`.
 * Bytes the old socket already buffered are returned (after `leftover`, which the caller already
 * holds) to be parsed first; the old socket is closed (the duplicate keeps the connection open).
 * Null, and nothing changed, when the stream is not a plain socket or still has writes queued.
 */
export function reopenWithOnread(source: Duplex, leftover: Buffer, onread: OnRead): Reopened | null {
  const fd = plainSocketFd(source);
  if (fd < 0 || source.writableLength !== 0) return null;
  const chunks = [leftover];
  for (let c = source.read() as Buffer | null; c !== null; c = source.read() as Buffer | null) chunks.push(c);
  const rest = chunks.length === 1 ? leftover : Buffer.concat(chunks);
  const dup = dupFd(fd);
  // `onread` is documented for new net.Socket() but missing from @types/node 20's constructor type.
  const opts = { fd: dup, readable: true, writable: true, allowHalfOpen: true, onread };
  const sock = new Socket(opts);
  if (source instanceof Socket && source.remotePort !== undefined) {
    sock.setNoDelay(true);
    sock.setKeepAlive(true, 60_000);
  }
  source.removeAllListeners("data");
  source.destroy();
  return { socket: sock, fd: dup, leftover: rest };
}
