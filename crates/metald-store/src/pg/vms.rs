//! [`VmStore`] on PostgreSQL, with the IPAM allocation inside the insert.

use std::collections::BTreeMap;

use postgres::{GenericClient, Row, Transaction};

use super::{pg, to_i64, PgStore};
use crate::domain::{CustomerId, VmConfig, VmId, VmNet, VmRecord, MIB};
use crate::state::{VmLife, VmState};
use crate::vms::{count, Running};
use crate::{within, HostLimits, HostUsage, RunLimits, StoreError, StoredLimits, VmStore};
use metald_domain::ipam::{mac_for, AllocationPlan, FIRST_VM_INDEX};

const VM_COLUMNS: &str = "seq, id, customer_id, state, config_json, backend, created_at_ms, \
                          updated_at_ms, vmm_pid, vmm_start_ticks, failure, guest_ready, \
                          slot, ipv6, ipv4, mac";
/// Every VM query reads its allocation with it.
const VMS: &str = "vms LEFT JOIN vm_network ON vm_network.vm_id = vms.id";
/// The VMs that count against running quotas and host capacity.
const HOLDING: &str = "(state IN ('RUNNING', 'PAUSED') OR run_reserved)";

impl VmStore for PgStore {
    fn insert_vm_within(
        &self,
        vm: &VmRecord,
        plan: Option<&AllocationPlan>,
        disk_bytes: u64,
        limits: &StoredLimits,
    ) -> Result<VmRecord, StoreError> {
        let (vm, plan, limits, host) = (vm.clone(), plan.cloned(), *limits, self.host.clone());
        self.pool.run(move |client, attempt| {
            let mut tx = client.transaction().map_err(pg("begin"))?;
            let saved = insert_vm_tx(
                &mut tx,
                &host,
                &vm,
                plan.as_ref(),
                disk_bytes,
                &limits,
                attempt.lost_connection,
            )?;
            tx.commit().map_err(pg("commit vm"))?;
            Ok(saved.record)
        })
    }

