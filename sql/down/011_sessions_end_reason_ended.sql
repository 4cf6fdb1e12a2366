-- Back to the end reasons before the admin API. The old check is validated at once: it reads
-- every row of sessions while the ALTER holds its lock (a roll-back only), and fails, changing
-- nothing, while a session ended through the admin API (end_reason 'ended') is archived.
ALTER TABLE sessions
    DROP CONSTRAINT sessions_end_reason,
    ADD CONSTRAINT sessions_end_reason CHECK (end_reason IN ('left', 'idle', 'ttl'));
