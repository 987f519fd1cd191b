-- A boot under way holds its place against the customer's running quotas from the moment it
-- is admitted until its VM is saved RUNNING (or the boot fails): concurrent boots count each
-- other. Cleared for every VM at start, as no boot outlives metald.
ALTER TABLE vms ADD COLUMN run_reserved INTEGER NOT NULL DEFAULT 0;
