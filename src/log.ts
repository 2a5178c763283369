// A small leveled logger to stderr: one line per event, ISO time, level, a context tag.
// Floods (thousands of refused connections, a client hammering bad requests) are rate-limited per
// key: the first lines of a burst are printed, then one summary line per second says how many
// were suppressed, so a log never becomes the denial of service.

export const LEVELS = ["error", "warn", "info", "debug"] as const;
export type LogLevel = (typeof LEVELS)[number];

/** Parse a --log-level value; undefined when unknown. */
export function parseLogLevel(s: string): LogLevel | undefined {
  return (LEVELS as readonly string[]).includes(s) ? (s as LogLevel) : undefined;
}

interface Sink {
  level: number;
  write(line: string): void;
  limits: Map<string, { windowStart: number; count: number; suppressed: number }>;
}

const BURST = 20;

/** A logger bound to a context tag (e.g. "conn 3"). */
export class Logger {
  private constructor(
    private readonly sink: Sink,
    private readonly tag: string,
  ) {}

  /** The root logger at a level, writing to stderr (or `write`, for tests). */
  static create(level: LogLevel = "info", write?: (line: string) => void): Logger {
    return new Logger(
      { level: LEVELS.indexOf(level), write: write ?? ((l) => process.stderr.write(l)), limits: new Map() },
      "",
    );
  }

  /** A logger whose lines carry `tag` after this one's. */
  child(tag: string): Logger {
    return new Logger(this.sink, this.tag ? `${this.tag} ${tag}` : tag);
  }

  enabled(level: LogLevel): boolean {
    return LEVELS.indexOf(level) <= this.sink.level;
  }

  error(msg: string): void {
    this.emit(0, "error", msg);
  }
  warn(msg: string): void {
    this.emit(1, "warn", msg);
  }
  info(msg: string): void {
    this.emit(2, "info", msg);
  }
  debug(msg: string): void {
    if (this.sink.level >= 3) this.emit(3, "debug", msg);
  }

  /** Log at `level`, but at most BURST lines per second for `key`; the rest are counted. */
  limited(level: LogLevel, key: string, msg: string): void {
    const n = LEVELS.indexOf(level);
    if (n > this.sink.level) return;
    const now = performance.now(); // monotonic: a step of the wall clock must not mute a key for its length
    let s = this.sink.limits.get(key);
    if (!s || now - s.windowStart >= 1000) {
      if (s && s.suppressed > 0) this.emit(n, level, `(${s.suppressed} more "${key}" messages suppressed)`);
      s = { windowStart: now, count: 0, suppressed: 0 };
      this.sink.limits.set(key, s);
    }
    if (++s.count <= BURST) this.emit(n, level, msg);
    else s.suppressed++;
  }

  private emit(n: number, level: string, msg: string): void {
    if (n > this.sink.level) return;
    const tag = this.tag ? ` [${this.tag}]` : "";
    this.sink.write(`${new Date().toISOString()} ${level}${tag} ${msg}\n`);
  }
}
