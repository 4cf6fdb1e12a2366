// tandem.js against a real Tandem process with authentication on
// (AUTH_JWT_SECRET below, AUTH_LEEWAY=0): hello, auth from the callback, a
// refresh before the token expires, and a client without a token refused.
// Run by tests/test_tandem_js.py, which starts the server with this secret.
import assert from "node:assert/strict";
import crypto from "node:crypto";
import { test } from "node:test";

import { closeAll, member, pair, until } from "./real_server.mjs";

export const SECRET = "tandem-js-test-secret-of-32-chars!";

/** An HS256 JWT for `sub`, valid for `ttl` seconds. */
function jwtFor(sub, ttl) {
  const part = (object) => Buffer.from(JSON.stringify(object)).toString("base64url");
  const input = `${part({ alg: "HS256", typ: "JWT" })}.${part({ sub, exp: Math.floor(Date.now() / 1000) + ttl })}`;
  return `${input}.${crypto.createHmac("sha256", SECRET).update(input).digest("base64url")}`;
}

/** An auth callback that counts its calls by reason. */
function tokens(sub, ttl) {
  const reasons = [];
  return {
    reasons,
    auth: ({ reason }) => {
      reasons.push(reason);
      return jwtFor(sub, ttl);
    },
  };
}

test("authenticated members pair, and a short token is refreshed before it expires", { timeout: 30_000 }, async () => {
  const alice = tokens("alice", 4); // refreshed a fifth of its life before exp
  const bob = tokens("bob", 300);
  const { a, b } = await pair({ auth: alice.auth }, { auth: bob.auth });
  const users = [];
  a.tandem.on("auth", (event) => users.push(event.user));
  await a.tandem.send("hello bob");
  await until(() => b.data().length === 1, 5000, "bob got it");
  assert.deepEqual(b.data(), ["hello bob"]);
  await until(() => alice.reasons.includes("refresh"), 6000, "a refresh");
  await until(() => users.length > 0, 5000, "the refresh's auth:ok"); // a round trip after the callback
  assert.deepEqual(users, ["alice"], "the refresh was accepted for the same user");
  await new Promise((resolve) => setTimeout(resolve, 1500)); // past the first token's exp
  await a.tandem.send("still here");
  await until(() => b.data().length === 2, 5000, "the second message");
  assert.equal(a.of("state").filter((e) => e.state === "reconnecting").length, 0, "the refresh kept the socket");
  assert.deepEqual(alice.reasons.slice(0, 2), ["connect", "refresh"]);
  closeAll(a, b);
});

test("a client without a token is refused: unauthorized", { timeout: 15_000 }, async () => {
  const anonymous = member();
  await assert.rejects(anonymous.tandem.create(), (error) => error.code === "unauthorized");
  closeAll(anonymous);
});
