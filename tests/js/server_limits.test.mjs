// tandem.js against a real Tandem process with a tight message rate limit
// (RATE_LIMIT_MESSAGES_USER=3/2): refused sends wait retry_after and are sent
// again with their mid, each stored once. Run by tests/test_tandem_js.py.
import assert from "node:assert/strict";
import { test } from "node:test";

import { assertAscending, closeAll, pair, until } from "./real_server.mjs";

test("rate_limited sends are retried after retry_after, each stored once", { timeout: 30_000 }, async () => {
  const { a, b } = await pair();
  const started = Date.now();
  const seqs = await Promise.all([1, 2, 3, 4, 5].map((n) => a.tandem.send(`m${n}`)));
  const elapsed = Date.now() - started;
  assert.equal(new Set(seqs).size, 5);
  const limited = a.of("error").filter((e) => e.code === "rate_limited");
  assert.ok(limited.length >= 2, "the 4th and 5th were refused at first");
  assert.ok(limited.every((e) => typeof e.retryAfter === "number" && e.retryAfter > 0));
  assert.ok(elapsed >= 1500, `waited for the window (3 per 2 s), took ${elapsed} ms`);
  await until(() => b.data().length === 5, 5000, "all five delivered");
  assert.deepEqual([...b.data()].sort(), ["m1", "m2", "m3", "m4", "m5"]);
  assertAscending(b.seqs());
  assert.equal(a.of("state").filter((e) => e.state === "reconnecting").length, 0, "no reconnect for a rate limit");
  closeAll(a, b);
});
