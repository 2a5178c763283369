// The handshake phase against an in-process NbdServer, driven byte by byte by the raw client:
// greeting, client flags, every option the server knows, the limits against abuse, and the
// handshake deadline. Numbers come from doc/proto.md, written out here.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { MemoryVolume } from "../../src/volume/memory.js";
import { utf8Capped } from "../../src/nbd/wire.js";
import {
  infoRequestData,
  isOptionError,
  metaContextData,
  optionBytes,
  startTestServer,
  type OptionReply,
  type RawClient,
  type TestServer,
} from "../helpers/raw-client.js";

const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
};
const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_TOO_BIG: 0x80000009,
};
const INFO_EXPORT = 0,
  INFO_NAME = 1,
  INFO_DESCRIPTION = 2,
  INFO_BLOCK_SIZE = 3;
const TF_SEND_DF = 1 << 7;
/** HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES|CAN_MULTI_CONN|SEND_CACHE|SEND_FAST_ZERO. */
const MEMORY_FLAGS = 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0100 | 0x0400 | 0x0800;
const DISK_SIZE = 4 * 1024 * 1024;
const OTHER_SIZE = 1024 * 1024;
const CMD_READ = 0,
  CMD_WRITE = 1,
  CMD_BLOCK_STATUS = 7;

const utf8 = new TextDecoder("utf-8", { fatal: true });

function types(rs: OptionReply[]): number[] {
  return rs.map((r) => r.type);
}

/** A message-carrying error reply: the type, and UTF-8 text of at most 4096 bytes. */
function assertErrorReply(rs: OptionReply[], option: number, type: number): string {
  assert.equal(
    rs.length,
    1,
    `one reply, got types ${types(rs)
      .map((t) => t.toString(16))
      .join(",")}`,
  );
  const r = rs[0];
  assert.equal(r.option, option);
  assert.equal(r.type >>> 0, type >>> 0, `reply type 0x${r.type.toString(16)}`);
  assert.ok(r.data.length <= 4096, `error message of ${r.data.length} bytes`);
  return utf8.decode(r.data);
}

let srv: TestServer;

before(async () => {
  srv = await startTestServer({
    exports: [
      { name: "disk", description: "the disk", volume: new MemoryVolume(DISK_SIZE) },
      { name: "other", volume: new MemoryVolume(OTHER_SIZE) },
    ],
  });
});
after(async () => {
  await srv.stop();
});

/** Connected, greeting read, client flags sent. */
async function opened(flags = 3): Promise<RawClient> {
  const c = await srv.connect();
  await c.greeting();
  c.sendClientFlags(flags);
  return c;
}

/** The session still works: GO to the default export, then a write and a read. */
async function assertUsable(c: RawClient, structured = false): Promise<void> {
  const go = await c.option(OPT.GO, infoRequestData(""));
  assert.equal(go[go.length - 1].type, REP.ACK);
  const data = Buffer.alloc(512, 0x5c);
  assert.equal(await c.writeAt(8192, data, 11n), 0);
  if (structured) {
    c.request({ type: CMD_READ, cookie: 12n, offset: 8192, length: 512 });
    const chunks = await c.structuredReply();
    assert.equal(chunks.length, 1);
    assert.equal(chunks[0].type, 1);
    assert.deepEqual(chunks[0].payload.subarray(8), data);
  } else {
    assert.deepEqual(await c.readAt(8192, 512, 12n), data);
  }
  await c.disconnect();
}

