// src/forks/link-state.ts, the pure state machine of a gateway link: every transition with its
// actions in order, the events each state ignores (same state, no actions), stop from every state,
// a whole outage scripted end to end, and a seeded walk that replays the actions the way the driver
// does (a probe loop, a resync task) and checks after every step that what runs matches the state.

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import {
  initialLinkState,
  sends,
  startActions,
  step,
  type LinkAction,
  type LinkEvent,
  type LinkState,
  type LinkStateName,
} from "../../src/forks/link-state.js";

const T0 = 1_700_000_000_000;

const EVENTS: LinkEvent[] = [
  { type: "healthy" },
  { type: "unhealthy", reason: "connect ECONNREFUSED" },
  { type: "failure", reason: "POST answered 500" },
  { type: "overflow", reason: "queue over 1024 bytes" },
  { type: "syncTimeout", reason: "a sync write waited 6000 ms" },
  { type: "resyncDone" },
  { type: "resyncRequested" },
  { type: "stop" },
];

function at(name: LinkStateName, extra: Partial<LinkState> = {}): LinkState {
  return { name, since: T0, reason: "", outages: 0, ...extra };
}

/** Drive a state through `events` from `s`, at T0+1, T0+2, ...; returns every step. */
function script(s: LinkState, events: LinkEvent[]): { state: LinkState; actions: LinkAction[] }[] {
  const out: { state: LinkState; actions: LinkAction[] }[] = [];
  let now = s.since;
  for (const e of events) {
    const [next, actions] = step(s, e, ++now);
    out.push({ state: next, actions });
    s = next;
  }
  return out;
}

/** Action types without the log text (the log's level is kept: it says warn or info). */
function kinds(actions: LinkAction[]): string[] {
  return actions.map((a) => (a.type === "log" ? `log:${a.level}` : a.type));
}

void describe("link state machine: the start", () => {
  void test("initial state is starting, no reason, no outages; the driver starts by probing", () => {
    const s = initialLinkState(T0);
    assert.deepEqual(s, { name: "starting", since: T0, reason: "", outages: 0 });
    assert.deepEqual(startActions, [{ type: "probe" }]);
  });

  void test("starting --healthy--> resyncing: stop probing, start the resync, say so", () => {
    const [s, actions] = step(at("starting"), { type: "healthy" }, T0 + 5);
    assert.equal(s.name, "resyncing");
    assert.equal(s.since, T0 + 5);
    assert.equal(s.outages, 0);
    assert.deepEqual(kinds(actions), ["stopProbe", "startResync", "log:info"]);
  });

  void test("starting --unhealthy (refused)--> tracking, said as an error: not an outage", () => {
    const reason = "health check: GET /v1/status answered 401 ERR_AUTH: wrong token";
    const [s, actions] = step(at("starting"), { type: "unhealthy", reason, refused: true }, T0 + 7);
    assert.equal(s.name, "tracking");
    const log = actions.find((a) => a.type === "log");
    assert.ok(log !== undefined && log.type === "log");
    assert.equal(log.level, "error");
    assert.match(log.message, /refuses this proxy .*401.*tracking until that is fixed/);
    assert.doesNotMatch(log.message, /not reachable/);
  });

  void test("starting --unhealthy--> tracking with the reason; the probe keeps running", () => {
    const [s, actions] = step(at("starting"), { type: "unhealthy", reason: "connect ECONNREFUSED" }, T0 + 7);
    assert.equal(s.name, "tracking");
    assert.equal(s.since, T0 + 7);
    assert.equal(s.reason, "connect ECONNREFUSED");
    // Nothing was ever queued and the probe loop started with startActions: only a warning.
    assert.deepEqual(kinds(actions), ["log:warn"]);
    const log = actions[0] as Extract<LinkAction, { type: "log" }>;
    assert.match(log.message, /connect ECONNREFUSED/);
  });

  void test("starting ignores failure, overflow, syncTimeout, resyncDone, resyncRequested", () => {
    for (const e of EVENTS) {
      if (e.type === "healthy" || e.type === "unhealthy" || e.type === "stop") continue;
      const s0 = at("starting");
      const [s, actions] = step(s0, e, T0 + 1);
      assert.equal(s, s0, `starting + ${e.type} must keep the very same state`);
      assert.deepEqual(actions, [], `starting + ${e.type} must do nothing`);
    }
  });
});

