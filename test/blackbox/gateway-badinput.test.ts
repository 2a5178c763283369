// Bad input against `blockfork gateway` (with a token), exact statuses and codes: authentication
// (and health without it), unknown paths and volumes, wrong methods, identity headers, size
// mismatch, ranges past the end, every kind of malformed body, Content-Length mismatches both
// ways (raw sockets), a body over 64 MiB refused before it is sent, bad query parameters and JSON.
// After each refused batch nothing was applied, and the gateway keeps serving.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { connect } from "node:net";
import { encodeUpdates, KIND, type UpdateRecord } from "../../src/gateway/records.js";
import {
  GatewayClient,
  identityHeaders,
  startGateway,
  type GatewayHandle,
  type Reply,
  unboot,
} from "../helpers/gateway.js";

const SIZE = 16 * 1024 * 1024;
const NAME = "sec";
let gw: GatewayHandle;
let c: GatewayClient;
before(async () => {
  gw = await startGateway({ size: "16M", token: true });
  c = gw.client;
});
after(async () => {
  await gw?.stop("SIGKILL");
});

const ID = { source: "bad0", generation: 1, size: SIZE };

function w(seq: number, offset: number, data: Buffer): UpdateRecord {
  return { kind: KIND.WRITE, seq, period: 0, offset, length: data.length, data };
}

function expectError(r: Reply, status: number, code: string, what: string): void {
  assert.equal(r.status, status, `${what}: ${r.status} ${r.body.toString().slice(0, 300)}`);
  assert.equal(r.headers["content-type"], "application/json", what);
  const body = r.json<{ error: { code: string; message: string } }>();
  assert.equal(body.error.code, code, `${what}: ${body.error.message}`);
  assert.ok(body.error.message.length > 10, `${what}: the message should say what to do`);
}

/** Nothing of the source's batches was applied, and the volume's first block is still zero. */
async function nothingApplied(what: string): Promise<void> {
  const st = (await c.request("GET", "/status")).json<{
    sources: { source: string; appliedThrough: number; outOfOrder: number }[];
  }>();
  const s = st.sources.find((x) => x.source === ID.source);
  assert.ok(
    s === undefined || (s.appliedThrough === 0 && s.outOfOrder === 0),
    `${what}: ${JSON.stringify(s)}`,
  );
  const d = await c.data(NAME, 0, 4096);
  assert.ok(
    d.body.every((b) => b === 0),
    `${what}: data was written`,
  );
}

/** Send raw bytes on a new connection (`end`: half-close after), collect what comes back until close. */
function raw(chunks: Buffer[], end: boolean, timeoutMs = 5000): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect(gw.port, "127.0.0.1");
    let out = "";
    const timer = setTimeout(() => {
      s.destroy();
      resolve(out);
    }, timeoutMs);
    s.on("data", (d: Buffer) => (out += d.toString("latin1")));
    s.on("close", () => {
      clearTimeout(timer);
      resolve(out);
    });
    s.on("error", (e) => {
      clearTimeout(timer);
      if (out) resolve(out);
      else reject(e);
    });
    for (const b of chunks) s.write(b);
    if (end) s.end();
  });
}

function rawHead(contentLength: number): Buffer {
  const h = identityHeaders(ID);
  return Buffer.from(
    `POST /v1/volumes/${NAME}/updates HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${gw.token}\r\n` +
      `Content-Type: application/vnd.blockfork.updates\r\n` +
      Object.entries(h)
        .map(([k, v]) => `${k}: ${v}\r\n`)
        .join("") +
      `Content-Length: ${contentLength}\r\n\r\n`,
  );
}

