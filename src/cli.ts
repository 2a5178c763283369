// The `blockfork` command: dispatches to subcommands and turns errors into exit statuses
// (2 for usage errors, 1 for runtime failures) with a message that says what to do.

import { readFileSync } from "node:fs";
import { serve, SERVE_HELP } from "./commands/serve.js";
import { gateway, GATEWAY_HELP } from "./commands/gateway.js";
import {
  mark,
  MARK_HELP,
  snapshots,
  SNAPSHOTS_HELP,
  resyncCommand,
  RESYNC_HELP,
  status,
  STATUS_HELP,
  tracking,
  TRACKING_HELP,
  verifyCommand,
  VERIFY_HELP,
} from "./commands/admin.js";
import { BlockforkError } from "./errors.js";

const HELP = `Usage: blockfork COMMAND [options]

Commands:
  serve      serve a primary volume over NBD (blockfork serve --help)
  gateway    apply forwarded writes to a secondary volume over HTTP (blockfork gateway --help)
  status     a running proxy's replication state (blockfork status --state-dir DIR)
  tracking   show a running proxy's tracking log (blockfork tracking show --state-dir DIR)
  verify     compare primary and secondary by checksums, --repair to resync what differs
  resync     resync now, with a progress bar (blockfork resync --state-dir DIR [--full])
  mark       bookmark a point in time, served as snap@NAME (blockfork mark NAME --state-dir DIR)
  snapshots  the available points in time and bookmarks (blockfork snapshots --state-dir DIR)

Options:
  --help     this text
  --version  print the version
`;

type Command = { run: (argv: string[]) => Promise<number>; help: string };
const COMMANDS: Record<string, Command> = {
  serve: { run: serve, help: SERVE_HELP },
  gateway: { run: gateway, help: GATEWAY_HELP },
  status: { run: status, help: STATUS_HELP },
  tracking: { run: tracking, help: TRACKING_HELP },
  verify: { run: verifyCommand, help: VERIFY_HELP },
  resync: { run: resyncCommand, help: RESYNC_HELP },
  mark: { run: mark, help: MARK_HELP },
  snapshots: { run: snapshots, help: SNAPSHOTS_HELP },
};

function version(): string {
  const pkg = JSON.parse(readFileSync(new URL("../../package.json", import.meta.url), "utf8")) as {
    version: string;
  };
  return pkg.version;
}

/** Run the CLI with argv (without node and script); resolves with the exit status. */
export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === "--help" || name === "-h" || name === "help") {
    process.stdout.write(HELP);
    return name === undefined ? 2 : 0;
  }
  if (name === "--version" || name === "-V") {
    process.stdout.write(`blockfork ${version()}\n`);
    return 0;
  }
  const cmd = COMMANDS[name];
  if (!cmd) {
    process.stderr.write(`blockfork: unknown command "${name}"\n\n${HELP}`);
    return 2;
  }
  if (rest.includes("--help") || rest.includes("-h")) {
    process.stdout.write(cmd.help);
    return 0;
  }
  try {
    return await cmd.run(rest);
  } catch (e) {
    const err = e as Error & { code?: string };
    const usage =
      (e instanceof BlockforkError && e.code === "ERR_USAGE") ||
      (typeof err.code === "string" && err.code.startsWith("ERR_PARSE_ARGS"));
    const hint = `(see "blockfork ${name} --help")`;
    const unknown = unknownOption(err);
    if (unknown !== null) process.stderr.write(`blockfork ${name}: unknown option ${unknown} ${hint}\n`);
    else {
      process.stderr.write(`blockfork ${name}: ${err.message}\n`);
      if (usage) process.stderr.write(`${hint}\n`);
    }
    return usage ? 2 : 1;
  }
}

/**
 * The option node:util parseArgs refused as unknown, or null. Its own message is about how to pass
 * a positional argument that starts with '-', quoted unevenly: not what a mistyped option needs.
 */
function unknownOption(err: Error & { code?: string }): string | null {
  if (err.code !== "ERR_PARSE_ARGS_UNKNOWN_OPTION") return null;
  return /^Unknown option '([^']+)'/.exec(err.message)?.[1] ?? null;
}