void describe("link state machine: streaming", () => {
  for (const type of ["failure", "overflow", "syncTimeout"] as const) {
    void test(`streaming --${type}--> tracking: drop the queue, probe, warn; one more outage`, () => {
      const reason = `because of ${type}`;
      const [s, actions] = step(at("streaming", { outages: 2 }), { type, reason }, T0 + 9);
      assert.deepEqual(s, { name: "tracking", since: T0 + 9, reason, outages: 3 });
      assert.deepEqual(kinds(actions), ["dropQueue", "probe", "log:warn"]);
      const log = actions[2] as Extract<LinkAction, { type: "log" }>;
      assert.match(log.message, /streaming -> tracking/);
      assert.ok(log.message.includes(reason), log.message);
    });
  }

  void test("streaming --resyncRequested--> resyncing: start the resync (no probe to stop)", () => {
    const [s, actions] = step(at("streaming", { outages: 1 }), { type: "resyncRequested" }, T0 + 3);
    assert.deepEqual(s, { name: "resyncing", since: T0 + 3, reason: "", outages: 1 });
    assert.deepEqual(kinds(actions), ["startResync", "log:info"]);
  });

  void test("streaming ignores healthy, unhealthy and resyncDone", () => {
    for (const type of ["healthy", "unhealthy", "resyncDone"]) {
      const e = EVENTS.find((x) => x.type === type)!;
      const s0 = at("streaming");
      const [s, actions] = step(s0, e, T0 + 1);
      assert.equal(s, s0, `streaming + ${type}`);
      assert.deepEqual(actions, []);
    }
  });
});

void describe("link state machine: tracking", () => {
  void test("tracking --healthy--> resyncing: stop probing, start the resync; the reason stays until done", () => {
    const s0 = at("tracking", { reason: "POST answered 500", outages: 4 });
    const [s, actions] = step(s0, { type: "healthy" }, T0 + 11);
    assert.deepEqual(s, { name: "resyncing", since: T0 + 11, reason: "POST answered 500", outages: 4 });
    assert.deepEqual(kinds(actions), ["stopProbe", "startResync", "log:info"]);
  });

  void test("tracking --resyncRequested--> tracking: check the gateway now (probe restarted, backoff over)", () => {
    const s0 = at("tracking", { reason: "down", outages: 3 });
    const [s, actions] = step(s0, { type: "resyncRequested" }, T0 + 5);
    assert.equal(s, s0);
    assert.deepEqual(kinds(actions), ["probeNow", "log:info"]);
  });

  void test("tracking ignores every failure kind, unhealthy and resyncDone", () => {
    for (const e of EVENTS) {
      if (e.type === "healthy" || e.type === "stop" || e.type === "resyncRequested") continue;
      const s0 = at("tracking", { reason: "down", outages: 1 });
      const [s, actions] = step(s0, e, T0 + 1);
      assert.equal(s, s0, `tracking + ${e.type} must keep the very same state`);
      assert.deepEqual(actions, [], `tracking + ${e.type}`);
    }
  });
});

