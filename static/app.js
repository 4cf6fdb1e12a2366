// @ts-check
/**
 * The pairing page at `/`, built on tandem.js.
 *
 * Create shows the code and a link (`/#CODE`: opening it joins); Join takes a
 * typed code. The conversation and the session (tandem.js's serialize()) are
 * kept together in sessionStorage, saved on every change, so that a reload
 * carries on where the page was: the messages shown so far (own ones too: the
 * server never replays a member's own messages), the sends not yet
 * acknowledged (sent again with their mid, stored once) and the last seq seen
 * (a peer's message is never shown twice).
 *
 * Elements carry `data-testid` attributes that browser tests rely on.
 */

import { Tandem, newMid, normaliseCode } from "./tandem.js";

const STORE_KEY = "tandem.page.v1";
const MAX_KEPT = 1000; // messages kept on the page and in sessionStorage; older ones are dropped
const MAX_LOG_LINES = 400;

/** @typedef {import("./tandem").Tandem} Client */
/**
 * @typedef {object} Entry a message shown in the conversation
 * @property {"me" | "peer"} from
 * @property {string} text
 * @property {number | null} seq null until the server stored it
 * @property {string | null} mid
 * @property {"sending" | "stored" | "received" | "failed"} state
 * @property {number} order the order it was added in, for messages without a seq
 */

/** @param {string} id @returns {any} */
const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);
const ui = {
  status: byTestId("status"),
  notice: byTestId("notice"),
  start: /** @type {HTMLElement} */ (document.getElementById("start")),
  session: /** @type {HTMLElement} */ (document.getElementById("session")),
  create: byTestId("create"),
  joinForm: /** @type {HTMLFormElement} */ (document.getElementById("join-form")),
  joinCode: byTestId("join-code"),
  join: byTestId("join"),
  joinError: byTestId("join-error"),
  code: byTestId("code"),
  copyCode: byTestId("copy-code"),
  copyLink: byTestId("copy-link"),
  copied: byTestId("copied"),
  link: byTestId("link"),
  peer: byTestId("peer"),
  messages: byTestId("messages"),
  sendForm: /** @type {HTMLFormElement} */ (document.getElementById("send-form")),
  input: byTestId("message-input"),
  send: byTestId("send"),
  sendError: byTestId("send-error"),
  leave: byTestId("leave"),
  log: byTestId("frame-log"),
  logLines: byTestId("frame-log-lines"),
};

/** @type {Client | null} */
let client = null;
/** @type {Entry[]} */
let conversation = [];
let nextOrder = 0;
/** Why the last session ended, for the status line: "expired", "left", "replaced", or an error code. */
let ended = "";
/** A create or join is on its way. */
let busy = false;
/** The peer left (its place is free for someone else to join). */
let peerLeft = false;
/** @type {string[]} */
const logLines = [];
/** @type {WeakMap<Entry, HTMLLIElement>} */
const rows = new WeakMap();

// --- storage ---------------------------------------------------------------------

function save() {
  const session = client?.serialize() ?? null;
  try {
    if (!session && conversation.length === 0) sessionStorage.removeItem(STORE_KEY);
    else sessionStorage.setItem(STORE_KEY, JSON.stringify({ session, messages: conversation }));
  } catch {
    // Storage full or disabled (private mode): the page still works, a reload forgets.
  }
}

/** @returns {{ session: any, messages: Entry[] } | null} */
function load() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(STORE_KEY) ?? "null");
    if (saved && Array.isArray(saved.messages)) return saved;
  } catch {
    // unreadable: start afresh
  }
  return null;
}

// --- the client ----------------------------------------------------------------------

