-- Usage totals that must survive a metald restart: what finished VMM runs used (carried) and,
-- while a VMM runs, the counter readings its run started from (base). A re-adopted VMM's
-- cgroup and veth counters kept counting while metald was down, so restoring both keeps the
-- totals continuous.
CREATE TABLE vm_usage (
    vm_id        TEXT PRIMARY KEY REFERENCES vms (id) ON DELETE CASCADE,
    carried_json TEXT NOT NULL,
    base_json    TEXT
);