void describe("link state machine: resyncing", () => {
  for (const type of ["failure", "overflow", "syncTimeout"] as const) {
    void test(`resyncing --${type}--> tracking: stop the resync first, then drop, probe, warn`, () => {
      const [s, actions] = step(at("resyncing", { outages: 1 }), { type, reason: "r" }, T0 + 2);
      assert.deepEqual(s, { name: "tracking", since: T0 + 2, reason: "r", outages: 2 });
      assert.deepEqual(kinds(actions), ["stopResync", "dropQueue", "probe", "log:warn"]);
      assert.match((actions[3] as Extract<LinkAction, { type: "log" }>).message, /resyncing -> tracking: r/);
    });
  }

  void test("resyncing --resyncDone--> streaming: the reason is cleared, outages stay", () => {
    const [s, actions] = step(at("resyncing", { reason: "old", outages: 3 }), { type: "resyncDone" }, T0 + 4);
    assert.deepEqual(s, { name: "streaming", since: T0 + 4, reason: "", outages: 3 });
    assert.deepEqual(kinds(actions), ["log:info"]);
  });

  void test("resyncing --resyncDone with unreadable blocks--> streaming all the same, and a warning says what was not copied", () => {
    const e = { type: "resyncDone", unreadable: "2 blocks (131072 bytes) the primary cannot read" } as const;
    const [s, actions] = step(at("resyncing", { outages: 1 }), e, T0 + 4);
    assert.deepEqual(s, { name: "streaming", since: T0 + 4, reason: "", outages: 1 });
    assert.deepEqual(kinds(actions), ["log:warn"]);
    assert.match(
      (actions[0] as Extract<LinkAction, { type: "log" }>).message,
      /resync complete but for 2 blocks \(131072 bytes\) the primary cannot read, streaming/,
    );
  });

  void test("resyncing ignores healthy, unhealthy and resyncRequested (the running resync covers it)", () => {
    for (const type of ["healthy", "unhealthy", "resyncRequested"]) {
      const e = EVENTS.find((x) => x.type === type)!;
      const s0 = at("resyncing");
      const [s, actions] = step(s0, e, T0 + 1);
      assert.equal(s, s0, `resyncing + ${type}`);
      assert.deepEqual(actions, []);
    }
  });
});

void describe("link state machine: stop", () => {
  const expected: Record<Exclude<LinkStateName, "stopped">, string[]> = {
    starting: ["stopProbe", "dropQueue"],
    streaming: ["stopProbe", "dropQueue"],
    tracking: ["stopProbe", "dropQueue"],
    resyncing: ["stopResync", "stopProbe", "dropQueue"],
  };
  for (const [name, acts] of Object.entries(expected)) {
    void test(`stop from ${name}: ${acts.join(", ")}; then stopped keeps reason and outages`, () => {
      const s0 = at(name as LinkStateName, { reason: "x", outages: 5 });
      const [s, actions] = step(s0, { type: "stop" }, T0 + 8);
      assert.deepEqual(s, { name: "stopped", since: T0 + 8, reason: "x", outages: 5 });
      assert.deepEqual(kinds(actions), acts);
    });
  }

  void test("stopped ignores everything, stop included", () => {
    const s0 = at("stopped");
    for (const e of EVENTS) {
      const [s, actions] = step(s0, e, T0 + 1);
      assert.equal(s, s0, `stopped + ${e.type}`);
      assert.deepEqual(actions, []);
    }
  });
});

void describe("link state machine: sends()", () => {
  void test("updates go out while streaming and resyncing, nowhere else", () => {
    const names: LinkStateName[] = ["starting", "streaming", "tracking", "resyncing", "stopped"];
    assert.deepEqual(
      names.filter((n) => sends(n)),
      ["streaming", "resyncing"],
    );
  });
});

