-- tandem: no-transaction
-- Down of 009. CONCURRENTLY: takes no lock that blocks writes to analytics_events
-- (it waits for the transactions using the index instead); IF EXISTS: a run
-- interrupted midway, which leaves the index invalid, can be repeated.
DROP INDEX CONCURRENTLY IF EXISTS analytics_events_created_at_brin;
