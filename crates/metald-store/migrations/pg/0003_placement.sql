-- Placement (a fleet's CreateVm): every VM stored on a host reserves its vCPUs and guest memory
-- there, whatever its state, so a VM placed on a host finds room to boot. The host's
-- `host_owning` row keeps the sums beside its VM count, and the insert that places a VM reads
-- them under that row's lock against the host's registered capacity: concurrent creates on
-- several hosts never overbook one.
ALTER TABLE host_owning ADD COLUMN vcpus BIGINT NOT NULL DEFAULT 0;
ALTER TABLE host_owning ADD COLUMN memory_bytes BIGINT NOT NULL DEFAULT 0;
UPDATE host_owning o SET
    vcpus = (SELECT COALESCE(SUM(v.vcpus), 0) FROM vms v WHERE v.host_id = o.host_id),
    memory_bytes = (SELECT COALESCE(SUM(v.memory_bytes), 0) FROM vms v WHERE v.host_id = o.host_id);

CREATE OR REPLACE FUNCTION vms_keep_owning() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        UPDATE customer_owning SET vms = vms - 1, disk_bytes = disk_bytes - OLD.disk_bytes
        WHERE customer_id = OLD.customer_id;
        UPDATE host_owning SET vms = vms - 1, disk_bytes = disk_bytes - OLD.disk_bytes,
            vcpus = vcpus - OLD.vcpus, memory_bytes = memory_bytes - OLD.memory_bytes
        WHERE host_id = OLD.host_id;
    ELSE
        INSERT INTO customer_owning AS o (customer_id, vms, disk_bytes)
        VALUES (NEW.customer_id, 1, NEW.disk_bytes)
        ON CONFLICT (customer_id) DO UPDATE
        SET vms = o.vms + 1, disk_bytes = o.disk_bytes + EXCLUDED.disk_bytes;
        INSERT INTO host_owning AS o (host_id, vms, disk_bytes, vcpus, memory_bytes)
        VALUES (NEW.host_id, 1, NEW.disk_bytes, NEW.vcpus, NEW.memory_bytes)
        ON CONFLICT (host_id) DO UPDATE
        SET vms = o.vms + 1, disk_bytes = o.disk_bytes + EXCLUDED.disk_bytes,
            vcpus = o.vcpus + EXCLUDED.vcpus, memory_bytes = o.memory_bytes + EXCLUDED.memory_bytes;
    END IF;
    RETURN NULL;
END $$;
