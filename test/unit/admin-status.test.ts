// The text of `blockfork status`: the link's last failure is shown while it is why the link is not
// streaming, with the time it happened, and not after the link recovered; blocks of the primary a
// resync could not read are shown while there are any.

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { statusText, type Status } from "../../src/commands/admin.js";

function doc(state: string, lastError: string): Status {
  return {
    volume: { path: "/v/p.img", name: "p", size: 64 << 20 },
    nbd: { connections: 1 },
    link: {
      gateway: "http://127.0.0.1:7070",
      mode: "async",
      state,
      since: "2026-11-23T17:00:00.000Z",
      reason: "",
      outages: 1,
      queue: { updates: 0, bytes: 0, oldestMs: 0 },
      transport: state === "streaming" ? "stream" : null,
      lastError,
      seq: 10,
      durableThrough: 10,
      resync: { running: false, totalBytes: 0, doneBytes: 0, bytesPerSecond: 0, etaSeconds: null },
    },
    tracking: null,
  };
}

void describe("blockfork status text", () => {
  void test("the last error is shown while the link tracks, not once it streams again", () => {
    const err = "health check: connect ECONNREFUSED 127.0.0.1:7070";
    assert.match(statusText(doc("tracking", err)), /^error {5}health check: connect ECONNREFUSED/m);
    const recovered = statusText(doc("streaming", err));
    assert.doesNotMatch(recovered, /ECONNREFUSED/, recovered);
    assert.match(recovered, /^link {6}streaming since 2026-11-23T17:00:00.000Z/m);
  });

  void test("the last error says when it happened", () => {
    const d = doc("tracking", "health check: connect ECONNREFUSED 127.0.0.1:7070");
    d.link!.lastErrorAt = Date.parse("2026-11-23T17:01:02.003Z");
    assert.match(statusText(d), /^error {5}health check: .* \(at 2026-11-23T17:01:02.003Z\)$/m);
  });

  void test("a secondary reported consistent before an outage is said to lack what is dirty since", () => {
    const d = doc("tracking", "health check: connect ECONNREFUSED 127.0.0.1:7070");
    d.link!.secondary = "consistent";
    assert.match(
      statusText(d),
      /^secondary consistent \(.*before the link went down; it lacks what is dirty since\)$/m,
    );
    const s = doc("streaming", "");
    s.link!.secondary = "consistent";
    assert.doesNotMatch(statusText(s), /before the link went down/);
  });

  void test("a tracking log that failed without its full-resync mark says writes are refused", () => {
    const d = doc("streaming", "");
    d.tracking = {
      dirtyBytes: 0,
      granularity: 65536,
      degraded: null,
      failure: "IO error: fsync failed",
    } as unknown as Status["tracking"];
    assert.match(
      statusText(d),
      /^tracking {2}FAILED \(IO error: fsync failed\).*writes are refused \(EIO\)/m,
    );
  });

  void test("blocks of the primary a resync could not read: how many, where, the error, and that the secondary differs", () => {
    const d = doc("streaming", "");
    d.link!.unreadable = {
      blocks: 3,
      bytes: 3 * 65536,
      ranges: [
        { offset: 327680, length: 65536 },
        { offset: 589824, length: 131072 },
      ],
      firstErrorAt: "2026-11-23T17:01:00.000Z",
      lastErrorAt: "2026-11-23T17:02:00.000Z",
      error: "pread failed: EIO (offset 589824, length 65536)",
      retryMs: 60_000,
    };
    const text = statusText(d);
    assert.match(
      text,
      /^unreadable 3 blocks \(192\.0 KiB\) of the primary cannot be read; the secondary differs there: \[327680, 393216\) \[589824, 720896\) \(pread failed: EIO .*; first at 2026-11-23T17:01:00.000Z, last at 2026-11-23T17:02:00.000Z\); they stay dirty and are retried every 60 s$/m,
    );
    assert.match(text, /^link {6}streaming since/m, "the link's state stays what it is");
    d.link!.unreadable = { ...d.link!.unreadable, blocks: 0, bytes: 0, ranges: [] };
    assert.doesNotMatch(statusText(d), /unreadable/);
  });

  void test("a resync running says how much it found unreadable, apart from its progress", () => {
    const d = doc("resyncing", "");
    d.link!.resync = {
      running: true,
      totalBytes: 1 << 20,
      doneBytes: 1 << 20,
      unreadableBytes: 65536,
      bytesPerSecond: 1 << 20,
      etaSeconds: 0,
    };
    assert.match(
      statusText(d),
      /^resync {4}1\.0 MiB of 1\.0 MiB \(100\.0%\), .*; 64\.0 KiB unreadable on the primary, not counted$/m,
    );
  });
});
