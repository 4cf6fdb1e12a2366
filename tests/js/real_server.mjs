// What the tests of tandem.js against a real Tandem process share. pytest
// (tests/test_tandem_js.py) starts the server and a control endpoint, and
// runs node with TANDEM_URL (the WebSocket) and TANDEM_CONTROL (kill -9,
// start, drain the server) in the environment.
import assert from "node:assert/strict";
import { after } from "node:test";

import { Tandem } from "../../static/tandem.js";

export const URL = process.env.TANDEM_URL;
const CONTROL = process.env.TANDEM_CONTROL;
if (!URL || !CONTROL) throw new Error("run through pytest: tests/test_tandem_js.py sets TANDEM_URL and TANDEM_CONTROL");

/** Quick retries: the tests wait for restarts. */
export const FAST = { backoffBase: 100, backoffCap: 1000, heartbeat: 0 };

/** Ask pytest to act on the server: "kill" (kill -9), "start", "drain" (SIGTERM, wait for exit 0). */
export async function control(action) {
  const response = await fetch(`${CONTROL}/${action}`);
  const text = await response.text();
  assert.equal(response.status, 200, `control ${action}: ${text}`);
  return text;
}

// Every client a test made is closed when the file is done, passed or failed:
// an open socket or a reconnect timer would keep node running.
const everyClient = [];
after(() => {
  for (const tandem of everyClient) tandem.close();
});

/** A client recording its events; `of(type)` lists them, `data()` the messages' data in order. */
export function member(options = {}) {
  const tandem = new Tandem({ url: URL, ...FAST, ...options });
  everyClient.push(tandem);
  const events = [];
  for (const type of ["state", "paired", "message", "presence", "peer_left", "expired", "error", "ack", "resumed"]) {
    tandem.on(type, (event) => events.push({ type, ...event }));
  }
  const of = (type) => events.filter((e) => e.type === type);
  return { tandem, events, of, data: () => of("message").map((e) => e.data), seqs: () => of("message").map((e) => e.seq) };
}

/** Two members of one new session, both past `paired`. */
export async function pair(optionsA = {}, optionsB = {}) {
  const a = member(optionsA);
  const b = member(optionsB);
  const { code } = await a.tandem.create();
  await b.tandem.join(code);
  await until(() => a.of("paired").length === 1 && b.of("paired").length === 1, 5000, "paired");
  return { a, b, code };
}

/** Resolve once `check()` is truthy (polling), fail after `within` ms. */
export async function until(check, within = 10_000, what = "condition") {
  const deadline = Date.now() + within;
  for (;;) {
    const value = check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${within} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** Strictly increasing: each seq once, in order. */
export function assertAscending(seqs) {
  for (let i = 1; i < seqs.length; i++) assert.ok(seqs[i] > seqs[i - 1], `seqs not ascending: ${seqs}`);
}

/**
 * A WebSocket class (Node's own underneath) that can lose the next `dropAcks`
 * `message:ack` frames, as if the connection had died between the server's
 * write and the client's read: the message is stored, the client does not know.
 */
export function lossyWebSocket() {
  const knobs = { dropAcks: 0, dropped: 0 };
  class LossyWebSocket {
    constructor(url, protocols) {
      this.ws = new WebSocket(url, protocols);
      this.onopen = this.onmessage = this.onerror = this.onclose = null;
      this.ws.onopen = (event) => this.onopen?.(event);
      this.ws.onerror = (event) => this.onerror?.(event);
      this.ws.onclose = (event) => this.onclose?.(event);
      this.ws.onmessage = (event) => {
        if (knobs.dropAcks > 0 && JSON.parse(event.data).type === "message:ack") {
          knobs.dropAcks -= 1;
          knobs.dropped += 1;
          return;
        }
        this.onmessage?.(event);
      };
    }

    get readyState() {
      return this.ws.readyState;
    }

    send(text) {
      this.ws.send(text);
    }

    close(code) {
      this.ws.close(code);
    }
  }
  return { WebSocket: LossyWebSocket, knobs };
}

export function closeAll(...members) {
  for (const m of members) m.tandem.close();
}
