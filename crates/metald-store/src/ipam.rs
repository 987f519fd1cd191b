//! The `vm_network` table: each VM's jail slot and addresses, picked inside the VM's insert
//! (see [`crate::VmStore::insert_vm`]) and removed with the VM by the schema's cascade, or
//! moved to `held_allocations` until a deleted VM's network and jail are gone.

use rusqlite::params;

use crate::domain::{VmId, VmNet};
use crate::{sql, StoreError};
use metald_domain::ipam::{lowest_free, mac_for, AllocationPlan, FIRST_VM_INDEX};

/// Picks the lowest free slot and addresses for `vm` and records them (inside the caller's
/// transaction, under the store's lock, so nobody else can pick the same ones).
pub(crate) fn allocate(
    tx: &rusqlite::Transaction<'_>,
    vm: &VmId,
    plan: &AllocationPlan,
) -> Result<VmNet, StoreError> {
    let used = |column: &str| -> Result<Vec<u64>, StoreError> {
        let mut stmt = tx
            .prepare_cached(&format!(
                "SELECT {column} FROM vm_network WHERE {column} IS NOT NULL
                 UNION SELECT {column} FROM held_allocations WHERE {column} IS NOT NULL
                 ORDER BY 1"
            ))
            .map_err(sql("read allocations"))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, i64>(0))
            .map_err(sql("read allocations"))?;
        rows.map(|r| r.map(|v| v as u64).map_err(sql("read allocations")))
            .collect()
    };
    let exhausted = |what: &'static str| StoreError::Exhausted(what);
    let slot = lowest_free(&used("slot")?, 0, u64::from(plan.slots).saturating_sub(1))
        .ok_or(exhausted("jail uid/gid slots"))?;
    let ip6_index = lowest_free(&used("ip6_index")?, FIRST_VM_INDEX, plan.ipv6.last_index())
        .ok_or(exhausted("IPv6 addresses"))?;
    let ip4_index = match &plan.ipv4 {
        Some(s) => Some(
            lowest_free(&used("ip4_index")?, FIRST_VM_INDEX, s.last_index())
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
    tx.execute(
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
