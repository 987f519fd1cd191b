-- VMs and the assets they are made of.
CREATE TABLE vms (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    customer_id     TEXT NOT NULL,
    state           TEXT NOT NULL,
    config_json     TEXT NOT NULL,
    backend         TEXT NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    updated_at_ms   INTEGER NOT NULL,
    vmm_pid         INTEGER,
    vmm_start_ticks INTEGER,
    failure         TEXT,
    guest_ready     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX vms_by_customer ON vms (customer_id, seq);

CREATE TABLE assets (
    id            TEXT PRIMARY KEY,
    kind          TEXT NOT NULL CHECK (kind IN ('kernel', 'initrd', 'rootfs')),
    file_name     TEXT NOT NULL,
    size_bytes    INTEGER NOT NULL,
    sha256        TEXT NOT NULL,
    initrd_id     TEXT REFERENCES assets (id),
    ready_marker  TEXT,
    created_at_ms INTEGER NOT NULL
);