void describe("authentication", () => {
  void test("health needs no token; everything else answers 401 without the right one", async () => {
    const h = await c.request("GET", "/health", { token: null });
    assert.equal(h.status, 200);
    assert.equal(h.json().ok, true);
    for (const [method, path] of [
      ["GET", "/status"],
      ["GET", "/fault"],
      ["POST", `/volumes/${NAME}/flush`],
      ["GET", `/volumes/${NAME}/data?offset=0&length=1`],
      ["GET", "/tracking/x"],
      ["GET", "/nowhere"],
      ["POST", "/health"],
    ]) {
      for (const token of [null, "wrong", `${gw.token}x`, gw.token!.slice(1)]) {
        const r = await c.request(method, path, { token });
        expectError(r, 401, "ERR_AUTH", `${method} ${path} with token ${token}`);
        assert.match(String(r.headers["www-authenticate"]), /^Bearer/);
      }
    }
    const noScheme = await c.request("GET", "/status", {
      token: null,
      headers: { Authorization: gw.token! },
    });
    expectError(noScheme, 401, "ERR_AUTH", "token without Bearer");
    // Not "wrong token": the token may be right, the scheme is missing.
    const noSchemeMsg = noScheme.json<{ error: { message: string } }>().error.message;
    assert.match(noSchemeMsg, /must be 'Authorization: Bearer <token>'/);
    assert.doesNotMatch(noSchemeMsg, /wrong token/);
    const updates = await c.updates(NAME, ID, [w(1, 0, Buffer.alloc(512, 1))], { token: "nope" });
    expectError(updates, 401, "ERR_AUTH", "updates with a wrong token");
    await nothingApplied("updates with a wrong token");
    assert.equal((await c.request("GET", "/status")).status, 200, "the right token works");
  });
});

void describe("routing", () => {
  void test("unknown paths and volumes are 404", async () => {
    for (const path of ["/nope", "/volumes", `/volumes/${NAME}`, `/volumes/${NAME}/nope`, "/status/x"]) {
      expectError(await c.request("GET", path), 404, "ERR_NOT_FOUND", path);
    }
    const v2 = await c.request("GET", "/../v2/status");
    assert.equal(v2.status, 404);
    const other = await c.updates("other", ID, [w(1, 0, Buffer.alloc(1))]);
    expectError(other, 404, "ERR_NOT_FOUND", "unknown volume");
    expectError(await c.flush("other", ID), 404, "ERR_NOT_FOUND", "flush of an unknown volume");
    expectError(await c.data("other", 0, 1), 404, "ERR_NOT_FOUND", "data of an unknown volume");
    await nothingApplied("unknown volume");
  });

  void test("wrong methods are 405 with Allow", async () => {
    for (const [method, path, allow] of [
      ["GET", `/volumes/${NAME}/updates`, "POST"],
      ["PUT", `/volumes/${NAME}/flush`, "POST"],
      ["POST", `/volumes/${NAME}/data?offset=0&length=1`, "GET"],
      ["DELETE", "/fault", "GET, PUT"],
      ["POST", "/status", "GET"],
      ["POST", "/health", "GET"],
      ["DELETE", "/tracking/x", "GET, PUT"],
    ]) {
      const r = await c.request(method, path);
      expectError(r, 405, "ERR_METHOD", `${method} ${path}`);
      assert.equal(r.headers.allow, allow);
    }
  });
});

void describe("identity headers and sizes", () => {
  void test("missing or malformed identity headers are 400 ERR_BAD_REQUEST", async () => {
    const body = encodeUpdates([w(1, 0, Buffer.alloc(512, 1))]);
    const base = { "Content-Type": "application/vnd.blockfork.updates", ...identityHeaders(ID) };
    const variants: [string, Record<string, string>][] = [
      ["no source", { ...base, "X-Blockfork-Source": "" }],
      ["source not hex", { ...base, "X-Blockfork-Source": "zz" }],
      ["generation 0", { ...base, "X-Blockfork-Generation": "0" }],
      ["generation hex", { ...base, "X-Blockfork-Generation": "0x10" }],
      ["generation negative", { ...base, "X-Blockfork-Generation": "-1" }],
      ["no size", { ...base, "X-Blockfork-Volume-Size": "" }],
      ["size not a number", { ...base, "X-Blockfork-Volume-Size": "16M" }],
      ["floor not a number", { ...base, "X-Blockfork-Floor": "x" }],
      ["content type", { ...base, "Content-Type": "application/octet-stream" }],
    ];
    for (const [what, headers] of variants) {
      // An empty value stands for "absent": leave the header out.
      const h = Object.fromEntries(Object.entries(headers).filter(([, v]) => v !== ""));
      const r = await c.request("POST", `/volumes/${NAME}/updates`, { body, headers: h });
      expectError(r, 400, "ERR_BAD_REQUEST", what);
    }
    expectError(
      await c.request("POST", `/volumes/${NAME}/flush`, { headers: { "X-Blockfork-Source": "aa" } }),
      400,
      "ERR_BAD_REQUEST",
      "flush without generation",
    );
    await nothingApplied("bad identity headers");
  });

  void test("a primary of another size is 400 ERR_SIZE_MISMATCH (updates and flush)", async () => {
    const r = await c.updates(NAME, { ...ID, size: SIZE * 2 }, [w(1, 0, Buffer.alloc(512, 1))]);
    expectError(r, 400, "ERR_SIZE_MISMATCH", "updates");
    expectError(await c.flush(NAME, { ...ID, size: SIZE - 1 }), 400, "ERR_SIZE_MISMATCH", "flush");
    await nothingApplied("size mismatch");
  });
});

