#!/usr/bin/env node
// Entry point of the `blockfork` command. Sets the I/O thread pool size (--threads, default 8)
// before anything can start libuv's pool, then runs the compiled CLI (npm install builds dist/).
const i = process.argv.indexOf("--threads");
const threads = i > 0 ? process.argv[i + 1] : undefined;
if (threads !== undefined && /^[1-9][0-9]{0,3}$/.test(threads)) process.env.UV_THREADPOOL_SIZE = threads;
else if (!process.env.UV_THREADPOOL_SIZE) process.env.UV_THREADPOOL_SIZE = "8";

let cli;
try {
  cli = await import("../dist/src/cli.js");
} catch (e) {
  if (e && e.code === "ERR_MODULE_NOT_FOUND") {
    console.error('blockfork: not built yet; run "npm install" (or "npm run build") in the project first');
    process.exit(1);
  }
  throw e;
}
const status = await cli.main(process.argv.slice(2));
process.exitCode = status;
if (status !== 0 || process.argv[2] === "serve") process.exit(status);