void describe("greeting and client flags", () => {
  void test("greeting is NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES, and nothing more", async () => {
    const c = await srv.connect();
    const g = await c.read(18);
    assert.deepEqual(g, Buffer.from("4e42444d4147494349484156454f50540003", "hex"));
    assert.equal(await c.closesWithin(100), false);
    assert.equal(c.available, 0, "the server waits for the client flags");
    c.destroy();
  });

  for (const flags of [0x4, 0x8, 0x80000000, 0x7, 0xffffffff]) {
    void test(`unknown client flags 0x${flags.toString(16)}: the server closes`, async () => {
      const c = await srv.connect();
      await c.greeting();
      c.sendClientFlags(flags);
      c.sendOption(OPT.LIST);
      const rest = await c.readToEnd();
      assert.equal(rest.length, 0, "no reply to anything after bad flags");
    });
  }

  void test("non-fixed newstyle client: EXPORT_NAME works, with 124 zero bytes", async () => {
    const c = await opened(0);
    c.sendOption(OPT.EXPORT_NAME, Buffer.from("disk"));
    const r = await c.read(134);
    assert.equal(Number(r.readBigUInt64BE(0)), DISK_SIZE);
    assert.equal(r.readUInt16BE(8), MEMORY_FLAGS);
    assert.deepEqual(r.subarray(10), Buffer.alloc(124));
    const data = Buffer.alloc(4096, 0x21);
    assert.equal(await c.writeAt(0, data), 0);
    assert.deepEqual(await c.readAt(0, 4096), data);
    await c.disconnect();
  });

  void test("NO_ZEROES alone: EXPORT_NAME of the default export answers with 10 bytes", async () => {
    const c = await opened(2);
    c.sendOption(OPT.EXPORT_NAME);
    const r = await c.read(10);
    assert.equal(Number(r.readBigUInt64BE(0)), DISK_SIZE);
    assert.equal(r.readUInt16BE(8), MEMORY_FLAGS);
    // The next bytes are the replies, not zero padding.
    const data = Buffer.alloc(16, 0x3e);
    assert.equal(await c.writeAt(65536, data, 98n), 0);
    assert.deepEqual(await c.readAt(65536, 16, 99n), data);
    await c.disconnect();
  });

  void test("non-fixed newstyle client sending another option: closed", async () => {
    const c = await opened(0);
    c.sendOption(OPT.LIST);
    assert.equal((await c.readToEnd()).length, 0);
  });

  void test("bad option magic: closed", async () => {
    const c = await opened();
    const o = optionBytes(OPT.LIST);
    o.write("IHAVEOPX", 0, "latin1");
    c.write(o);
    assert.equal((await c.readToEnd()).length, 0);
  });
});

void describe("LIST", () => {
  void test("one SERVER reply per export, then ACK", async () => {
    const c = await opened();
    const rs = await c.option(OPT.LIST);
    assert.deepEqual(types(rs), [REP.SERVER, REP.SERVER, REP.ACK]);
    for (const r of rs) assert.equal(r.option, OPT.LIST);
    assert.deepEqual(
      rs[0].data,
      Buffer.concat([Buffer.from("00000004", "hex"), Buffer.from("diskthe disk")]),
    );
    assert.deepEqual(rs[1].data, Buffer.concat([Buffer.from("00000005", "hex"), Buffer.from("other")]));
    assert.equal(rs[2].data.length, 0);
    await assertUsable(c);
  });

  void test("LIST with data: ERR_INVALID, and the session continues", async () => {
    const c = await opened();
    assertErrorReply(await c.option(OPT.LIST, Buffer.from("x")), OPT.LIST, REP.ERR_INVALID);
    assert.deepEqual(types(await c.option(OPT.LIST)), [REP.SERVER, REP.SERVER, REP.ACK]);
    await assertUsable(c);
  });
});

