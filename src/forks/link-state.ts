// The state of a gateway link as a pure state machine (after etcd-io/raft's tracker/state.go and
// rawnode.go: events in, actions out; the driver in link.ts does the I/O).
//
//   starting ──healthy──▶ resyncing ──resyncDone──▶ streaming
//      │                     ▲   │                      │
//      └──unhealthy──▶ tracking ◀┘ failure/overflow/    │ failure/overflow/syncTimeout
//                        ▲   └──healthy──▶ resyncing    │
//                        └──────────────────────────────┘
//
// - streaming: every update is sent as it happens; acknowledgements clear dirty blocks.
// - tracking: the gateway is down or too slow; updates are not sent, only recorded as dirty; health
//   checks probe the gateway with backoff.
// - resyncing: the gateway is back; dirty blocks are copied from the primary while new updates
//   stream too (and re-dirty what they touch). When a pass leaves no block dirty that is not
//   covered by an update in flight, the link streams. Blocks the primary cannot read do not hold
//   it back: they stay dirty, the driver retries them later, and resyncDone says which they are.
// - starting: nothing is known about the gateway yet; after the first health check it resyncs
//   (which finishes at once when nothing is dirty) or tracks.
// Every failure of the gateway (send error, 5xx, timeout, queue overflow, a sync write not
// acknowledged in time) drops the link to tracking: primary I/O never waits for a sick gateway.

export type LinkStateName = "starting" | "streaming" | "tracking" | "resyncing" | "stopped";

/** Something that happened to the link. */
export type LinkEvent =
  | { type: "healthy" }
  /** `refused`: the gateway answered but refuses this proxy (token, size, volume): not an outage. */
  | { type: "unhealthy"; reason: string; refused?: boolean }
  | { type: "failure"; reason: string }
  | { type: "overflow"; reason: string }
  | { type: "syncTimeout"; reason: string }
  /** `unreadable`: what the resync could not copy (blocks the primary failed to read), if any. */
  | { type: "resyncDone"; unreadable?: string }
  /** Blocks were marked dirty out of band (verify --repair, a manual resync). */
  | { type: "resyncRequested" }
  | { type: "stop" };

/** What the driver must do. */
export type LinkAction =
  | { type: "probe" }
  | { type: "stopProbe" }
  /** Check the gateway now, starting the backoff over (a resync asked for while tracking). */
  | { type: "probeNow" }
  | { type: "dropQueue" }
  | { type: "startResync" }
  | { type: "stopResync" }
  | { type: "log"; level: "info" | "warn" | "error"; message: string };

/** The machine's state. */
export interface LinkState {
  name: LinkStateName;
  /** When the current state was entered (ms since the epoch). */
  since: number;
  /** Why the link last left streaming (empty while all is well). */
  reason: string;
  /** Number of times the link fell to tracking. */
  outages: number;
}

/** The initial state; the driver performs `startActions` once. */
export function initialLinkState(now: number): LinkState {
  return { name: "starting", since: now, reason: "", outages: 0 };
}

export const startActions: LinkAction[] = [{ type: "probe" }];

/** Whether updates are sent to the gateway in this state (else only marked dirty). */
export function sends(state: LinkStateName): boolean {
  return state === "streaming" || state === "resyncing";
}

function toTracking(
  s: LinkState,
  now: number,
  reason: string,
  extra: LinkAction[],
): [LinkState, LinkAction[]] {
  return [
    { name: "tracking", since: now, reason, outages: s.outages + 1 },
    [
      ...extra,
      { type: "dropQueue" },
      { type: "probe" },
      { type: "log", level: "warn", message: `gateway link: ${s.name} -> tracking: ${reason}` },
    ],
  ];
}

/** Apply an event: the next state and the actions to perform, in order. */
export function step(s: LinkState, e: LinkEvent, now: number): [LinkState, LinkAction[]] {
  if (s.name === "stopped") return [s, []];
  if (e.type === "stop") {
    const actions: LinkAction[] = [{ type: "stopProbe" }, { type: "dropQueue" }];
    if (s.name === "resyncing") actions.unshift({ type: "stopResync" });
    return [{ ...s, name: "stopped", since: now }, actions];
  }
  switch (s.name) {
    case "starting":
      if (e.type === "healthy") {
        return [
          { ...s, name: "resyncing", since: now },
          [
            { type: "stopProbe" },
            { type: "startResync" },
            {
              type: "log",
              level: "info",
              message: "gateway link: gateway reachable, resyncing dirty blocks",
            },
          ],
        ];
      }
      if (e.type === "unhealthy") {
        return [
          { ...s, name: "tracking", since: now, reason: e.reason },
          [
            e.refused === true
              ? {
                  type: "log",
                  level: "error",
                  message: `gateway link: the gateway refuses this proxy (${e.reason}); tracking until that is fixed`,
                }
              : {
                  type: "log",
                  level: "warn",
                  message: `gateway link: gateway not reachable (${e.reason}); tracking`,
                },
          ],
        ];
      }
      return [s, []];
    case "streaming":
      if (e.type === "failure" || e.type === "overflow" || e.type === "syncTimeout") {
        return toTracking(s, now, e.reason, []);
      }
      if (e.type === "resyncRequested") {
        return [
          { ...s, name: "resyncing", since: now },
          [
            { type: "startResync" },
            { type: "log", level: "info", message: "gateway link: resync requested" },
          ],
        ];
      }
      return [s, []];
    case "tracking":
      if (e.type === "healthy") {
        return [
          { ...s, name: "resyncing", since: now },
          [
            { type: "stopProbe" },
            { type: "startResync" },
            { type: "log", level: "info", message: "gateway link: gateway is back, resyncing dirty blocks" },
          ],
        ];
      }
      if (e.type === "resyncRequested") {
        // Someone asks for a resync now (blockfork resync): do not leave it to the backoff, which
        // may be up to 30 s away; if the gateway answers, "healthy" starts the resync.
        return [
          s,
          [
            { type: "probeNow" },
            {
              type: "log",
              level: "info",
              message: "gateway link: resync requested; checking the gateway now",
            },
          ],
        ];
      }
      return [s, []];
    case "resyncing":
      if (e.type === "failure" || e.type === "overflow" || e.type === "syncTimeout") {
        return toTracking(s, now, e.reason, [{ type: "stopResync" }]);
      }
      if (e.type === "resyncDone") {
        return [
          { ...s, name: "streaming", since: now, reason: "" },
          [
            e.unreadable === undefined
              ? { type: "log", level: "info", message: "gateway link: resync complete, streaming" }
              : {
                  type: "log",
                  level: "warn",
                  message: `gateway link: resync complete but for ${e.unreadable}, streaming`,
                },
          ],
        ];
      }
      return [s, []];
  }
}
