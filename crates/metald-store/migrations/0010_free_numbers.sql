-- The IPAM's free numbers, so a create takes the lowest free slot and addresses with an index
-- lookup instead of reading every VM's (issue 14). Per pool ('slot', 'ip6', 'ip4'): `ipam_next`
-- is one past the highest number ever handed out, and `ipam_free` holds every number below it
-- that is free again. The lowest free number is the smallest in `ipam_free`, else `next`.
-- Numbers come back when a VM's allocation row goes (its VM deleted) unless the allocation is
-- held for a deleted VM's leftovers; then when the hold ends.
CREATE TABLE ipam_next (
    pool TEXT PRIMARY KEY,
    next INTEGER NOT NULL
);
CREATE TABLE ipam_free (
    pool TEXT NOT NULL,
    n    INTEGER NOT NULL,
    PRIMARY KEY (pool, n)
) WITHOUT ROWID;

-- From what is allocated (or held) now: next is one past the highest, the gaps below are free.
CREATE TEMP TABLE taken AS
    SELECT 'slot' AS pool, slot AS n FROM vm_network
    UNION SELECT 'slot', slot FROM held_allocations
    UNION SELECT 'ip6', ip6_index FROM vm_network
    UNION SELECT 'ip6', ip6_index FROM held_allocations
    UNION SELECT 'ip4', ip4_index FROM vm_network WHERE ip4_index IS NOT NULL
    UNION SELECT 'ip4', ip4_index FROM held_allocations WHERE ip4_index IS NOT NULL;
INSERT INTO ipam_next (pool, next) SELECT pool, MAX(n) + 1 FROM taken GROUP BY pool;
WITH RECURSIVE numbers (pool, n) AS (
    SELECT pool, 0 FROM ipam_next WHERE next > 0
    UNION ALL
    SELECT numbers.pool, numbers.n + 1 FROM numbers JOIN ipam_next USING (pool)
    WHERE numbers.n + 1 < ipam_next.next
)
INSERT INTO ipam_free (pool, n)
SELECT pool, n FROM numbers WHERE (pool, n) NOT IN (SELECT pool, n FROM taken);
DROP TABLE taken;

CREATE TRIGGER ipam_free_on_delete AFTER DELETE ON vm_network
WHEN NOT EXISTS (SELECT 1 FROM held_allocations WHERE vm_id = OLD.vm_id)
BEGIN
    INSERT OR IGNORE INTO ipam_free (pool, n) VALUES ('slot', OLD.slot), ('ip6', OLD.ip6_index);
    INSERT OR IGNORE INTO ipam_free (pool, n)
    SELECT 'ip4', OLD.ip4_index WHERE OLD.ip4_index IS NOT NULL;
END;
CREATE TRIGGER ipam_free_on_release AFTER DELETE ON held_allocations
BEGIN
    INSERT OR IGNORE INTO ipam_free (pool, n) VALUES ('slot', OLD.slot), ('ip6', OLD.ip6_index);
    INSERT OR IGNORE INTO ipam_free (pool, n)
    SELECT 'ip4', OLD.ip4_index WHERE OLD.ip4_index IS NOT NULL;
END;
