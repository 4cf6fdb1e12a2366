-- tandem: no-transaction
-- Down of 002. CONCURRENTLY: takes no lock that blocks writes to sessions
-- (it waits for the transactions using the index instead); IF EXISTS: a run
-- interrupted midway, which leaves the index invalid, can be repeated.
-- The writer's ON CONFLICT (code, created_at) needs this index: without it
-- no Tandem can archive, so revert 002 only to remove the archive (001).
DROP INDEX CONCURRENTLY IF EXISTS sessions_code_created_at;
