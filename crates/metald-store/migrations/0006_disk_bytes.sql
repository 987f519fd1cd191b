-- What each VM's own writable disks (its root disk copy and writable drive copies) take on the
-- host, fixed at create: the per-customer disk quota sums it. Shared read-only images do not
-- count. VMs from before this column take 0.
ALTER TABLE vms ADD COLUMN disk_bytes INTEGER NOT NULL DEFAULT 0;
