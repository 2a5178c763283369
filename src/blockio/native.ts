// The only importer of the native addon (build/blockio.node, built from crates/blockio).
// Everything else uses the typed, promise-based wrapper in ./index.ts.

import { createRequire } from "node:module";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";

/** The raw functions of crates/blockio/src/lib.rs. Results are byte counts or -errno. */
export interface BlockioBinding {
  readNowait(fd: number, buf: Uint8Array, offset: number): number;
  writeNowait(fd: number, buf: Uint8Array, offset: number): number;
  readInline(fd: number, buf: Uint8Array, offset: number): number;
  writeInline(fd: number, buf: Uint8Array, offset: number): number;
  extentsSync(fd: number, offset: number, length: number, out: Float64Array): number;
  deviceSize(fd: number): number;
  cachedBytes(fd: number, offset: number, length: number): number;
  mapRegister(fd: number, limit: number): number;
  mapForget(fd: number): number;
  mappedWindows(): number;
  dupFd(fd: number): number;
  lockFd(fd: number, exclusive: number): number;
  sendNow(sock: number, buf: Uint8Array): number;
  setSendBuffer(sock: number, bytes: number): number;
  tuneMalloc(mmapThreshold: number, trimThreshold: number, topPad: number): number;
  recvNowait(sock: number, buf: Uint8Array): number;
  threadSleeps(): number;
  crc32c(buf: Uint8Array, seed: number): number;
  sendPieces(sock: number, header: Uint8Array, pieces: Float64Array, skip: number, copyFd: number): number;
  submit(desc: Float64Array, bufs: (Uint8Array | undefined)[], results: Float64Array, cb: () => void): void;
}

function findRoot(): string {
  // dist/src/blockio/native.js or src/blockio/native.ts: walk up to the directory with package.json.
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    if (existsSync(join(dir, "package.json"))) return dir;
    dir = dirname(dir);
  }
  throw new Error("blockio: cannot find the project root (package.json)");
}

const path = process.env.BLOCKIO_ADDON ?? join(findRoot(), "build", "blockio.node");
if (!existsSync(path)) {
  throw new Error(`blockio: native addon not found at ${path}; run "npm install" (or "npm run build:addon")`);
}

/** The loaded addon. */
export const binding = createRequire(import.meta.url)(path) as BlockioBinding;
