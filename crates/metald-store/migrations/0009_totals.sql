-- What VMs hold, kept as running sums by triggers so that admitting a create or a boot reads a
-- row or two instead of summing over every VM (issue 14: nothing on the boot path grows with
-- the VMs running). One row per customer and backend, plus the host's rows under customer ''.
--
-- `holding`: VMs that run, are paused or are being booted (run_reserved): the running quotas
-- and the host's capacity. `owning`: every VM and its writable disk bytes: the stored quotas.
CREATE TABLE holding (
    customer_id  TEXT NOT NULL,
    backend      TEXT NOT NULL,
    vms          INTEGER NOT NULL,
    vcpus        INTEGER NOT NULL,
    memory_bytes INTEGER NOT NULL,
    PRIMARY KEY (customer_id, backend)
);
CREATE TABLE owning (
    customer_id TEXT PRIMARY KEY,
    vms         INTEGER NOT NULL,
    disk_bytes  INTEGER NOT NULL
);

INSERT INTO holding (customer_id, backend, vms, vcpus, memory_bytes)
SELECT customer_id, backend, COUNT(*),
       COALESCE(SUM(json_extract(config_json, '$.vcpu_count')), 0),
       COALESCE(SUM(json_extract(config_json, '$.memory_bytes')), 0)
FROM vms WHERE state IN ('RUNNING', 'PAUSED') OR run_reserved = 1
GROUP BY customer_id, backend;
INSERT INTO holding (customer_id, backend, vms, vcpus, memory_bytes)
SELECT '', backend, SUM(vms), SUM(vcpus), SUM(memory_bytes)
FROM holding GROUP BY backend;
INSERT INTO owning (customer_id, vms, disk_bytes)
SELECT customer_id, COUNT(*), COALESCE(SUM(disk_bytes), 0) FROM vms GROUP BY customer_id;
INSERT INTO owning (customer_id, vms, disk_bytes)
SELECT '', COALESCE(SUM(vms), 0), COALESCE(SUM(disk_bytes), 0) FROM owning;

-- A VM starts holding: added to its customer's row and the host's.
CREATE TRIGGER holding_add_on_insert AFTER INSERT ON vms
WHEN NEW.state IN ('RUNNING', 'PAUSED') OR NEW.run_reserved = 1
BEGIN
    INSERT INTO holding (customer_id, backend, vms, vcpus, memory_bytes)
    VALUES (NEW.customer_id, NEW.backend, 1, json_extract(NEW.config_json, '$.vcpu_count'),
            json_extract(NEW.config_json, '$.memory_bytes')),
           ('', NEW.backend, 1, json_extract(NEW.config_json, '$.vcpu_count'),
            json_extract(NEW.config_json, '$.memory_bytes'))
    ON CONFLICT (customer_id, backend) DO UPDATE SET
        vms = vms + excluded.vms, vcpus = vcpus + excluded.vcpus,
        memory_bytes = memory_bytes + excluded.memory_bytes;
END;
CREATE TRIGGER holding_add_on_update
AFTER UPDATE OF state, run_reserved, config_json, backend, customer_id ON vms
WHEN NEW.state IN ('RUNNING', 'PAUSED') OR NEW.run_reserved = 1
BEGIN
    INSERT INTO holding (customer_id, backend, vms, vcpus, memory_bytes)
    VALUES (NEW.customer_id, NEW.backend, 1, json_extract(NEW.config_json, '$.vcpu_count'),
            json_extract(NEW.config_json, '$.memory_bytes')),
           ('', NEW.backend, 1, json_extract(NEW.config_json, '$.vcpu_count'),
            json_extract(NEW.config_json, '$.memory_bytes'))
    ON CONFLICT (customer_id, backend) DO UPDATE SET
        vms = vms + excluded.vms, vcpus = vcpus + excluded.vcpus,
        memory_bytes = memory_bytes + excluded.memory_bytes;
END;
-- A VM stops holding (or changes what it holds: removed here, added back above).
CREATE TRIGGER holding_remove_on_update
AFTER UPDATE OF state, run_reserved, config_json, backend, customer_id ON vms
WHEN OLD.state IN ('RUNNING', 'PAUSED') OR OLD.run_reserved = 1
BEGIN
    UPDATE holding SET
        vms = vms - 1,
        vcpus = vcpus - json_extract(OLD.config_json, '$.vcpu_count'),
        memory_bytes = memory_bytes - json_extract(OLD.config_json, '$.memory_bytes')
    WHERE customer_id IN (OLD.customer_id, '') AND backend = OLD.backend;
END;
CREATE TRIGGER holding_remove_on_delete AFTER DELETE ON vms
WHEN OLD.state IN ('RUNNING', 'PAUSED') OR OLD.run_reserved = 1
BEGIN
    UPDATE holding SET
        vms = vms - 1,
        vcpus = vcpus - json_extract(OLD.config_json, '$.vcpu_count'),
        memory_bytes = memory_bytes - json_extract(OLD.config_json, '$.memory_bytes')
    WHERE customer_id IN (OLD.customer_id, '') AND backend = OLD.backend;
END;

CREATE TRIGGER owning_add AFTER INSERT ON vms
BEGIN
    INSERT INTO owning (customer_id, vms, disk_bytes)
    VALUES (NEW.customer_id, 1, NEW.disk_bytes), ('', 1, NEW.disk_bytes)
    ON CONFLICT (customer_id) DO UPDATE SET
        vms = vms + 1, disk_bytes = disk_bytes + excluded.disk_bytes;
END;
CREATE TRIGGER owning_remove AFTER DELETE ON vms
BEGIN
    UPDATE owning SET vms = vms - 1, disk_bytes = disk_bytes - OLD.disk_bytes
    WHERE customer_id IN (OLD.customer_id, '');
END;
CREATE TRIGGER owning_resize AFTER UPDATE OF disk_bytes, customer_id ON vms
BEGIN
    UPDATE owning SET vms = vms - 1, disk_bytes = disk_bytes - OLD.disk_bytes
    WHERE customer_id IN (OLD.customer_id, '');
    INSERT INTO owning (customer_id, vms, disk_bytes)
    VALUES (NEW.customer_id, 1, NEW.disk_bytes), ('', 1, NEW.disk_bytes)
    ON CONFLICT (customer_id) DO UPDATE SET
        vms = vms + 1, disk_bytes = disk_bytes + excluded.disk_bytes;
END;
