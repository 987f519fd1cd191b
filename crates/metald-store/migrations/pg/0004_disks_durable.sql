-- A new VM's own disk copies are made without waiting for stable storage; a background sync
-- sets `disks_durable` once they are there (the SQLite migration 0013 says why). VMs stored
-- before this column synced their copies when they were created.
ALTER TABLE vms ADD COLUMN disks_durable BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE vms SET disks_durable = TRUE;