void describe("INFO and GO", () => {
  void test("INFO with every information request", async () => {
    const c = await opened();
    const rs = await c.option(
      OPT.INFO,
      infoRequestData("disk", [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
    );
    assert.equal(rs[rs.length - 1].type, REP.ACK);
    const infos = rs.filter((r) => r.type === REP.INFO);
    assert.equal(infos.length, rs.length - 1, "only INFO replies before the ACK");
    const byType = new Map(infos.map((r) => [r.data.readUInt16BE(0), r.data]));
    assert.equal(byType.size, 4);
    const sz = Buffer.alloc(8);
    sz.writeBigUInt64BE(BigInt(DISK_SIZE));
    const fl = Buffer.alloc(2);
    fl.writeUInt16BE(MEMORY_FLAGS);
    assert.deepEqual(byType.get(INFO_EXPORT), Buffer.concat([Buffer.from("0000", "hex"), sz, fl]));
    assert.deepEqual(byType.get(INFO_NAME), Buffer.concat([Buffer.from("0001", "hex"), Buffer.from("disk")]));
    assert.deepEqual(
      byType.get(INFO_DESCRIPTION),
      Buffer.concat([Buffer.from("0002", "hex"), Buffer.from("the disk")]),
    );
    assert.deepEqual(
      byType.get(INFO_BLOCK_SIZE),
      Buffer.from("0003 00000001 00001000 02000000".replace(/ /g, ""), "hex"),
    );
    for (const r of rs) assert.equal(r.option, OPT.INFO);
    // INFO does not end the handshake.
    await assertUsable(c);
  });

  void test("INFO of the default export names the canonical name", async () => {
    const c = await opened();
    const rs = await c.option(OPT.INFO, infoRequestData("", [INFO_NAME]));
    const name = rs.find((r) => r.type === REP.INFO && r.data.readUInt16BE(0) === INFO_NAME);
    assert.ok(name, "NBD_INFO_NAME sent");
    assert.equal(name.data.toString("utf8", 2), "disk");
    c.destroy();
  });

  void test("INFO with an unknown information type ignores it", async () => {
    const c = await opened();
    const rs = await c.option(OPT.INFO, infoRequestData("other", [0x1234, INFO_DESCRIPTION]));
    assert.equal(rs[rs.length - 1].type, REP.ACK);
    const infoTypes = rs.filter((r) => r.type === REP.INFO).map((r) => r.data.readUInt16BE(0));
    assert.ok(infoTypes.includes(INFO_EXPORT));
    assert.ok(!infoTypes.includes(0x1234));
    const exp = rs.find((r) => r.type === REP.INFO && r.data.readUInt16BE(0) === INFO_EXPORT)!;
    assert.equal(Number(exp.data.readBigUInt64BE(2)), OTHER_SIZE);
    c.destroy();
  });

  void test("GO with no information requests still sends INFO_EXPORT, then transmission works", async () => {
    const c = await opened();
    const rs = await c.option(OPT.GO, infoRequestData("other"));
    assert.equal(rs[rs.length - 1].type, REP.ACK);
    const exp = rs.filter((r) => r.type === REP.INFO && r.data.readUInt16BE(0) === INFO_EXPORT);
    assert.equal(exp.length, 1);
    assert.equal(exp[0].data.length, 12);
    assert.equal(Number(exp[0].data.readBigUInt64BE(2)), OTHER_SIZE);
    assert.equal(exp[0].data.readUInt16BE(10), MEMORY_FLAGS);
    // Transmission on "other": its last byte is readable, one past it is not.
    assert.equal((await c.readAt(OTHER_SIZE - 1, 1, 3n)).length, 1);
    c.request({ type: CMD_READ, cookie: 4n, offset: OTHER_SIZE, length: 1 });
    assert.deepEqual(await c.simpleReply(), { error: 22, cookie: 4n });
    await c.disconnect();
  });

  void test("malformed INFO/GO data: ERR_INVALID, and the session continues", async () => {
    const c = await opened();
    const good = infoRequestData("disk", [INFO_NAME]);
    const bad: Buffer[] = [
      Buffer.alloc(3), // too short
      Buffer.from("0000ffff0000", "hex"), // name length past the data
      good.subarray(0, good.length - 1), // request count does not match
      Buffer.concat([good, Buffer.alloc(2)]), // trailing bytes
    ];
    for (const d of bad) {
      assertErrorReply(await c.option(OPT.INFO, d), OPT.INFO, REP.ERR_INVALID);
      assertErrorReply(await c.option(OPT.GO, d), OPT.GO, REP.ERR_INVALID);
    }
    await assertUsable(c);
  });

  void test("unknown export: ERR_UNKNOWN with a message, and the session continues", async () => {
    const c = await opened();
    const msg = assertErrorReply(await c.option(OPT.GO, infoRequestData("nope")), OPT.GO, REP.ERR_UNKNOWN);
    assert.ok(msg.includes("nope"), `message names the export: ${msg}`);
    assertErrorReply(await c.option(OPT.INFO, infoRequestData("Disk")), OPT.INFO, REP.ERR_UNKNOWN);
    await assertUsable(c);
  });

  void test("an export name that is not UTF-8, or holds a NUL: ERR_INVALID, and the session continues", async () => {
    // proto.md: strings are UTF-8 and MUST NOT contain NUL. Decoded loosely, "disk\xff" and
    // "disk\xfe" would both become "disk\ufffd" and name the same export.
    const c = await opened();
    const raw = (name: Buffer): Buffer => {
      const d = Buffer.alloc(4 + name.length + 2);
      d.writeUInt32BE(name.length, 0);
      name.copy(d, 4);
      return d;
    };
    for (const name of [Buffer.from("disk\0"), Buffer.from([0x64, 0xff]), Buffer.from([0xc3])]) {
      for (const opt of [OPT.INFO, OPT.GO]) {
        const msg = assertErrorReply(await c.option(opt, raw(name)), opt, REP.ERR_INVALID);
        assert.match(msg, /not UTF-8 without NUL/);
        assert.ok(!Buffer.from(msg).includes(0), "no NUL in the server's message");
      }
    }
    await c.option(OPT.STRUCTURED_REPLY);
    for (const d of [metaContextData("disk\0", ["base:allocation"]), metaContextData("disk", ["base:\0"])]) {
      assertErrorReply(await c.option(OPT.LIST_META_CONTEXT, d), OPT.LIST_META_CONTEXT, REP.ERR_INVALID);
    }
    await assertUsable(c, true);
  });

  void test("server strings never carry a NUL, even quoting one", () => {
    const b = utf8Capped('no export named "a\0b"');
    assert.ok(!b.includes(0), `NUL in ${JSON.stringify(b.toString())}`);
    assert.equal(b.toString(), 'no export named "a\\0b"');
  });

  void test("an export name over 4096 bytes: ERR_INVALID", async () => {
    const c = await opened();
    assertErrorReply(await c.option(OPT.GO, infoRequestData("n".repeat(4097))), OPT.GO, REP.ERR_INVALID);
    await assertUsable(c);
  });

  void test("unknown export with a long multi-byte name: the error message is valid UTF-8 of at most 4096 bytes", async () => {
    // 1365 three-byte characters: a legal 4095-byte name. The message quoting it must still obey
    // proto.md's string rule (UTF-8, at most 4096 bytes).
    const c = await opened();
    const name = "€".repeat(1365);
    assert.equal(Buffer.byteLength(name), 4095);
    assertErrorReply(await c.option(OPT.GO, infoRequestData(name)), OPT.GO, REP.ERR_UNKNOWN);
    await assertUsable(c);
  });

  void test("EXPORT_NAME of an unknown export: the connection is closed", async () => {
    const c = await opened();
    c.sendOption(OPT.EXPORT_NAME, Buffer.from("nope"));
    assert.equal((await c.readToEnd()).length, 0);
  });

  void test("EXPORT_NAME of a named export after INFO", async () => {
    const c = await opened();
    assert.equal((await c.option(OPT.INFO, infoRequestData("other"))).at(-1)!.type, REP.ACK);
    c.sendOption(OPT.EXPORT_NAME, Buffer.from("other"));
    const r = await c.read(10);
    assert.equal(Number(r.readBigUInt64BE(0)), OTHER_SIZE);
    await c.disconnect();
  });
});

void describe("STRUCTURED_REPLY and metadata contexts", () => {
  void test("STRUCTURED_REPLY with data: ERR_INVALID; without: ACK, and GO then advertises DF", async () => {
    const c = await opened();
    assertErrorReply(
      await c.option(OPT.STRUCTURED_REPLY, Buffer.alloc(1)),
      OPT.STRUCTURED_REPLY,
      REP.ERR_INVALID,
    );
    // The refused request negotiated nothing: GO on another connection shows no DF either way;
    // here the ACK does.
    const ack = await c.option(OPT.STRUCTURED_REPLY);
    assert.deepEqual(types(ack), [REP.ACK]);
    assert.equal(ack[0].data.length, 0);
    const go = await c.option(OPT.GO, infoRequestData(""));
    const exp = go.find((r) => r.type === REP.INFO && r.data.readUInt16BE(0) === INFO_EXPORT)!;
    assert.equal(exp.data.readUInt16BE(10), MEMORY_FLAGS | TF_SEND_DF);
    c.destroy();
  });

  void test("without STRUCTURED_REPLY, DF is not advertised", async () => {
    const c = await srv.connect();
    const s = await c.handshake();
    assert.equal(s.flags & TF_SEND_DF, 0);
    await c.disconnect();
  });

  void test("LIST/SET_META_CONTEXT before STRUCTURED_REPLY: ERR_INVALID", async () => {
    const c = await opened();
    const d = metaContextData("disk", ["base:allocation"]);
    assertErrorReply(await c.option(OPT.LIST_META_CONTEXT, d), OPT.LIST_META_CONTEXT, REP.ERR_INVALID);
    assertErrorReply(await c.option(OPT.SET_META_CONTEXT, d), OPT.SET_META_CONTEXT, REP.ERR_INVALID);
    await assertUsable(c);
  });

  void test("LIST_META_CONTEXT: all, base:, base:allocation list it; other namespaces are ignored", async () => {
    const c = await opened();
    await c.option(OPT.STRUCTURED_REPLY);
    const cases: [string[], boolean][] = [
      [[], true],
      [["base:"], true],
      [["base:allocation"], true],
      [["qemu:dirty-bitmap:x"], false],
      [["x-test:thing", "nbd-server:"], false],
      [["x-test:thing", "base:allocation"], true],
    ];
    for (const [queries, listed] of cases) {
      const rs = await c.option(OPT.LIST_META_CONTEXT, metaContextData("disk", queries));
      const what = JSON.stringify(queries);
      if (listed) {
        assert.deepEqual(types(rs), [REP.META_CONTEXT, REP.ACK], what);
        assert.equal(rs[0].data.toString("utf8", 4), "base:allocation", what);
      } else {
        assert.deepEqual(types(rs), [REP.ACK], what);
      }
    }
    await assertUsable(c, true);
  });

  void test("a query without a namespace: ERR_INVALID", async () => {
    const c = await opened();
    await c.option(OPT.STRUCTURED_REPLY);
    for (const opt of [OPT.LIST_META_CONTEXT, OPT.SET_META_CONTEXT]) {
      assertErrorReply(await c.option(opt, metaContextData("disk", ["allocation"])), opt, REP.ERR_INVALID);
      assertErrorReply(
        await c.option(opt, metaContextData("disk", ["base:allocation", ""])),
        opt,
        REP.ERR_INVALID,
      );
    }
    await assertUsable(c, true);
  });

  void test("malformed meta context data: ERR_INVALID", async () => {
    const c = await opened();
    await c.option(OPT.STRUCTURED_REPLY);
    const good = metaContextData("disk", ["base:allocation"]);
    const bad = [
      Buffer.alloc(7),
      good.subarray(0, good.length - 1),
      Buffer.concat([good, Buffer.alloc(1)]),
      Buffer.from("00000000 00000002 00000001 41".replace(/ /g, ""), "hex"),
    ];
    for (const d of bad) {
      assertErrorReply(await c.option(OPT.SET_META_CONTEXT, d), OPT.SET_META_CONTEXT, REP.ERR_INVALID);
    }
    await assertUsable(c, true);
  });

  void test("SET_META_CONTEXT for an unknown export: ERR_UNKNOWN", async () => {
    const c = await opened();
    await c.option(OPT.STRUCTURED_REPLY);
    assertErrorReply(
      await c.option(OPT.SET_META_CONTEXT, metaContextData("nope", ["base:allocation"])),
      OPT.SET_META_CONTEXT,
      REP.ERR_UNKNOWN,
    );
    c.destroy();
  });

  /** Send BLOCK_STATUS [0, 64 KiB) and return the single reply chunk. */
  async function blockStatus(c: RawClient, cookie: bigint): Promise<{ type: number; payload: Buffer }> {
    c.request({ type: CMD_BLOCK_STATUS, cookie, offset: 0, length: 65536 });
    const chunks = await c.structuredReply();
    assert.equal(chunks.length, 1);
    assert.equal(chunks[0].cookie, cookie);
    return chunks[0];
  }

  void test("SET base:allocation then GO to the same export: BLOCK_STATUS uses the context id", async () => {
    const c = await opened();
    await c.option(OPT.STRUCTURED_REPLY);
    const set = await c.option(
      OPT.SET_META_CONTEXT,
      metaContextData("other", ["x-foo:bar", "base:allocation"]),
    );
    assert.deepEqual(types(set), [REP.META_CONTEXT, REP.ACK]);
    const id = set[0].data.readUInt32BE(0);
    assert.equal(set[0].data.toString("utf8", 4), "base:allocation");
    assert.equal((await c.option(OPT.GO, infoRequestData("other"))).at(-1)!.type, REP.ACK);
    const r = await blockStatus(c, 5n);
    assert.equal(r.type, 5);
    assert.equal(r.payload.readUInt32BE(0), id);
    await c.disconnect();
  });

  void test("SET then GO to a different export: BLOCK_STATUS is refused with EINVAL", async () => {
    const c = await opened();
    await c.option(OPT.STRUCTURED_REPLY);
    assert.deepEqual(
      types(await c.option(OPT.SET_META_CONTEXT, metaContextData("other", ["base:allocation"]))),
      [REP.META_CONTEXT, REP.ACK],
    );
    assert.equal((await c.option(OPT.GO, infoRequestData("disk"))).at(-1)!.type, REP.ACK);
    const r = await blockStatus(c, 6n);
    assert.equal(r.type, 0x8001);
    assert.equal(r.payload.readUInt32BE(0), 22);
    // The connection carries on.
    c.request({ type: CMD_WRITE, cookie: 7n, offset: 0, length: 1 }, Buffer.from([1]));
    assert.deepEqual(await c.simpleReply(), { error: 0, cookie: 7n });
    await c.disconnect();
  });

  void test("a later SET that selects nothing replaces the earlier selection", async () => {
    const c = await opened();
    await c.option(OPT.STRUCTURED_REPLY);
    await c.option(OPT.SET_META_CONTEXT, metaContextData("disk", ["base:allocation"]));
    assert.deepEqual(types(await c.option(OPT.SET_META_CONTEXT, metaContextData("disk", ["x-foo:bar"]))), [
      REP.ACK,
    ]);
    await c.option(OPT.GO, infoRequestData("disk"));
    const r = await blockStatus(c, 8n);
    assert.equal(r.type, 0x8001);
    assert.equal(r.payload.readUInt32BE(0), 22);
    await c.disconnect();
  });
});

void describe("other options and limits", () => {
  void test("shutdown while a client haggles: its options get ERR_SHUTDOWN, then closeAll closes it", async () => {
    const own = await startTestServer({ exports: [{ name: "d", volume: new MemoryVolume(1024 * 1024) }] });
    try {
      const c = await own.connect();
      await c.greeting();
      c.sendClientFlags(3);
      const list = await c.option(OPT.LIST);
      assert.equal(list[list.length - 1].type, REP.ACK);
      const quiesced = own.server.quiesce(1000);
      assertErrorReply(await c.option(OPT.LIST), OPT.LIST, REP.ERR_SHUTDOWN);
      assertErrorReply(await c.option(OPT.GO, infoRequestData("")), OPT.GO, REP.ERR_SHUTDOWN);
      assert.equal(await quiesced, true, "a haggling client does not hold up the quiesce");
      await own.server.closeAll(1000);
      assert.equal((await c.readToEnd()).length, 0, "closed after closeAll");
    } finally {
      await own.stop();
    }
  });

  void test("unknown and unsupported options: ERR_UNSUP, and the session continues", async () => {
    const c = await opened();
    for (const opt of [OPT.PEEK_EXPORT, OPT.EXTENDED_HEADERS, 12, 99, 0x7fffffff, 0xffffffff]) {
      const rs = await c.option(opt);
      assert.equal(rs.length, 1);
      assert.equal(rs[0].option >>> 0, opt >>> 0);
      assert.equal(rs[0].type >>> 0, REP.ERR_UNSUP);
    }
    await assertUsable(c);
  });

  void test("STARTTLS on a server without TLS: ERR_POLICY", async () => {
    const c = await opened();
    assertErrorReply(await c.option(OPT.STARTTLS), OPT.STARTTLS, REP.ERR_POLICY);
    await assertUsable(c);
  });

  void test("ABORT: ACK, then the server closes", async () => {
    const c = await opened();
    assert.deepEqual(types(await c.option(OPT.ABORT)), [REP.ACK]);
    assert.equal((await c.readToEnd()).length, 0);
  });

  void test("option data over 64 KiB: ERR_TOO_BIG, and the session continues", async () => {
    const c = await opened();
    for (const opt of [OPT.LIST, OPT.GO, 99]) {
      c.write(optionBytes(opt, Buffer.alloc(64 * 1024 + 1, 0x41)));
      const rs = await c.optionReplies();
      assert.equal(rs.length, 1);
      assert.equal(rs[0].type >>> 0, REP.ERR_TOO_BIG, `option ${opt}`);
    }
    await assertUsable(c);
  });

  void test("EXPORT_NAME over 64 KiB: closed, with no option reply (EXPORT_NAME gets none)", async () => {
    const c = await opened();
    c.write(optionBytes(OPT.EXPORT_NAME, Buffer.alloc(64 * 1024 + 1, 0x41)));
    assert.equal((await c.readToEnd()).length, 0, "an option reply to EXPORT_NAME");
  });

  void test("option data of 64 KiB exactly is read and judged on its merits", async () => {
    const c = await opened();
    assertErrorReply(await c.option(OPT.LIST, Buffer.alloc(64 * 1024)), OPT.LIST, REP.ERR_INVALID);
    await assertUsable(c);
  });

  void test("an option announcing more than 16 MiB of data: closed without reading it", async () => {
    const c = await opened();
    c.write(optionBytes(OPT.LIST, Buffer.alloc(0), 16 * 1024 * 1024 + 1));
    assert.equal((await c.readToEnd()).length, 0);
  });

  void test("more than 256 options: 256 are answered, then the connection is closed", async () => {
    const c = await opened();
    const one = optionBytes(OPT.LIST_META_CONTEXT, metaContextData("disk", []));
    c.write(Buffer.concat(Array.from({ length: 300 }, () => one)));
    let answered = 0;
    for (;;) {
      let r: OptionReply;
      try {
        r = await c.optionReply();
      } catch (e) {
        assert.equal((e as { code?: string }).code, "ERR_RAW_CLOSED");
        break;
      }
      assert.ok(isOptionError(r.type), "no structured replies yet: every LIST_META_CONTEXT is refused");
      answered++;
    }
    assert.equal(answered, 256);
    assert.ok(c.ended);
  });
});

void describe("the option limit after a LIST of many exports", () => {
  let many: TestServer;
  const N = 200;
  before(async () => {
    many = await startTestServer({
      exports: [{ name: "disk", volume: new MemoryVolume(DISK_SIZE) }],
    });
    many.registry.addProvider({
      owns: (name) => name.startsWith("many@"),
      list: () => Array.from({ length: N }, (_, i) => ({ name: `many@${i}`, description: "" })),
      open: () => Promise.resolve({ message: "not today" }),
    });
  });
  after(async () => {
    await many.stop();
  });

  void test("a client may ask about every export a LIST told it of (nbdinfo --list): 256 + 4 per listed export, however many LISTs", async () => {
    const c = await many.connect();
    await c.greeting();
    c.sendClientFlags(3);
    for (let i = 0; i < 2; i++) {
      const listed = await c.option(OPT.LIST, Buffer.alloc(0));
      assert.equal(listed.length, N + 2, "disk, N snapshots, ACK");
    }
    // Sent in one go, exactly as many as the limit allows: every one is answered ...
    const limit = 256 + 4 * (N + 1); // the LIST told of N + 1 exports
    const one = optionBytes(OPT.LIST_META_CONTEXT, metaContextData("disk", []));
    c.write(Buffer.concat(Array.from({ length: limit - 2 }, () => one)));
    for (let i = 2; i < limit; i++) assert.ok(isOptionError((await c.optionReply()).type));
    // ... and one more closes the connection: the second LIST did not extend the limit again.
    c.write(one);
    await c.expectClosed(3000);
    assert.match(many.log.join("\n"), new RegExp(`more than ${limit} options`));
  });
});

void describe("a client that sends options without reading the replies", () => {
  let big: TestServer;
  const N = 2000;
  before(async () => {
    big = await startTestServer({
      exports: [{ name: "disk", volume: new MemoryVolume(DISK_SIZE) }],
      logLevel: "debug",
    });
    big.registry.addProvider({
      owns: (name) => name.startsWith("many@"),
      list: () => Array.from({ length: N }, (_, i) => ({ name: `many@${i}`, description: "" })),
      open: () => Promise.resolve({ message: "not today" }),
    });
  });
  after(async () => {
    await big.stop();
  });

  void test("the server stops reading options while its replies pile up, and goes on once they are read", async () => {
    const c = await big.connect();
    await c.greeting();
    c.sendClientFlags(3);
    const LISTS = 300; // ~70 KB of replies each: 21 MB if the server buffered them all
    c.socket.pause(); // reads nothing: the kernel's buffers fill, then the server's queue
    c.write(Buffer.concat(Array.from({ length: LISTS }, () => optionBytes(OPT.LIST))));
    await new Promise((r) => setTimeout(r, 500));
    const handled = (): number => big.log.filter((l) => /option LIST \(0 bytes\)/.test(l)).length;
    assert.ok(handled() < 60, `${handled()} LISTs answered to a client that reads nothing`);
    c.socket.resume();
    for (let i = 0; i < LISTS; i++) {
      const replies = await c.optionReplies();
      assert.equal(replies.length, N + 2, `LIST ${i}`);
    }
    assert.equal(handled(), LISTS);
    c.destroy();
  });
});

void describe("handshake deadline", () => {
  let slow: TestServer;
  before(async () => {
    slow = await startTestServer({
      exports: [{ name: "disk", volume: new MemoryVolume(DISK_SIZE) }],
      handshakeTimeoutMs: 300,
    });
  });
  after(async () => {
    await slow.stop();
  });

  void test("a client that stalls after the greeting is disconnected and logged", async () => {
    const c = await slow.connect();
    await c.greeting();
    const t0 = Date.now();
    await c.expectClosed(3000);
    assert.ok(Date.now() - t0 >= 200, "not before the deadline");
    assert.ok(
      slow.log.some((l) => l.includes(" warn ") && l.includes("handshake")),
      slow.log.join(""),
    );
  });

  void test("a client that stalls in the middle of an option is disconnected", async () => {
    const c = await slow.connect();
    await c.greeting();
    c.sendClientFlags(3);
    c.write(optionBytes(OPT.GO, infoRequestData("disk")).subarray(0, 20));
    await c.expectClosed(3000);
  });

  void test("after ABORT the server lets go of the connection even if the client never closes it", async () => {
    const c = await slow.connect();
    await c.greeting();
    c.sendClientFlags(3);
    const ack = await c.option(OPT.ABORT);
    assert.equal(ack[0].type, REP.ACK);
    await c.serverEnded;
    // The client keeps its side open. A connection slot must not stay taken for ever: the
    // handshake deadline (300 ms here) or a close grace period (5 s) ends it.
    try {
      const deadline = Date.now() + 7000;
      while (slow.server.connectionCount > 0 && Date.now() < deadline)
        await new Promise((r) => setTimeout(r, 50));
      assert.equal(slow.server.connectionCount, 0, "connection still held after ABORT");
    } finally {
      c.destroy();
    }
  });

  void test("after a LIST, a client that goes on earns more time (0.5 s per option, up to 0.5 s per export listed); one that idles does not", async () => {
    slow.registry.addProvider({
      owns: (name) => name.startsWith("dl@"),
      list: () => Array.from({ length: 20 }, (_, i) => ({ name: `dl@${i}`, description: "" })),
      open: () => Promise.resolve({ message: "not today" }),
    });
    const busy = await slow.connect();
    await busy.greeting();
    busy.sendClientFlags(3);
    await busy.option(OPT.LIST);
    const t0 = Date.now();
    for (let i = 0; i < 12; i++) {
      await new Promise((r) => setTimeout(r, 100));
      const r = await busy.option(OPT.INFO, infoRequestData(`dl@${i}`));
      assert.ok(isOptionError(r[r.length - 1].type));
    }
    assert.ok(Date.now() - t0 > 1000, "the options took longer than the 300 ms deadline");
    busy.destroy();
    const idle = await slow.connect();
    await idle.greeting();
    idle.sendClientFlags(3);
    await idle.option(OPT.LIST);
    const t1 = Date.now();
    await idle.expectClosed(5000); // not the 10 s that 20 exports could earn
    assert.ok(Date.now() - t1 < 2000, `an idle client was kept ${Date.now() - t1} ms`);
    idle.destroy();
  });

  void test("an export that opens after the deadline closed the connection is released", async () => {
    // A provider whose open outlasts the deadline, as a snap@ open waiting for changes in flight
    // does: the export it returns must be released (a snapshot holds back journal retention).
    let released = 0;
    let opened = 0;
    slow.registry.addProvider({
      owns: (name) => name.startsWith("late@"),
      list: () => [],
      open: async (name) => {
        await new Promise((r) => setTimeout(r, 800));
        opened++;
        return {
          name,
          description: "",
          volume: new MemoryVolume(DISK_SIZE),
          blockSizes: { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 },
          release: () => void released++,
        };
      },
    });
    for (const how of ["GO", "EXPORT_NAME"]) {
      const c = await slow.connect();
      await c.greeting();
      c.sendClientFlags(3);
      if (how === "GO") c.sendOption(OPT.GO, infoRequestData("late@1"));
      else c.sendOption(OPT.EXPORT_NAME, Buffer.from("late@1"));
      await c.expectClosed(3000);
      const deadline = Date.now() + 3000;
      while (opened < (how === "GO" ? 1 : 2) && Date.now() < deadline)
        await new Promise((r) => setTimeout(r, 20));
      await new Promise((r) => setTimeout(r, 50));
      assert.equal(released, opened, `${how}: every export opened after the close was released`);
      assert.equal(slow.server.connectionCount, 0, `${how}: no connection left`);
      c.destroy();
    }
    assert.equal(opened, 2);
    assert.ok(
      slow.log.some((l) => /opened after the connection closed; released/.test(l)),
      slow.log.join("\n"),
    );
  });

  void test("the deadline ends with the handshake: an idle session in transmission stays open", async () => {
    const c = await slow.connect();
    await c.handshake();
    assert.equal(await c.closesWithin(700), false);
    assert.equal((await c.readAt(0, 512, 1n)).length, 512);
    await c.disconnect();
  });
});
