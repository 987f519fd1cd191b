-- Billing delivery. Every batch is written to the outbox, in the same transaction that moves
-- the VM's cursor past the samples it holds, before anything is sent; a row goes only once the
-- billing service acknowledged it. Outbox rows outlive their VM (usage is still owed).
CREATE TABLE billing_outbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    key           TEXT NOT NULL UNIQUE,
    kind          TEXT NOT NULL CHECK (kind IN ('metrics', 'started', 'stopped', 'gap')),
    vm_id         TEXT NOT NULL,
    customer_id   TEXT NOT NULL,
    payload_json  TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);
-- Per VM: the end of the last interval put in the outbox, the totals there, and the batch number.
CREATE TABLE billing_cursor (
    vm_id           TEXT PRIMARY KEY REFERENCES vms (id) ON DELETE CASCADE,
    last_ms         INTEGER NOT NULL,
    last_total_json TEXT NOT NULL,
    seq             INTEGER NOT NULL
);
