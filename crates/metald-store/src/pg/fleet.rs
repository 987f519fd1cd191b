//! The `hosts` table on PostgreSQL: leases run on the database's clock, and a new host's place
//! is taken under a table lock so hosts registering at once never share one.

use std::time::Duration;

use super::{pg, PgStore};
use crate::domain::{CustomerId, VmId};
use crate::fleet::{column, labels_json, lowest_free, HostRow};
use crate::{FleetStore, StoreError};
use metald_domain::fleet::{HostId, HostLoad, HostRecord, HostRegistration};

/// The database's clock, in ms since the Unix epoch.
const NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

fn lease_ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX)
}

impl FleetStore for PgStore {
    fn register_host(
        &self,
        reg: &HostRegistration,
        places: u64,
        lease: Duration,
    ) -> Result<HostRecord, StoreError> {
        let id = reg.id.clone();
        let reg = reg.clone();
        let labels = labels_json(&reg)?;
        let lease = lease_ms(lease);
        self.pool.run(move |client, _| {
            let mut tx = client.transaction().map_err(pg("begin"))?;
            // Places are few and registrations rare: one lock for the whole table is simplest.
            tx.batch_execute("LOCK TABLE hosts IN EXCLUSIVE MODE")
                .map_err(pg("lock hosts"))?;
            let known = tx
                .query_opt("SELECT idx FROM hosts WHERE id = $1", &[&reg.id.as_str()])
                .map_err(pg("read host"))?;
            let idx: i64 = match known {
                Some(row) => row.try_get(0).map_err(pg("read host"))?,
                None => {
                    let taken: Vec<u64> = tx
                        .query("SELECT idx FROM hosts ORDER BY idx", &[])
                        .map_err(pg("read host places"))?
                        .iter()
                        .map(|r| {
                            r.try_get::<_, i64>(0)
                                .map(|v| u64::try_from(v).unwrap_or(u64::MAX))
                        })
                        .collect::<Result<_, _>>()
                        .map_err(pg("read host places"))?;
                    let free = lowest_free(&taken, places)
                        .ok_or(StoreError::Exhausted("fleet address block"))?;
                    i64::try_from(free).map_err(|_| StoreError::Exhausted("fleet address block"))?
                }
            };
            tx.execute(
                &format!(
                    "INSERT INTO hosts (id, idx, advertise_url, memory_bytes, vcpus, labels_json,
                                        lease_expires_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, {NOW_MS} + $7)
                     ON CONFLICT (id) DO UPDATE SET advertise_url = $3, memory_bytes = $4,
                         vcpus = $5, labels_json = $6, lease_expires_ms = {NOW_MS} + $7"
                ),
                &[
                    &reg.id.as_str(),
                    &idx,
                    &reg.advertise_url,
                    &column(reg.capacity.memory_bytes),
                    &column(reg.capacity.vcpus),
                    &labels,
                    &lease,
                ],
            )
            .map_err(pg("register host"))?;
            tx.commit().map_err(pg("commit host"))
        })?;
        self.list_hosts()?
            .into_iter()
            .find(|h| h.registration.id == id)
            .ok_or_else(|| StoreError::Corrupt {
                id: id.to_string(),
                reason: "registered host not found".into(),
            })
    }

    fn renew_lease(&self, host: &HostId, lease: Duration) -> Result<bool, StoreError> {
        let (host, lease) = (host.to_string(), lease_ms(lease));
        self.pool.run(move |client, _| {
            let n = client
                .execute(
                    &format!("UPDATE hosts SET lease_expires_ms = {NOW_MS} + $2 WHERE id = $1"),
                    &[&host, &lease],
                )
                .map_err(pg("renew lease"))?;
            Ok(n == 1)
        })
    }

    fn end_lease(&self, host: &HostId) -> Result<(), StoreError> {
        let host = host.to_string();
        self.pool.run(move |client, _| {
            client
                .execute(
                    &format!("UPDATE hosts SET lease_expires_ms = {NOW_MS} WHERE id = $1"),
                    &[&host],
                )
                .map_err(pg("end lease"))?;
            Ok(())
        })
    }

    fn list_hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        let (now, rows) = self.pool.run(move |client, _| {
            let op = "list hosts";
            let now: i64 = client
                .query_one(&format!("SELECT {NOW_MS}"), &[])
                .and_then(|r| r.try_get(0))
                .map_err(pg(op))?;
            let rows = client
                .query(
                    "SELECT h.id, h.idx, h.advertise_url, h.memory_bytes, h.vcpus, h.labels_json,
                            h.lease_expires_ms,
                            COALESCE((SELECT o.vms FROM host_owning o WHERE o.host_id = h.id), 0)
                     FROM hosts h ORDER BY h.id",
                    &[],
                )
                .map_err(pg(op))?
                .iter()
                .map(|r| {
                    Ok(HostRow {
                        id: r.try_get(0)?,
                        idx: r.try_get(1)?,
                        advertise_url: r.try_get(2)?,
                        memory_bytes: r.try_get(3)?,
                        vcpus: r.try_get(4)?,
                        labels_json: r.try_get(5)?,
                        lease_expires_ms: r.try_get(6)?,
                        vms: r.try_get(7)?,
                    })
                })
                .collect::<Result<Vec<_>, postgres::Error>>()
                .map_err(pg(op))?;
            Ok((now, rows))
        })?;
        rows.into_iter().map(|r| r.into_record(now)).collect()
    }

    fn host_loads(&self, customer: &CustomerId) -> Result<Vec<HostLoad>, StoreError> {
        self.loads(customer)
    }

    fn vm_hosts(&self, vms: &[VmId]) -> Result<Vec<Option<HostId>>, StoreError> {
        let ids: Vec<String> = vms.iter().map(ToString::to_string).collect();
        let rows: Vec<(String, String)> = self.pool.run({
            let ids = ids.clone();
            move |client, _| {
                client
                    .query("SELECT id, host_id FROM vms WHERE id = ANY($1)", &[&ids])
                    .map_err(pg("read vm hosts"))?
                    .iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                    .collect::<Result<_, postgres::Error>>()
                    .map_err(pg("read vm hosts"))
            }
        })?;
        let hosts: std::collections::HashMap<String, String> = rows.into_iter().collect();
        ids.iter()
            .map(|id| hosts.get(id).map(|h| parse_host(h)).transpose())
            .collect()
    }

    fn snapshot_host(&self, snapshot: &str) -> Result<Option<HostId>, StoreError> {
        self.host_of(
            "SELECT host_id FROM snapshots WHERE id = $1",
            snapshot.to_string(),
        )
    }
}

