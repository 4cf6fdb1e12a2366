-- Down of 001: drops the archive's tables, and every archived row with them.
-- Refused while any of them holds a row, so that a miscounted
-- `migrate down N` cannot erase the archive: to drop it on purpose, empty the
-- tables first (TRUNCATE users, profiles, sessions, messages, analytics_events).
-- The tables are locked before the check, so no row arrives between it and the
-- drop; the lock waits 5 s at most, since writes queue behind it meanwhile.
SET LOCAL lock_timeout = '5s';
LOCK TABLE users, profiles, sessions, messages, analytics_events IN ACCESS EXCLUSIVE MODE;
DO $$
BEGIN
    IF EXISTS (SELECT FROM users) OR EXISTS (SELECT FROM profiles) OR EXISTS (SELECT FROM sessions)
        OR EXISTS (SELECT FROM messages) OR EXISTS (SELECT FROM analytics_events) THEN
        RAISE EXCEPTION 'the archive''s tables hold rows, which dropping them would erase: TRUNCATE users, profiles, sessions, messages, analytics_events first if that is what you want';
    END IF;
END
$$;
DROP TABLE analytics_events, messages, sessions, profiles, users;
