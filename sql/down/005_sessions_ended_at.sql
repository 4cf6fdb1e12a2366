-- tandem: no-transaction
-- Down of 005. CONCURRENTLY: takes no lock that blocks writes to sessions
-- (it waits for the transactions using the index instead); IF EXISTS: a run
-- interrupted midway, which leaves the index invalid, can be repeated.
DROP INDEX CONCURRENTLY IF EXISTS sessions_ended_at;
