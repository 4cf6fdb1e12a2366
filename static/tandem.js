// @ts-check
/**
 * tandem.js: the client of a Tandem pairing relay, for browsers and Node 18+.
 *
 * One dependency-free ES module, no build step. It keeps Tandem's delivery
 * promise for the application: it reconnects by itself (exponential backoff
 * with full jitter), resumes the session with the last seq it processed,
 * drops duplicate messages, and resends every unacknowledged message with its
 * `mid` so that the server stores it once (PROTOCOL.md, versions 1 and 1.1).
 *
 *     import { Tandem } from "/tandem.js";
 *     const tandem = new Tandem();                       // ws(s)://<this host>/ws in a browser
 *     tandem.on("message", (m) => console.log(m.seq, m.data));
 *     const { code } = await tandem.create();            // or: await tandem.join(code)
 *     const seq = await tandem.send({ text: "hello" });   // resolves once stored
 *     sessionStorage.tandem = JSON.stringify(tandem.serialize());  // carry on after a reload:
 *     // new Tandem().resume(JSON.parse(sessionStorage.tandem))
 *
 * The pure parts (backoff, the inbox that drops duplicates, the outbox of
 * unacknowledged sends, code normalisation, the close-code policy) are
 * exported on their own, so that they can be tested without a socket.
 *
 * Node: Node 22 has a global WebSocket; Node 20 needs `--experimental-websocket`;
 * on Node 18 pass a WHATWG-compatible implementation as `options.WebSocket`.
 */

/** The WebSocket subprotocol Tandem selects when the client offers it. */
export const SUBPROTOCOL = "tandem.v1";

/** Defaults of the options of `new Tandem(options)`; times in milliseconds. */
export const DEFAULTS = Object.freeze({
  /** First backoff ceiling: attempt n waits a random time in [0, min(cap, base * 2^n)). */
  backoffBase: 500,
  /** Largest backoff ceiling. */
  backoffCap: 10_000,
  /** After close 1012 (server restarting) the first attempt waits a random time below this. */
  restartDelay: 250,
  /** Unacknowledged sends kept at most (queued while offline, or in flight). */
  maxQueue: 100,
  /** Largest frame the server accepts (its MAX_MESSAGE_BYTES); `welcome` may lower it. */
  maxMessageBytes: 65_536,
  /** Time a socket may take to open. */
  connectTimeout: 10_000,
  /** Time create, join, resume, hello and auth may wait for their reply. */
  requestTimeout: 10_000,
  /** A ping this often while connected; silence for twice as long drops the socket. 0: off. */
  heartbeat: 15_000,
  /** The auth callback is called again this long (at most a fifth of the token's life) before it expires. */
  authMargin: 60_000,
  /** Time leave() waits for a connection before it gives up telling the server. */
  leaveTimeout: 5_000,
});

/** The alphabet of session codes: Crockford's base32, 0-9 and A-Z without I, L, O, U. */
export const CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const CODE_PATTERN = /^[0-9A-HJKMNP-TV-Z]{6,12}$/;

/** The version of `serialize()`'s format. */
const SESSION_FORMAT = 1;
const MAX_MID_CHARS = 64;
// The largest request id written into a frame when its size is checked in advance.
const ID_PLACEHOLDER = Number.MAX_SAFE_INTEGER;
// Server errors after which a request may simply be tried again later.
const RETRYABLE = new Set(["rate_limited", "unavailable", "internal"]);

/**
 * An error of Tandem: a server `error` frame, or one the client raised itself.
 * `code` is the protocol's error code (`not_found`, `rate_limited`, ...) or one
 * of the client's: `queue_full`, `too_big`, `bad_code`, `not_in_session`,
 * `busy`, `connect_failed`, `disconnected`, `timeout`, `closed`, `replaced`,
 * `session_gone`, `left`, `protocol_error`, `policy`.
 */
export class TandemError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{ retryAfter?: number, closeCode?: number }} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message);
    this.name = "TandemError";
    /** @type {string} */
    this.code = code;
    /** Seconds to wait before trying again, when the server said so. @type {number | undefined} */
    this.retryAfter = extra.retryAfter;
    /** The WebSocket close code, when the connection closed. @type {number | undefined} */
    this.closeCode = extra.closeCode;
  }

  /**
   * The error a server frame stands for: an `error` frame, or a reply of an unexpected type.
   * @param {any} frame
   * @returns {TandemError}
   */
  static fromFrame(frame) {
    if (frame && frame.type === "error") {
      const retryAfter = typeof frame.retry_after === "number" ? frame.retry_after : undefined;
      return new TandemError(String(frame.code), String(frame.message ?? frame.code), { retryAfter });
    }
    return new TandemError("protocol_error", `unexpected reply ${JSON.stringify(frame).slice(0, 200)}`);
  }
}

// --- the pure parts ---------------------------------------------------------------

/**
 * A session code as the server expects it, from what a person typed: any case,
 * spaces and hyphens ignored, the ambiguous letters forgiven as in Crockford's
 * base32 (I and L read as 1, O as 0). Throws TandemError `bad_code` otherwise.
 * @param {string} input
 * @returns {string}
 */
export function normaliseCode(input) {
  // NFKC first: a full-width "ＡＢ" typed on a phone keyboard is "AB".
  const compact = String(input).normalize("NFKC").replace(/[\s\-_.]/g, "");
  // ASCII before upper-casing: "ß".toUpperCase() is "SS", a code is only ever ASCII.
  if (!/^[\x21-\x7e]*$/.test(compact)) {
    throw new TandemError("bad_code", "a code holds only the letters A-Z and the digits 0-9");
  }
  const code = compact.toUpperCase().replace(/[IL]/g, "1").replace(/O/g, "0");
  if (!CODE_PATTERN.test(code)) {
    const why = code.includes("U") ? "codes never contain the letter U" : "a code is 6 to 12 letters and digits";
    throw new TandemError("bad_code", `not a session code: ${why}`);
  }
  return code;
}

