-- tandem: no-transaction
-- Down of 010. CONCURRENTLY: takes no lock that blocks writes to messages
-- (it waits for the transactions using the index instead); IF EXISTS: a run
-- interrupted midway, which leaves the index invalid, can be repeated.
DROP INDEX CONCURRENTLY IF EXISTS messages_created_at_brin;