/** A Tandem client whose every event updates the page. */
function makeClient() {
  const tandem = new Tandem();
  tandem.on("session", save);
  tandem.on("state", render);
  tandem.on("paired", () => {
    peerLeft = false;
    render();
  });
  tandem.on("presence", render);
  tandem.on("peer_left", () => {
    peerLeft = true;
    render();
  });
  tandem.on("message", (event) => {
    if (!conversation.some((entry) => entry.from === "peer" && entry.seq === event.seq)) {
      add({ from: "peer", text: textOf(event.data), seq: event.seq, mid: event.mid, state: "received" });
    }
    save();
  });
  tandem.on("ack", (event) => {
    const entry = conversation.find((e) => e.from === "me" && e.mid === event.mid);
    if (entry) {
      entry.seq = event.seq;
      entry.state = "stored";
      renderMessages();
    }
    save();
  });
  tandem.on("resumed", (event) => {
    showNotice(event.recovered ? "" : "Some messages sent while you were away could not be recovered.");
    render();
  });
  tandem.on("expired", () => {
    ended = "expired";
    forgetLink();
  });
  tandem.on("error", (event) => {
    if (event.fatal) ended = event.code;
    if (event.mid && event.code === "too_big") markFailed(event.mid, "too big to send");
  });
  tandem.on("frame", (event) => logFrame(event.direction, event.text));
  return tandem;
}

/** What a message's data shows: the page sends `{text}`; other clients may send anything. @param {unknown} data */
function textOf(data) {
  if (typeof data === "string") return data;
  if (data && typeof data === "object" && typeof (/** @type {any} */ (data).text) === "string") {
    return /** @type {any} */ (data).text;
  }
  return JSON.stringify(data);
}

async function create() {
  if (busy) return;
  startSession();
  try {
    await /** @type {Client} */ (client).create();
    ui.input.focus();
  } catch (error) {
    failedToStart(error, ui.create);
  } finally {
    busy = false;
    render();
  }
}

/** @param {string} typed */
async function join(typed) {
  if (busy) return;
  let code;
  try {
    code = normaliseCode(typed);
  } catch (error) {
    ui.joinError.textContent = `That is not a code: ${/** @type {Error} */ (error).message.replace(/^not a session code: /, "")}.`;
    ui.joinCode.focus();
    return;
  }
  startSession();
  try {
    await /** @type {Client} */ (client).join(code);
    ui.input.focus();
  } catch (error) {
    failedToStart(error, ui.joinCode);
  } finally {
    busy = false;
    render();
  }
}

/** A fresh client and an empty conversation, for a create or a join. */
function startSession() {
  client?.close();
  client = makeClient();
  conversation = [];
  nextOrder = 0;
  ended = "";
  peerLeft = false;
  busy = true;
  ui.joinError.textContent = "";
  showNotice("");
  renderMessages();
  save();
  render();
}

/** @param {unknown} error @param {HTMLElement} focus */
function failedToStart(error, focus) {
  const code = /** @type {any} */ (error)?.code;
  const wait = /** @type {any} */ (error)?.retryAfter;
  const messages = /** @type {Record<string, string>} */ ({
    not_found: "No session has that code (or it expired). Check the code, or ask for a new one.",
    session_full: "That session already has two people.",
    rate_limited: `Too many attempts. Try again in ${Math.ceil(wait ?? 60)} seconds.`,
    connect_failed: "Cannot reach the server. Check your connection and try again.",
    unavailable: "The server is busy. Try again in a moment.",
  });
  ui.joinError.textContent = messages[code] ?? `Something went wrong (${code ?? String(error)}). Try again.`;
  client = null;
  forgetLink();
  save();
  focus.focus();
}

/** Show the stored session again after a reload. @param {{ session: any, messages: Entry[] }} saved */
function restore(saved) {
  conversation = saved.messages.filter((entry) => entry && typeof entry.text === "string").slice(-MAX_KEPT);
  nextOrder = 0;
  for (const entry of conversation) entry.order = nextOrder++;
  const restored = makeClient();
  client = restored;
  renderMessages();
  render();
  restored.resume(saved.session).catch(() => render());
}

async function leave() {
  const leaving = client;
  if (!leaving) return;
  ui.leave.disabled = true;
  try {
    await leaving.leave();
  } finally {
    ui.leave.disabled = false;
  }
  client = null;
  ended = "left";
  conversation = [];
  renderMessages();
  showNotice("");
  forgetLink();
  save();
  render();
  ui.create.focus();
}

// --- the conversation ------------------------------------------------------------

