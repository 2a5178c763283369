// HTTP plumbing of the gateway: the error type every handler throws (status + stable API code),
// JSON replies, and reading a request body whose Content-Length is known in advance (one buffer,
// filled in place: no list of chunks joined at the end).

import type { IncomingMessage, ServerResponse } from "node:http";
import { acquire, release } from "../util/buffer-pool.js";

/** Stable error codes of the API (docs/gateway-api.md, the error table). */
export type ApiCode =
  | "ERR_BAD_REQUEST"
  | "ERR_MALFORMED"
  | "ERR_RANGE"
  | "ERR_SIZE_MISMATCH"
  | "ERR_AUTH"
  | "ERR_NOT_FOUND"
  | "ERR_METHOD"
  | "ERR_TOO_LARGE"
  | "ERR_IO"
  | "ERR_FAULT"
  | "ERR_UNAVAILABLE"
  | "ERR_NO_SPACE"
  | "ERR_OWNER";

/** A request that ends in an error reply: HTTP status, API code, and a message saying what to do. */
export class HttpError extends Error {
  readonly status: number;
  readonly code: ApiCode;
  readonly headers: Record<string, string>;
  /** Close the connection after the reply (the request body was not read). */
  readonly close: boolean;
  constructor(
    status: number,
    code: ApiCode,
    message: string,
    opts: { headers?: Record<string, string>; close?: boolean; cause?: unknown } = {},
  ) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = "HttpError";
    this.status = status;
    this.code = code;
    this.headers = opts.headers ?? {};
    this.close = opts.close === true;
  }
}

/** 400 ERR_BAD_REQUEST. */
export function badRequest(message: string): HttpError {
  return new HttpError(400, "ERR_BAD_REQUEST", message);
}

/** Send a JSON reply. */
export function sendJson(
  res: ServerResponse,
  status: number,
  body: unknown,
  headers: Record<string, string> = {},
): void {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    "Content-Type": "application/json",
    "Content-Length": String(Buffer.byteLength(text)),
    "Cache-Control": "no-store",
    ...headers,
  });
  res.end(text);
}

/** The JSON error body of the API. */
export function errorBody(code: ApiCode, message: string): { error: { code: ApiCode; message: string } } {
  return { error: { code, message } };
}

/** Send an HttpError as the API's JSON error. */
export function sendError(res: ServerResponse, err: HttpError): void {
  const headers: Record<string, string> = { ...err.headers };
  // A connection option the error names (a 426's "Upgrade": RFC 9110 7.8 wants the Upgrade header
  // listed in Connection) is kept beside "close".
  if (err.close) headers.Connection = headers.Connection ? `${headers.Connection}, close` : "close";
  sendJson(res, err.status, errorBody(err.code, err.message), headers);
}

/** A request body: `data` is a view of `backing`, which goes back to the pool with dispose(). */
export interface Body {
  data: Buffer;
  dispose(): void;
}

const EMPTY: Body = { data: Buffer.alloc(0), dispose: () => {} };

/**
 * Read a request body of exactly Content-Length bytes, at most `limit`. Without Content-Length:
 * an error when `required`, else an empty body. Over the limit: 413 before any of it is read.
 * Ending short of Content-Length (the client closed early) rejects with 400.
 */
export function readBody(req: IncomingMessage, limit: number, required: boolean): Promise<Body> {
  if (req.headers["transfer-encoding"] !== undefined) {
    return Promise.reject(
      badRequest("send the body with Content-Length (chunked transfer encoding is not accepted)"),
    );
  }
  const declared = req.headers["content-length"];
  if (declared === undefined) {
    if (required) {
      return Promise.reject(badRequest("Content-Length is required: send the body with its length"));
    }
    return Promise.resolve(EMPTY);
  }
  const n = Number(declared);
  if (!/^\d+$/.test(declared) || !Number.isSafeInteger(n)) {
    return Promise.reject(badRequest(`Content-Length "${declared}" is not a number of bytes`));
  }
  if (n > limit) {
    return Promise.reject(
      new HttpError(
        413,
        "ERR_TOO_LARGE",
        `the body is ${n} bytes, over the limit of ${limit}; split it into smaller requests`,
        { close: true },
      ),
    );
  }
  if (n === 0) return Promise.resolve(EMPTY);
  return new Promise<Body>((resolve, reject) => {
    const backing = acquire(n);
    const data = backing.subarray(0, n);
    let got = 0;
    let settled = false;
    const fail = (err: HttpError): void => {
      if (settled) return;
      settled = true;
      release(backing);
      reject(err);
    };
    req.on("data", (chunk: Buffer) => {
      if (settled) return;
      if (got + chunk.length > n) {
        fail(badRequest(`the body is longer than its Content-Length (${n})`));
        return;
      }
      data.set(chunk, got);
      got += chunk.length;
    });
    req.on("end", () => {
      if (settled) return;
      if (got !== n) {
        fail(badRequest(`the body ended after ${got} of the ${n} bytes its Content-Length announced`));
        return;
      }
      settled = true;
      resolve({ data, dispose: () => release(backing) });
    });
    const early = (): void =>
      fail(badRequest(`the connection ended after ${got} of the ${n} body bytes Content-Length announced`));
    req.on("aborted", early);
    req.on("error", early);
    req.on("close", () => {
      if (!req.complete) early();
    });
  });
}
