//! The `hosts` table: the fleet's hosts, their leases and their places in the fleet's address
//! space. A SQLite store serves a single host, which registers itself like any fleet member so
//! `GetFleet` reads the same everywhere; its clock is this machine's.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::Cached as _;
use rusqlite::{params, OptionalExtension};

use crate::domain::{CustomerId, VmId};
use crate::{sql, Store, StoreError};
use metald_domain::fleet::{
    HostCapacity, HostId, HostLoad, HostRecord, HostRegistration, HostStatus,
};

/// The hosts of a fleet.
pub trait FleetStore: Send + Sync {
    /// Registers the host (or replaces its registration) with a lease of `lease` from now on
    /// the store's clock. A new host gets the lowest place below `places` no other host holds;
    /// a known one keeps its own. All places taken: [`StoreError::Exhausted`].
    fn register_host(
        &self,
        reg: &HostRegistration,
        places: u64,
        lease: Duration,
    ) -> Result<HostRecord, StoreError>;

    /// Extends the host's lease to `lease` from now; `false` if it is not registered.
    fn renew_lease(&self, host: &HostId, lease: Duration) -> Result<bool, StoreError>;

    /// Ends the host's lease now (a clean stop): it shows `DOWN` at once.
    fn end_lease(&self, host: &HostId) -> Result<(), StoreError>;

    /// Every host by id, its status read against the store's clock, with its VM count.
    fn list_hosts(&self) -> Result<Vec<HostRecord>, StoreError>;

    /// The host holding each of `vms`, in order, for a store whose VMs live on several hosts
    /// (one read for a page of them); `None` for a store that serves one host, or a VM that
    /// does not exist.
    fn vm_hosts(&self, vms: &[VmId]) -> Result<Vec<Option<HostId>>, StoreError>;

    /// The host holding the snapshot's files, for a store whose snapshots live on several
    /// hosts; `None` for a store that serves one host, or a snapshot that does not exist.
    fn snapshot_host(&self, snapshot: &str) -> Result<Option<HostId>, StoreError>;

    /// What each host holds, with how many VMs of `customer` are among them, for placing a
    /// VM; empty for a store that serves one host (nothing to place).
    fn host_loads(&self, customer: &CustomerId) -> Result<Vec<HostLoad>, StoreError>;
}

/// Milliseconds since the Unix epoch on this machine's clock.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn lease_ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX)
}

/// The lowest place below `places` not in `taken` (sorted).
pub(crate) fn lowest_free(taken: &[u64], places: u64) -> Option<u64> {
    let mut want = 0u64;
    for &t in taken {
        if t == want {
            want += 1;
        } else if t > want {
            break;
        }
    }
    (want < places).then_some(want)
}

pub(crate) fn labels_json(reg: &HostRegistration) -> Result<String, StoreError> {
    serde_json::to_string(&reg.labels).map_err(|e| StoreError::Corrupt {
        id: reg.id.to_string(),
        reason: format!("labels do not serialize: {e}"),
    })
}

/// One `hosts` row as read, before its status is judged.
pub(crate) struct HostRow {
    pub id: String,
    pub idx: i64,
    pub advertise_url: String,
    pub memory_bytes: Option<i64>,
    pub vcpus: Option<i64>,
    pub labels_json: String,
    pub lease_expires_ms: i64,
    pub vms: i64,
}

impl HostRow {
    /// The record, judged against `now_ms` on the store's clock.
    pub(crate) fn into_record(self, now_ms: i64) -> Result<HostRecord, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            id: self.id.clone(),
            reason,
        };
        let id = self
            .id
            .parse::<HostId>()
            .map_err(|e| corrupt(e.to_string()))?;
        let labels: BTreeMap<String, String> =
            serde_json::from_str(&self.labels_json).map_err(|e| corrupt(format!("labels: {e}")))?;
        let unsigned = |v: i64| u64::try_from(v).map_err(|_| corrupt(format!("negative {v}")));
        Ok(HostRecord {
            registration: HostRegistration {
                id,
                advertise_url: self.advertise_url.clone(),
                capacity: HostCapacity {
                    memory_bytes: self.memory_bytes.map(unsigned).transpose()?,
                    vcpus: self.vcpus.map(unsigned).transpose()?,
                },
                labels,
            },
            index: unsigned(self.idx)?,
            lease_expires_ms: self.lease_expires_ms,
            status: if self.lease_expires_ms > now_ms {
                HostStatus::Up
            } else {
                HostStatus::Down
            },
            vms: unsigned(self.vms)?,
        })
    }
}