void describe("link state machine: scripted outages", () => {
  void test("start, stream, fail, come back, fail during the resync, come back, stop", () => {
    const steps = script(initialLinkState(T0), [
      { type: "unhealthy", reason: "not yet" },
      { type: "healthy" },
      { type: "resyncDone" },
      { type: "healthy" }, // a stray health answer while streaming: nothing
      { type: "failure", reason: "ECONNRESET" },
      { type: "failure", reason: "a late answer of the dropped epoch" }, // ignored while tracking
      { type: "healthy" },
      { type: "overflow", reason: "oldest queued update is 6000 ms old" },
      { type: "healthy" },
      { type: "resyncDone" },
      { type: "stop" },
    ]);
    assert.deepEqual(
      steps.map((x) => x.state.name),
      [
        "tracking",
        "resyncing",
        "streaming",
        "streaming",
        "tracking",
        "tracking",
        "resyncing",
        "tracking",
        "resyncing",
        "streaming",
        "stopped",
      ],
    );
    assert.deepEqual(
      steps.map((x) => kinds(x.actions).join(",")),
      [
        "log:warn",
        "stopProbe,startResync,log:info",
        "log:info",
        "",
        "dropQueue,probe,log:warn",
        "",
        "stopProbe,startResync,log:info",
        "stopResync,dropQueue,probe,log:warn",
        "stopProbe,startResync,log:info",
        "log:info",
        "stopProbe,dropQueue",
      ],
    );
    // Outages count falls from streaming or resyncing (not the first unhealthy answer at start).
    assert.deepEqual(
      steps.map((x) => x.state.outages),
      [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2],
    );
    // The reason is the first failure's until the next one; streaming clears it.
    assert.equal(steps[5].state.reason, "ECONNRESET");
    assert.equal(steps[7].state.reason, "oldest queued update is 6000 ms old");
    assert.equal(steps[9].state.reason, "");
    // `since` moves on transitions only: the ignored steps keep the time of the state they stay in.
    assert.equal(steps[3].state.since, steps[2].state.since);
    assert.equal(steps[5].state.since, steps[4].state.since);
    assert.ok(steps[6].state.since > steps[5].state.since);
  });

  void test("seeded walk: what the driver runs (probe loop, resync task) always matches the state", () => {
    let seed = 0x5eed1234;
    const rand = (n: number): number => {
      seed ^= seed << 13;
      seed ^= seed >>> 17;
      seed ^= seed << 5;
      return (seed >>> 0) % n;
    };
    const seen = new Set<string>();
    for (let walk = 0; walk < 200; walk++) {
      let s = initialLinkState(T0);
      let probing = false;
      let resyncing = false;
      let queueDrops = 0;
      let falls = 0;
      const run = (actions: LinkAction[], where: string): void => {
        for (const a of actions) {
          if (a.type === "probe") {
            assert.ok(!probing, `${where}: probe while the probe loop runs`);
            probing = true;
          } else if (a.type === "stopProbe") probing = false;
          else if (a.type === "startResync") {
            assert.ok(!resyncing, `${where}: a second resync started`);
            resyncing = true;
          } else if (a.type === "stopResync") {
            assert.ok(resyncing, `${where}: stopResync without a resync`);
            resyncing = false;
          } else if (a.type === "dropQueue") queueDrops++;
        }
      };
      run(startActions, "start");
      const trace: string[] = [];
      for (let i = 0; i < 60; i++) {
        // Stop rarely, so that most walks see many transitions.
        const e = rand(40) === 0 ? EVENTS[7] : EVENTS[rand(7)];
        const before = s.name;
        const [next, actions] = step(s, e, T0 + i + 1);
        trace.push(`${before}+${e.type}`);
        seen.add(`${before}+${e.type}`);
        const where = `walk ${walk}: ${trace.join(" ")}`;
        // The driver ends its resync itself when it reports resyncDone.
        if (e.type === "resyncDone" && before === "resyncing") resyncing = false;
        run(actions, where);
        if (
          next.name === "tracking" &&
          (before === "streaming" || before === "resyncing") &&
          e.type !== "stop"
        )
          falls++;
        s = next;
        assert.equal(probing, s.name === "starting" || s.name === "tracking", `${where}: probing`);
        assert.equal(resyncing, s.name === "resyncing", `${where}: resync task`);
        assert.equal(s.outages, falls, `${where}: outages`);
        if (s.name === "starting" || s.name === "streaming") assert.equal(s.reason, "", `${where}: reason`);
        if (s.name === "tracking") assert.notEqual(s.reason, "", `${where}: tracking says why`);
        if (s.name === "stopped") break;
      }
      assert.ok(queueDrops >= falls, "every fall to tracking drops the queue");
    }
    // The walks met every event in every live state (4 states x 8 events).
    assert.equal(seen.size, 32, [...seen].sort().join(" "));
  });
});