/**
 * Exponential backoff with full jitter: a random delay in [0, min(cap, base * 2^attempt)).
 * @param {number} attempt failed attempts so far (0 for the first retry)
 * @param {{ base?: number, cap?: number, random?: () => number }} [options]
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, { base = DEFAULTS.backoffBase, cap = DEFAULTS.backoffCap, random = Math.random } = {}) {
  const ceiling = Math.min(cap, base * 2 ** Math.min(Math.max(0, attempt), 30));
  return Math.floor(random() * ceiling);
}

/**
 * What to do after the server closed the connection with `code` while in a session
 * (PROTOCOL.md, "Close codes").
 * @param {number} code
 * @param {{ auth?: boolean }} [context] `auth`: the client can fetch a fresh token
 * @returns {{ retry: boolean, reason: string, immediate?: boolean, minAttempt?: number }}
 */
export function closePolicy(code, { auth = false } = {}) {
  switch (code) {
    case 1000: // another connection resumed this member: resuming back would steal it in turn
      return { retry: false, reason: "replaced" };
    case 1002: // a WebSocket protocol error
    case 1003: // a binary frame
    case 1007: // invalid UTF-8: a bug that a reconnect would repeat
      return { retry: false, reason: "protocol_error" };
    case 1008: // authentication expired (retry with a fresh token), or too many errors in a row (a bug)
      return auth ? { retry: true, reason: "auth_expired", minAttempt: 1 } : { retry: false, reason: "policy" };
    case 1009: // the frame that was too big is dropped by the caller, then the rest resumes
      return { retry: true, reason: "too_big", minAttempt: 1 };
    case 1012: // the server is restarting: come back at once (with a little jitter)
      return { retry: true, reason: "restart", immediate: true };
    case 1013: // overloaded, or this client read too slowly: back off
      return { retry: true, reason: "overloaded", minAttempt: 1 };
    default: // 1006 (network, crash), 1011, anything else
      return { retry: true, reason: "dropped" };
  }
}

/**
 * The messages received, by seq: each is delivered once, in seq order.
 *
 * The server sends a connection's messages in seq order, and a resume replays
 * those above the `last_seq` it is given, so a message is new exactly when its
 * seq is above the highest one delivered. Seqs are per session and the
 * member's own sends take some, so the seqs delivered have gaps: a message is
 * never held back waiting for a missing seq.
 */
export class Inbox {
  /** @param {number} [lastSeq] the highest seq already delivered */
  constructor(lastSeq = 0) {
    /** The highest seq delivered: `last_seq` of the next resume. */
    this.lastSeq = lastSeq;
  }

  /**
   * Whether the message with `seq` is new; if so it counts as delivered.
   * @param {unknown} seq
   * @returns {boolean}
   */
  accept(seq) {
    if (typeof seq !== "number" || !Number.isSafeInteger(seq) || seq <= this.lastSeq) return false;
    this.lastSeq = seq;
    return true;
  }
}

/**
 * @typedef {object} OutboxEntry
 * @property {string} mid the message's id, the same on every resend
 * @property {string} json its data as JSON text, exactly as first given
 * @property {number | null} id the request id on the current connection; null while not sent on it
 * @property {{ resolve: (seq: number) => void, reject: (error: TandemError) => void }[]} waiters the send() promises
 */

/**
 * The unacknowledged sends, oldest first, at most `limit` of them. An entry
 * stays until its `message:ack`; a new connection sends every entry again.
 */
export class Outbox {
  /** @param {number} [limit] */
  constructor(limit = DEFAULTS.maxQueue) {
    this.limit = limit;
    /** @type {OutboxEntry[]} */
    this.entries = [];
  }

  get size() {
    return this.entries.length;
  }

  /**
   * Add a send; TandemError `queue_full` when `limit` sends wait already.
   * @param {string} mid
   * @param {string} json
   * @returns {OutboxEntry}
   */
  add(mid, json) {
    if (this.entries.length >= this.limit) {
      throw new TandemError(
        "queue_full",
        `${this.entries.length} messages are waiting for the server (the limit is ${this.limit}): ` +
          "wait until some are acknowledged, or raise maxQueue",
      );
    }
    if (this.entries.some((entry) => entry.mid === mid)) {
      throw new TandemError("bad_request", `mid ${JSON.stringify(mid)} is already waiting`);
    }
    /** @type {OutboxEntry} */
    const entry = { mid, json, id: null, waiters: [] };
    this.entries.push(entry);
    return entry;
  }

  /** The entries not sent on the current connection, oldest first. */
  unsent() {
    return this.entries.filter((entry) => entry.id === null);
  }

  /** The oldest entry sent on the current connection and not acknowledged. */
  firstInFlight() {
    return this.entries.find((entry) => entry.id !== null);
  }

  /** @param {OutboxEntry} entry @param {number} id */
  markSent(entry, id) {
    entry.id = id;
  }

  /** Send `entry` again (after a refusal the server asked to retry). @param {OutboxEntry} entry */
  requeue(entry) {
    entry.id = null;
  }

  /** The connection is gone: every entry is to be sent on the next one. */
  resetWire() {
    for (const entry of this.entries) entry.id = null;
  }

  /** @param {OutboxEntry} entry */
  remove(entry) {
    const at = this.entries.indexOf(entry);
    if (at >= 0) this.entries.splice(at, 1);
  }

  /** Empty it; returns what it held. */
  clear() {
    const entries = this.entries;
    this.entries = [];
    return entries;
  }

  /** The entries as `serialize()` keeps them. @returns {{ mid: string, data: unknown }[]} */
  serialise() {
    return this.entries.map((entry) => ({ mid: entry.mid, data: JSON.parse(entry.json) }));
  }
}

