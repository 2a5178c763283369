// The proxy's admin endpoint: a small HTTP server on a unix socket in the state directory
// (`<state-dir>/admin.sock`, reachable only by users who can reach that directory). It serves
// `blockfork status`, `tracking show`, `verify` and `resync`:
//
//   GET  /status             link, tracking and NBD state as JSON
//   GET  /tracking?limit=N   dirty extents with timestamps
//   POST /verify?repair=1    compare primary and secondary; NDJSON progress lines, then the result
//   POST /resync?full=1      start a resync now (full: mark every block dirty first)
//   POST /mark?name=NAME     bookmark the current point in time (PIT journal); &replace=1 moves
//                            an existing bookmark (without it, an existing name is refused)
//   GET  /snapshots          the journal's window, size and bookmarks

import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { chmodSync, unlinkSync } from "node:fs";
import type { Logger } from "../log.js";
import { clearStaleSocket } from "../util/unix-socket.js";
import { UsageError } from "../errors.js";

/** What `GET /snapshots` answers (and `blockfork snapshots --json` prints). */
export interface SnapshotsReport {
  earliest: string | null;
  latest: string;
  windowMs: number;
  stopped: { at: string; reason: string } | null;
  journalBytes: number;
  segments: number;
  entries: number;
  bookmarks: { name: string; time: string | null; export: string }[];
  /** Wall times that passed twice (the clock went back): snap@ one of them is refused. */
  passedTwice: { from: string; to: string }[];
  /**
   * The snapshot views open now (a running proxy): one per point, shared by the connections that
   * opened it; broken: why it no longer serves its point (it stays until they close).
   */
  views?: { point: string; connections: number; journalBlocks: number; broken: string | null }[];
  /** Read from the journal files, no proxy running. */
  offline?: true;
}

/** What the admin endpoint can do; the serve command provides it. */
export interface AdminHandlers {
  status(): unknown;
  tracking(limit: number): unknown;
  verify(
    repair: boolean,
    progress: (done: number, total: number) => void,
    signal: AbortSignal,
  ): Promise<unknown>;
  resync(full: boolean): Promise<unknown>;
  mark(name: string, replace: boolean): Promise<unknown>;
  snapshots(): SnapshotsReport;
}

/** The admin endpoint of a running proxy. */
export class AdminServer {
  private server: Server | null = null;
  private path = "";
  /** Requests being handled (close() waits for them) and what tells long ones to stop. */
  private readonly running = new Set<Promise<void>>();
  private readonly stopping = new AbortController();

  constructor(
    private readonly handlers: AdminHandlers,
    private readonly log: Logger,
  ) {}

  /** Listen on a unix socket path. */
  async listen(path: string): Promise<void> {
    await clearStaleSocket(path);
    const server = createServer((req, res) => {
      const p = this.handle(req, res);
      this.running.add(p);
      void p.finally(() => this.running.delete(p));
    });
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(path, resolve);
    });
    // Whoever can connect can resync, verify --repair or mark: the owner only, whatever the umask.
    chmodSync(path, 0o600);
    this.server = server;
    this.path = path;
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? "/", "http://admin");
    const send = (status: number, body: unknown): void => {
      res.writeHead(status, { "content-type": "application/json" });
      res.end(JSON.stringify(body));
    };
    try {
      if (req.method === "GET" && url.pathname === "/status") return send(200, this.handlers.status());
      if (req.method === "GET" && url.pathname === "/tracking") {
        const limit = Number(url.searchParams.get("limit") ?? 1000);
        if (!Number.isSafeInteger(limit) || limit <= 0)
          throw new UsageError("limit must be a positive integer");
        return send(200, this.handlers.tracking(limit));
      }
      if (req.method === "POST" && url.pathname === "/verify") {
        res.writeHead(200, { "content-type": "application/x-ndjson" });
        let last = 0;
        const result = await this.handlers.verify(
          url.searchParams.get("repair") === "1",
          (done, total) => {
            const now = performance.now();
            if (now - last < 200 && done < total) return;
            last = now;
            res.write(JSON.stringify({ progress: { done, total } }) + "\n");
          },
          this.stopping.signal,
        );
        res.end(JSON.stringify({ result }) + "\n");
        return;
      }
      if (req.method === "POST" && url.pathname === "/mark") {
        return send(
          200,
          await this.handlers.mark(
            url.searchParams.get("name") ?? "",
            url.searchParams.get("replace") === "1",
          ),
        );
      }
      if (req.method === "GET" && url.pathname === "/snapshots") return send(200, this.handlers.snapshots());
      if (req.method === "POST" && url.pathname === "/resync") {
        return send(200, await this.handlers.resync(url.searchParams.get("full") === "1"));
      }
      send(404, {
        error: { code: "ERR_NOT_FOUND", message: `no admin route ${req.method} ${url.pathname}` },
      });
    } catch (e) {
      // Limited: the caller hears the error, and a script polling a failing call must not flood the log.
      this.log.limited(
        "warn",
        `admin ${url.pathname}`,
        `admin ${req.method} ${url.pathname}: ${(e as Error).message}`,
      );
      // A usage error (a bad bookmark name, a command this proxy cannot do) is the caller's: 400
      // ERR_USAGE, which the client turns back into one (exit status 2).
      const usage = e instanceof UsageError;
      const error = { code: usage ? "ERR_USAGE" : "ERR_ADMIN", message: (e as Error).message };
      if (!res.headersSent) send(usage ? 400 : 500, { error });
      else res.end(JSON.stringify({ error }) + "\n");
    }
  }

  /**
   * Stop listening, stop a running verify (its client gets an error line saying why) and wait for
   * every request being handled, then close the connections and remove the socket. The proxy calls
   * it first when it shuts down, before it stops what the handlers use (link, tracking log).
   */
  async close(): Promise<void> {
    const s = this.server;
    if (!s) return;
    this.server = null;
    const closed = new Promise<void>((r) => s.close(() => r()));
    this.stopping.abort();
    await Promise.allSettled([...this.running]);
    s.closeAllConnections();
    await closed;
    try {
      unlinkSync(this.path);
    } catch {
      // already gone
    }
  }
}
