-- tandem: no-transaction
-- Query: database.QUERIES["admin.open_sessions"] (sessions not ended yet,
-- oldest first). Open sessions are a small, hot subset: partial index.
CREATE INDEX CONCURRENTLY IF NOT EXISTS sessions_open_created_at ON sessions (created_at) WHERE ended_at IS NULL;
