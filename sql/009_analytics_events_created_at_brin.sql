-- tandem: no-transaction
-- Query: database.QUERIES["analytics.events_window"] (every type's count in a
-- time window). The table is append-only and written in time order, so
-- created_at follows the physical order: a BRIN index (a few pages) pays;
-- measured in bench/pg_indexes.py (README, "PostgreSQL archive").
CREATE INDEX CONCURRENTLY IF NOT EXISTS analytics_events_created_at_brin ON analytics_events USING brin (created_at);