    fn update_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let vm = vm.clone();
        self.pool.run(move |client, _| {
            client
                .execute(
                    "UPDATE vms SET state = $2, updated_at_ms = $3, vmm_pid = $4,
                                    vmm_start_ticks = $5, failure = $6, guest_ready = $7,
                                    run_reserved = FALSE
                     WHERE id = $1",
                    &[
                        &vm.id.as_str(),
                        &vm.life.state().as_str(),
                        &vm.updated_at_ms,
                        &vm.life.vmm_pid().map(i64::from),
                        &vm.life.vmm_start_ticks().map(to_i64),
                        &vm.life.failure(),
                        &vm.life.guest_ready(),
                    ],
                )
                .map_err(pg("update vm"))?;
            Ok(())
        })
    }

    fn get_vm(&self, customer: &CustomerId, id: &VmId) -> Result<Option<VmRecord>, StoreError> {
        let (customer, id) = (customer.to_string(), id.to_string());
        self.pool.run(move |client, _| {
            client
                .query_opt(
                    &format!("SELECT {VM_COLUMNS} FROM {VMS} WHERE id = $1 AND customer_id = $2"),
                    &[&id, &customer],
                )
                .map_err(pg("read vm"))?
                .map(|r| read_vm_row(&r))
                .transpose()
        })
    }

    fn get_vm_unscoped(&self, id: &VmId) -> Result<Option<VmRecord>, StoreError> {
        let id = id.to_string();
        self.pool.run(move |client, _| read_vm(client, &id))
    }

    fn list_vms(
        &self,
        customer: &CustomerId,
        state: Option<VmState>,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<VmRecord>, StoreError> {
        let customer = customer.to_string();
        self.pool.run(move |client, _| {
            let rows = client
                .query(
                    &format!(
                        "SELECT {VM_COLUMNS} FROM {VMS}
                         WHERE customer_id = $1 AND seq > $2
                           AND ($3::TEXT IS NULL OR state = $3)
                         ORDER BY seq LIMIT $4"
                    ),
                    &[
                        &customer,
                        &after_seq,
                        &state.map(|s| s.as_str()),
                        &i64::from(limit),
                    ],
                )
                .map_err(pg("list vms"))?;
            rows.iter().map(read_vm_row).collect()
        })
    }

    fn all_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let host = self.host.clone();
        self.pool.run(move |client, _| {
            let rows = client
                .query(
                    &format!("SELECT {VM_COLUMNS} FROM {VMS} WHERE vms.host_id = $1 ORDER BY seq"),
                    &[&&*host],
                )
                .map_err(pg("list all vms"))?;
            rows.iter().map(read_vm_row).collect()
        })
    }

    fn count_by_state(&self) -> Result<Vec<(VmState, u64)>, StoreError> {
        let host = self.host.clone();
        self.pool.run(move |client, _| {
            let rows = client
                .query(
                    "SELECT state, COUNT(*) FROM vms WHERE host_id = $1 GROUP BY state",
                    &[&&*host],
                )
                .map_err(pg("count vms"))?;
            let mut out = Vec::new();
            for row in rows {
                let state: String = row.try_get(0).map_err(pg("count vms"))?;
                let n: i64 = row.try_get(1).map_err(pg("count vms"))?;
                let state = VmState::parse(&state).ok_or_else(|| StoreError::Corrupt {
                    id: "vms".into(),
                    reason: format!("state {state}"),
                })?;
                out.push((state, count(n)));
            }
            Ok(out)
        })
    }

    fn reserve_run(
        &self,
        vm: &VmRecord,
        limits: &RunLimits,
        host: &HostLimits,
    ) -> Result<(), StoreError> {
        // As SQLite's: without a limit, a boot costs no write (see there).
        if *limits == RunLimits::default() && *host == HostLimits::default() {
            return Ok(());
        }
        let (vm, limits, bounds, host) = (vm.clone(), *limits, *host, self.host.clone());
        self.pool.run(move |client, _| {
            let mut tx = client.transaction().map_err(pg("begin"))?;
            let own = own_holding(&mut tx, vm.id.as_str())?;
            if limits != RunLimits::default() {
                lock_customer(&mut tx, vm.customer.as_str())?;
                let mut sums = holding(
                    &mut tx,
                    "customer_holding",
                    "customer_id",
                    vm.customer.as_str(),
                )?;
                if let Some(own) = own.as_ref().filter(|o| o.customer == vm.customer.as_str()) {
                    own.subtract_from(&mut sums);
                }
                Running::from(sums).admit_quota(&vm, &limits)?;
            }
            if bounds != HostLimits::default() {
                lock_host(&mut tx, &host)?;
                let mut sums = holding(&mut tx, "host_holding", "host_id", &host)?;
                if let Some(own) = own.as_ref().filter(|o| o.host == *host) {
                    own.subtract_from(&mut sums);
                }
                Running::from(sums).admit_host(&vm, &bounds)?;
            }
            tx.execute(
                "UPDATE vms SET run_reserved = TRUE WHERE id = $1",
                &[&vm.id.as_str()],
            )
            .map_err(pg("reserve run"))?;
            tx.commit().map_err(pg("commit run reservation"))
        })
    }

    fn host_usage(&self) -> Result<HostUsage, StoreError> {
        let host = self.host.clone();
        self.pool.run(move |client, _| {
            let run = Running::from(holding(client, "host_holding", "host_id", &host)?);
            let (vms, disk) = client
                .query_opt(
                    "SELECT vms, disk_bytes FROM host_owning WHERE host_id = $1",
                    &[&&*host],
                )
                .map_err(pg("count vms"))?
                .map(|r| Ok::<_, postgres::Error>((r.try_get(0)?, r.try_get(1)?)))
                .transpose()
                .map_err(pg("count vms"))?
                .unwrap_or((0, 0));
            Ok(HostUsage {
                memory_bytes: run.memory_bytes,
                vcpus: run.vcpus,
                vms: count(vms),
                disk_bytes: count(disk),
            })
        })
    }

    fn release_run(&self, id: &VmId) -> Result<(), StoreError> {
        let id = id.to_string();
        self.pool.run(move |client, _| {
            client
                .execute(
                    "UPDATE vms SET run_reserved = FALSE WHERE id = $1 AND run_reserved",
                    &[&id],
                )
                .map_err(pg("release run"))?;
            Ok(())
        })
    }

    fn release_all_runs(&self) -> Result<(), StoreError> {
        let host = self.host.clone();
        self.pool.run(move |client, _| {
            client
                .execute(
                    "UPDATE vms SET run_reserved = FALSE WHERE run_reserved AND host_id = $1",
                    &[&&*host],
                )
                .map_err(pg("release runs"))?;
            Ok(())
        })
    }

    fn delete_vm(&self, id: &VmId) -> Result<(), StoreError> {
        let id = id.to_string();
        self.pool.run(move |client, _| {
            client
                .execute("DELETE FROM vms WHERE id = $1", &[&id])
                .map_err(pg("delete vm"))?;
            Ok(())
        })
    }

    fn delete_vm_holding_allocation(&self, id: &VmId) -> Result<(), StoreError> {
        let id = id.to_string();
        self.pool.run(move |client, _| {
            let mut tx = client.transaction().map_err(pg("begin"))?;
            tx.execute(
                "INSERT INTO held_allocations (vm_id, host_id, slot, ip6_index, ip4_index)
                 SELECT vm_id, host_id, slot, ip6_index, ip4_index FROM vm_network
                 WHERE vm_id = $1
                 ON CONFLICT (vm_id) DO UPDATE SET
                     host_id = EXCLUDED.host_id, slot = EXCLUDED.slot,
                     ip6_index = EXCLUDED.ip6_index, ip4_index = EXCLUDED.ip4_index",
                &[&id],
            )
            .map_err(pg("hold allocation"))?;
            tx.execute("DELETE FROM vms WHERE id = $1", &[&id])
                .map_err(pg("delete vm"))?;
            tx.commit().map_err(pg("commit"))
        })
    }

    fn free_held_allocation(&self, id: &VmId) -> Result<(), StoreError> {
        let id = id.to_string();
        self.pool.run(move |client, _| {
            client
                .execute("DELETE FROM held_allocations WHERE vm_id = $1", &[&id])
                .map_err(pg("free held allocation"))?;
            Ok(())
        })
    }

    fn free_held_allocations(&self) -> Result<u64, StoreError> {
        let host = self.host.clone();
        self.pool.run(move |client, _| {
            client
                .execute(
                    "DELETE FROM held_allocations WHERE host_id = $1",
                    &[&&*host],
                )
                .map_err(pg("free held allocations"))
        })
    }

    fn set_disks_durable(&self, id: &VmId) -> Result<(), StoreError> {
        let id = id.to_string();
        self.pool.run(move |client, _| {
            client
                .execute("UPDATE vms SET disks_durable = TRUE WHERE id = $1", &[&id])
                .map_err(pg("record disks durable"))?;
            Ok(())
        })
    }

    fn vms_with_undurable_disks(&self) -> Result<Vec<VmId>, StoreError> {
        let host = self.host.clone();
        self.pool.run(move |client, _| {
            let rows = client
                .query(
                    "SELECT id FROM vms WHERE host_id = $1 AND NOT disks_durable ORDER BY seq",
                    &[&&*host],
                )
                .map_err(pg("list vms with undurable disks"))?;
            rows.iter()
                .map(|r| crate::vms::parse_vm_id(r.get(0)))
                .collect()
        })
    }
}

