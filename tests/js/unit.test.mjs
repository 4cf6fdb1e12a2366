// Unit tests of tandem.js: the pure parts, and the client against a fake
// WebSocket (fake_server.mjs) for what a real server cannot be made to do on
// cue: refusals, every close code, lost acks, authentication (protocol 1.1,
// which the real server does not implement yet). Run: node --test tests/js/
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  backoffDelay,
  closePolicy,
  DEFAULTS,
  Inbox,
  newMid,
  normaliseCode,
  Outbox,
  Tandem,
  TandemError,
} from "../../static/tandem.js";
import { FakeServer, sleep, until } from "./fake_server.mjs";

const URL = "ws://fake/ws";
const FAST = { backoffBase: 20, backoffCap: 200, restartDelay: 10, heartbeat: 0, requestTimeout: 1000 };

/** A client on `server` with fast timings, recording its events. */
function client(server, options = {}) {
  const tandem = new Tandem({ url: URL, WebSocket: server.WebSocket, ...FAST, ...options });
  const events = [];
  for (const type of ["state", "paired", "message", "presence", "peer_left", "expired", "error", "ack", "resumed", "auth"]) {
    tandem.on(type, (event) => events.push({ type, ...event }));
  }
  return { tandem, events, of: (type) => events.filter((e) => e.type === type) };
}

async function rejects(promise, code) {
  await assert.rejects(promise, (error) => {
    assert.ok(error instanceof TandemError, `a TandemError, got ${error}`);
    assert.equal(error.code, code, error.message);
    return true;
  });
}

// --- the pure parts ---------------------------------------------------------------

describe("backoffDelay", () => {
  test("full jitter below min(cap, base * 2^attempt)", () => {
    const top = () => 0.999999;
    assert.equal(backoffDelay(0, { base: 500, cap: 10_000, random: () => 0 }), 0);
    assert.equal(backoffDelay(0, { base: 500, cap: 10_000, random: top }), 499);
    assert.equal(backoffDelay(3, { base: 500, cap: 10_000, random: top }), 3999);
    assert.equal(backoffDelay(5, { base: 500, cap: 10_000, random: top }), 9999); // 16 s capped at 10 s
    assert.equal(backoffDelay(1000, { random: top }), DEFAULTS.backoffCap - 1); // no overflow
    assert.equal(DEFAULTS.backoffCap, 10_000);
  });

  test("random spread over the whole range", () => {
    const delays = Array.from({ length: 2000 }, () => backoffDelay(4));
    assert.ok(Math.min(...delays) < 800 && Math.max(...delays) > 7200, "full jitter spans [0, 8000)");
    assert.ok(delays.every((d) => d >= 0 && d < 8000));
  });
});

describe("normaliseCode", () => {
  test("any case, spaces, dashes, ambiguous letters forgiven", () => {
    assert.equal(normaliseCode("abcd2345"), "ABCD2345");
    assert.equal(normaliseCode(" ab-cd 23_45 "), "ABCD2345");
    assert.equal(normaliseCode("iloO1234"), "11001234"); // I, L read as 1; O as 0 (Crockford)
    assert.equal(normaliseCode("ＡＢＣＤ２３４５"), "ABCD2345"); // full-width, from a phone keyboard
  });

  test("refuses what no code is", () => {
    for (const bad of ["", "ABC12", "ABCDEFGH12345", "ABCDU123", "ABCD234ß", "ABCD23!5", "ABCDé123"]) {
      assert.throws(() => normaliseCode(bad), (e) => e instanceof TandemError && e.code === "bad_code", bad);
    }
    assert.throws(() => normaliseCode("ABCDU123"), /never contain the letter U/);
  });
});

describe("Inbox", () => {
  test("each seq once, gaps allowed, stale dropped", () => {
    const inbox = new Inbox();
    assert.deepEqual([1, 2, 2, 4, 3, 7, 1, 8].map((seq) => inbox.accept(seq)), [true, true, false, true, false, true, false, true]);
    assert.equal(inbox.lastSeq, 8);
    assert.equal(new Inbox(5).accept(5), false);
    assert.equal(inbox.accept("9"), false);
    assert.equal(inbox.accept(9.5), false);
  });
});