/// A capacity figure as a column value (`None`: no bound).
pub(crate) fn column(v: Option<u64>) -> Option<i64> {
    v.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

impl FleetStore for Store {
    fn register_host(
        &self,
        reg: &HostRegistration,
        places: u64,
        lease: Duration,
    ) -> Result<HostRecord, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        let known: Option<i64> = tx
            .row(
                "SELECT idx FROM hosts WHERE id = ?1",
                params![reg.id.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("read host"))?;
        let idx = match known {
            Some(idx) => idx,
            None => {
                let taken = tx
                    .prepare("SELECT idx FROM hosts ORDER BY idx")
                    .and_then(|mut s| {
                        s.query_map([], |r| r.get::<_, i64>(0))?
                            .map(|r| r.map(|v| u64::try_from(v).unwrap_or(u64::MAX)))
                            .collect::<Result<Vec<u64>, _>>()
                    })
                    .map_err(sql("read host places"))?;
                let free = lowest_free(&taken, places)
                    .ok_or(StoreError::Exhausted("fleet address block"))?;
                i64::try_from(free).map_err(|_| StoreError::Exhausted("fleet address block"))?
            }
        };
        let expires = now_ms().saturating_add(lease_ms(lease));
        tx.exec(
            "INSERT INTO hosts (id, idx, advertise_url, memory_bytes, vcpus, labels_json,
                                lease_expires_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (id) DO UPDATE SET advertise_url = ?3, memory_bytes = ?4, vcpus = ?5,
                 labels_json = ?6, lease_expires_ms = ?7",
            params![
                reg.id.as_str(),
                idx,
                reg.advertise_url,
                column(reg.capacity.memory_bytes),
                column(reg.capacity.vcpus),
                labels_json(reg)?,
                expires,
            ],
        )
        .map_err(sql("register host"))?;
        tx.commit().map_err(sql("commit host"))?;
        drop(conn);
        self.list_hosts()?
            .into_iter()
            .find(|h| h.registration.id == reg.id)
            .ok_or_else(|| StoreError::Corrupt {
                id: reg.id.to_string(),
                reason: "registered host not found".into(),
            })
    }

    fn renew_lease(&self, host: &HostId, lease: Duration) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .exec(
                "UPDATE hosts SET lease_expires_ms = ?2 WHERE id = ?1",
                params![host.as_str(), now_ms().saturating_add(lease_ms(lease))],
            )
            .map_err(sql("renew lease"))?;
        Ok(n == 1)
    }

    fn end_lease(&self, host: &HostId) -> Result<(), StoreError> {
        self.conn()
            .exec(
                "UPDATE hosts SET lease_expires_ms = ?2 WHERE id = ?1",
                params![host.as_str(), now_ms()],
            )
            .map_err(sql("end lease"))?;
        Ok(())
    }

    fn list_hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        let conn = self.conn();
        // One host per SQLite file: every VM in it is that host's, counted in the kept sums'
        // host-wide row (customer '') rather than by a scan.
        let mut stmt = conn
            .prepare(
                "SELECT id, idx, advertise_url, memory_bytes, vcpus, labels_json,
                        lease_expires_ms,
                        COALESCE((SELECT vms FROM owning WHERE customer_id = ''), 0)
                 FROM hosts ORDER BY id",
            )
            .map_err(sql("list hosts"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(HostRow {
                    id: r.get(0)?,
                    idx: r.get(1)?,
                    advertise_url: r.get(2)?,
                    memory_bytes: r.get(3)?,
                    vcpus: r.get(4)?,
                    labels_json: r.get(5)?,
                    lease_expires_ms: r.get(6)?,
                    vms: r.get(7)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(sql("list hosts"))?;
        let now = now_ms();
        rows.into_iter().map(|r| r.into_record(now)).collect()
    }

    fn vm_hosts(&self, vms: &[VmId]) -> Result<Vec<Option<HostId>>, StoreError> {
        // One host per SQLite file.
        Ok(vec![None; vms.len()])
    }

    fn host_loads(&self, _customer: &CustomerId) -> Result<Vec<HostLoad>, StoreError> {
        Ok(Vec::new())
    }

    fn snapshot_host(&self, _snapshot: &str) -> Result<Option<HostId>, StoreError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::lowest_free;

    #[test]
    fn the_lowest_free_place_fills_gaps_first() {
        assert_eq!(lowest_free(&[], 4), Some(0));
        assert_eq!(lowest_free(&[0, 1, 3], 4), Some(2));
        assert_eq!(lowest_free(&[1, 2], 4), Some(0));
        assert_eq!(lowest_free(&[0, 1, 2, 3], 4), None);
        assert_eq!(lowest_free(&[], 0), None);
    }
}
