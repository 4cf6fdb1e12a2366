// tandem.js against a real Tandem process that is killed (-9) and restarted,
// or drained (SIGTERM, close 1012) and restarted. Run by tests/test_tandem_js.py.
import assert from "node:assert/strict";
import { test } from "node:test";

import { assertAscending, closeAll, control, lossyWebSocket, member, pair, until } from "./real_server.mjs";

test("kill -9 and restart: both resume, the unacked send is resent once, nothing lost or doubled", { timeout: 60_000 }, async () => {
  const lossy = lossyWebSocket();
  const { a, b } = await pair({ WebSocket: lossy.WebSocket });
  assert.equal(await a.tandem.send("a1"), 1);
  // a2 is stored and delivered, but A never reads its ack.
  lossy.knobs.dropAcks = 1;
  const a2 = a.tandem.send("a2 ack lost");
  await until(() => b.data().includes("a2 ack lost"), 5000, "a2 delivered");
  await b.tandem.send("b1");
  await until(() => a.data().includes("b1"), 5000, "b1 delivered");
  assert.equal(lossy.knobs.dropped, 1);
  assert.deepEqual(a.tandem.unacked.map((u) => u.data), ["a2 ack lost"]);

  await control("kill");
  await until(() => a.tandem.state === "reconnecting" && b.tandem.state === "reconnecting", 5000, "both reconnecting");
  const a3 = a.tandem.send("a3 while down");
  const b2 = b.tandem.send("b2 while down");
  await control("start");

  assert.equal(await a2, 2, "the resend is acknowledged with the first seq");
  const a3seq = await a3;
  const b2seq = await b2;
  const duplicate = a.of("ack").find((e) => e.seq === 2);
  assert.equal(duplicate.duplicate, true, "acknowledged as a duplicate: stored once");
  await until(() => b.data().length === 3 && a.data().length === 2, 10_000, "everything delivered");
  assert.deepEqual(b.data(), ["a1", "a2 ack lost", "a3 while down"]);
  assert.deepEqual(a.data(), ["b1", "b2 while down"]);
  assertAscending(b.seqs());
  assertAscending(a.seqs());
  assert.ok(b.seqs().includes(a3seq) && a.seqs().includes(b2seq));
  assert.deepEqual(a.of("resumed").map((e) => e.recovered), [true]);
  assert.deepEqual(b.of("resumed").map((e) => e.recovered), [true]);
  closeAll(a, b);
});

test("the offline queue is bounded while the server is down", { timeout: 60_000 }, async () => {
  const { a, b } = await pair({ maxQueue: 3 });
  await control("kill");
  await until(() => a.tandem.state === "reconnecting", 5000, "reconnecting");
  const queued = [a.tandem.send("q1"), a.tandem.send("q2"), a.tandem.send("q3")];
  await assert.rejects(a.tandem.send("q4"), (e) => e.code === "queue_full" && /3 messages are waiting/.test(e.message));
  await control("start");
  const seqs = await Promise.all(queued);
  assertAscending(seqs);
  await until(() => b.data().length === 3, 10_000, "queued sends delivered");
  assert.deepEqual(b.data(), ["q1", "q2", "q3"]);
  closeAll(a, b);
});

test("SIGTERM drain (1012): reconnect at once, resume after the restart", { timeout: 60_000 }, async () => {
  const { a, b } = await pair();
  await a.tandem.send("before");
  await until(() => b.data().length === 1, 5000, "before delivered");
  const exit = await control("drain"); // returns once the server exited (0) and a new one listens
  assert.equal(exit.trim(), "0");
  for (const m of [a, b]) {
    const after = m.of("state").find((e) => e.state === "reconnecting");
    assert.equal(after.closeCode, 1012, "closed with 1012");
    assert.ok(after.delay < 250, `the first attempt comes at once, not after a backoff: ${after.delay} ms`);
  }
  const during = a.tandem.send("during the restart");
  await until(() => a.tandem.state === "open" && b.tandem.state === "open", 10_000, "both back");
  await during;
  await b.tandem.send("after");
  await until(() => b.data().length === 2 && a.data().length === 1, 10_000, "delivered after the drain");
  assert.deepEqual(b.data(), ["before", "during the restart"]);
  assert.deepEqual(a.data(), ["after"]);
  closeAll(a, b);
});
