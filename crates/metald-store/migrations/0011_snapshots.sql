-- A snapshot belongs to the customer who made it, not to its source VM: it outlives that VM, and
-- deleting the VM leaves it alone (no foreign key). A row is CREATING while its files are being
-- written; a metald killed then leaves a CREATING row that start-up removes with its files.
CREATE TABLE snapshots (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL UNIQUE,
    customer_id   TEXT NOT NULL,
    source_vm_id  TEXT NOT NULL,
    state         TEXT NOT NULL,
    backend       TEXT NOT NULL,
    config_json   TEXT NOT NULL,
    -- The source VM's addresses and MAC at the snapshot: the guest in every clone still
    -- believes they are its own.
    ipv6          TEXT,
    ipv4          TEXT,
    mac           TEXT,
    bytes         INTEGER NOT NULL DEFAULT 0,
    created_at_ms INTEGER NOT NULL
);
CREATE INDEX snapshots_by_customer ON snapshots (customer_id, seq);

-- A VM whose guest believes it has other addresses than its own (a clone restored from a
-- snapshot, until its next cold boot): its runs map these to its own. The row goes with the VM.
CREATE TABLE vm_inner_identity (
    vm_id       TEXT PRIMARY KEY REFERENCES vms (id) ON DELETE CASCADE,
    snapshot_id TEXT NOT NULL,
    ipv6        TEXT NOT NULL,
    ipv4        TEXT,
    mac         TEXT NOT NULL
);
