-- tandem: no-transaction
-- Query: database.QUERIES["analytics.event_counts"] (one event type per hour
-- over a window). Equality then range: composite.
CREATE INDEX CONCURRENTLY IF NOT EXISTS analytics_events_type_created_at ON analytics_events (type, created_at);
