-- metald's schema for PostgreSQL: the SQLite schema as of its migration 0011, for a database that
-- several metald hosts may share. What is one host's own (its VMs' reconciliation, capacity,
-- jail slots and addresses, billing outbox, snapshot files) carries `host_id`; what belongs to
-- a customer (VMs read through the API, quotas, snapshots) or to the fleet (assets) does not
-- filter by it.

CREATE TABLE vms (
    -- Grows with each insert and is never reused (a sequence never goes back).
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    host_id         TEXT NOT NULL,
    customer_id     TEXT NOT NULL,
    state           TEXT NOT NULL,
    config_json     TEXT NOT NULL,
    -- Copied from config_json at insert (it never changes), for the kept sums below.
    vcpus           BIGINT NOT NULL,
    memory_bytes    BIGINT NOT NULL,
    backend         TEXT NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    updated_at_ms   BIGINT NOT NULL,
    vmm_pid         BIGINT,
    vmm_start_ticks BIGINT,
    failure         TEXT,
    guest_ready     BOOLEAN NOT NULL DEFAULT FALSE,
    -- A boot admitted and under way (see the SQLite migration 0005).
    run_reserved    BOOLEAN NOT NULL DEFAULT FALSE,
    -- The VM's own writable disks, fixed at create (SQLite migration 0006).
    disk_bytes      BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX vms_by_customer ON vms (customer_id, seq);
CREATE INDEX vms_by_host ON vms (host_id, seq);

-- The catalog is the fleet's: assets are addressed by content (sha256), whichever host has
-- their files.
CREATE TABLE assets (
    id            TEXT PRIMARY KEY,
    kind          TEXT NOT NULL CHECK (kind IN ('kernel', 'initrd', 'rootfs')),
    file_name     TEXT NOT NULL,
    size_bytes    BIGINT NOT NULL,
    sha256        TEXT NOT NULL,
    initrd_id     TEXT REFERENCES assets (id),
    ready_marker  TEXT,
    created_at_ms BIGINT NOT NULL,
    owner         TEXT
);
CREATE INDEX assets_by_initrd ON assets (initrd_id);

-- Jail slots and addresses are a host's: unique per host only.
CREATE TABLE vm_network (
    vm_id     TEXT PRIMARY KEY REFERENCES vms (id) ON DELETE CASCADE,
    host_id   TEXT NOT NULL,
    slot      BIGINT NOT NULL,
    ip6_index BIGINT NOT NULL,
    ipv6      TEXT NOT NULL,
    ip4_index BIGINT,
    ipv4      TEXT,
    mac       TEXT NOT NULL,
    UNIQUE (host_id, slot),
    UNIQUE (host_id, ip6_index),
    UNIQUE (host_id, ipv6),
    UNIQUE (host_id, ip4_index),
    UNIQUE (host_id, ipv4)
);

CREATE TABLE vm_usage (
    vm_id        TEXT PRIMARY KEY REFERENCES vms (id) ON DELETE CASCADE,
    carried_json TEXT NOT NULL,
    base_json    TEXT
);

-- Each host drains its own outbox rows.
CREATE TABLE billing_outbox (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    host_id       TEXT NOT NULL,
    key           TEXT NOT NULL UNIQUE,
    kind          TEXT NOT NULL CHECK (kind IN ('metrics', 'started', 'stopped', 'gap')),
    vm_id         TEXT NOT NULL,
    customer_id   TEXT NOT NULL,
    payload_json  TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX billing_outbox_by_host ON billing_outbox (host_id, id);

CREATE TABLE billing_cursor (
    vm_id           TEXT PRIMARY KEY REFERENCES vms (id) ON DELETE CASCADE,
    last_ms         BIGINT NOT NULL,
    last_total_json TEXT NOT NULL,
    seq             BIGINT NOT NULL
);

CREATE TABLE held_allocations (
    vm_id     TEXT PRIMARY KEY,
    host_id   TEXT NOT NULL,
    slot      BIGINT NOT NULL,
    ip6_index BIGINT NOT NULL,
    ip4_index BIGINT,
    UNIQUE (host_id, slot),
    UNIQUE (host_id, ip6_index),
    UNIQUE (host_id, ip4_index)
);

-- Kept sums (SQLite migration 0009), so admission reads a row or two whatever number of VMs
-- exists. The customer's rows sum over every host (quotas are fleet-wide); the host's rows
-- over every customer on that host (capacity is local). The `*_owning` rows are also what a
-- quota check locks (SELECT ... FOR UPDATE) so concurrent admissions on any host queue.
CREATE TABLE customer_holding (
    customer_id  TEXT NOT NULL,
    backend      TEXT NOT NULL,
    vms          BIGINT NOT NULL,
    vcpus        BIGINT NOT NULL,
    memory_bytes BIGINT NOT NULL,
    PRIMARY KEY (customer_id, backend)
);
CREATE TABLE host_holding (
    host_id      TEXT NOT NULL,
    backend      TEXT NOT NULL,
    vms          BIGINT NOT NULL,
    vcpus        BIGINT NOT NULL,
    memory_bytes BIGINT NOT NULL,
    PRIMARY KEY (host_id, backend)
);
CREATE TABLE customer_owning (
    customer_id TEXT PRIMARY KEY,
    vms         BIGINT NOT NULL,
    disk_bytes  BIGINT NOT NULL
);
CREATE TABLE host_owning (
    host_id    TEXT PRIMARY KEY,
    vms        BIGINT NOT NULL,
    disk_bytes BIGINT NOT NULL
);

-- Every VM counts in its customer's and its host's `owning` row. Customer first, then host,
-- the order every admission locks them in, so the triggers never deadlock against it.
CREATE FUNCTION vms_keep_owning() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        UPDATE customer_owning SET vms = vms - 1, disk_bytes = disk_bytes - OLD.disk_bytes
        WHERE customer_id = OLD.customer_id;
        UPDATE host_owning SET vms = vms - 1, disk_bytes = disk_bytes - OLD.disk_bytes
        WHERE host_id = OLD.host_id;
    ELSE
        INSERT INTO customer_owning AS o (customer_id, vms, disk_bytes)
        VALUES (NEW.customer_id, 1, NEW.disk_bytes)
        ON CONFLICT (customer_id) DO UPDATE
        SET vms = o.vms + 1, disk_bytes = o.disk_bytes + EXCLUDED.disk_bytes;
        INSERT INTO host_owning AS o (host_id, vms, disk_bytes)
        VALUES (NEW.host_id, 1, NEW.disk_bytes)
        ON CONFLICT (host_id) DO UPDATE
        SET vms = o.vms + 1, disk_bytes = o.disk_bytes + EXCLUDED.disk_bytes;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER vms_1_owning AFTER INSERT OR DELETE ON vms
FOR EACH ROW EXECUTE FUNCTION vms_keep_owning();

-- A VM that runs, is paused or is being booted counts in its customer's and host's `holding`.
CREATE FUNCTION vms_keep_holding() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was_holding BOOLEAN :=
        TG_OP <> 'INSERT' AND (OLD.state IN ('RUNNING', 'PAUSED') OR OLD.run_reserved);
    is_holding BOOLEAN :=
        TG_OP <> 'DELETE' AND (NEW.state IN ('RUNNING', 'PAUSED') OR NEW.run_reserved);
BEGIN
    IF was_holding AND NOT is_holding THEN
        UPDATE customer_holding
        SET vms = vms - 1, vcpus = vcpus - OLD.vcpus, memory_bytes = memory_bytes - OLD.memory_bytes
        WHERE customer_id = OLD.customer_id AND backend = OLD.backend;
        UPDATE host_holding
        SET vms = vms - 1, vcpus = vcpus - OLD.vcpus, memory_bytes = memory_bytes - OLD.memory_bytes
        WHERE host_id = OLD.host_id AND backend = OLD.backend;
    ELSIF is_holding AND NOT was_holding THEN
        INSERT INTO customer_holding AS h (customer_id, backend, vms, vcpus, memory_bytes)
        VALUES (NEW.customer_id, NEW.backend, 1, NEW.vcpus, NEW.memory_bytes)
        ON CONFLICT (customer_id, backend) DO UPDATE
        SET vms = h.vms + 1, vcpus = h.vcpus + EXCLUDED.vcpus,
            memory_bytes = h.memory_bytes + EXCLUDED.memory_bytes;
        INSERT INTO host_holding AS h (host_id, backend, vms, vcpus, memory_bytes)
        VALUES (NEW.host_id, NEW.backend, 1, NEW.vcpus, NEW.memory_bytes)
        ON CONFLICT (host_id, backend) DO UPDATE
        SET vms = h.vms + 1, vcpus = h.vcpus + EXCLUDED.vcpus,
            memory_bytes = h.memory_bytes + EXCLUDED.memory_bytes;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER vms_2_holding AFTER INSERT OR DELETE OR UPDATE OF state, run_reserved ON vms
FOR EACH ROW EXECUTE FUNCTION vms_keep_holding();

-- The IPAM's free numbers (SQLite migration 0010), per host and pool ('slot', 'ip6', 'ip4').
-- An allocation locks its `ipam_next` row, so allocations on one host queue there.
CREATE TABLE ipam_next (
    host_id TEXT NOT NULL,
    pool    TEXT NOT NULL,
    next    BIGINT NOT NULL,
    PRIMARY KEY (host_id, pool)
);
CREATE TABLE ipam_free (
    host_id TEXT NOT NULL,
    pool    TEXT NOT NULL,
    n       BIGINT NOT NULL,
    PRIMARY KEY (host_id, pool, n)
);

CREATE FUNCTION ipam_give_back(host TEXT, slot BIGINT, ip6 BIGINT, ip4 BIGINT)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ipam_free (host_id, pool, n) VALUES (host, 'slot', slot), (host, 'ip6', ip6)
    ON CONFLICT DO NOTHING;
    IF ip4 IS NOT NULL THEN
        INSERT INTO ipam_free (host_id, pool, n) VALUES (host, 'ip4', ip4) ON CONFLICT DO NOTHING;
    END IF;
END $$;

CREATE FUNCTION ipam_free_on_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'held_allocations'
       OR NOT EXISTS (SELECT 1 FROM held_allocations WHERE vm_id = OLD.vm_id) THEN
        PERFORM ipam_give_back(OLD.host_id, OLD.slot, OLD.ip6_index, OLD.ip4_index);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER ipam_free_on_delete AFTER DELETE ON vm_network
FOR EACH ROW EXECUTE FUNCTION ipam_free_on_delete();
CREATE TRIGGER ipam_free_on_release AFTER DELETE ON held_allocations
FOR EACH ROW EXECUTE FUNCTION ipam_free_on_delete();

-- Snapshots belong to their customer (read fleet-wide) but their files are on the host that
-- made them (`host_id`: that host's start-up reconciliation lists them).
CREATE TABLE snapshots (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id            TEXT NOT NULL UNIQUE,
    host_id       TEXT NOT NULL,
    customer_id   TEXT NOT NULL,
    source_vm_id  TEXT NOT NULL,
    state         TEXT NOT NULL,
    backend       TEXT NOT NULL,
    config_json   TEXT NOT NULL,
    ipv6          TEXT,
    ipv4          TEXT,
    mac           TEXT,
    bytes         BIGINT NOT NULL DEFAULT 0,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX snapshots_by_customer ON snapshots (customer_id, seq);
CREATE INDEX snapshots_by_host ON snapshots (host_id, seq);

CREATE TABLE vm_inner_identity (
    vm_id       TEXT PRIMARY KEY REFERENCES vms (id) ON DELETE CASCADE,
    snapshot_id TEXT NOT NULL,
    ipv6        TEXT NOT NULL,
    ipv4        TEXT,
    mac         TEXT NOT NULL
);
