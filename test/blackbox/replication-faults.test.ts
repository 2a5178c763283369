// Black-box replication with network faults and no process killed: the gateway's fault injection,
// set over its API (PUT /v1/fault) or by its trigger file (<gateway state dir>/fault), while fio
// writes through the proxy (async mode, --queue-age 1000):
// - slow (every request delayed 3 s, beyond the queue age: the queue's age or bytes bound trips),
//   drop (connections destroyed), error
//   (500 to every request but health), down (503 to everything, health included);
// - each time fio sees no error and its run ends on time (primary I/O never waits for the gateway);
//   the link falls to tracking and `blockfork status` says why; after the fault is cleared the link
//   resyncs, streams with 0 dirty bytes, and the secondary file equals the primary file.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import {
  fioClean,
  fioStart,
  sha256File,
  sleep,
  startPair,
  type FioRun,
  type Pair,
  type ProxyStatus,
} from "../helpers/replication.js";

interface FaultCase {
  name: string;
  /** How the fault is set: over the API, or by the trigger file. */
  via: "api" | "file";
  fault: Record<string, unknown> | string;
  /** What `status` must give as the reason. */
  reason: RegExp;
}

const CASES: FaultCase[] = [
  {
    name: "slow 3 s",
    via: "api",
    fault: { mode: "slow", delayMs: 3000 },
    // fio fills the 64 MiB queue before its oldest update is 1 s old: either bound may trip first
    // (resync copies queued behind a slow gateway no longer count for the age bound).
    reason: /(ms old|bytes) \(gateway too slow\)/,
  },
  { name: "drop", via: "file", fault: "drop\n", reason: /failed: .*(closed|reset|socket|ECONN)/i },
  { name: "error 500", via: "api", fault: { mode: "error" }, reason: /500 ERR_FAULT/ },
  { name: "down 503", via: "file", fault: '{"mode": "down"}', reason: /503 ERR_FAULT/ },
];

const RUNTIME_S = 4;

void describe("replication: gateway faults without killing anything", () => {
  let pair: Pair;
  before(async () => {
    pair = await startPair({ size: "128M", proxyArgs: ["--queue-age", "1000"] });
  });
  after(async () => {
    await pair.stop();
  });

  for (const c of CASES) {
    void test(`${c.name} (${c.via === "api" ? "PUT /v1/fault" : "trigger file"}): tracking with the reason, fio unharmed, resync to identical files`, async () => {
      let fio: FioRun | null = null;
      try {
        const start = await pair.waitSynced();
        const outages0 = start.link!.outages;
        const t0 = Date.now();
        fio = fioStart(pair.proxy!.uri, pair.dir, [
          "--name=load",
          "--rw=randwrite",
          "--bsrange=4k-64k",
          "--iodepth=16",
          "--offset=0",
          "--size=64M",
          "--time_based",
          `--runtime=${RUNTIME_S}`,
        ]);
        await sleep(500);
        if (c.via === "api") await pair.setFault(c.fault as Record<string, unknown>);
        else pair.faultFile(c.fault as string);

        // Watch status while the fault lasts: the link must fall (outages grows, with the reason),
        // and status should show it tracking.
        let fell: ProxyStatus | null = null;
        let tracking: ProxyStatus | null = null;
        const seen = new Set<string>();
        const deadline = Date.now() + 10_000;
        while (Date.now() < deadline && tracking === null) {
          const s = await pair.status();
          seen.add(s.link!.state);
          if (s.link!.outages > outages0 && c.reason.test(s.link!.reason)) fell ??= s;
          if (s.link!.state === "tracking" && c.reason.test(s.link!.reason)) tracking = s;
          await sleep(100);
        }
        assert.ok(
          fell !== null,
          `the link never fell with a reason like ${c.reason}; states seen ${[...seen].join(", ")}; ` +
            `log tail:\n${pair.proxyLog().slice(-1500)}`,
        );

        const r = await fio.done;
        const took = (Date.now() - t0) / 1000;
        assert.equal(fioClean(r), null, `fio during ${c.name}`);
        assert.ok(
          took < RUNTIME_S + 6,
          `fio took ${took.toFixed(1)} s for a ${RUNTIME_S} s run during ${c.name}`,
        );

        if (c.via === "api") await pair.setFault({ mode: "none" });
        else pair.faultFile(null);
        const end = await pair.waitSynced(60_000);
        assert.ok(end.link!.outages > outages0);
        assert.equal(end.link!.reason, "", "streaming again: no reason");
        const [a, b] = await Promise.all([sha256File(pair.primary), sha256File(pair.secondary)]);
        assert.equal(b, a, `the secondary differs from the primary after ${c.name} and its resync`);

        assert.ok(
          tracking !== null,
          `status never showed the link tracking during ${c.name} (states seen: ${[...seen].join(", ")}; ` +
            `${end.link!.outages - outages0} falls to tracking): the link leaves tracking as soon as ` +
            `a health check answers, without backoff`,
        );
      } finally {
        await fio?.kill();
        if (c.via === "api") await pair.setFault({ mode: "none" }).catch(() => {});
        else pair.faultFile(null);
      }
    });
  }
});
