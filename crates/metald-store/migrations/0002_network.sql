-- What each VM holds while it exists: its jail uid/gid slot and its addresses. The UNIQUE
-- constraints are the IPAM's guarantee that no two live VMs share a slot or an address; the
-- row goes with the VM.
CREATE TABLE vm_network (
    vm_id     TEXT PRIMARY KEY REFERENCES vms (id) ON DELETE CASCADE,
    slot      INTEGER NOT NULL UNIQUE,
    ip6_index INTEGER NOT NULL UNIQUE,
    ipv6      TEXT NOT NULL UNIQUE,
    ip4_index INTEGER UNIQUE,
    ipv4      TEXT UNIQUE,
    mac       TEXT NOT NULL
);
