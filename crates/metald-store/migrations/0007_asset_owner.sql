-- An asset is public (NULL: imported by the operator for everyone) or belongs to one customer,
-- the only one who may create VMs from it.
ALTER TABLE assets ADD COLUMN owner TEXT;
