-- 001: the archive's tables. Primary keys and integrity constraints only;
-- every other index comes in its own non-transactional file below
-- (CREATE INDEX CONCURRENTLY), each beside the query it serves.
-- Times are timestamptz; Tandem sends milliseconds since the Unix epoch.

-- Accounts, for when authentication exists; empty until then.
CREATE TABLE users (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- Integrity: one account per address, case-insensitively. Query:
-- database.QUERIES["admin.user_by_email"] (sign-in and the admin's user search).
CREATE UNIQUE INDEX users_email_lower ON users (lower(email));

CREATE TABLE profiles (
    user_id      bigint PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,  -- the key indexes the FK
    display_name text NOT NULL DEFAULT '',
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- One row per session. A code can be drawn again after its session ended,
-- so the key is `id`; (code, created_at) is unique (see 002).
CREATE TABLE sessions (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    code            text NOT NULL,
    created_by      bigint REFERENCES users (id) ON DELETE SET NULL,  -- NULL until auth exists; index: 006
    created_at      timestamptz NOT NULL,
    paired_at       timestamptz,                 -- first time it had two members
    ended_at        timestamptz,
    end_reason      text,
    message_count   integer NOT NULL DEFAULT 0,
    last_message_at timestamptz,
    CONSTRAINT sessions_end_reason CHECK (end_reason IN ('left', 'idle', 'ttl')),
    CONSTRAINT sessions_ended CHECK ((ended_at IS NULL) = (end_reason IS NULL))
);

CREATE TABLE messages (
    session_id bigint NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq        bigint NOT NULL,
    sender     text NOT NULL,                    -- the member's client_id
    body       jsonb,                            -- NULL when ARCHIVE_MESSAGES=0
    size_bytes integer NOT NULL,                 -- of the JSON text as relayed
    created_at timestamptz NOT NULL,             -- the server's `ts`
    -- Also the FK's index, the writer's ON CONFLICT arbiter, and
    -- database.QUERIES["admin.transcript"].
    PRIMARY KEY (session_id, seq)
);

CREATE TABLE analytics_events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type       text NOT NULL,
    session_id bigint REFERENCES sessions (id) ON DELETE CASCADE,  -- index: 007
    created_at timestamptz NOT NULL,
    props      jsonb NOT NULL DEFAULT '{}'
);