/// A VM by id, with its allocation.
pub(super) fn read_vm(
    client: &mut impl GenericClient,
    id: &str,
) -> Result<Option<VmRecord>, StoreError> {
    client
        .query_opt(
            &format!("SELECT {VM_COLUMNS} FROM {VMS} WHERE id = $1"),
            &[&id],
        )
        .map_err(pg("read vm"))?
        .map(|r| read_vm_row(&r))
        .transpose()
}

/// Makes sure the customer's `customer_owning` row exists and locks it until the transaction
/// ends: every admission of the customer's, on any host, queues here.
pub(super) fn lock_customer(
    tx: &mut Transaction<'_>,
    customer: &str,
) -> Result<(i64, i64), StoreError> {
    tx.execute(
        "INSERT INTO customer_owning (customer_id, vms, disk_bytes) VALUES ($1, 0, 0)
         ON CONFLICT DO NOTHING",
        &[&customer],
    )
    .map_err(pg("lock customer"))?;
    let row = tx
        .query_one(
            "SELECT vms, disk_bytes FROM customer_owning WHERE customer_id = $1 FOR UPDATE",
            &[&customer],
        )
        .map_err(pg("lock customer"))?;
    Ok((
        row.try_get(0).map_err(pg("lock customer"))?,
        row.try_get(1).map_err(pg("lock customer"))?,
    ))
}