/** @param {string} text */
function sendText(text) {
  if (!client || !client.code) return;
  const mid = newMid();
  const entry = add({ from: "me", text, seq: null, mid, state: "sending" });
  ui.sendError.textContent = "";
  client.send({ text }, { mid }).catch((error) => {
    // closed, replaced: the message stays queued in the session and may still be sent after a resume.
    if (["queue_full", "too_big", "bad_request", "not_in_session"].includes(error.code)) {
      conversation = conversation.filter((e) => e !== entry);
      renderMessages();
      save();
      ui.sendError.textContent =
        error.code === "queue_full"
          ? "Not sent: too many messages are waiting for the connection. Try again once it is back."
          : `Not sent: ${error.message}.`;
      if (!ui.input.value) ui.input.value = text;
    } else if (error.code === "left" || error.code === "session_gone") {
      markFailed(mid, "not sent");
    }
  });
}

/** @param {Omit<Entry, "order">} fields @returns {Entry} */
function add(fields) {
  const entry = { ...fields, order: nextOrder++ };
  conversation.push(entry);
  if (conversation.length > MAX_KEPT) conversation.splice(0, conversation.length - MAX_KEPT);
  renderMessages();
  return entry;
}

/** @param {string} mid @param {string} why */
function markFailed(mid, why) {
  const entry = conversation.find((e) => e.mid === mid && e.from === "me");
  if (!entry) return;
  entry.state = "failed";
  renderMessages();
  save();
  ui.sendError.textContent = `A message was ${why}.`;
}

/** Oldest first, in seq order; messages not stored yet last, in the order they were written. */
function sorted() {
  return [...conversation].sort((a, b) => (a.seq ?? Infinity) - (b.seq ?? Infinity) || a.order - b.order);
}

const BADGES = { sending: "sending…", stored: "stored", received: "", failed: "not sent" };

function renderMessages() {
  const list = ui.messages;
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const wanted = sorted().map((entry) => {
    let row = rows.get(entry);
    if (!row) {
      row = document.createElement("li");
      row.className = "msg";
      row.dataset.testid = "message";
      const who = document.createElement("span");
      who.className = "visually-hidden";
      const text = document.createElement("span");
      text.className = "text";
      const badge = document.createElement("span");
      badge.className = "badge";
      row.append(who, text, badge);
      rows.set(entry, row);
    }
    row.dataset.from = entry.from;
    row.dataset.state = entry.state;
    if (entry.seq !== null) row.dataset.seq = String(entry.seq);
    else delete row.dataset.seq;
    const [who, text, badge] = /** @type {HTMLElement[]} */ ([...row.children]);
    who.textContent = entry.from === "me" ? "You: " : "Peer: ";
    if (text.textContent !== entry.text) text.textContent = entry.text;
    badge.textContent = BADGES[entry.state];
    return row;
  });
  // Move rows only when the order changed: the elements stay the same objects.
  const current = [...list.children];
  if (current.length !== wanted.length || wanted.some((row, i) => current[i] !== row)) list.replaceChildren(...wanted);
  if (nearBottom) list.scrollTop = list.scrollHeight;
}

// --- status, code, link ---------------------------------------------------------------

/** @returns {[string, string]} data-state and the sentence a person reads */
function status() {
  if (!client) {
    if (busy) return ["idle", "Connecting…"];
    if (ended === "expired") return ["expired", "The session expired. Create a new one, or join with a code."];
    if (ended === "left") return ["closed", "You left the session."];
    return ["idle", "Not in a session yet: create one, or join with a code."];
  }
  const state = client.state;
  if (busy || (state === "connecting" && !client.code)) return ["idle", "Connecting…"];
  if (state === "closed") {
    if (ended === "expired") return ["expired", "The session expired. Create a new one, or join with a code."];
    if (ended === "replaced") return ["closed", "This session is now open in another tab or window."];
    if (ended) return ["closed", `Disconnected (${ended}). Reload the page to try again.`];
    return ["closed", "Disconnected."];
  }
  if (state === "connecting" || state === "reconnecting") return ["reconnecting", "Connection lost. Reconnecting…"];
  const peer = client.peers[0];
  if (!peer) {
    return peerLeft
      ? ["waiting", "Your peer left. Waiting for someone to join with the code."]
      : ["waiting", "Waiting for your peer to join."];
  }
  if (peer.online) return ["paired", "Paired: messages go straight to your peer."];
  return ["peer-offline", "Your peer is offline. Your messages wait for them."];
}

