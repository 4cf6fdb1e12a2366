-- tandem: no-transaction
-- Query: database.QUERIES["admin.ended_sessions"] (sessions that ended in a
-- window, newest first, one page). Open sessions have no end: partial index.
CREATE INDEX CONCURRENTLY IF NOT EXISTS sessions_ended_at ON sessions (ended_at) WHERE ended_at IS NOT NULL;