/// [`lock_customer`] for the host's `host_owning` row: boots on this host queue here.
fn lock_host(tx: &mut Transaction<'_>, host: &str) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO host_owning (host_id, vms, disk_bytes) VALUES ($1, 0, 0)
         ON CONFLICT DO NOTHING",
        &[&host],
    )
    .map_err(pg("lock host"))?;
    tx.query_one(
        "SELECT 1 FROM host_owning WHERE host_id = $1 FOR UPDATE",
        &[&host],
    )
    .map_err(pg("lock host"))?;
    Ok(())
}

/// Reserves `vm`'s vCPUs and memory (plus its VMM's headroom) on `host` against the capacity
/// the host registered (no registration, or none reported yet: no bound), under the host's
/// `host_owning` lock: the reservation and the VM row commit together.
fn place(tx: &mut Transaction<'_>, host: &str, vm: &VmRecord) -> Result<(), StoreError> {
    let op = "place vm";
    let Some(cap) = tx
        .query_opt(
            "SELECT memory_bytes, vcpus FROM hosts WHERE id = $1",
            &[&host],
        )
        .map_err(pg(op))?
    else {
        return Ok(());
    };
    let (cap_memory, cap_vcpus): (Option<i64>, Option<i64>) = (
        cap.try_get(0).map_err(pg(op))?,
        cap.try_get(1).map_err(pg(op))?,
    );
    if cap_memory.is_none() && cap_vcpus.is_none() {
        return Ok(());
    }
    lock_host(tx, host)?;
    let row = tx
        .query_one(
            "SELECT vms, vcpus, memory_bytes FROM host_owning WHERE host_id = $1",
            &[&host],
        )
        .map_err(pg(op))?;
    let (vms, vcpus, memory): (i64, i64, i64) = (
        row.try_get(0).map_err(pg(op))?,
        row.try_get(1).map_err(pg(op))?,
        row.try_get(2).map_err(pg(op))?,
    );
    // One host runs one VMM kind: its VMs' headroom is this VM's.
    let held = Running::from(BTreeMap::from([(vm.backend.clone(), (vms, vcpus, memory))]));
    let bounds = HostLimits {
        memory_bytes: cap_memory.map(count),
        vcpus: cap_vcpus.map(count),
    };
    held.admit_host(vm, &bounds)?;
    Ok(())
}

/// The customer's bytes of snapshots (a few rows: the snapshot quota bounds them).
pub(super) fn snapshot_bytes(tx: &mut Transaction<'_>, customer: &str) -> Result<i64, StoreError> {
    tx.query_one(
        "SELECT COALESCE(SUM(bytes), 0)::BIGINT FROM snapshots WHERE customer_id = $1",
        &[&customer],
    )
    .and_then(|r| r.try_get(0))
    .map_err(pg("count snapshots"))
}

/// What [`insert_vm_tx`] did.
pub(super) struct Inserted {
    /// The VM as stored.
    pub record: VmRecord,
    /// It was already stored, identical: an earlier attempt's COMMIT went through.
    pub earlier: bool,
}