void describe("malformed and out-of-range bodies", () => {
  const good = (): Buffer => encodeUpdates([w(1, 0, Buffer.alloc(512, 1)), w(2, 4096, Buffer.alloc(512, 2))]);

  void test("bad magic, unknown kind, length 0, truncated record, nonzero flags: 400 ERR_MALFORMED", async () => {
    const cases: [string, (b: Buffer) => Buffer][] = [
      ["bad magic", (b) => (b.writeUInt32BE(0xdeadbeef, 0), b)],
      ["bad magic in the second record", (b) => (b.writeUInt32BE(0, 552), b)],
      ["unknown kind", (b) => ((b[4] = 9), b)],
      [
        "length 0",
        () => encodeUpdates([{ kind: KIND.ZERO, seq: 1, period: 0, offset: 0, length: 0, data: null }]),
      ],
      ["truncated record (data)", (b) => b.subarray(0, b.length - 1)],
      ["truncated record (header)", (b) => b.subarray(0, 552 + 20)],
      ["unknown flags", (b) => ((b[5] = 2), b)],
      ["seq 0", () => encodeUpdates([w(0, 0, Buffer.alloc(1))])],
      ["seq twice", () => encodeUpdates([w(1, 0, Buffer.alloc(1)), w(1, 0, Buffer.alloc(1))])],
    ];
    for (const [what, mutate] of cases) {
      const r = await c.updates(NAME, ID, mutate(good()));
      expectError(r, 400, "ERR_MALFORMED", what);
    }
    await nothingApplied("malformed bodies");
  });

  void test("a record past the end of the volume: 400 ERR_RANGE, nothing of the batch applied", async () => {
    const body = encodeUpdates([w(1, 0, Buffer.alloc(512, 1)), w(2, SIZE - 100, Buffer.alloc(200, 2))]);
    expectError(await c.updates(NAME, ID, body), 400, "ERR_RANGE", "WRITE past the end");
    const trim = encodeUpdates([{ kind: KIND.TRIM, seq: 1, period: 0, offset: SIZE, length: 1, data: null }]);
    expectError(await c.updates(NAME, ID, trim), 400, "ERR_RANGE", "TRIM at the end");
    await nothingApplied("range past the end");
  });

  void test("Content-Length longer than the body (client half-closes): 400, nothing applied", async () => {
    const body = good();
    const out = await raw([rawHead(body.length + 100), body], true);
    assert.match(out, /^HTTP\/1\.1 400 /, out);
    assert.match(out, /"code":"ERR_BAD_REQUEST"/);
    await nothingApplied("short body");
  });

  void test("Content-Length shorter than the body: 400 (the cut record is truncated), nothing applied", async () => {
    const body = good();
    const out = await raw([rawHead(body.length - 10), body], false, 2000);
    assert.match(out, /^HTTP\/1\.1 400 /, out);
    assert.doesNotMatch(out, /HTTP\/1\.1 200/);
    await nothingApplied("long body");
  });

  void test("no Content-Length (chunked): 400", async () => {
    const r = await c.request("POST", `/volumes/${NAME}/updates`, {
      body: good(),
      headers: {
        "Content-Type": "application/vnd.blockfork.updates",
        "Transfer-Encoding": "chunked",
        "Content-Length": "",
        ...identityHeaders(ID),
      },
    });
    expectError(r, 400, "ERR_BAD_REQUEST", "chunked");
    assert.match(r.json<{ error: { message: string } }>().error.message, /Content-Length/);
    await nothingApplied("chunked");
  });

  void test("over 64 MiB: 413 ERR_TOO_LARGE before the body is sent", async () => {
    const out = await raw([rawHead(64 * 1024 * 1024 + 1)], false, 2000);
    assert.match(out, /^HTTP\/1\.1 413 /, out);
    assert.match(out, /"code":"ERR_TOO_LARGE"/);
    assert.match(out, /Connection: close/i);
    // Exactly 64 MiB is allowed: 16 overlapping 4 MiB records (the last one wins on disk).
    const MiB = 1024 * 1024;
    const recs = Array.from({ length: 16 }, (_, i) => w(i + 1, 8 * MiB, Buffer.alloc(4 * MiB - 40, i + 1)));
    const big = encodeUpdates(recs);
    assert.equal(big.length, 64 * MiB);
    const r = await c.updates(NAME, { ...ID, source: "b16" }, big);
    assert.equal(r.status, 200, r.body.toString());
    assert.deepEqual(unboot(r.json()), { applied: 16, duplicates: 0, appliedThrough: 16, durableThrough: 0 });
    const back = await c.data(NAME, 8 * MiB, 4 * MiB - 40);
    assert.ok(back.body.every((b) => b === 16));
  });

  void test("flush with a body: 400", async () => {
    const r = await c.flush(NAME, ID, { body: "x" });
    expectError(r, 400, "ERR_BAD_REQUEST", "flush with a body");
  });
});

