-- An operator may end a session through the admin API (DELETE /api/debug/sessions/{code}):
-- end_reason 'ended'. The new check admits every row the old one did, so NOT VALID skips
-- checking the whole table under the ALTER's lock; new and updated rows are checked.
ALTER TABLE sessions
    DROP CONSTRAINT sessions_end_reason,
    ADD CONSTRAINT sessions_end_reason CHECK (end_reason IN ('left', 'idle', 'ttl', 'ended')) NOT VALID;