describe("Outbox", () => {
  test("bounded, with a clear error past the bound", () => {
    const outbox = new Outbox(2);
    outbox.add("a", "1");
    outbox.add("b", '"x"');
    assert.throws(() => outbox.add("c", "3"), (e) => e.code === "queue_full" && /2 messages are waiting/.test(e.message));
    assert.deepEqual(outbox.serialise(), [
      { mid: "a", data: 1 },
      { mid: "b", data: "x" },
    ]);
  });

  test("tracks what is on the wire", () => {
    const outbox = new Outbox();
    const a = outbox.add("a", "1");
    const b = outbox.add("b", "2");
    outbox.markSent(a, 7);
    assert.deepEqual(outbox.unsent(), [b]);
    assert.equal(outbox.firstInFlight(), a);
    outbox.resetWire();
    assert.deepEqual(outbox.unsent(), [a, b]);
    outbox.remove(a);
    assert.equal(outbox.size, 1);
    assert.throws(() => outbox.add("b", "3"), (e) => e.code === "bad_request");
  });
});

test("closePolicy follows PROTOCOL.md's close codes", () => {
  assert.equal(closePolicy(1000).retry, false); // takeover
  assert.equal(closePolicy(1003).retry, false);
  assert.equal(closePolicy(1002).retry, false);
  assert.equal(closePolicy(1007).retry, false);
  assert.equal(closePolicy(1008).retry, false); // without a way to get a fresh token
  assert.deepEqual(closePolicy(1008, { auth: true }).retry, true);
  assert.equal(closePolicy(1012).immediate, true);
  assert.equal(closePolicy(1013).minAttempt, 1);
  assert.equal(closePolicy(1006).retry, true);
  assert.equal(closePolicy(1011).retry, true);
});

test("newMid: unique, URL-safe, within the protocol's 64 characters", () => {
  const mids = new Set(Array.from({ length: 1000 }, newMid));
  assert.equal(mids.size, 1000);
  for (const mid of mids) assert.match(mid, /^[A-Za-z0-9_-]{22}$/);
});

// --- the client against a fake server ---------------------------------------------

