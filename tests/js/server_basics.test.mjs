// tandem.js against a real Tandem process (HISTORY_SIZE=5): create, join,
// exchange, serialise and restore, recovered: false. Run by tests/test_tandem_js.py.
import assert from "node:assert/strict";
import { test } from "node:test";

import { assertAscending, closeAll, member, pair, until } from "./real_server.mjs";

test("create, join by a typed code, exchange both ways", { timeout: 30_000 }, async () => {
  const a = member();
  const b = member();
  const { code } = await a.tandem.create();
  assert.match(code, /^[0-9A-HJKMNP-TV-Z]{8}$/);
  assert.deepEqual(a.tandem.peers, []);
  // As a person might type it: lower case, a dash, O for 0 and l for 1.
  const typed = `${code.slice(0, 4)}-${code.slice(4)}`.toLowerCase().replace(/0/g, "o").replace(/1/g, "l");
  const joined = await b.tandem.join(typed);
  assert.equal(joined.code, code);
  await until(() => a.of("paired").length === 1 && b.of("paired").length === 1, 5000, "paired");
  assert.deepEqual(a.tandem.peers, [{ clientId: b.tandem.clientId, online: true }]);

  const seqs = [];
  for (let i = 1; i <= 3; i++) seqs.push(await a.tandem.send({ text: `a${i}` }));
  assertAscending(seqs);
  seqs.push(await b.tandem.send({ text: "b1" }));
  await until(() => b.of("message").length === 3 && a.of("message").length === 1, 5000, "delivered");
  assert.deepEqual(b.data(), [{ text: "a1" }, { text: "a2" }, { text: "a3" }]);
  assert.deepEqual(b.seqs(), seqs.slice(0, 3));
  assert.deepEqual(a.data(), [{ text: "b1" }]);
  assert.ok(b.of("message").every((m) => m.from === a.tandem.clientId && typeof m.mid === "string"));

  b.tandem.close(); // the peer drops without leaving: presence
  await until(() => a.of("presence").some((e) => e.online === false), 5000, "presence offline");
  assert.equal(a.tandem.peers[0].online, false);
  closeAll(a);
});

test("serialise, close, restore in a new client: nothing lost, nothing twice", { timeout: 30_000 }, async () => {
  const { a, b } = await pair();
  await a.tandem.send("a1");
  await b.tandem.send("b1");
  await until(() => a.of("message").length === 1);
  // A goes away (a page reload) with one send never acknowledged: queued while closed.
  a.tandem.close();
  const unacked = a.tandem.send("a2 queued while away");
  unacked.catch(() => {});
  const saved = JSON.parse(JSON.stringify(a.tandem.serialize()));
  assert.equal(saved.lastSeq, 2);
  assert.deepEqual(saved.unacked.map((u) => u.data), ["a2 queued while away"]);
  await b.tandem.send("b2 while A was away");

  const restored = member();
  await restored.tandem.resume(saved);
  assert.equal(restored.tandem.clientId, a.tandem.clientId);
  await until(() => restored.of("message").length === 1 && restored.of("ack").length === 1, 5000, "caught up");
  assert.deepEqual(restored.data(), ["b2 while A was away"]); // b1 was seen before: not again
  await until(() => b.of("message").length === 2, 5000, "B has A's queued send");
  assert.deepEqual(b.data(), ["a1", "a2 queued while away"]);
  assertAscending(b.seqs());
  await until(() => b.tandem.peers[0]?.online === true, 5000, "A online again");
  closeAll(restored, b);
});

test("a resume past history reports recovered: false", { timeout: 30_000 }, async () => {
  const { a, b } = await pair();
  const saved = b.tandem.serialize();
  b.tandem.close();
  for (let i = 1; i <= 8; i++) await a.tandem.send(i); // HISTORY_SIZE=5: 1 to 3 are gone
  const back = member();
  await back.tandem.resume(saved);
  await until(() => back.of("message").length === 5, 5000, "the 5 kept");
  assert.deepEqual(back.of("resumed").map((e) => e.recovered), [false]);
  assert.deepEqual(back.data(), [4, 5, 6, 7, 8]);
  closeAll(a, back);
});

test("leave: the peer is told; the credentials stop working", { timeout: 30_000 }, async () => {
  const { a, b } = await pair();
  const saved = b.tandem.serialize();
  await b.tandem.leave();
  await until(() => a.of("peer_left").length === 1, 5000, "peer_left");
  assert.deepEqual(a.tandem.peers, []);
  const ghost = member();
  await assert.rejects(ghost.tandem.resume(saved), (e) => e.code === "session_gone");
  assert.deepEqual(ghost.of("expired").map((e) => e.reason), ["gone"]);
  closeAll(a);
});

test("join errors come back as TandemError codes", { timeout: 30_000 }, async () => {
  const { a, b, code } = await pair();
  const third = member().tandem;
  await assert.rejects(third.join(code), (e) => e.code === "session_full");
  assert.equal(third.state, "closed");
  await assert.rejects(third.join("ZZZZ9999"), (e) => e.code === "not_found");
  closeAll(a, b);
});