/// The insert of [`VmStore::insert_vm_within`] inside the caller's transaction (a clone's
/// insert adds its own rows to the same one). After a lost connection (`retry`), a stored VM
/// with this id and the same content is the earlier attempt's, and is returned as it is.
pub(super) fn insert_vm_tx(
    tx: &mut Transaction<'_>,
    host: &str,
    vm: &VmRecord,
    plan: Option<&AllocationPlan>,
    disk_bytes: u64,
    limits: &StoredLimits,
    retry: bool,
) -> Result<Inserted, StoreError> {
    let config = config_json(vm)?;
    if retry {
        let same = tx
            .query_opt(
                "SELECT 1 FROM vms WHERE id = $1 AND host_id = $2 AND customer_id = $3
                   AND state = $4 AND config_json = $5 AND backend = $6
                   AND created_at_ms = $7 AND disk_bytes = $8",
                &[
                    &vm.id.as_str(),
                    &host,
                    &vm.customer.as_str(),
                    &vm.life.state().as_str(),
                    &config,
                    &vm.backend,
                    &vm.created_at_ms,
                    &to_i64(disk_bytes),
                ],
            )
            .map_err(pg("read vm"))?;
        if same.is_some() {
            if let Some(record) = read_vm(tx, vm.id.as_str())? {
                return Ok(Inserted {
                    record,
                    earlier: true,
                });
            }
        }
    }
    if limits.vms.is_some() || limits.disk_bytes.is_some() {
        let (vms, vm_disk) = lock_customer(tx, vm.customer.as_str())?;
        let disk = vm_disk.saturating_add(snapshot_bytes(tx, vm.customer.as_str())?);
        within("UNKEY_METALD_QUOTA_VMS", count(vms), 1, limits.vms)?;
        // Compared in MiB, rounded up, as the quota is set and reported.
        within(
            "UNKEY_METALD_QUOTA_DISK_MIB",
            count(disk).div_ceil(MIB),
            disk_bytes.div_ceil(MIB),
            limits.disk_bytes.map(|b| b / MIB),
        )?;
    }
    place(tx, host, vm)?;
    let seq: i64 = tx
        .query_one(
            "INSERT INTO vms (id, host_id, customer_id, state, config_json, vcpus, memory_bytes,
                              backend, created_at_ms, updated_at_ms, vmm_pid, vmm_start_ticks,
                              failure, guest_ready, disk_bytes)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
             RETURNING seq",
            &[
                &vm.id.as_str(),
                &host,
                &vm.customer.as_str(),
                &vm.life.state().as_str(),
                &config,
                &i64::from(vm.config.vcpu_count),
                &to_i64(vm.config.memory_bytes),
                &vm.backend,
                &vm.created_at_ms,
                &vm.updated_at_ms,
                &vm.life.vmm_pid().map(i64::from),
                &vm.life.vmm_start_ticks().map(to_i64),
                &vm.life.failure(),
                &vm.life.guest_ready(),
                &to_i64(disk_bytes),
            ],
        )
        .and_then(|r| r.try_get(0))
        .map_err(pg("insert vm"))?;
    let mut record = vm.clone();
    record.seq = seq;
    if let Some(plan) = plan {
        record.net = Some(allocate(tx, host, &vm.id, plan)?);
    }
    Ok(Inserted {
        record,
        earlier: false,
    })
}

/// Picks the lowest free slot and addresses of this host for `vm` and records them (see
/// SQLite's `ipam::allocate`; here each pool's `ipam_next` row is locked, so allocations on
/// one host queue).
fn allocate(
    tx: &mut Transaction<'_>,
    host: &str,
    vm: &VmId,
    plan: &AllocationPlan,
) -> Result<VmNet, StoreError> {
    let exhausted = StoreError::Exhausted;
    let slot = take_lowest(tx, host, "slot", 0, u64::from(plan.slots).saturating_sub(1))?
        .ok_or(exhausted("jail uid/gid slots"))?;
    let ip6_index = take_lowest(tx, host, "ip6", FIRST_VM_INDEX, plan.ipv6.last_index())?
        .ok_or(exhausted("IPv6 addresses"))?;
    let ip4_index = match &plan.ipv4 {
        Some(s) => Some(
            take_lowest(tx, host, "ip4", FIRST_VM_INDEX, s.last_index())?
                .ok_or(exhausted("IPv4 addresses"))?,
        ),
        None => None,
    };
    let net = VmNet {
        slot: u32::try_from(slot).map_err(|_| exhausted("jail uid/gid slots"))?,
        ipv6: plan.ipv6.at(ip6_index),
        ipv4: plan.ipv4.zip(ip4_index).map(|(s, i)| s.at(i)),
        mac: mac_for(vm),
    };
    tx.execute(
        "INSERT INTO vm_network (vm_id, host_id, slot, ip6_index, ipv6, ip4_index, ipv4, mac)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &vm.as_str(),
            &host,
            &to_i64(slot),
            &to_i64(ip6_index),
            &net.ipv6.to_string(),
            &ip4_index.map(to_i64),
            &net.ipv4.map(|a| a.to_string()),
            &net.mac,
        ],
    )
    .map_err(pg("record allocation"))?;
    Ok(net)
}

