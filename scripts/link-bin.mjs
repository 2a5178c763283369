#!/usr/bin/env node
// Make `npx blockfork` work inside a checkout: npm links the bins of dependencies into
// node_modules/.bin, but not the package's own. Runs from `npm install` (prepare).
import { mkdirSync, rmSync, symlinkSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const binDir = join(root, "node_modules", ".bin");
mkdirSync(binDir, { recursive: true });
const link = join(binDir, "blockfork");
rmSync(link, { force: true });
symlinkSync(join("..", "..", "bin", "blockfork.js"), link);