describe("Tandem", () => {
  test("create, send, ack; states and events", async () => {
    const server = new FakeServer();
    const { tandem, of } = client(server);
    assert.equal(tandem.state, "closed");
    const { code } = await tandem.create();
    assert.equal(code, "ABCD2345");
    assert.equal(tandem.state, "open");
    assert.equal(tandem.clientId, "me");
    assert.deepEqual(of("state").map((e) => e.state), ["connecting", "open"]);
    assert.equal(server.last.protocol, "tandem.v1");
    assert.equal(await tandem.send({ text: "hi" }), 1);
    assert.equal(await tandem.send("two"), 2);
    const sends = server.sent("message:send");
    assert.equal(sends.length, 2);
    assert.ok(sends.every((f) => typeof f.mid === "string" && f.mid.length > 0), "every send carries a mid");
    assert.deepEqual(of("ack").map((e) => [e.seq, e.duplicate]), [[1, false], [2, false]]);
    tandem.close();
  });

  test("join: a normalised code, peers, the backlog once", async () => {
    const server = new FakeServer();
    server.peerSends("early 1", { live: false });
    server.peerSends("early 2", { live: false });
    const { tandem, of } = client(server);
    await rejects(tandem.join("nope"), "bad_code");
    const joined = await tandem.join("abcd-2345");
    assert.equal(server.sent("session:join")[0].code, "ABCD2345");
    assert.deepEqual(joined.peers, [{ clientId: "peer", online: true }]);
    await until(() => of("message").length === 2, 1000, "the backlog");
    assert.deepEqual(of("message").map((e) => e.data), ["early 1", "early 2"]);
    tandem.close();
  });

  test("server events update peers", async () => {
    const server = new FakeServer();
    const { tandem, of } = client(server);
    await tandem.create();
    const socket = server.last;
    socket.push({ type: "session:paired", code: "ABCD2345", clients: [{ client_id: "me", online: true }, { client_id: "p", online: true }] });
    assert.deepEqual(tandem.peers, [{ clientId: "p", online: true }]);
    socket.push({ type: "session:presence", client_id: "p", online: false });
    assert.deepEqual(tandem.peers, [{ clientId: "p", online: false }]);
    socket.push({ type: "session:peer_left", client_id: "p" });
    assert.deepEqual(tandem.peers, []);
    socket.push({ type: "error", code: "internal", message: "oops" });
    assert.equal(of("paired").length, 1);
    assert.equal(of("presence").length, 1);
    assert.equal(of("peer_left").length, 1);
    assert.equal(of("error")[0].fatal, false);
    socket.push({ type: "session:expired", code: "ABCD2345", reason: "idle" });
    assert.deepEqual(of("expired")[0], { type: "expired", code: "ABCD2345", reason: "idle" });
    assert.equal(tandem.state, "closed");
    assert.equal(tandem.code, null);
  });

  test("a drop reconnects with backoff, resumes, resends unacked once, delivers each message once", async () => {
    const server = new FakeServer();
    const { tandem, of } = client(server, { random: () => 0.5 });
    await tandem.create();
    server.members.set("peer", "tok-peer");
    server.peerSends("m1");
    await until(() => of("message").length === 1);
    // The next send is stored, but its ack is lost with the connection.
    server.intercept = (socket, frame) => {
      if (frame.type !== "message:send") return false;
      server.intercept = null;
      server.stored.push({ seq: server.stored.length + 1, from: socket.member, mid: frame.mid, data: frame.data });
      socket.serverClose(1006); // stored, and the connection drops before the ack is sent
      return true;
    };
    const lost = tandem.send("lost ack");
    await until(() => tandem.state === "reconnecting", 1000, "reconnecting");
    const queued = tandem.send("while away");
    server.peerSends("m3", { live: false });
    assert.equal(await lost, 2, "the resend's ack: the first seq");
    assert.equal(await queued, 4);
    const resumes = server.sent("session:resume");
    assert.equal(resumes.length, 1);
    assert.equal(resumes[0].last_seq, 1);
    const reconnecting = of("state").find((e) => e.state === "reconnecting");
    assert.equal(reconnecting.closeCode, 1006);
    assert.ok(reconnecting.delay >= 0 && reconnecting.delay < FAST.backoffBase, "first retry within base");
    assert.deepEqual(of("ack").map((e) => [e.seq, e.duplicate]), [[2, true], [4, false]]);
    assert.equal(server.stored.filter((m) => m.data === "lost ack").length, 1, "stored once");
    const sends = server.sent("message:send").filter((f) => f.data === "lost ack");
    assert.equal(sends.length, 2);
    assert.equal(sends[0].mid, sends[1].mid, "resent with its mid");
    // The server replays m3 (and would replay m1 if asked from 0): each delivered once.
    await until(() => of("message").length === 2);
    server.last.push(server.messageFrame(server.stored[0])); // a duplicate on the new connection
    await sleep(20);
    assert.deepEqual(of("message").map((e) => e.seq), [1, 3]);
    assert.equal(of("resumed")[0].recovered, true);
    tandem.close();
  });

  test("failed connections back off exponentially, capped", async () => {
    const server = new FakeServer();
    const { tandem, of } = client(server, { random: () => 0.999, backoffBase: 10, backoffCap: 40 });
    await tandem.create();
    server.refuse = 4;
    server.last.serverClose(1006);
    await until(() => tandem.state === "open" && server.sockets.length === 6, 3000, "back in");
    const delays = of("state").filter((e) => e.state === "reconnecting").map((e) => e.delay);
    assert.deepEqual(delays, [9, 19, 39, 39, 39]);
    assert.equal(of("resumed").length, 1);
    tandem.close();
  });

  test("1012: reconnects at once; 1013: backs off", async () => {
    const server = new FakeServer();
    const { tandem, of } = client(server, { random: () => 0.999, restartDelay: 10, backoffBase: 300, backoffCap: 10_000 });
    await tandem.create();
    server.last.serverClose(1012);
    await until(() => tandem.state === "open" && server.sockets.length === 2, 1000, "back after 1012");
    assert.deepEqual(of("state").filter((e) => e.state === "reconnecting").map((e) => [e.closeCode, e.delay]), [[1012, 9]]);
    server.last.serverClose(1013);
    await until(() => tandem.state === "reconnecting");
    const after = of("state").filter((e) => e.state === "reconnecting").at(-1);
    assert.equal(after.closeCode, 1013);
    assert.ok(after.delay >= 300, `1013 waits at least one backoff step, got ${after.delay}`);
    tandem.close();
  });

  for (const code of [1003, 1008, 1002, 1007]) {
    test(`close ${code}: no blind retry`, async () => {
      const server = new FakeServer();
      const { tandem, of } = client(server);
      await tandem.create();
      server.intercept = (socket, frame) => frame.type === "message:send"; // never acked
      const pending = tandem.send("x").catch((error) => error);
      await sleep(10);
      server.last.serverClose(code);
      await until(() => tandem.state === "closed");
      await sleep(100);
      assert.equal(server.sockets.length, 1, "no new connection");
      assert.equal(of("error").at(-1).fatal, true);
      assert.equal((await pending).code, of("error").at(-1).code);
      assert.equal(tandem.serialize().unacked.length, 1, "kept for a later resume()");
    });
  }

  test("close 1009: the oversized send is dropped, the rest resumes", async () => {
    const server = new FakeServer();
    const { tandem, of } = client(server);
    await tandem.create();
    server.intercept = (socket, frame) => {
      if (frame.type === "message:send" && frame.data === "too big for the server") {
        socket.serverClose(1009);
        socket.readyState = 3;
        return true;
      }
      return false;
    };
    const big = tandem.send("too big for the server");
    const next = tandem.send("fine");
    await rejects(big, "too_big");
    assert.equal(await next, 1);
    assert.equal(server.stored.length, 1);
    assert.equal(of("error").find((e) => e.code === "too_big").fatal, false);
    await rejects(tandem.send("x".repeat(200)), "too_big"); // the limit it learnt
    tandem.close();
  });

  test("close 1009 with nothing in flight, 1000 (takeover): closed", async () => {
    for (const [code, reason] of [
      [1009, "too_big"],
      [1000, "replaced"],
    ]) {
      const server = new FakeServer();
      const { tandem, of } = client(server);
      await tandem.create();
      server.last.serverClose(code);
      await until(() => tandem.state === "closed");
      await sleep(60);
      assert.equal(server.sockets.length, 1);
      assert.equal(of("state").at(-1).reason, reason);
    }
  });

  test("sends over the limit are refused before they are queued", async () => {
    const server = new FakeServer();
    const { tandem } = client(server, { maxMessageBytes: 256 });
    await tandem.create();
    await rejects(tandem.send("é".repeat(100)), "too_big"); // 200 bytes of data, more with the frame
    assert.equal(await tandem.send("é".repeat(50)), 1);
    await rejects(tandem.send(undefined), "bad_request");
    await rejects(tandem.send(10n), "bad_request");
    await rejects(tandem.send(1, { mid: "" }), "bad_request");
    tandem.close();
  });

  test("the offline queue is bounded, with a clear error", async () => {
    const server = new FakeServer();
    const { tandem } = client(server, { maxQueue: 2, backoffBase: 200 });
    await tandem.create();
    server.last.serverClose(1006);
    await until(() => tandem.state === "reconnecting");
    const a = tandem.send("a");
    const b = tandem.send("b");
    await assert.rejects(tandem.send("c"), (e) => e.code === "queue_full" && /2 messages are waiting/.test(e.message));
    assert.deepEqual([await a, await b], [1, 2]);
    assert.equal(await tandem.send("c"), 3, "room again once acknowledged");
    tandem.close();
  });

  test("rate_limited send: sent again after retry_after with its mid, in order", async () => {
    const server = new FakeServer();
    const { tandem, of } = client(server);
    await tandem.create();
    let refused = 0;
    server.intercept = (socket, frame) => {
      if (frame.type === "message:send" && refused < 2) {
        refused += 1;
        socket.push({ type: "error", id: frame.id, code: "rate_limited", message: "slow down", retry_after: 0.15 });
        return true;
      }
      return false;
    };
    const started = Date.now();
    const seqs = await Promise.all([tandem.send("a"), tandem.send("b")]);
    assert.deepEqual(seqs, [1, 2]);
    assert.ok(Date.now() - started >= 140, "waited retry_after");
    assert.equal(of("error").filter((e) => e.code === "rate_limited" && e.retryAfter === 0.15).length, 2);
    assert.equal(server.sockets.length, 1, "no reconnect for a rate limit");
    tandem.close();
  });

  test("a refused resume honours retry_after", async () => {
    const server = new FakeServer();
    const { tandem, of } = client(server, { random: () => 0 });
    await tandem.create();
    let refusals = 1;
    server.intercept = (socket, frame) => {
      if (frame.type === "session:resume" && refusals-- > 0) {
        socket.push({ type: "error", id: frame.id, code: "unavailable", message: "store down", retry_after: 0.2 });
        return true;
      }
      return false;
    };
    server.last.serverClose(1006);
    await until(() => of("resumed").length === 1, 2000, "resumed");
    const waits = of("state").filter((e) => e.state === "reconnecting").map((e) => e.delay);
    assert.deepEqual(waits, [0, 200]);
    tandem.close();
  });

  test("resume of a session that is gone: expired, sends rejected, credentials dropped", async () => {
    const server = new FakeServer();
    const { tandem, of } = client(server);
    await tandem.create();
    server.members.clear();
    server.last.serverClose(1006);
    const pending = tandem.send("too late");
    await rejects(pending, "session_gone");
    assert.deepEqual(of("expired").map((e) => e.reason), ["gone"]);
    assert.equal(tandem.state, "closed");
    assert.equal(tandem.serialize(), null);
    await sleep(50);
    assert.equal(server.sockets.length, 2);
  });

  test("recovered: false is reported", async () => {
    const server = new FakeServer();
    const { tandem, of } = client(server);
    await tandem.create();
    server.recovered = false;
    server.last.serverClose(1006);
    await until(() => of("resumed").length === 1);
    assert.equal(of("resumed")[0].recovered, false);
    tandem.close();
  });

  test("serialize / resume(saved): a reload carries on", async () => {
    const server = new FakeServer();
    const first = client(server);
    await first.tandem.create();
    server.members.set("peer", "tok-peer");
    server.peerSends("seen");
    await until(() => first.of("message").length === 1);
    server.intercept = (socket, frame) => frame.type === "message:send"; // the server takes nothing now
    first.tandem.send("unacked").catch(() => {});
    await sleep(10);
    const saved = JSON.parse(JSON.stringify(first.tandem.serialize()));
    assert.deepEqual(Object.keys(saved).sort(), ["clientId", "code", "lastSeq", "token", "unacked", "version"]);
    assert.equal(saved.lastSeq, 1);
    assert.equal(saved.unacked[0].data, "unacked");
    first.tandem.close(); // the page goes away
    server.intercept = null;
    server.peerSends("missed", { live: false });

    const second = client(server);
    await second.tandem.resume(saved);
    assert.equal(second.tandem.code, "ABCD2345");
    await until(() => second.of("ack").length === 1 && second.of("message").length === 1);
    assert.deepEqual(second.of("message").map((e) => e.data), ["missed"]);
    assert.equal(server.sent("session:resume").at(-1).last_seq, 1);
    const mids = server.sent("message:send").map((f) => f.mid);
    assert.equal(mids[0], mids.at(-1), "the restored send keeps its mid");
    assert.equal(server.stored.filter((m) => m.data === "unacked").length, 1);
    assert.equal(second.tandem.serialize().lastSeq, 2, "the peer's seqs only: own sends are not replayed");
    await rejects(new Tandem({ url: URL, WebSocket: server.WebSocket }).resume({ nope: 1 }), "bad_request");
    second.tandem.close();
  });

  test("leave: told to the server, closed, pending sends rejected", async () => {
    const server = new FakeServer();
    const { tandem } = client(server);
    await tandem.create();
    await tandem.leave();
    assert.equal(server.sent("session:leave").length, 1);
    assert.equal(tandem.state, "closed");
    assert.equal(tandem.serialize(), null);
    await rejects(tandem.send("x"), "not_in_session");
    assert.equal(server.last.closedByClient, 1000);
  });

  test("a silent connection is dropped by the heartbeat", async () => {
    const server = new FakeServer();
    const { tandem, of } = client(server, { heartbeat: 30 });
    await tandem.create();
    server.intercept = (socket, frame) => frame.type === "ping" && socket === server.sockets[0]; // no pong
    await until(() => of("resumed").length === 1, 2000, "resumed on a new socket");
    assert.ok(server.sent("ping").length >= 1);
    tandem.close();
  });

  test("connect failures reject create; create twice is refused", async () => {
    const server = new FakeServer();
    server.refuse = 1;
    const { tandem } = client(server);
    await rejects(tandem.create(), "connect_failed");
    assert.equal(tandem.state, "closed");
    await tandem.create();
    await rejects(tandem.create(), "busy");
    tandem.close();
  });
});

