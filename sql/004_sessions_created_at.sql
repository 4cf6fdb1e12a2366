-- tandem: no-transaction
-- Query: database.QUERIES["admin.recent_sessions"] (sessions created since a
-- time, newest first, one page). Range plus sort plus LIMIT: a B-tree, read
-- backwards, stops after one page; a BRIN index cannot return rows in order.
CREATE INDEX CONCURRENTLY IF NOT EXISTS sessions_created_at ON sessions (created_at);
