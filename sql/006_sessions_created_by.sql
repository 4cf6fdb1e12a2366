-- tandem: no-transaction
-- The FK sessions.created_by -> users: ON DELETE SET NULL looks up a user's
-- sessions, and so does database.QUERIES["admin.user_sessions"] (a user's
-- sessions, newest first). Equality then sort: composite. Anonymous sessions
-- (created_by IS NULL, all of them until auth exists) are left out: partial.
CREATE INDEX CONCURRENTLY IF NOT EXISTS sessions_created_by_created_at ON sessions (created_by, created_at)
    WHERE created_by IS NOT NULL;