void describe("queries and JSON", () => {
  void test("data and checksums: missing, malformed and out-of-range parameters", async () => {
    const d = `/volumes/${NAME}/data`;
    const k = `/volumes/${NAME}/checksums`;
    const cases: [string, number, string][] = [
      [`${d}`, 400, "ERR_BAD_REQUEST"],
      [`${d}?offset=0`, 400, "ERR_BAD_REQUEST"],
      [`${d}?offset=-1&length=1`, 400, "ERR_BAD_REQUEST"],
      [`${d}?offset=0&length=1e3`, 400, "ERR_BAD_REQUEST"],
      [`${d}?offset=0&length=0`, 400, "ERR_RANGE"],
      [`${d}?offset=${SIZE - 1}&length=2`, 400, "ERR_RANGE"],
      [`${d}?offset=${SIZE}&length=1`, 400, "ERR_RANGE"],
      [`${d}?offset=0&length=${32 * 1024 * 1024 + 1}`, 400, "ERR_RANGE"],
      [`${k}?offset=0&length=4096`, 400, "ERR_BAD_REQUEST"],
      [`${k}?offset=0&length=4096&block=512`, 400, "ERR_BAD_REQUEST"],
      [`${k}?offset=0&length=4096&block=0`, 400, "ERR_BAD_REQUEST"],
      [`${k}?offset=0&length=${SIZE + 1}&block=4096`, 400, "ERR_RANGE"],
      [`${k}?offset=0&length=${65537 * 4096}&block=4096`, 400, "ERR_RANGE"],
    ];
    for (const [path, status, code] of cases) expectError(await c.request("GET", path), status, code, path);
    // The edges that are fine.
    assert.equal((await c.request("GET", `${d}?offset=${SIZE - 1}&length=1`)).status, 200);
    assert.equal((await c.request("GET", `${k}?offset=0&length=${SIZE}&block=4096`)).status, 200);
  });

  void test("PUT /v1/fault with bad JSON or a bad fault: 400, the fault unchanged", async () => {
    for (const body of [
      "",
      "{",
      "[]",
      '{"mode":"explode"}',
      '{"mode":"slow","delayMs":-5}',
      '{"mode":"drop","probability":2}',
    ]) {
      const r = await c.request("PUT", "/fault", { body, headers: { "Content-Type": "application/json" } });
      expectError(r, 400, "ERR_BAD_REQUEST", `fault ${body}`);
    }
    assert.equal((await c.request("GET", "/fault")).json().mode, "none");
  });

  void test("a malformed HTTP request gets a JSON 400 and the gateway keeps serving", async () => {
    const out = await raw([Buffer.from("BLAH / HTTP/1.1\r\n\r\n")], false, 2000);
    assert.match(out, /^HTTP\/1\.1 400 /);
    assert.equal((await c.request("GET", "/health")).status, 200);
    assert.equal(gw.proc.exitCode, null);
  });
});
