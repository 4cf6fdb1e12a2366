-- tandem: no-transaction
-- Query: database.QUERIES["analytics.message_volume"] (messages and bytes per
-- minute in a window). Append-only, written in time order: BRIN, measured in
-- bench/pg_indexes.py (README, "PostgreSQL archive").
CREATE INDEX CONCURRENTLY IF NOT EXISTS messages_created_at_brin ON messages USING brin (created_at);
