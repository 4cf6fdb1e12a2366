-- tandem: no-transaction
-- Queries: database.QUERIES["archive.resolve_session"] (the writer: which
-- session a message, pairing or end belongs to: code =, created_at <=, newest
-- first), the writer's ON CONFLICT (code, created_at) arbiter, and
-- database.QUERIES["admin.session_by_code"]. Equality then sort: composite.
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS sessions_code_created_at ON sessions (code, created_at);
