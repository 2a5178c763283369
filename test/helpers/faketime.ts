// A wall clock that a test can step, for one server process: libfaketime preloaded (LD_PRELOAD)
// with its offset in a timestamp file the test rewrites, as `date -s` or an NTP step would move the
// host's clock. Only the wall clock is faked (FAKETIME_DONT_FAKE_MONOTONIC): the monotonic clock
// stays real, as it does when a real clock is stepped. This shared machine's clock is not touched.

import { existsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { sleep } from "./pit.js";

export const LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
/**
 * libfaketime rereads its timestamp file when a clock call finds the last read more than this many
 * whole seconds old (s): so up to 2 x CACHE_S after the file changes.
 */
const CACHE_S = 1;

export interface FakeClock {
  /** The environment to start the server with. */
  env: NodeJS.ProcessEnv;
  /** The server's wall clock minus the real one (ms). */
  offset: number;
  /** The server's wall clock now. */
  now(): number;
  /** Step the server's wall clock to `ms` from the real one; resolves once the server sees it. */
  set(ms: number): Promise<void>;
  /** Write the new offset without waiting for the server to see it (within about two seconds). */
  setNoWait(ms: number): void;
}

/** A fake clock at the real time, its timestamp file in `dir`. */
export function fakeClock(dir: string): FakeClock {
  if (!existsSync(LIBFAKETIME)) {
    throw new Error(
      `${LIBFAKETIME} is missing: apt-get install libfaketime (scripts/ensure-test-deps.sh does)`,
    );
  }
  const file = join(dir, "faketime.rc");
  writeFileSync(file, "+0\n");
  const c: FakeClock = {
    env: {
      LD_PRELOAD: LIBFAKETIME,
      FAKETIME_TIMESTAMP_FILE: file,
      FAKETIME_CACHE_DURATION: String(CACHE_S),
      FAKETIME_DONT_FAKE_MONOTONIC: "1",
    },
    offset: 0,
    now: () => Date.now() + c.offset,
    setNoWait(ms) {
      writeFileSync(file, `${ms >= 0 ? "+" : ""}${ms / 1000}\n`);
      c.offset = ms;
    },
    async set(ms) {
      c.setNoWait(ms);
      // Not CACHE_S + a margin: a read at second X is redone only at a call in second X + 2, so a
      // step written just after a read shows up to 2 s later (a 1.5 s wait failed now and then).
      await sleep(2 * CACHE_S * 1000 + 500);
    },
  };
  return c;
}
