// Types of tandem.js, the client of a Tandem pairing relay (PROTOCOL.md, versions 1 and 1.1).

/** A WHATWG WebSocket constructor: the browser's, Node's global one, or a compatible implementation. */
export interface WebSocketConstructor {
  new (url: string, protocols?: string | string[]): WebSocketLike;
}

/** The part of a WebSocket that tandem.js uses. */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  onclose: ((event: { code: number }) => void) | null;
  send(text: string): void;
  close(code?: number, reason?: string): void;
}

export type TandemState = "connecting" | "open" | "reconnecting" | "closed";

export interface Peer {
  clientId: string;
  online: boolean;
}

/** What serialize() returns and resume(saved) takes: plain JSON, for sessionStorage. */
export interface SavedSession {
  version: 1;
  code: string;
  clientId: string;
  token: string;
  /** The highest seq delivered: the next resume asks for what came after it. */
  lastSeq: number;
  /** The sends not acknowledged yet, oldest first: sent again, with their mid, after the resume. */
  unacked: { mid: string; data: unknown }[];
}

export interface TandemOptions {
  /** The WebSocket endpoint; default ws(s)://<the page's host>/ws in a browser, required elsewhere. */
  url?: string;
  /** The WebSocket class; default globalThis.WebSocket (Node 18 has none: pass one). */
  WebSocket?: WebSocketConstructor;
  /**
   * Protocol 1.1 authentication: gives a JWT when the server requires one, on
   * every connection and again before the token expires.
   */
  auth?: (context: { reason: "connect" | "refresh" }) => string | Promise<string>;
  /** First backoff ceiling in ms (500). Attempt n waits a random time below min(cap, base * 2^n). */
  backoffBase?: number;
  /** Largest backoff ceiling in ms (10000). */
  backoffCap?: number;
  /** After close 1012 the first attempt waits a random time below this, in ms (250). */
  restartDelay?: number;
  /** Unacknowledged sends kept at most (100); past it send() rejects with `queue_full`. */
  maxQueue?: number;
  /** Largest frame in bytes (65536, the server's default MAX_MESSAGE_BYTES); larger sends reject with `too_big`. */
  maxMessageBytes?: number;
  /** Time a socket may take to open, in ms (10000). */
  connectTimeout?: number;
  /** Time create, join, resume, hello and auth wait for their reply, in ms (10000). */
  requestTimeout?: number;
  /** A ping this often while connected, in ms (15000); silence for twice as long drops the socket. 0: off. */
  heartbeat?: number;
  /** The auth callback is called this long (at most a fifth of the token's life) before the token expires, in ms (60000). */
  authMargin?: number;
  /** Time leave() waits for a connection, in ms (5000). */
  leaveTimeout?: number;
  /** Random numbers in [0, 1) for the jitter (Math.random); for tests. */
  random?: () => number;
}

export interface TandemEvents {
  state: { state: TandemState; previous: TandemState; reason?: string; closeCode?: number; delay?: number };
  paired: { code: string; peers: Peer[] };
  presence: { clientId: string; online: boolean };
  peer_left: { clientId: string };
  message: { seq: number; from: string; data: unknown; ts: number; mid: string | null };
  ack: { mid: string; seq: number; duplicate: boolean };
  resumed: { recovered: boolean; lastSeq: number };
  expired: { code: string; reason: "idle" | "ttl" | "ended" | "gone" | string };
  error: { code: string; message: string; retryAfter?: number; fatal: boolean; mid?: string };
  auth: { user: string; expiresAt: number };
  session: Record<string, never>;
  frame: { direction: "in" | "out"; text: string };
}

export declare const SUBPROTOCOL: "tandem.v1";
export declare const CODE_ALPHABET: string;
export declare const DEFAULTS: Readonly<Required<Omit<TandemOptions, "url" | "WebSocket" | "auth" | "random">>>;

export declare class TandemError extends Error {
  constructor(code: string, message: string, extra?: { retryAfter?: number; closeCode?: number });
  /** The protocol's error code, or one of the client's (`queue_full`, `too_big`, `bad_code`, ...). */
  code: string;
  /** Seconds to wait, when the server said so. */
  retryAfter: number | undefined;
  /** The close code, when the connection closed. */
  closeCode: number | undefined;
  static fromFrame(frame: unknown): TandemError;
}

export declare class Tandem {
  constructor(options?: TandemOptions);
  readonly state: TandemState;
  readonly code: string | null;
  readonly clientId: string | null;
  readonly peers: Peer[];
  readonly lastSeq: number;
  readonly unacked: { mid: string; data: unknown }[];
  on<K extends keyof TandemEvents>(type: K, listener: (event: TandemEvents[K]) => void): () => void;
  off<K extends keyof TandemEvents>(type: K, listener: (event: TandemEvents[K]) => void): void;
  create(): Promise<{ code: string; clientId: string }>;
  join(code: string): Promise<{ code: string; clientId: string; peers: Peer[] }>;
  resume(saved?: SavedSession | null): Promise<void>;
  send(data: unknown, options?: { mid?: string }): Promise<number>;
  leave(): Promise<void>;
  close(): void;
  serialize(): SavedSession | null;
}

export declare function normaliseCode(input: string): string;
export declare function backoffDelay(
  attempt: number,
  options?: { base?: number; cap?: number; random?: () => number },
): number;
export declare function closePolicy(
  code: number,
  context?: { auth?: boolean },
): { retry: boolean; reason: string; immediate?: boolean; minAttempt?: number };
export declare function newMid(): string;

export declare class Inbox {
  constructor(lastSeq?: number);
  lastSeq: number;
  accept(seq: unknown): boolean;
}

export interface OutboxEntry {
  mid: string;
  json: string;
  id: number | null;
  waiters: { resolve: (seq: number) => void; reject: (error: TandemError) => void }[];
}

export declare class Outbox {
  constructor(limit?: number);
  limit: number;
  entries: OutboxEntry[];
  readonly size: number;
  add(mid: string, json: string): OutboxEntry;
  unsent(): OutboxEntry[];
  firstInFlight(): OutboxEntry | undefined;
  markSent(entry: OutboxEntry, id: number): void;
  requeue(entry: OutboxEntry): void;
  resetWire(): void;
  remove(entry: OutboxEntry): void;
  clear(): OutboxEntry[];
  serialise(): { mid: string; data: unknown }[];
}
