//! The `vm_network` table: each VM's jail slot and addresses, picked inside the VM's insert
//! (see [`crate::VmStore::insert_vm`]) and removed with the VM by the schema's cascade, or
//! moved to `held_allocations` until a deleted VM's network and jail are gone.

use crate::Cached as _;
use rusqlite::params;

use crate::domain::{VmId, VmNet};
use crate::{sql, StoreError};
use metald_domain::ipam::{mac_for, AllocationPlan, FIRST_VM_INDEX};

/// Picks the lowest free slot and addresses for `vm` and records them (inside the caller's
/// transaction, under the store's lock, so nobody else can pick the same ones). Each is one
/// index lookup in the free numbers the schema keeps, whatever number of VMs exists.
pub(crate) fn allocate(
    tx: &rusqlite::Transaction<'_>,
    vm: &VmId,
    plan: &AllocationPlan,
) -> Result<VmNet, StoreError> {
    let exhausted = |what: &'static str| StoreError::Exhausted(what);
    let slot = take_lowest(tx, "slot", 0, u64::from(plan.slots).saturating_sub(1))?
        .ok_or(exhausted("jail uid/gid slots"))?;
    let ip6_index = take_lowest(tx, "ip6", FIRST_VM_INDEX, plan.ipv6.last_index())?
        .ok_or(exhausted("IPv6 addresses"))?;
    let ip4_index = match &plan.ipv4 {
        Some(s) => Some(
            take_lowest(tx, "ip4", FIRST_VM_INDEX, s.last_index())?
                .ok_or(exhausted("IPv4 addresses"))?,
        ),
        None => None,
    };
    let net = VmNet {
        slot: slot as u32,
        ipv6: plan.ipv6.at(ip6_index),
        ipv4: plan.ipv4.zip(ip4_index).map(|(s, i)| s.at(i)),
        mac: mac_for(vm),
    };
    tx.exec(
        "INSERT INTO vm_network (vm_id, slot, ip6_index, ipv6, ip4_index, ipv4, mac)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            vm.as_str(),
            slot as i64,
            ip6_index as i64,
            net.ipv6.to_string(),
            ip4_index.map(|i| i as i64),
            net.ipv4.map(|a| a.to_string()),
            net.mac,
        ],
    )
    .map_err(sql("record allocation"))?;
    Ok(net)
}

/// Takes the lowest free number of `pool` within `first..=last`: the smallest freed one, else
/// the next never handed out. `None` when none is left. A number outside the range (the range
/// was narrowed by the configuration) stays where it is, free for a later, wider range.
fn take_lowest(
    tx: &rusqlite::Transaction<'_>,
    pool: &str,
    first: u64,
    last: u64,
) -> Result<Option<u64>, StoreError> {
    use rusqlite::OptionalExtension;
    let (first_i, last_i) = (to_i64(first), to_i64(last));
    let freed: Option<i64> = tx
        .prepare_cached("SELECT MIN(n) FROM ipam_free WHERE pool = ?1 AND n BETWEEN ?2 AND ?3")
        .map_err(sql("read free numbers"))?
        .query_row(params![pool, first_i, last_i], |r| r.get(0))
        .map_err(sql("read free numbers"))?;
    if let Some(n) = freed {
        tx.exec(
            "DELETE FROM ipam_free WHERE pool = ?1 AND n = ?2",
            params![pool, n],
        )
        .map_err(sql("take a free number"))?;
        return Ok(Some(n as u64));
    }
    let next: i64 = tx
        .prepare_cached("SELECT next FROM ipam_next WHERE pool = ?1")
        .map_err(sql("read next number"))?
        .query_row(params![pool], |r| r.get(0))
        .optional()
        .map_err(sql("read next number"))?
        .unwrap_or(0);
    // Numbers below `first` that were never handed out are not free for this range.
    let n = next.max(first_i);
    if n > last_i {
        return Ok(None);
    }
    // Skipped numbers between the old `next` and `first` stay unused; nothing is lost.
    tx.exec(
        "INSERT INTO ipam_next (pool, next) VALUES (?1, ?2)
         ON CONFLICT (pool) DO UPDATE SET next = excluded.next",
        params![pool, n + 1],
    )
    .map_err(sql("advance next number"))?;
    Ok(Some(n as u64))
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