impl PgStore {
    /// The host id `query` reads for `key`, if a row has it.
    fn host_of(&self, query: &'static str, key: String) -> Result<Option<HostId>, StoreError> {
        let host: Option<String> = self.pool.run(move |client, _| {
            client
                .query_opt(query, &[&key])
                .map_err(pg("read host of"))?
                .map(|r| r.try_get(0))
                .transpose()
                .map_err(pg("read host of"))
        })?;
        host.as_deref().map(parse_host).transpose()
    }
}

impl PgStore {
    /// [`FleetStore::host_loads`]: the kept sums of every host, and the customer's count on
    /// each (an index scan of the customer's VMs).
    pub(super) fn loads(&self, customer: &CustomerId) -> Result<Vec<HostLoad>, StoreError> {
        let customer = customer.to_string();
        let rows = self.pool.run(move |client, _| {
            let op = "read host loads";
            client
                .query(
                    "SELECT o.host_id, o.vms, o.vcpus, o.memory_bytes,
                            (SELECT COUNT(*) FROM vms v
                             WHERE v.customer_id = $1 AND v.host_id = o.host_id)
                     FROM host_owning o ORDER BY o.host_id",
                    &[&customer],
                )
                .map_err(pg(op))?
                .iter()
                .map(|r| {
                    Ok((
                        r.try_get::<_, String>(0)?,
                        r.try_get::<_, i64>(1)?,
                        r.try_get::<_, i64>(2)?,
                        r.try_get::<_, i64>(3)?,
                        r.try_get::<_, i64>(4)?,
                    ))
                })
                .collect::<Result<Vec<_>, postgres::Error>>()
                .map_err(pg(op))
        })?;
        let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
        rows.into_iter()
            .map(|(host, vms, vcpus, memory, mine)| {
                Ok(HostLoad {
                    host: parse_host(&host)?,
                    vms: unsigned(vms),
                    vcpus: unsigned(vcpus),
                    memory_bytes: unsigned(memory),
                    customer_vms: unsigned(mine),
                })
            })
            .collect()
    }
}

/// A stored host id, or the row is corrupt.
fn parse_host(host: &str) -> Result<HostId, StoreError> {
    host.parse()
        .map_err(|e: metald_domain::fleet::BadHostId| StoreError::Corrupt {
            id: format!("host {host}"),
            reason: e.to_string(),
        })
}