/**
 * A fresh `mid`: 128 random bits, URL-safe base64 (22 characters).
 * @returns {string}
 */
export function newMid() {
  const bytes = new Uint8Array(16);
  const webCrypto = globalThis.crypto;
  if (webCrypto && typeof webCrypto.getRandomValues === "function") {
    webCrypto.getRandomValues(bytes);
  } else {
    // Node 18 without a global crypto: a mid needs uniqueness, not secrecy.
    for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  }
  let text = "";
  for (const byte of bytes) text += String.fromCharCode(byte);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

const encoder = new TextEncoder();

/** @param {string} text */
function utf8Bytes(text) {
  return encoder.encode(text).length;
}

/** @param {unknown} clients @param {string | undefined} self */
function othersOf(clients, self) {
  if (!Array.isArray(clients)) return [];
  return clients
    .filter((client) => client && client.client_id !== self)
    .map((client) => ({ clientId: String(client.client_id), online: client.online !== false }));
}

/** @param {unknown} error */
function asTandemError(error) {
  if (error instanceof TandemError) return error;
  const message = error instanceof Error ? error.message : String(error);
  return new TandemError("internal", message);
}

// --- the client --------------------------------------------------------------------

/**
 * @typedef {"connecting" | "open" | "reconnecting" | "closed"} TandemState
 * @typedef {{ clientId: string, online: boolean }} Peer
 * @typedef {{ version: 1, code: string, clientId: string, token: string, lastSeq: number,
 *   unacked: { mid: string, data: unknown }[] }} SavedSession
 * @typedef {{ settle: (frame: any) => void, fail: (error: TandemError) => void }} Pending
 */

/**
 * A member of a Tandem session, connected or reconnecting.
 *
 * Events (`on(type, listener)`; each listener gets one object):
 * - `state` `{state, previous, reason?, closeCode?, delay?}`: the state changed
 *   (`delay`: milliseconds until the next attempt, when reconnecting);
 * - `paired` `{code, peers}`, `presence` `{clientId, online}`,
 *   `peer_left` `{clientId}`: the server's session events;
 * - `message` `{seq, from, data, ts, mid}`: a message from the peer, once, in seq order;
 * - `ack` `{mid, seq, duplicate}`: a send was stored (also for sends restored by resume());
 * - `resumed` `{recovered, lastSeq}`: back in the session; `recovered: false`
 *   means that messages were lost to this member (history moved on);
 * - `expired` `{code, reason}`: the session is over (`idle`, `ttl`, `ended`, or
 *   `gone` when a resume found it no more);
 * - `error` `{code, message, retryAfter?, fatal, mid?}`: an error frame without a
 *   request, a send the server refused, or why the client stopped (`fatal: true`);
 * - `auth` `{user, expiresAt}`: authenticated (protocol 1.1);
 * - `session` `{}`: what serialize() returns changed: save it now;
 * - `frame` `{direction, text}`: every frame in (`in`) and out (`out`), for logs.
 */
export class Tandem {
  /** @type {Required<Omit<import("./tandem").TandemOptions, "auth" | "WebSocket" | "url">>} */
  #opts;
  /** @type {string} */
  #url;
  /** @type {import("./tandem").WebSocketConstructor} */
  #WebSocket;
  /** @type {import("./tandem").TandemOptions["auth"]} */
  #auth;

  /** @type {TandemState} */
  #state = "closed";
  /** @type {any} the current socket; null between sockets */
  #ws = null;
  /** @type {{ code: string, clientId: string, token: string } | null} */
  #session = null;
  /** @type {Peer[]} */
  #peers = [];
  #inbox = new Inbox();
  /** @type {Outbox} */
  #outbox;
  /** @type {Map<string, Set<(event: any) => void>>} */
  #listeners = new Map();

  #nextId = 1;
  /** @type {Map<number, Pending>} */
  #pending = new Map();
  /** A create, join or resume is connecting: it, not the close handler, decides what follows a close. */
  #establishing = false;
  #lastCloseCode = 1006;
  /** Consecutive failed attempts: the backoff exponent. */
  #attempt = 0;
  /** @type {{ resolve: () => void, reject: (error: TandemError) => void }[]} */
  #openWaiters = [];
  #maxBytes = 0;
  #lastHeard = 0;
  /** Server clock minus ours, from `welcome`. */
  #skew = 0;
  #sendsPausedUntil = 0;
  /** @type {ReturnType<typeof setTimeout> | null} */
  #retryTimer = null;
  /** @type {ReturnType<typeof setTimeout> | null} */
  #pauseTimer = null;
  /** @type {ReturnType<typeof setTimeout> | null} */
  #authTimer = null;
  /** @type {ReturnType<typeof setInterval> | null} */
  #heartbeatTimer = null;
  /** @type {(() => void) | null} */
  #removeOnlineListener = null;

  /** @param {import("./tandem").TandemOptions} [options] */
  constructor(options = {}) {
    const { url, WebSocket: socketClass, auth, ...rest } = options;
    this.#opts = { ...DEFAULTS, random: Math.random, ...rest };
    this.#url = url ?? Tandem.#defaultUrl();
    this.#WebSocket = socketClass ?? /** @type {any} */ (globalThis).WebSocket;
    if (typeof this.#WebSocket !== "function") {
      throw new TypeError(
        "tandem.js needs a WebSocket: Node 22 has one, Node 20 needs --experimental-websocket, " +
          "Node 18 needs options.WebSocket (a WHATWG-compatible implementation)",
      );
    }
    this.#auth = auth;
    this.#outbox = new Outbox(this.#opts.maxQueue);
    this.#maxBytes = this.#opts.maxMessageBytes;
  }

  static #defaultUrl() {
    const here = /** @type {any} */ (globalThis).location;
    if (!here || !here.host) throw new TypeError("options.url is required outside a browser page");
    return `${here.protocol === "https:" ? "wss" : "ws"}://${here.host}/ws`;
  }

  // --- what the application reads ---

  /** `connecting`, `open`, `reconnecting` or `closed`. */
  get state() {
    return this.#state;
  }

  /** The session's code; null in no session. */
  get code() {
    return this.#session?.code ?? null;
  }

  /** This member's client id; null in no session. */
  get clientId() {
    return this.#session?.clientId ?? null;
  }

  /** The other members (at most one), with whether each is online. @returns {Peer[]} */
  get peers() {
    return this.#peers.map((peer) => ({ ...peer }));
  }

  /** The highest seq delivered to the application. */
  get lastSeq() {
    return this.#inbox.lastSeq;
  }

  /** The sends not acknowledged yet, oldest first. @returns {{ mid: string, data: unknown }[]} */
  get unacked() {
    return this.#outbox.serialise();
  }

  /**
   * Listen to an event; returns a function that stops listening.
   * @param {string} type
   * @param {(event: any) => void} listener
   * @returns {() => void}
   */
  on(type, listener) {
    let set = this.#listeners.get(type);
    if (!set) this.#listeners.set(type, (set = new Set()));
    set.add(listener);
    return () => this.off(type, listener);
  }

  /** @param {string} type @param {(event: any) => void} listener */
  off(type, listener) {
    this.#listeners.get(type)?.delete(listener);
  }

  // --- starting, ending ---

  /**
   * Create a session; resolves once it exists, with its code.
   * @returns {Promise<{ code: string, clientId: string }>}
   */
  create() {
    return this.#start(() =>
      this.#request({ type: "session:create" }, (reply) => {
        if (reply.type !== "session:created") throw TandemError.fromFrame(reply);
        this.#adopt(reply, []);
        return { code: reply.code, clientId: reply.client_id };
      }),
    );
  }

  /**
   * Join the session `code` (as a person typed it: see normaliseCode).
   * @param {string} code
   * @returns {Promise<{ code: string, clientId: string, peers: Peer[] }>}
   */
  join(code) {
    let normalised;
    try {
      normalised = normaliseCode(code);
    } catch (error) {
      return Promise.reject(error);
    }
    return this.#start(() =>
      this.#request({ type: "session:join", code: normalised }, (reply) => {
        if (reply.type !== "session:joined") throw TandemError.fromFrame(reply);
        this.#adopt(reply, reply.clients);
        return { code: reply.code, clientId: reply.client_id, peers: this.peers };
      }),
    );
  }

  /**
   * Resume a session: the one `saved` describes (from serialize(), after a
   * reload), or this client's own after close(). Keeps trying with backoff until
   * it is back in the session (resolves) or the session is gone (rejects).
   * @param {SavedSession | null} [saved]
   * @returns {Promise<void>}
   */
  resume(saved) {
    if (saved !== undefined && saved !== null) {
      if (this.#state !== "closed") return Promise.reject(new TandemError("busy", "resume(saved) needs a closed client"));
      try {
        this.#load(saved);
      } catch (error) {
        return Promise.reject(error);
      }
    }
    if (!this.#session) return Promise.reject(new TandemError("not_in_session", "no session to resume"));
    if (this.#state === "open") return Promise.resolve();
    const opened = this.#whenOpen();
    if (this.#state === "closed") {
      this.#attempt = 0;
      this.#setState("connecting");
      this.#watchOnline();
      this.#retryTimer = setTimeout(() => this.#reconnect(), 0);
    }
    return opened;
  }

  /**
   * Leave the session for good: the peer is told, the credentials stop working,
   * unacknowledged sends are dropped (their promises reject with `left`).
   * @returns {Promise<void>}
   */
  async leave() {
    if (!this.#session) {
      this.#stop("left");
      return;
    }
    if (this.#state === "connecting" || this.#state === "reconnecting") {
      await Promise.race([this.#whenOpen(), new Promise((resolve) => setTimeout(resolve, this.#opts.leaveTimeout))]).catch(
        () => {},
      );
    }
    if (this.#state === "open") {
      await this.#request({ type: "session:leave" }).catch(() => {});
    }
    const left = new TandemError("left", "left the session");
    this.#endSession(left);
    this.#stop("left", left);
  }

  /**
   * Close the connection and stop reconnecting, staying a member: resume() or
   * serialize() carry on later. Pending send() promises reject with `closed`
   * (their messages stay queued and are sent after a resume: see the `ack` event).
   */
  close() {
    this.#stop("closed", new TandemError("closed", "the client was closed"));
  }

  /**
   * What a later `resume(saved)` needs, as plain JSON; null in no session.
   * @returns {SavedSession | null}
   */
  serialize() {
    if (!this.#session) return null;
    return {
      version: SESSION_FORMAT,
      code: this.#session.code,
      clientId: this.#session.clientId,
      token: this.#session.token,
      lastSeq: this.#inbox.lastSeq,
      unacked: this.#outbox.serialise(),
    };
  }

  // --- sending ---

  /**
   * Send `data` (any JSON value) to the peer; resolves with its seq once the
   * server stored it. Sent at once when connected, else queued (at most
   * maxQueue unacknowledged sends) and sent after the resume, with the same
   * `mid` every time, so it is stored once.
   * @param {unknown} data
   * @param {{ mid?: string }} [options] `mid`: the message's id (default: a fresh random one)
   * @returns {Promise<number>}
   */
  send(data, options = {}) {
    try {
      if (!this.#session) throw new TandemError("not_in_session", "create, join or resume a session first");
      const mid = options.mid ?? newMid();
      if (typeof mid !== "string" || mid.length < 1 || mid.length > MAX_MID_CHARS) {
        throw new TandemError("bad_request", `a mid is a string of 1 to ${MAX_MID_CHARS} characters`);
      }
      let json;
      try {
        json = JSON.stringify(data);
      } catch (error) {
        throw new TandemError("bad_request", `data is not JSON: ${asTandemError(error).message}`);
      }
      if (json === undefined) throw new TandemError("bad_request", "data is not a JSON value");
      const size = utf8Bytes(this.#sendFrame(ID_PLACEHOLDER, mid, json));
      if (size > this.#maxBytes) {
        throw new TandemError("too_big", `the message takes ${size} bytes; the server accepts ${this.#maxBytes}`);
      }
      const entry = this.#outbox.add(mid, json);
      const promise = new Promise((resolve, reject) => entry.waiters.push({ resolve, reject }));
      this.#emit("session", {});
      this.#flush();
      return /** @type {Promise<number>} */ (promise);
    } catch (error) {
      return Promise.reject(asTandemError(error));
    }
  }

  /** @param {number} id @param {string} mid @param {string} json */
  #sendFrame(id, mid, json) {
    return `{"type":"message:send","id":${id},"mid":${JSON.stringify(mid)},"data":${json}}`;
  }

  /** Send every queued entry, in order, when connected and not told to wait. */
  #flush() {
    const ws = this.#ws;
    if (this.#state !== "open" || !ws || Date.now() < this.#sendsPausedUntil) return;
    for (const entry of this.#outbox.unsent()) {
      const id = this.#nextId++;
      this.#outbox.markSent(entry, id);
      this.#pending.set(id, { settle: (reply) => this.#onSendReply(entry, reply), fail: () => {} });
      this.#writeText(this.#sendFrame(id, entry.mid, entry.json));
    }
  }

  /** @param {OutboxEntry} entry @param {any} reply */
  #onSendReply(entry, reply) {
    if (reply.type === "message:ack") {
      this.#outbox.remove(entry);
      for (const waiter of entry.waiters) waiter.resolve(reply.seq);
      this.#emit("ack", { mid: entry.mid, seq: reply.seq, duplicate: reply.duplicate === true });
      this.#emit("session", {});
      return;
    }
    const error = TandemError.fromFrame(reply);
    this.#emit("error", { code: error.code, message: error.message, retryAfter: error.retryAfter, fatal: false, mid: entry.mid });
    if (RETRYABLE.has(error.code)) {
      // Stored or not, it is sent again with its mid after the wait: stored once either way.
      this.#outbox.requeue(entry);
      const wait = Math.max((error.retryAfter ?? 1) * 1000, backoffDelay(0, this.#backoffOptions()));
      this.#pauseSends(wait);
    } else if (error.code === "not_found" || error.code === "not_in_session") {
      // This connection no longer holds the member (expired, or taken over):
      // a resume on a new connection finds out which, and then sends it again.
      this.#outbox.requeue(entry);
      this.#dropSocket();
    } else {
      // bad_request and the like: the server will never take this message.
      this.#outbox.remove(entry);
      for (const waiter of entry.waiters) waiter.reject(error);
      this.#emit("session", {});
    }
  }

  /** @param {number} wait */
  #pauseSends(wait) {
    const until = Date.now() + wait;
    if (until <= this.#sendsPausedUntil) return;
    this.#sendsPausedUntil = until;
    if (this.#pauseTimer) clearTimeout(this.#pauseTimer);
    this.#pauseTimer = setTimeout(() => {
      this.#pauseTimer = null;
      this.#sendsPausedUntil = 0; // a timer may fire a millisecond early: never wait for a second one
      this.#flush();
    }, wait);
  }

  // --- connecting ---

  /**
   * Open a socket, authenticate if needed and run `action` (create or join);
   * on any failure the client is closed again and the promise rejects.
   * @template T
   * @param {() => Promise<T>} action
   * @returns {Promise<T>}
   */
  async #start(action) {
    if (this.#state !== "closed" || this.#session) {
      throw new TandemError("busy", "already in a session or connecting: leave() first");
    }
    this.#setState("connecting");
    this.#establishing = true;
    try {
      await this.#openSocket();
      await this.#handshake();
      return await action();
    } catch (error) {
      this.#establishing = false;
      const failure = asTandemError(error);
      // (read through a cast: the type checker would keep the "closed" it saw above)
      if (/** @type {TandemState} */ (this.#state) === "connecting") this.#stop(failure.code);
      throw failure;
    }
  }

  /** One attempt to get back into the session; schedules the next one when it fails. */
  async #reconnect() {
    this.#retryTimer = null;
    const session = this.#session;
    if (!session || (this.#state !== "reconnecting" && this.#state !== "connecting")) return;
    this.#establishing = true;
    try {
      await this.#openSocket();
      await this.#handshake();
      await this.#request(
        {
          type: "session:resume",
          code: session.code,
          client_id: session.clientId,
          token: session.token,
          last_seq: this.#inbox.lastSeq,
        },
        (reply) => this.#onResumed(reply),
      );
    } catch (error) {
      this.#establishing = false;
      if (this.#state !== "reconnecting" && this.#state !== "connecting") return; // closed meanwhile
      this.#discardSocket();
      this.#afterFailedAttempt(asTandemError(error));
    }
  }

  /** @param {TandemError} error */
  #afterFailedAttempt(error) {
    if (error.code === "not_found") {
      // Resume answers not_found for a session that ended and for credentials it no longer knows.
      const code = this.#session?.code;
      const gone = new TandemError("session_gone", "the session is gone (it ended or expired)");
      this.#emit("expired", { code, reason: "gone" });
      this.#endSession(gone);
      this.#stop("expired", gone);
      return;
    }
    if (error.code === "unauthorized" || error.code === "bad_request" || error.code === "protocol_error") {
      this.#fail(error);
      return;
    }
    let policy = /** @type {ReturnType<typeof closePolicy>} */ ({ retry: true, reason: error.code });
    if (error.closeCode !== undefined && error.closeCode !== 1000 && error.closeCode !== 1009) {
      policy = closePolicy(error.closeCode, { auth: Boolean(this.#auth) });
    }
    if (!policy.retry) {
      this.#fail(new TandemError(policy.reason, `the server closed the connection with ${error.closeCode}`, error));
      return;
    }
    this.#scheduleReconnect(policy, error.retryAfter, error.closeCode);
  }

  /**
   * @param {{ reason: string, immediate?: boolean, minAttempt?: number }} policy
   * @param {number} [retryAfter] seconds, from the server
   * @param {number} [closeCode]
   */
  #scheduleReconnect(policy, retryAfter, closeCode) {
    let delay;
    if (policy.immediate) {
      this.#attempt = 0;
      delay = Math.floor(this.#opts.random() * this.#opts.restartDelay);
    } else {
      this.#attempt = Math.max(this.#attempt, policy.minAttempt ?? 0);
      delay = backoffDelay(this.#attempt, this.#backoffOptions());
      this.#attempt += 1;
    }
    if (retryAfter !== undefined) delay = Math.max(delay, retryAfter * 1000);
    if (this.#retryTimer) clearTimeout(this.#retryTimer);
    this.#retryTimer = setTimeout(() => this.#reconnect(), delay);
    this.#setState("reconnecting", { reason: policy.reason, closeCode, delay });
  }

  #backoffOptions() {
    return { base: this.#opts.backoffBase, cap: this.#opts.backoffCap, random: this.#opts.random };
  }

  /**
   * A new socket as the current one; resolves once it is open.
   * @returns {Promise<void>}
   */
  #openSocket() {
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new this.#WebSocket(this.#url, SUBPROTOCOL);
      } catch (error) {
        reject(new TandemError("connect_failed", `cannot open ${this.#url}: ${asTandemError(error).message}`));
        return;
      }
      this.#ws = ws;
      let opened = false;
      const timer = setTimeout(() => {
        if (opened || this.#ws !== ws) return;
        this.#discardSocket();
        reject(new TandemError("connect_failed", `no connection to ${this.#url} within ${this.#opts.connectTimeout} ms`));
      }, this.#opts.connectTimeout);
      ws.onopen = () => {
        opened = true;
        clearTimeout(timer);
        this.#lastHeard = Date.now();
        resolve();
      };
      ws.onmessage = (/** @type {{ data: unknown }} */ event) => {
        if (this.#ws === ws) this.#onText(event.data);
      };
      ws.onerror = () => {}; // a close event follows
      ws.onclose = (/** @type {{ code: number }} */ event) => {
        clearTimeout(timer);
        if (this.#ws !== ws) return; // a socket given up on already
        this.#ws = null;
        if (!opened) {
          // A browser reports a refused upgrade (HTTP 429, 503) as a failed connection.
          reject(new TandemError("connect_failed", `could not connect to ${this.#url}`, { closeCode: event.code }));
          return;
        }
        this.#onSocketClosed(event.code);
      };
    });
  }

  /** Protocol 1.1: ask the server about itself, and authenticate when it requires it. */
  async #handshake() {
    if (!this.#auth) return; // hello only matters for authentication
    const welcome = await this.#request({ type: "hello" }, (reply) => reply);
    if (welcome.type === "error" && welcome.code === "unknown_type") return; // a version 1 server: no authentication
    if (welcome.type !== "welcome") throw TandemError.fromFrame(welcome);
    if (typeof welcome.time === "number") this.#skew = welcome.time - Date.now();
    const limit = welcome.limits?.max_message_bytes;
    if (typeof limit === "number" && limit > 0) this.#maxBytes = Math.min(this.#opts.maxMessageBytes, limit);
    if (welcome.auth === "required") await this.#authenticate("connect");
  }

  /** @param {"connect" | "refresh"} reason */
  async #authenticate(reason) {
    const auth = this.#auth;
    if (!auth) throw new TandemError("unauthorized", "the server requires authentication: pass options.auth");
    const token = await auth({ reason });
    if (typeof token !== "string" || token.length === 0) {
      throw new TandemError("unauthorized", "the auth callback gave no token");
    }
    const reply = await this.#request({ type: "auth", token });
    if (reply.type !== "auth:ok") throw TandemError.fromFrame(reply);
    this.#emit("auth", { user: reply.user, expiresAt: reply.expires_at });
    this.#scheduleAuthRefresh(reply.expires_at);
  }

  /** Call the auth callback again before the token expires (in the server's clock). @param {unknown} expiresAt */
  #scheduleAuthRefresh(expiresAt) {
    if (this.#authTimer) clearTimeout(this.#authTimer);
    this.#authTimer = null;
    if (typeof expiresAt !== "number") return;
    const life = expiresAt - (Date.now() + this.#skew);
    const margin = Math.min(this.#opts.authMargin, life / 5);
    const ws = this.#ws;
    this.#authTimer = setTimeout(() => {
      this.#authTimer = null;
      if (this.#ws !== ws) return;
      this.#authenticate("refresh").catch((error) => {
        // The connection stays authenticated until the old token expires; then the
        // server closes with 1008 and the reconnect asks the callback again.
        const failure = asTandemError(error);
        this.#emit("error", { code: failure.code, message: failure.message, fatal: false });
      });
    }, Math.max(0, life - margin));
  }

  /**
   * Send a request and wait for its reply; `onReply` runs as the reply is read,
   * before any frame after it (a join's messages follow its reply at once).
   * Rejects with the server's error, or `disconnected`, or `timeout`.
   * @template [T=any]
   * @param {Record<string, unknown>} frame
   * @param {(reply: any) => T} [onReply] default: the reply, or its error thrown
   * @returns {Promise<T>}
   */
  #request(frame, onReply) {
    if (!this.#ws) {
      const code = this.#lastCloseCode;
      return Promise.reject(new TandemError("disconnected", `connection closed (${code})`, { closeCode: code }));
    }
    const id = this.#nextId++;
    const ws = this.#ws;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new TandemError("timeout", `no reply to ${frame.type} within ${this.#opts.requestTimeout} ms`));
        if (this.#ws === ws) this.#dropSocket();
      }, this.#opts.requestTimeout);
      this.#pending.set(id, {
        settle: (reply) => {
          clearTimeout(timer);
          try {
            if (onReply) resolve(onReply(reply));
            else if (reply.type === "error") reject(TandemError.fromFrame(reply));
            else resolve(reply);
          } catch (error) {
            reject(asTandemError(error));
          }
        },
        fail: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      });
      this.#writeText(JSON.stringify({ ...frame, id }));
    });
  }

  /** @param {string} text */
  #writeText(text) {
    const ws = this.#ws;
    if (!ws) return;
    this.#emit("frame", { direction: "out", text });
    try {
      ws.send(text);
    } catch {
      // The socket is closing: its close event follows, and the outbox sends again.
    }
  }

  // --- reading ---

  /** @param {unknown} text */
  #onText(text) {
    if (typeof text !== "string") return; // Tandem sends text frames only
    this.#lastHeard = Date.now();
    this.#emit("frame", { direction: "in", text });
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    if (!frame || typeof frame !== "object") return;
    if (frame.id !== undefined && frame.id !== null) {
      const pending = this.#pending.get(frame.id);
      if (pending) {
        this.#pending.delete(frame.id);
        pending.settle(frame);
      }
      return;
    }
    this.#onEvent(frame);
  }

  /** A server event (a frame without `id`). @param {any} frame */
  #onEvent(frame) {
    const session = this.#session;
    switch (frame.type) {
      case "message":
        if (!session || !this.#inbox.accept(frame.seq)) return; // a duplicate around a reconnect
        this.#emit("message", { seq: frame.seq, from: frame.from, data: frame.data, ts: frame.ts, mid: frame.mid ?? null });
        this.#emit("session", {});
        return;
      case "session:paired":
        this.#peers = othersOf(frame.clients, session?.clientId);
        this.#emit("paired", { code: frame.code, peers: this.peers });
        return;
      case "session:presence": {
        const clientId = String(frame.client_id);
        const online = frame.online === true;
        const peer = this.#peers.find((p) => p.clientId === clientId);
        if (peer) peer.online = online;
        else if (clientId !== session?.clientId) this.#peers.push({ clientId, online });
        this.#emit("presence", { clientId, online });
        return;
      }
      case "session:peer_left":
        this.#peers = this.#peers.filter((peer) => peer.clientId !== frame.client_id);
        this.#emit("peer_left", { clientId: frame.client_id });
        return;
      case "session:expired":
        this.#emit("expired", { code: frame.code, reason: frame.reason });
        const gone = new TandemError("session_gone", `the session expired (${frame.reason})`);
        this.#endSession(gone);
        this.#stop("expired", gone);
        return;
      case "error":
        this.#emit("error", {
          code: frame.code,
          message: frame.message,
          retryAfter: frame.retry_after,
          fatal: false,
        });
        return;
      default:
        return; // pong, and frames of later versions: ignored
    }
  }

  /** A create's or join's reply: this client is now that member. @param {any} reply @param {unknown} clients */
  #adopt(reply, clients) {
    this.#session = { code: reply.code, clientId: reply.client_id, token: reply.token };
    this.#inbox = new Inbox(0); // a joiner's backlog follows the reply
    this.#peers = othersOf(clients, reply.client_id);
    this.#establishing = false;
    this.#attempt = 0;
    this.#watchOnline();
    this.#startHeartbeat();
    this.#setState("open");
    this.#emit("session", {});
  }

  /** The reply to session:resume. @param {any} reply */
  #onResumed(reply) {
    if (reply.type !== "session:resumed") throw TandemError.fromFrame(reply);
    this.#peers = othersOf(reply.clients, this.#session?.clientId);
    this.#establishing = false;
    this.#attempt = 0;
    this.#startHeartbeat();
    this.#setState("open");
    this.#emit("resumed", { recovered: reply.recovered !== false, lastSeq: reply.last_seq });
    for (const waiter of this.#openWaiters.splice(0)) waiter.resolve();
    this.#flush(); // every unacknowledged send again, with its mid: stored once
  }

  // --- closing ---

  /** The current socket closed under us. @param {number} code */
  #onSocketClosed(code) {
    this.#lastCloseCode = code;
    this.#stopConnectionTimers();
    const culprit = code === 1009 ? this.#outbox.firstInFlight() : undefined;
    this.#outbox.resetWire();
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    const error = new TandemError("disconnected", `connection closed (${code})`, { closeCode: code });
    for (const request of pending) request.fail(error);
    if (this.#establishing || this.#state !== "open") return; // the attempt in progress decides
    let policy = closePolicy(code, { auth: Boolean(this.#auth) });
    if (code === 1009) {
      if (culprit) {
        // The server read a frame over its limit: the oldest unacknowledged send.
        // Drop it (never resend it) and learn the limit; the rest carries on.
        this.#outbox.remove(culprit);
        this.#maxBytes = Math.min(this.#maxBytes, utf8Bytes(this.#sendFrame(ID_PLACEHOLDER, culprit.mid, culprit.json)) - 1);
        const tooBig = new TandemError("too_big", "the server refused the message as too big (close 1009)", { closeCode: code });
        for (const waiter of culprit.waiters) waiter.reject(tooBig);
        this.#emit("error", { code: "too_big", message: tooBig.message, fatal: false, mid: culprit.mid });
        this.#emit("session", {});
      } else {
        policy = { retry: false, reason: "too_big" };
      }
    }
    if (!policy.retry) {
      this.#fail(new TandemError(policy.reason, `the server closed the connection with ${code}`, { closeCode: code }));
      return;
    }
    this.#scheduleReconnect(policy, undefined, code);
  }

  /** Give up on the current socket as if it had closed without a close frame (1006). */
  #dropSocket() {
    if (!this.#ws) return;
    this.#discardSocket();
    this.#onSocketClosed(1006);
  }

  /** Forget the current socket (its later events are ignored) and close it. */
  #discardSocket() {
    const ws = this.#ws;
    this.#ws = null;
    this.#stopConnectionTimers();
    if (!ws) return;
    try {
      ws.close(1000);
    } catch {
      // already closing
    }
  }

  #stopConnectionTimers() {
    if (this.#heartbeatTimer) clearInterval(this.#heartbeatTimer);
    if (this.#authTimer) clearTimeout(this.#authTimer);
    if (this.#pauseTimer) clearTimeout(this.#pauseTimer);
    this.#heartbeatTimer = this.#authTimer = this.#pauseTimer = null;
    this.#sendsPausedUntil = 0;
  }

  /** Stop for a reason the application must act on: an `error` event with `fatal: true`. @param {TandemError} error */
  #fail(error) {
    this.#emit("error", { code: error.code, message: error.message, fatal: true });
    this.#stop(error.code, error);
  }

  /**
   * The session is over for this member: forget it, and reject every pending send.
   * @param {TandemError} error
   */
  #endSession(error) {
    for (const entry of this.#outbox.clear()) for (const waiter of entry.waiters) waiter.reject(error);
    this.#session = null;
    this.#peers = [];
    this.#inbox = new Inbox(0);
    this.#emit("session", {});
  }

  /**
   * Closed: no socket, no timer. The session (if any) stays for resume().
   * @param {string} reason
   * @param {TandemError} [error] rejects the pending sends and resume() with it
   */
  #stop(reason, error) {
    if (this.#retryTimer) clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.#establishing = false;
    this.#discardSocket();
    const failure = error ?? new TandemError(reason, `closed (${reason})`);
    for (const request of this.#pending.values()) request.fail(failure);
    this.#pending.clear();
    this.#outbox.resetWire();
    for (const waiter of this.#openWaiters.splice(0)) waiter.reject(failure);
    if (error) {
      for (const entry of this.#outbox.entries) {
        for (const waiter of entry.waiters.splice(0)) waiter.reject(error);
      }
    }
    this.#removeOnlineListener?.();
    this.#removeOnlineListener = null;
    this.#setState("closed", { reason });
  }

  // --- small helpers ---

  /** @returns {Promise<void>} */
  #whenOpen() {
    return new Promise((resolve, reject) => this.#openWaiters.push({ resolve, reject }));
  }

  #startHeartbeat() {
    if (this.#heartbeatTimer) clearInterval(this.#heartbeatTimer);
    this.#heartbeatTimer = null;
    const every = this.#opts.heartbeat;
    if (!every) return;
    this.#heartbeatTimer = setInterval(() => {
      if (!this.#ws) return;
      // Silence, not even a pong, for two rounds: the network is gone without telling (sleep, Wi-Fi switch).
      if (Date.now() - this.#lastHeard > 2 * every) this.#dropSocket();
      else this.#writeText('{"type":"ping"}');
    }, every);
  }

  /** In a browser, try again at once when the network comes back. */
  #watchOnline() {
    const target = /** @type {any} */ (globalThis);
    if (this.#removeOnlineListener || typeof target.addEventListener !== "function" || !("onLine" in (target.navigator ?? {}))) {
      return;
    }
    const onOnline = () => {
      if (this.#state === "reconnecting" && this.#retryTimer && !this.#ws) {
        clearTimeout(this.#retryTimer);
        this.#retryTimer = setTimeout(() => this.#reconnect(), 0);
      }
    };
    target.addEventListener("online", onOnline);
    this.#removeOnlineListener = () => target.removeEventListener("online", onOnline);
  }

  /** @param {SavedSession} saved */
  #load(saved) {
    const ok =
      saved &&
      saved.version === SESSION_FORMAT &&
      typeof saved.code === "string" &&
      typeof saved.clientId === "string" &&
      typeof saved.token === "string" &&
      Number.isSafeInteger(saved.lastSeq) &&
      saved.lastSeq >= 0 &&
      Array.isArray(saved.unacked);
    if (!ok) throw new TandemError("bad_request", "not a session saved by serialize()");
    this.#session = { code: saved.code, clientId: saved.clientId, token: saved.token };
    this.#inbox = new Inbox(saved.lastSeq);
    this.#peers = [];
    this.#outbox.clear();
    for (const { mid, data } of saved.unacked) {
      // Restored as they were, past maxQueue too: each was accepted by send() once.
      this.#outbox.entries.push({ mid: String(mid), json: JSON.stringify(data) ?? "null", id: null, waiters: [] });
    }
  }

  /** @param {TandemState} state @param {Record<string, unknown>} [detail] */
  #setState(state, detail = {}) {
    const previous = this.#state;
    if (previous === state && state !== "reconnecting") return;
    this.#state = state;
    this.#emit("state", { state, previous, ...detail });
  }

  /** @param {string} type @param {Record<string, unknown>} event */
  #emit(type, event) {
    const set = this.#listeners.get(type);
    if (!set) return;
    for (const listener of [...set]) {
      try {
        listener(event);
      } catch (error) {
        // A listener's bug must not break the client: report it like an event handler's.
        setTimeout(() => {
          throw error;
        }, 0);
      }
    }
  }
}
