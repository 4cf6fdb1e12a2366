-- tandem: no-transaction
-- The FK analytics_events.session_id -> sessions (ON DELETE CASCADE), and
-- database.QUERIES["admin.session_events"] (one session's events in time
-- order). Equality then sort: composite. Events of no session are left out.
CREATE INDEX CONCURRENTLY IF NOT EXISTS analytics_events_session_created_at ON analytics_events (session_id, created_at)
    WHERE session_id IS NOT NULL;