/// Takes the lowest free number of this host's `pool` within `first..=last` (see SQLite's
/// `ipam::take_lowest`).
fn take_lowest(
    tx: &mut Transaction<'_>,
    host: &str,
    pool: &str,
    first: u64,
    last: u64,
) -> Result<Option<u64>, StoreError> {
    let (first_i, last_i) = (to_i64(first), to_i64(last));
    tx.execute(
        "INSERT INTO ipam_next (host_id, pool, next) VALUES ($1, $2, 0) ON CONFLICT DO NOTHING",
        &[&host, &pool],
    )
    .map_err(pg("read next number"))?;
    // The lock queues this host's allocations; each statement after it sees what the one
    // before committed (READ COMMITTED takes a new snapshot per statement).
    let next: i64 = tx
        .query_one(
            "SELECT next FROM ipam_next WHERE host_id = $1 AND pool = $2 FOR UPDATE",
            &[&host, &pool],
        )
        .and_then(|r| r.try_get(0))
        .map_err(pg("read next number"))?;
    let freed: Option<i64> = tx
        .query_one(
            "SELECT MIN(n) FROM ipam_free WHERE host_id = $1 AND pool = $2 AND n BETWEEN $3 AND $4",
            &[&host, &pool, &first_i, &last_i],
        )
        .and_then(|r| r.try_get(0))
        .map_err(pg("read free numbers"))?;
    if let Some(n) = freed {
        tx.execute(
            "DELETE FROM ipam_free WHERE host_id = $1 AND pool = $2 AND n = $3",
            &[&host, &pool, &n],
        )
        .map_err(pg("take a free number"))?;
        return Ok(Some(count(n)));
    }
    let n = next.max(first_i);
    if n > last_i {
        return Ok(None);
    }
    tx.execute(
        "UPDATE ipam_next SET next = $3 WHERE host_id = $1 AND pool = $2",
        &[&host, &pool, &(n + 1)],
    )
    .map_err(pg("advance next number"))?;
    Ok(Some(count(n)))
}

/// A VM's own row, when it holds (runs, is paused or is being booted).
struct OwnHolding {
    customer: String,
    host: String,
    backend: String,
    vcpus: i64,
    memory_bytes: i64,
}

impl OwnHolding {
    /// Leaves this VM out of `sums` (a VM asking again never counts itself twice).
    fn subtract_from(&self, sums: &mut BTreeMap<String, (i64, i64, i64)>) {
        if let Some(t) = sums.get_mut(&self.backend) {
            *t = (t.0 - 1, t.1 - self.vcpus, t.2 - self.memory_bytes);
        }
    }
}

fn own_holding(tx: &mut Transaction<'_>, id: &str) -> Result<Option<OwnHolding>, StoreError> {
    let op = "count running vms";
    tx.query_opt(
        &format!(
            "SELECT customer_id, host_id, backend, vcpus, memory_bytes FROM vms
             WHERE id = $1 AND {HOLDING}"
        ),
        &[&id],
    )
    .map_err(pg(op))?
    .map(|r| {
        Ok(OwnHolding {
            customer: r.try_get(0).map_err(pg(op))?,
            host: r.try_get(1).map_err(pg(op))?,
            backend: r.try_get(2).map_err(pg(op))?,
            vcpus: r.try_get(3).map_err(pg(op))?,
            memory_bytes: r.try_get(4).map_err(pg(op))?,
        })
    })
    .transpose()
}

