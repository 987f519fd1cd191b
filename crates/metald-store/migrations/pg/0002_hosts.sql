-- The fleet's hosts (SQLite's 0012): registration, place in the fleet's address space (kept for
-- as long as the row exists, so a host's routes never move) and lease, on the database's clock
-- so hosts with skewed clocks agree on who is DOWN.
CREATE TABLE hosts (
    id               TEXT PRIMARY KEY,
    idx              BIGINT NOT NULL UNIQUE,
    advertise_url    TEXT NOT NULL,
    memory_bytes     BIGINT,
    vcpus            BIGINT,
    labels_json      TEXT NOT NULL,
    lease_expires_ms BIGINT NOT NULL
);
