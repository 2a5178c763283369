// Fault injection for tests (docs/gateway-api.md, "PUT /v1/fault"): the active fault, set over the
// API or by the trigger file `<state-dir>/fault` (after nbdkit's error filter and its
// tests/test-error-triggered.sh: create the file and requests fail, delete it and they recover).
//
// The file is checked lazily, when a request asks for the fault, at most every CHECK_MS: one stat
// per 100 ms costs nothing and needs no timer (nothing to keep the process alive or to stop). It is
// re-read when its modification time, size or inode changes; removing it clears the fault. A file
// whose content is not a fault is reported in the log and changes nothing.

import { readFileSync, statSync } from "node:fs";
import type { Logger } from "../log.js";

export const FAULT_MODES = ["none", "slow", "drop", "error", "down"] as const;
export type FaultMode = (typeof FAULT_MODES)[number];

/** An active fault. `delayMs` matters for slow, `probability` for drop and error. */
export interface Fault {
  mode: FaultMode;
  delayMs: number;
  probability: number;
}

export const NO_FAULT: Fault = { mode: "none", delayMs: 0, probability: 1 };
/** delayMs of a slow fault that does not say. */
export const DEFAULT_DELAY_MS = 1000;
const MAX_DELAY_MS = 10 * 60 * 1000;
/** How often (at most) the trigger file is looked at. */
export const CHECK_MS = 100;

/** Why a fault description was refused. */
export class FaultSpecError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "FaultSpecError";
  }
}

/** A fault from the JSON of PUT /v1/fault ({"mode", "delayMs", "probability"}). */
export function faultFromJson(v: unknown): Fault {
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw new FaultSpecError(
      `a fault is a JSON object {"mode": ${FAULT_MODES.map((m) => `"${m}"`).join("|")}}`,
    );
  }
  const o = v as Record<string, unknown>;
  for (const k of Object.keys(o)) {
    if (k !== "mode" && k !== "delayMs" && k !== "probability") {
      throw new FaultSpecError(`unknown fault field "${k}" (mode, delayMs, probability)`);
    }
  }
  const mode = o.mode;
  if (typeof mode !== "string" || !(FAULT_MODES as readonly string[]).includes(mode)) {
    throw new FaultSpecError(`"mode" must be one of ${FAULT_MODES.join(", ")}, not ${JSON.stringify(mode)}`);
  }
  let delayMs = mode === "slow" ? DEFAULT_DELAY_MS : 0;
  if (o.delayMs !== undefined) {
    const d = o.delayMs;
    if (typeof d !== "number" || !Number.isInteger(d) || d < 0 || d > MAX_DELAY_MS) {
      throw new FaultSpecError(
        `"delayMs" must be an integer from 0 to ${MAX_DELAY_MS}, not ${JSON.stringify(d)}`,
      );
    }
    delayMs = d;
  }
  let probability = 1;
  if (o.probability !== undefined) {
    const p = o.probability;
    if (typeof p !== "number" || !Number.isFinite(p) || p < 0 || p > 1) {
      throw new FaultSpecError(`"probability" must be a number from 0 to 1, not ${JSON.stringify(p)}`);
    }
    probability = p;
  }
  return { mode: mode as FaultMode, delayMs, probability };
}

/** A fault from the trigger file's text: the same JSON, or just the mode word ("down"). */
export function parseFault(text: string): Fault {
  const t = text.trim();
  if (t.startsWith("{")) {
    let v: unknown;
    try {
      v = JSON.parse(t);
    } catch (e) {
      throw new FaultSpecError(`not valid JSON: ${(e as Error).message}`);
    }
    return faultFromJson(v);
  }
  if (!(FAULT_MODES as readonly string[]).includes(t)) {
    throw new FaultSpecError(
      `expected a mode word (${FAULT_MODES.join(", ")}) or a JSON fault, not ${JSON.stringify(t.slice(0, 40))}`,
    );
  }
  return faultFromJson({ mode: t });
}

/** The fault in force, from the API or the trigger file, whichever changed last. */
export class FaultSwitch {
  private fault: Fault = NO_FAULT;
  private origin: "api" | "file" = "api";
  private lastCheck = -Infinity;
  private fileSig: string | null = null;

  constructor(
    private readonly file: string,
    private readonly log: Logger,
    private readonly now: () => number = () => performance.now(),
  ) {
    this.checkFile();
  }

  /** The active fault (looking at the trigger file when it was not looked at recently). */
  current(): Fault {
    const t = this.now();
    if (t - this.lastCheck >= CHECK_MS) {
      this.lastCheck = t;
      this.checkFile();
    }
    return this.fault;
  }

  /** Set the fault (PUT /v1/fault). */
  set(fault: Fault): void {
    this.fault = fault;
    this.origin = "api";
    this.log.info(`fault set over the API: ${describeFault(fault)}`);
  }

  /** The active fault and where it came from, for GET /v1/fault and status. */
  describe(): Fault & { origin: "api" | "file" } {
    return { ...this.current(), origin: this.origin };
  }

  /** True when a fault with a probability strikes this time. */
  static strikes(f: Fault): boolean {
    return f.probability >= 1 || Math.random() < f.probability;
  }

  private checkFile(): void {
    let sig: string | null;
    try {
      const st = statSync(this.file, { bigint: true });
      sig = `${st.ino}:${st.mtimeNs}:${st.size}`;
    } catch {
      sig = null;
    }
    if (sig === this.fileSig) return;
    this.fileSig = sig;
    if (sig === null) {
      // Removing the file clears the fault, whoever set it last.
      if (this.fault.mode !== "none") this.log.info(`fault cleared: ${this.file} was removed`);
      this.fault = NO_FAULT;
      this.origin = "file";
      return;
    }
    let text: string;
    try {
      text = readFileSync(this.file, "utf8");
    } catch (e) {
      this.log.warn(`cannot read the fault trigger file ${this.file}: ${(e as Error).message}`);
      return;
    }
    try {
      this.fault = parseFault(text);
      this.origin = "file";
      this.log.info(`fault set by ${this.file}: ${describeFault(this.fault)}`);
    } catch (e) {
      this.log.warn(`ignoring the fault trigger file ${this.file}: ${(e as Error).message}`);
    }
  }
}

/** "slow 500 ms", "drop p=0.5", ... for logs. */
export function describeFault(f: Fault): string {
  switch (f.mode) {
    case "slow":
      return `slow ${f.delayMs} ms`;
    case "drop":
    case "error":
      return f.probability >= 1 ? f.mode : `${f.mode} p=${f.probability}`;
    default:
      return f.mode;
  }
}
