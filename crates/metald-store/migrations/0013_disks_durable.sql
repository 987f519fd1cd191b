-- A new VM's own disk copies are made without waiting for stable storage (the fdatasync cost a
-- boot 2 ms, and tens of ms with many VMs running); a background sync sets `disks_durable`
-- once they are there. A VM whose copies were never synced (metald stopped first) has them
-- copied again, or synced, at the next start. VMs stored before this column synced their
-- copies when they were created.
ALTER TABLE vms ADD COLUMN disks_durable INTEGER NOT NULL DEFAULT 0;
UPDATE vms SET disks_durable = 1;