function render() {
  const [state, sentence] = status();
  ui.status.dataset.state = state;
  if (ui.status.textContent !== sentence) ui.status.textContent = sentence;

  const code = client?.code ?? null;
  const inSession = Boolean(client && code);
  ui.session.hidden = !inSession && conversation.length === 0;
  ui.start.hidden = inSession;
  ui.create.disabled = busy;
  ui.join.disabled = busy;
  for (const element of [ui.code.parentElement, ui.leave]) element.hidden = !inSession;
  ui.sendForm.hidden = !inSession;
  if (code) {
    ui.code.textContent = code;
    const link = `${location.origin}/#${code}`;
    ui.link.href = link;
    ui.link.textContent = link;
  }
  const peer = client?.peers[0];
  ui.peer.hidden = !inSession;
  ui.peer.dataset.online = String(Boolean(peer?.online));
  if (client && client.state !== "open") ui.peer.textContent = "Peer: not known until the connection is back";
  else ui.peer.textContent = !peer ? "Peer: not joined yet" : peer.online ? "Peer: online" : "Peer: offline";
}

/** @param {string} text */
function showNotice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = !text;
}

/** The address no longer names a session to join. */
function forgetLink() {
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
}

/** The code in the address (`/#CODE`), or null. */
function codeFromLink() {
  const raw = decodeURIComponent(location.hash.slice(1));
  if (!raw) return null;
  try {
    return normaliseCode(raw);
  } catch {
    return null;
  }
}

/** @param {string} text */
async function copy(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // No clipboard API (a page over plain HTTP on another host): copy through a selection.
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  ui.copied.textContent = "Copied.";
  setTimeout(() => (ui.copied.textContent = ""), 2000);
}

// --- the developer's frame log -----------------------------------------------------

/** @param {"in" | "out"} direction @param {string} text */
function logFrame(direction, text) {
  const hidden = text.replace(/"token":"[^"]*"/g, '"token":"…"');
  logLines.push(`${direction === "in" ? "<" : ">"} ${hidden}`);
  if (logLines.length > MAX_LOG_LINES) logLines.splice(0, logLines.length - MAX_LOG_LINES);
  if (ui.log.open) renderLog();
}

function renderLog() {
  ui.logLines.textContent = logLines.join("\n");
  ui.logLines.scrollTop = ui.logLines.scrollHeight;
}

// --- wiring ------------------------------------------------------------------------

ui.create.addEventListener("click", () => create());
ui.joinForm.addEventListener("submit", (event) => {
  event.preventDefault();
  join(ui.joinCode.value);
});
ui.sendForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.input.value;
  if (!text.trim()) return;
  ui.input.value = "";
  sendText(text);
});
ui.leave.addEventListener("click", () => leave());
ui.copyCode.addEventListener("click", () => copy(client?.code ?? ""));
ui.copyLink.addEventListener("click", () => copy(ui.link.href));
ui.log.addEventListener("toggle", () => ui.log.open && renderLog());
// A page the browser keeps in its back-forward cache would keep its socket open
// and its member "online" while nobody looks: go offline when hidden that way,
// and resume when shown again. (A real unload closes the socket anyway.)
window.addEventListener("pagehide", () => {
  if (client?.code) client.close();
});
window.addEventListener("pageshow", (event) => {
  if (event.persisted && client?.code && client.state === "closed") {
    ended = "";
    client.resume().catch(() => render());
    render();
  }
});
window.addEventListener("hashchange", () => {
  const code = codeFromLink();
  if (code && !client?.code) join(code); // a link opened in this tab while in no session
});

function boot() {
  const saved = load();
  const linked = codeFromLink();
  if (saved?.session && (!linked || linked === saved.session.code)) {
    restore(saved);
    return;
  }
  if (saved) sessionStorage.removeItem(STORE_KEY);
  render();
  if (linked) join(linked);
}

boot();
