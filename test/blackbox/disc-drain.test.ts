// DISC (and a client half-close) after many large reads, with a client that reads its replies
// slowly: "The server MUST handle all outstanding requests ... and close the TCP session" (NBD
// proto.md, NBD_CMD_DISC). Cached large reads leave by sendfile once libuv's writes ahead of them
// have completed, so at DISC some of them are still waiting in the reply queue; the stream must
// not be ended before they have all been handed to it (a write after end() cut the reply short
// and destroyed the socket).

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { RawClient, requestBytes, SIMPLE_MAGIC } from "../helpers/raw-client.js";

const KiB = 1024;
const SIZE = 32 * 1024 * KiB;
const READ = 256 * KiB;
const COUNT = 64; // 16 MiB of replies: several times the socket's buffers

const dir = scratchDir();
const volume = join(dir, "data.img");
const data = randomBytes(SIZE);
writeFileSync(volume, data); // just written: in the page cache, so reads go by sendfile
let srv: ServerHandle;
after(async () => {
  await srv?.stop();
  rmSync(dir, { recursive: true, force: true }); // the server was given this dir: it leaves it
});

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function readsThenClose(how: "disc" | "half-close", where: string | number): Promise<void> {
  const c = await RawClient.connect(where);
  await c.handshake();
  c.socket.pause(); // read nothing until everything is asked for and the queue is full
  const reqs: Buffer[] = [];
  for (let i = 0; i < COUNT; i++) {
    reqs.push(requestBytes({ type: 0, cookie: BigInt(i + 1), offset: (i * READ) % SIZE, length: READ }));
  }
  if (how === "disc") reqs.push(requestBytes({ type: 2, cookie: 0xd15cn }));
  await c.send(Buffer.concat(reqs));
  if (how === "half-close") c.socket.end();
  await sleep(500);
  c.socket.resume();
  for (let i = 0; i < COUNT; i++) {
    const h = await c.read(16, 10_000);
    assert.equal(h.readUInt32BE(0), SIMPLE_MAGIC, `reply ${i}: magic`);
    assert.equal(h.readUInt32BE(4), 0, `reply ${i}: error`);
    const cookie = Number(h.readBigUInt64BE(8));
    const off = ((cookie - 1) * READ) % SIZE;
    const got = await c.read(READ, 10_000);
    assert.ok(got.equals(data.subarray(off, off + READ)), `reply ${i} (cookie ${cookie}): data`);
    // A slow reader: the socket fills up again while the server is still sending.
    c.socket.pause();
    await sleep(10);
    c.socket.resume();
  }
  await c.expectClosed(10_000);
  assert.equal(c.available, 0, "nothing after the last reply");
}

let port = 0;
void test("start", async () => {
  srv = await startServer({ volume, size: null, dir, args: ["--listen", "127.0.0.1:0"] });
  const deadline = Date.now() + 10_000;
  while (!/nbd:\/\/127\.0\.0\.1:\d+/.test(srv.stdout()) && Date.now() < deadline) await sleep(50);
  port = Number(/nbd:\/\/127\.0\.0\.1:(\d+)/.exec(srv.stdout())?.[1] ?? 0);
  assert.ok(port > 0, `no TCP URI in the banner:\n${srv.stdout()}`);
});

for (const [where, name] of [
  [() => srv.sock, "unix socket"],
  [() => port, "TCP"],
] as const) {
  void test(`${name}: DISC after 64 large reads: every reply arrives whole, then the server closes`, async () => {
    await readsThenClose("disc", where());
  });
  void test(`${name}: a half-close after 64 large reads: every reply arrives whole, then it closes`, async () => {
    await readsThenClose("half-close", where());
  });
}

void test("the server is still serving", async () => {
  const c = await RawClient.connect(srv.sock);
  await c.handshake();
  const got = await c.readAt(READ, 4096);
  assert.ok(got.equals(data.subarray(READ, READ + 4096)));
  await c.disconnect();
  assert.doesNotMatch(srv.log(), /write after end/);
});