/// The kept sums of `table` (`customer_holding` or `host_holding`) for `key = value`, per
/// backend: (VMs, vCPUs, guest memory).
fn holding(
    client: &mut impl GenericClient,
    table: &str,
    key: &str,
    value: &str,
) -> Result<BTreeMap<String, (i64, i64, i64)>, StoreError> {
    let op = "count running vms";
    let rows = client
        .query(
            &format!("SELECT backend, vms, vcpus, memory_bytes FROM {table} WHERE {key} = $1"),
            &[&value],
        )
        .map_err(pg(op))?;
    let mut out = BTreeMap::new();
    for r in rows {
        out.insert(
            r.try_get(0).map_err(pg(op))?,
            (
                r.try_get(1).map_err(pg(op))?,
                r.try_get(2).map_err(pg(op))?,
                r.try_get(3).map_err(pg(op))?,
            ),
        );
    }
    Ok(out)
}

fn config_json(vm: &VmRecord) -> Result<String, StoreError> {
    serde_json::to_string(&vm.config).map_err(|e| StoreError::Corrupt {
        id: vm.id.to_string(),
        reason: format!("config does not serialize: {e}"),
    })
}

fn read_vm_row(row: &Row) -> Result<VmRecord, StoreError> {
    let op = "read vm";
    let id: String = row.try_get(1).map_err(pg(op))?;
    let customer: String = row.try_get(2).map_err(pg(op))?;
    let state: String = row.try_get(3).map_err(pg(op))?;
    let config: String = row.try_get(4).map_err(pg(op))?;
    let corrupt = |reason: String| StoreError::Corrupt {
        id: id.clone(),
        reason,
    };
    let pid: Option<i64> = row.try_get(8).map_err(pg(op))?;
    let ticks: Option<i64> = row.try_get(9).map_err(pg(op))?;
    Ok(VmRecord {
        seq: row.try_get(0).map_err(pg(op))?,
        id: id.parse().map_err(|e| corrupt(format!("{e}")))?,
        customer: customer.parse().map_err(|e| corrupt(format!("{e}")))?,
        config: serde_json::from_str::<VmConfig>(&config)
            .map_err(|e| corrupt(format!("config: {e}")))?,
        backend: row.try_get(5).map_err(pg(op))?,
        created_at_ms: row.try_get(6).map_err(pg(op))?,
        updated_at_ms: row.try_get(7).map_err(pg(op))?,
        life: VmLife::restore(
            VmState::parse(&state).ok_or_else(|| corrupt(format!("state {state}")))?,
            pid.map(|p| u32::try_from(p).map_err(|_| corrupt(format!("vmm pid {p}"))))
                .transpose()?,
            ticks.map(count),
            row.try_get(10).map_err(pg(op))?,
            row.try_get(11).map_err(pg(op))?,
        ),
        net: read_net(row).map_err(|e| corrupt(format!("network: {e}")))?,
    })
}

/// The allocation columns of a VM row (`None` for a VM created without a plan).
fn read_net(row: &Row) -> Result<Option<VmNet>, String> {
    let slot: Option<i64> = row.try_get(12).map_err(|e| e.to_string())?;
    let Some(slot) = slot else { return Ok(None) };
    let ipv6: String = row.try_get(13).map_err(|e| e.to_string())?;
    let ipv4: Option<String> = row.try_get(14).map_err(|e| e.to_string())?;
    Ok(Some(VmNet {
        slot: u32::try_from(slot).map_err(|e| e.to_string())?,
        ipv6: ipv6.parse().map_err(|_| format!("ipv6 {ipv6}"))?,
        ipv4: ipv4
            .map(|a| a.parse().map_err(|_| format!("ipv4 {a}")))
            .transpose()?,
        mac: row.try_get(15).map_err(|e| e.to_string())?,
    }))
}
