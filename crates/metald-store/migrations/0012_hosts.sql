-- The hosts of a fleet (a SQLite store serves one host: its own row). `idx` is the host's place
-- in the fleet's address space, kept for as long as the row exists so its routes never move;
-- the lease is renewed every few seconds, and a host whose lease has ended is DOWN.
CREATE TABLE hosts (
    id               TEXT PRIMARY KEY,
    idx              INTEGER NOT NULL UNIQUE,
    advertise_url    TEXT NOT NULL,
    memory_bytes     INTEGER,
    vcpus            INTEGER,
    labels_json      TEXT NOT NULL,
    lease_expires_ms INTEGER NOT NULL
);
