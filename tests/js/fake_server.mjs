// A fake WebSocket class with a small in-memory Tandem server behind it, for
// the unit tests of tandem.js: each test scripts what the server does
// (refuse, close with a code, answer an error, lose an ack) and checks what the
// client sends. Time is real but short: the tests set small backoffs.

/** @typedef {{ type: string, id?: number | string, [key: string]: any }} Frame */

export class FakeServer {
  constructor({ auth = "none", hello = true } = {}) {
    /** "none", "required" (protocol 1.1 authentication), as `welcome` says */
    this.auth = auth;
    /** false: a version 1 server, `hello` is an unknown type */
    this.hello = hello;
    /** every socket the client opened, oldest first */
    this.sockets = [];
    /** messages stored: { seq, from, mid, data } */
    this.stored = [];
    this.members = new Map(); // clientId -> token
    this.code = "ABCD2345";
    this.refuse = 0; // refuse this many connections (closed 1006 before opening)
    /** hooks: (socket, frame) => true when handled (the default handling is skipped) */
    this.intercept = null;
    this.tokens = []; // auth tokens received
    this.authExpiresIn = 3_600_000;
  }

  /** The WebSocket class to give to `new Tandem({ WebSocket })`. */
  get WebSocket() {
    const server = this;
    return class extends FakeSocket {
      constructor(url, protocol) {
        super(server, url, protocol);
      }
    };
  }

  get last() {
    return this.sockets.at(-1);
  }

  /** Frames of `type` the client sent, over every socket. */
  sent(type) {
    return this.sockets.flatMap((s) => s.received).filter((f) => f.type === type);
  }

  /** The default behaviour: a tiny Tandem server. @param {FakeSocket} socket @param {Frame} frame */
  handle(socket, frame) {
    if (this.intercept && this.intercept(socket, frame)) return;
    const reply = (fields) => socket.push({ ...fields, id: frame.id });
    switch (frame.type) {
      case "hello":
        if (!this.hello) return reply({ type: "error", code: "unknown_type", message: "unknown type hello" });
        return reply({
          type: "welcome",
          protocol: "1.1",
          server: "tandem/fake",
          auth: this.auth,
          limits: { max_message_bytes: 65536, history_size: 100, session_idle_timeout: 1800, session_ttl: 86400 },
          time: Date.now(),
        });
      case "auth":
        this.tokens.push(frame.token);
        if (this.auth !== "required") return reply({ type: "error", code: "bad_request", message: "auth is off" });
        if (frame.token.startsWith("bad")) return reply({ type: "error", code: "unauthorized", message: "bad signature" });
        socket.authenticated = true;
        return reply({ type: "auth:ok", user: "u1", expires_at: Date.now() + this.authExpiresIn });
      case "ping":
        return socket.push({ type: "pong", ts: Date.now() });
      default:
    }
    if (this.auth === "required" && !socket.authenticated) {
      return reply({ type: "error", code: "unauthorized", message: "authenticate first" });
    }
    switch (frame.type) {
      case "session:create":
        socket.member = "me";
        this.members.set("me", "tok-me");
        return reply({ type: "session:created", code: this.code, client_id: "me", token: "tok-me", expires_at: 0 });
      case "session:join":
        socket.member = "me";
        this.members.set("peer", "tok-peer");
        this.members.set("me", "tok-me");
        reply({
          type: "session:joined",
          code: this.code,
          client_id: "me",
          token: "tok-me",
          clients: [
            { client_id: "peer", online: true },
            { client_id: "me", online: true },
          ],
          last_seq: this.stored.length,
        });
        for (const m of this.stored) if (m.from !== "me") socket.push(this.messageFrame(m));
        return;
      case "session:resume": {
        if (this.members.get(frame.client_id) !== frame.token || frame.code !== this.code) {
          return reply({ type: "error", code: "not_found", message: "no such session, or wrong client_id or token" });
        }
        socket.member = frame.client_id;
        reply({
          type: "session:resumed",
          code: this.code,
          client_id: frame.client_id,
          clients: [...this.members.keys()].map((id) => ({ client_id: id, online: id === frame.client_id })),
          last_seq: this.stored.length,
          recovered: this.recovered ?? true,
        });
        for (const m of this.stored) {
          if (m.seq > frame.last_seq && m.from !== frame.client_id) socket.push(this.messageFrame(m));
        }
        return;
      }
      case "message:send": {
        const old = this.stored.find((m) => m.from === socket.member && m.mid === frame.mid);
        if (old) return reply({ type: "message:ack", seq: old.seq, duplicate: true });
        const m = { seq: this.stored.length + 1, from: socket.member, mid: frame.mid, data: frame.data };
        this.stored.push(m);
        return reply({ type: "message:ack", seq: m.seq });
      }
      case "session:leave":
        return reply({ type: "session:left", code: this.code });
      default:
        return reply({ type: "error", code: "unknown_type", message: `unknown type ${frame.type}` });
    }
  }

  /** A peer's message, stored and (when `live`) sent to the client's socket. */
  peerSends(data, { live = true } = {}) {
    const m = { seq: this.stored.length + 1, from: "peer", mid: `p${this.stored.length + 1}`, data };
    this.stored.push(m);
    if (live && this.last && this.last.readyState === 1) this.last.push(this.messageFrame(m));
    return m;
  }

  messageFrame(m) {
    return { type: "message", code: this.code, seq: m.seq, from: m.from, data: m.data, ts: Date.now(), mid: m.mid };
  }
}

/** One fake connection; the client sees a WHATWG WebSocket. */
class FakeSocket {
  constructor(server, url, protocol) {
    this.server = server;
    this.url = url;
    this.protocol = protocol;
    this.readyState = 0;
    this.received = []; // frames from the client
    this.onopen = this.onmessage = this.onerror = this.onclose = null;
    this.closedByClient = null;
    server.sockets.push(this);
    this.openedAt = Date.now();
    setTimeout(() => {
      if (this.readyState !== 0) return;
      if (server.refuse > 0) {
        server.refuse -= 1;
        this.readyState = 3;
        this.onerror?.({});
        this.onclose?.({ code: 1006 });
        return;
      }
      this.readyState = 1;
      this.onopen?.({});
    }, 1);
  }

  send(text) {
    if (this.readyState !== 1) throw new Error("not open");
    const frame = JSON.parse(text);
    this.received.push(frame);
    // The server answers on a later task, as a real one does.
    setTimeout(() => this.readyState === 1 && this.server.handle(this, frame), 0);
  }

  close(code = 1000) {
    if (this.readyState >= 2) return;
    this.closedByClient = code;
    this.readyState = 3;
    setTimeout(() => this.onclose?.({ code }), 0);
  }

  /** The server sends a frame. */
  push(frame) {
    if (this.readyState !== 1) return;
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  /** The server closes the connection with `code` (1006: it just vanished). */
  serverClose(code) {
    if (this.readyState >= 2) return;
    this.readyState = 3;
    setTimeout(() => this.onclose?.({ code }), 0);
  }
}

/** Resolve once `check()` is truthy (polling every 5 ms), fail after `within` ms. */
export async function until(check, within = 2000, what = "condition") {
  const deadline = Date.now() + within;
  for (;;) {
    const value = check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
