#!/usr/bin/env node
// Build the Rust addon (crates/blockio) offline with plain cargo and install it as build/blockio.node,
// the one file src/blockio/native.ts loads. No crates.io access is needed: the crate has no dependencies.
import { spawnSync } from "node:child_process";
import { copyFileSync, mkdirSync, renameSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const manifest = join(root, "crates", "blockio", "Cargo.toml");
const profile = process.env.BLOCKIO_PROFILE === "debug" ? "debug" : "release";
const args = ["build", "--offline", "--manifest-path", manifest];
if (profile === "release") args.push("--release");

const r = spawnSync("cargo", args, { stdio: "inherit" });
if (r.error) {
  console.error(
    `build-addon: cannot run cargo (${r.error.message}). Install Rust (cargo, rustc >= 1.70) and retry.`,
  );
  process.exit(1);
}
if (r.status !== 0) {
  console.error("build-addon: cargo build failed (see above)");
  process.exit(r.status ?? 1);
}
mkdirSync(join(root, "build"), { recursive: true });
// Copy then rename: a server running from this tree keeps its mapping of the old file (an in-place
// overwrite would change the code under it and crash it).
const dest = join(root, "build", "blockio.node");
copyFileSync(join(root, "crates", "blockio", "target", profile, "libblockio.so"), `${dest}.tmp`);
renameSync(`${dest}.tmp`, dest);
console.log(`build-addon: build/blockio.node (${profile})`);
