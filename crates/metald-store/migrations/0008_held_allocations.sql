-- A deleted VM's jail slot and addresses, held from its delete until its network and jail are
-- gone: DeleteVm answers once the VM's VMM is killed and its row removed, and the rest is
-- removed in the background. Nothing may be given a slot or address whose old interfaces,
-- routes or cgroup may still exist. Emptied at start, after the sweep of leftovers.
CREATE TABLE held_allocations (
    vm_id     TEXT PRIMARY KEY,
    slot      INTEGER NOT NULL UNIQUE,
    ip6_index INTEGER NOT NULL UNIQUE,
    ip4_index INTEGER UNIQUE
);