describe("authentication (protocol 1.1, against the fake: the server does not implement it yet)", () => {
  test("hello, then auth with the callback's token before anything else", async () => {
    const server = new FakeServer({ auth: "required" });
    const calls = [];
    const { tandem, of } = client(server, { auth: (context) => (calls.push(context.reason), "jwt-1") });
    await tandem.create();
    assert.deepEqual(server.last.received.map((f) => f.type), ["hello", "auth", "session:create"]);
    assert.deepEqual(server.tokens, ["jwt-1"]);
    assert.deepEqual(calls, ["connect"]);
    assert.equal(of("auth")[0].user, "u1");
    tandem.close();
  });

  test("the token is refreshed before it expires", async () => {
    const server = new FakeServer({ auth: "required" });
    server.authExpiresIn = 300;
    let n = 0;
    const { tandem } = client(server, { auth: async () => `jwt-${++n}`, authMargin: 100 });
    await tandem.create();
    await until(() => server.tokens.length >= 2, 1000, "a refresh");
    assert.equal(server.sockets.length, 1, "on the same connection");
    assert.deepEqual(server.tokens.slice(0, 2), ["jwt-1", "jwt-2"]);
    tandem.close();
  });

  test("1008 after the token expired: reconnect with a fresh token and resume", async () => {
    const server = new FakeServer({ auth: "required" });
    let n = 0;
    const { tandem, of } = client(server, { auth: () => `jwt-${++n}` });
    await tandem.create();
    server.last.serverClose(1008);
    await until(() => of("resumed").length === 1, 2000);
    assert.deepEqual(server.tokens, ["jwt-1", "jwt-2"]);
    assert.deepEqual(server.last.received.map((f) => f.type), ["hello", "auth", "session:resume"]);
    tandem.close();
  });

  test("unauthorized: no blind retry", async () => {
    const server = new FakeServer({ auth: "required" });
    const { tandem } = client(server, { auth: () => "bad-token" });
    await rejects(tandem.create(), "unauthorized");
    assert.equal(tandem.state, "closed");

    const resuming = new FakeServer({ auth: "required" });
    let token = "jwt-ok";
    const second = client(resuming, { auth: () => token });
    await second.tandem.create();
    token = "bad-now";
    resuming.last.serverClose(1006);
    await until(() => second.tandem.state === "closed", 2000);
    await sleep(100);
    assert.equal(resuming.sockets.length, 2, "one attempt, refused, no more");
    assert.equal(second.of("error").at(-1).code, "unauthorized");
    assert.equal(second.of("error").at(-1).fatal, true);
  });

  test("a server without hello (version 1): no authentication needed", async () => {
    const server = new FakeServer({ hello: false });
    const { tandem } = client(server, { auth: () => assert.fail("not asked") });
    await tandem.create();
    assert.deepEqual(server.last.received.map((f) => f.type), ["hello", "session:create"]);
    tandem.close();
  });

  test("authentication required without a callback: a clear error", async () => {
    const server = new FakeServer({ auth: "required" });
    const { tandem } = client(server);
    await assert.rejects(tandem.create(), (e) => e.code === "unauthorized");
  });
});

test("Node without a WebSocket gets a clear error", () => {
  const saved = globalThis.WebSocket;
  try {
    globalThis.WebSocket = undefined;
    assert.throws(() => new Tandem({ url: URL }), /--experimental-websocket/);
  } finally {
    globalThis.WebSocket = saved;
  }
  assert.throws(() => new Tandem({ WebSocket: new FakeServer().WebSocket }), /options.url is required/);
});
