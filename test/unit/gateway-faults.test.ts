// src/gateway/faults.ts: parsing fault descriptions (JSON of PUT /v1/fault, or a mode word in the
// trigger file), and the FaultSwitch: the trigger file looked at no more than every 100 ms (a fake
// clock), re-read when it changes, removal clears the fault, garbage is ignored, the API and the
// file override each other in the order they change.

import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, unlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  CHECK_MS,
  DEFAULT_DELAY_MS,
  describeFault,
  faultFromJson,
  FaultSpecError,
  FaultSwitch,
  parseFault,
} from "../../src/gateway/faults.js";
import { Logger } from "../../src/log.js";

const dir = mkdtempSync(join(tmpdir(), "bf-gw-faults-"));
after(() => rmSync(dir, { recursive: true, force: true }));

void describe("fault descriptions", () => {
  void test("JSON: modes, defaults and limits", () => {
    assert.deepEqual(faultFromJson({ mode: "none" }), { mode: "none", delayMs: 0, probability: 1 });
    assert.deepEqual(faultFromJson({ mode: "slow" }), {
      mode: "slow",
      delayMs: DEFAULT_DELAY_MS,
      probability: 1,
    });
    assert.deepEqual(faultFromJson({ mode: "slow", delayMs: 250 }), {
      mode: "slow",
      delayMs: 250,
      probability: 1,
    });
    assert.deepEqual(faultFromJson({ mode: "drop", probability: 0.25 }), {
      mode: "drop",
      delayMs: 0,
      probability: 0.25,
    });
    assert.deepEqual(faultFromJson({ mode: "error", probability: 0 }), {
      mode: "error",
      delayMs: 0,
      probability: 0,
    });
    assert.equal(faultFromJson({ mode: "down" }).mode, "down");
  });

  void test("JSON: what is refused", () => {
    const bad: unknown[] = [
      null,
      [],
      "down",
      {},
      { mode: "crash" },
      { mode: 3 },
      { mode: "slow", delayMs: -1 },
      { mode: "slow", delayMs: 1.5 },
      { mode: "slow", delayMs: "100" },
      { mode: "slow", delayMs: 10 * 60 * 1000 + 1 },
      { mode: "drop", probability: 1.5 },
      { mode: "drop", probability: -0.1 },
      { mode: "drop", probability: "1" },
      { mode: "down", extra: true },
    ];
    for (const v of bad) assert.throws(() => faultFromJson(v), FaultSpecError, JSON.stringify(v));
  });

  void test("trigger file text: a mode word or the JSON, surrounded by white space", () => {
    assert.equal(parseFault("down\n").mode, "down");
    assert.equal(parseFault("  error ").mode, "error");
    assert.deepEqual(parseFault('{"mode":"slow","delayMs":5}\n'), {
      mode: "slow",
      delayMs: 5,
      probability: 1,
    });
    for (const t of ["", "\n", "DOWN", "down now", "{mode: down}", '{"mode":"x"}']) {
      assert.throws(() => parseFault(t), FaultSpecError, JSON.stringify(t));
    }
  });

  void test("descriptions for logs", () => {
    assert.equal(describeFault(faultFromJson({ mode: "slow", delayMs: 7 })), "slow 7 ms");
    assert.equal(describeFault(faultFromJson({ mode: "drop", probability: 0.5 })), "drop p=0.5");
    assert.equal(describeFault(faultFromJson({ mode: "error" })), "error");
  });

  void test("strikes: probability 1 always, 0 never", () => {
    for (let i = 0; i < 100; i++) {
      assert.equal(FaultSwitch.strikes({ mode: "drop", delayMs: 0, probability: 1 }), true);
      assert.equal(FaultSwitch.strikes({ mode: "drop", delayMs: 0, probability: 0 }), false);
    }
  });
});

void describe("FaultSwitch and the trigger file", () => {
  const lines: string[] = [];
  const log = Logger.create("info", (l) => lines.push(l));

  void test("file present at start, changes seen after CHECK_MS, removal clears", () => {
    const file = join(dir, "fault1");
    writeFileSync(file, "down\n");
    let now = 1000;
    const sw = new FaultSwitch(file, log, () => now);
    assert.equal(sw.current().mode, "down");
    assert.equal(sw.describe().origin, "file");

    writeFileSync(file, '{"mode": "slow", "delayMs": 20}'); // another size: a change even within one mtime tick
    now += CHECK_MS - 1;
    assert.equal(sw.current().mode, "down", "not looked at again within CHECK_MS");
    now += 1;
    assert.deepEqual(sw.current(), { mode: "slow", delayMs: 20, probability: 1 });

    unlinkSync(file);
    now += CHECK_MS;
    assert.equal(sw.current().mode, "none");
  });

  void test("garbage in the file is logged and changes nothing", () => {
    const file = join(dir, "fault2");
    let now = 0;
    const sw = new FaultSwitch(file, log, () => now);
    assert.equal(sw.current().mode, "none");
    writeFileSync(file, "error");
    now += CHECK_MS;
    assert.equal(sw.current().mode, "error");
    lines.length = 0;
    writeFileSync(file, "explode please");
    now += CHECK_MS;
    assert.equal(sw.current().mode, "error");
    assert.ok(
      lines.some((l) => /warn .*ignoring the fault trigger file/.test(l)),
      lines.join(""),
    );
  });

  void test("the API and the file: the last change wins; removing the file clears either", () => {
    const file = join(dir, "fault3");
    let now = 0;
    const sw = new FaultSwitch(file, log, () => now);
    sw.set(faultFromJson({ mode: "drop" }));
    assert.equal(sw.current().mode, "drop");
    assert.equal(sw.describe().origin, "api");
    now += CHECK_MS;
    assert.equal(sw.current().mode, "drop", "no file: the API's fault stays");
    writeFileSync(file, "down");
    now += CHECK_MS;
    assert.equal(sw.current().mode, "down");
    sw.set(faultFromJson({ mode: "error" }));
    now += CHECK_MS;
    assert.equal(sw.current().mode, "error", "an unchanged file does not override a later PUT");
    unlinkSync(file);
    now += CHECK_MS;
    assert.equal(sw.current().mode, "none");
  });
});
