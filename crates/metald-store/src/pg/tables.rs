//! [`UsageStore`], [`BillingStore`], [`AssetCatalog`] and [`SnapshotStore`] on PostgreSQL.

use std::net::{Ipv4Addr, Ipv6Addr};

use postgres::Row;

use super::vms::{insert_vm_tx, lock_customer, snapshot_bytes};
use super::{pg, to_i64, PgStore};
use crate::domain::{CustomerId, VmConfig, VmId, VmRecord, MIB};
use crate::vms::count;
use crate::{
    within, AssetCatalog, AssetKind, AssetRecord, BillingStore, InnerIdentity, OutboxRow,
    SnapshotRecord, SnapshotState, SnapshotStore, StoreError, StoredLimits, UsageStore,
};
use metald_domain::ipam::AllocationPlan;
use metald_domain::usage::Counters;

fn counters_json(id: &str, what: &str, c: &Counters) -> Result<String, StoreError> {
    serde_json::to_string(c).map_err(|e| StoreError::Corrupt {
        id: id.to_string(),
        reason: format!("{what} does not serialize: {e}"),
    })
}

fn parse_counters(id: &str, what: &str, json: &str) -> Result<Counters, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        id: id.to_string(),
        reason: format!("{what}: {e}"),
    })
}

impl UsageStore for PgStore {
    fn save_usage(
        &self,
        id: &VmId,
        carried: &Counters,
        base: Option<&Counters>,
    ) -> Result<(), StoreError> {
        let id = id.to_string();
        let carried = counters_json(&id, "usage", carried)?;
        let base = base.map(|b| counters_json(&id, "usage", b)).transpose()?;
        self.pool.run(move |client, _| {
            client
                .execute(
                    "INSERT INTO vm_usage (vm_id, carried_json, base_json) VALUES ($1, $2, $3)
                     ON CONFLICT (vm_id) DO UPDATE SET carried_json = $2, base_json = $3",
                    &[&id, &carried, &base],
                )
                .map_err(pg("save usage"))?;
            Ok(())
        })
    }

    fn load_usage(&self, id: &VmId) -> Result<Option<(Counters, Option<Counters>)>, StoreError> {
        let id = id.to_string();
        self.pool.run(move |client, _| {
            let Some(row) = client
                .query_opt(
                    "SELECT carried_json, base_json FROM vm_usage WHERE vm_id = $1",
                    &[&id],
                )
                .map_err(pg("load usage"))?
            else {
                return Ok(None);
            };
            let carried: String = row.try_get(0).map_err(pg("load usage"))?;
            let base: Option<String> = row.try_get(1).map_err(pg("load usage"))?;
            Ok(Some((
                parse_counters(&id, "usage", &carried)?,
                base.map(|b| parse_counters(&id, "usage", &b)).transpose()?,
            )))
        })
    }
}

impl BillingStore for PgStore {
    fn billing_cursor(&self, id: &VmId) -> Result<Option<(i64, Counters, u64)>, StoreError> {
        let id = id.to_string();
        self.pool.run(move |client, _| {
            let op = "read billing cursor";
            let Some(row) = client
                .query_opt(
                    "SELECT last_ms, last_total_json, seq FROM billing_cursor WHERE vm_id = $1",
                    &[&id],
                )
                .map_err(pg(op))?
            else {
                return Ok(None);
            };
            let json: String = row.try_get(1).map_err(pg(op))?;
            Ok(Some((
                row.try_get(0).map_err(pg(op))?,
                parse_counters(&id, "billing cursor", &json)?,
                count(row.try_get(2).map_err(pg(op))?),
            )))
        })
    }

    fn enqueue_billing(
        &self,
        rows: &[OutboxRow],
        cursor: Option<(&VmId, i64, &Counters, u64)>,
    ) -> Result<bool, StoreError> {
        let rows = rows.to_vec();
        let cursor = cursor
            .map(|(vm, ms, total, seq)| {
                Ok::<_, StoreError>((
                    vm.to_string(),
                    ms,
                    counters_json(vm.as_str(), "billing cursor", total)?,
                    to_i64(seq),
                ))
            })
            .transpose()?;
        let (host, now) = (self.host.clone(), crate::domain::now_ms());
        // Idempotent as it is (keys are queued once, the cursor only moves forward), so a retry
        // after a lost COMMIT changes nothing.
        self.pool.run(move |client, _| {
            let mut tx = client.transaction().map_err(pg("begin"))?;
            if let Some((vm, last_ms, json, seq)) = &cursor {
                let moved = tx
                    .execute(
                        "INSERT INTO billing_cursor (vm_id, last_ms, last_total_json, seq)
                         VALUES ($1, $2, $3, $4)
                         ON CONFLICT (vm_id) DO UPDATE SET last_ms = $2, last_total_json = $3,
                                                           seq = $4
                         WHERE billing_cursor.seq < $4",
                        &[vm, last_ms, json, seq],
                    )
                    .map_err(pg("move billing cursor"))?;
                if moved == 0 {
                    // Dropping the transaction rolls it back: nothing of this batch is written.
                    return Ok(false);
                }
            }
            for r in &rows {
                tx.execute(
                    "INSERT INTO billing_outbox (host_id, key, kind, vm_id, customer_id,
                                                 payload_json, created_at_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (key) DO NOTHING",
                    &[
                        &&*host,
                        &r.key,
                        &r.kind,
                        &r.vm_id,
                        &r.customer_id,
                        &r.payload_json,
                        &now,
                    ],
                )
                .map_err(pg("queue billing"))?;
            }
            tx.commit().map_err(pg("commit billing"))?;
            Ok(true)
        })
    }

    fn outbox_peek(&self, limit: u32) -> Result<Vec<(i64, OutboxRow)>, StoreError> {
        let host = self.host.clone();
        self.pool.run(move |client, _| {
            let op = "read outbox";
            let rows = client
                .query(
                    "SELECT id, key, kind, vm_id, customer_id, payload_json FROM billing_outbox
                     WHERE host_id = $1 ORDER BY id LIMIT $2",
                    &[&&*host, &i64::from(limit)],
                )
                .map_err(pg(op))?;
            rows.iter()
                .map(|r| {
                    Ok((
                        r.try_get(0)?,
                        OutboxRow {
                            key: r.try_get(1)?,
                            kind: r.try_get(2)?,
                            vm_id: r.try_get(3)?,
                            customer_id: r.try_get(4)?,
                            payload_json: r.try_get(5)?,
                        },
                    ))
                })
                .collect::<Result<_, postgres::Error>>()
                .map_err(pg(op))
        })
    }

    fn outbox_delete(&self, id: i64) -> Result<(), StoreError> {
        let host = self.host.clone();
        self.pool.run(move |client, _| {
            client
                .execute(
                    "DELETE FROM billing_outbox WHERE id = $1 AND host_id = $2",
                    &[&id, &&*host],
                )
                .map_err(pg("delete outbox row"))?;
            Ok(())
        })
    }

    fn outbox_depth(&self) -> Result<u64, StoreError> {
        let host = self.host.clone();
        self.pool.run(move |client, _| {
            client
                .query_one(
                    "SELECT COUNT(*) FROM billing_outbox WHERE host_id = $1",
                    &[&&*host],
                )
                .and_then(|r| r.try_get::<_, i64>(0))
                .map(count)
                .map_err(pg("count outbox"))
        })
    }
}

const ASSET_COLUMNS: &str =
    "id, kind, file_name, size_bytes, sha256, initrd_id, ready_marker, created_at_ms, owner";

impl AssetCatalog for PgStore {
    fn insert_asset(&self, a: &AssetRecord) -> Result<(), StoreError> {
        let a = a.clone();
        self.pool.run(move |client, attempt| {
            // After a lost COMMIT: our own row, identical, is the earlier attempt's.
            if attempt.lost_connection && read_asset(client, &a.id)?.as_ref() == Some(&a) {
                return Ok(());
            }
            client
                .execute(
                    "INSERT INTO assets (id, kind, file_name, size_bytes, sha256, initrd_id,
                                         ready_marker, created_at_ms, owner)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    &[
                        &a.id,
                        &a.kind.as_str(),
                        &a.file_name,
                        &to_i64(a.size_bytes),
                        &a.sha256,
                        &a.initrd_id,
                        &a.ready_marker,
                        &a.created_at_ms,
                        &a.owner,
                    ],
                )
                .map_err(pg("insert asset"))?;
            Ok(())
        })
    }

    fn get_asset(&self, id: &str) -> Result<Option<AssetRecord>, StoreError> {
        let id = id.to_string();
        self.pool.run(move |client, _| read_asset(client, &id))
    }

    fn list_assets(&self) -> Result<Vec<AssetRecord>, StoreError> {
        self.pool.run(move |client, _| {
            client
                .query(
                    &format!("SELECT {ASSET_COLUMNS} FROM assets ORDER BY id"),
                    &[],
                )
                .map_err(pg("list assets"))?
                .iter()
                .map(read_asset_row)
                .collect()
        })
    }

    fn delete_asset(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.pool.run(move |client, _| {
            client
                .execute("DELETE FROM assets WHERE id = $1", &[&id])
                .map_err(pg("delete asset"))?;
            Ok(())
        })
    }

    fn assets_using_initrd(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let id = id.to_string();
        self.pool.run(move |client, _| {
            client
                .query(
                    "SELECT id FROM assets WHERE initrd_id = $1 ORDER BY id",
                    &[&id],
                )
                .and_then(|rows| rows.iter().map(|r| r.try_get(0)).collect())
                .map_err(pg("find initrd users"))
        })
    }
}

fn read_asset(client: &mut postgres::Client, id: &str) -> Result<Option<AssetRecord>, StoreError> {
    client
        .query_opt(
            &format!("SELECT {ASSET_COLUMNS} FROM assets WHERE id = $1"),
            &[&id],
        )
        .map_err(pg("read asset"))?
        .map(|r| read_asset_row(&r))
        .transpose()
}

fn read_asset_row(row: &Row) -> Result<AssetRecord, StoreError> {
    let op = "read asset";
    let id: String = row.try_get(0).map_err(pg(op))?;
    let kind: String = row.try_get(1).map_err(pg(op))?;
    let Some(kind) = AssetKind::parse(&kind) else {
        return Err(StoreError::Corrupt {
            id,
            reason: format!("asset kind {kind}"),
        });
    };
    Ok(AssetRecord {
        id,
        kind,
        file_name: row.try_get(2).map_err(pg(op))?,
        size_bytes: count(row.try_get(3).map_err(pg(op))?),
        sha256: row.try_get(4).map_err(pg(op))?,
        initrd_id: row.try_get(5).map_err(pg(op))?,
        ready_marker: row.try_get(6).map_err(pg(op))?,
        created_at_ms: row.try_get(7).map_err(pg(op))?,
        owner: row.try_get(8).map_err(pg(op))?,
    })
}

const SNAPSHOT_COLUMNS: &str = "id, customer_id, source_vm_id, state, backend, config_json, \
                                ipv6, ipv4, mac, bytes, created_at_ms";

impl SnapshotStore for PgStore {
    fn insert_snapshot_within(
        &self,
        snap: &SnapshotRecord,
        limits: &StoredLimits,
    ) -> Result<(), StoreError> {
        let (snap, limits, host) = (snap.clone(), *limits, self.host.clone());
        let config = serde_json::to_string(&snap.config).map_err(|e| StoreError::Corrupt {
            id: snap.id.clone(),
            reason: format!("config does not serialize: {e}"),
        })?;
        self.pool.run(move |client, attempt| {
            let mut tx = client.transaction().map_err(pg("begin"))?;
            if attempt.lost_connection
                && read_snapshot(&mut tx, &snap.id, None)?.as_ref() == Some(&snap)
            {
                return Ok(());
            }
            if limits.snapshots.is_some() {
                lock_customer(&mut tx, snap.customer.as_str())?;
                let n: i64 = tx
                    .query_one(
                        "SELECT COUNT(*) FROM snapshots WHERE customer_id = $1",
                        &[&snap.customer.as_str()],
                    )
                    .and_then(|r| r.try_get(0))
                    .map_err(pg("count snapshots"))?;
                within(
                    "UNKEY_METALD_QUOTA_SNAPSHOTS",
                    count(n),
                    1,
                    limits.snapshots,
                )?;
            }
            let inner = snap.inner.as_ref();
            tx.execute(
                "INSERT INTO snapshots (id, host_id, customer_id, source_vm_id, state, backend,
                                        config_json, ipv6, ipv4, mac, bytes, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                &[
                    &snap.id,
                    &&*host,
                    &snap.customer.as_str(),
                    &snap.source_vm.as_str(),
                    &snap.state.as_str(),
                    &snap.backend,
                    &config,
                    &inner.map(|i| i.ipv6.to_string()),
                    &inner.and_then(|i| i.ipv4).map(|a| a.to_string()),
                    &inner.map(|i| i.mac.clone()),
                    &to_i64(snap.bytes),
                    &snap.created_at_ms,
                ],
            )
            .map_err(pg("insert snapshot"))?;
            tx.commit().map_err(pg("commit snapshot"))
        })
    }

    fn finish_snapshot(
        &self,
        id: &str,
        bytes: u64,
        limits: &StoredLimits,
    ) -> Result<(), StoreError> {
        let (id, limits) = (id.to_string(), *limits);
        self.pool.run(move |client, _| {
            let mut tx = client.transaction().map_err(pg("begin"))?;
            if let Some(limit) = limits.disk_bytes {
                let owner: Option<(String, i64)> = tx
                    .query_opt(
                        "SELECT customer_id, bytes FROM snapshots WHERE id = $1",
                        &[&id],
                    )
                    .and_then(|r| r.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose())
                    .map_err(pg("sum disk"))?;
                if let Some((owner, own_bytes)) = owner {
                    let (_, vm_disk) = lock_customer(&mut tx, &owner)?;
                    // Its own bytes are what this call sets, not in use besides: 0 while
                    // CREATING, and already its size when a call whose COMMIT went through
                    // runs again after a lost connection.
                    let used = vm_disk
                        .saturating_add(snapshot_bytes(&mut tx, &owner)?)
                        .saturating_sub(own_bytes);
                    within(
                        "UNKEY_METALD_QUOTA_DISK_MIB",
                        count(used).div_ceil(MIB),
                        bytes.div_ceil(MIB),
                        Some(limit / MIB),
                    )?;
                }
            }
            tx.execute(
                "UPDATE snapshots SET state = $2, bytes = $3 WHERE id = $1",
                &[&id, &SnapshotState::Ready.as_str(), &to_i64(bytes)],
            )
            .map_err(pg("finish snapshot"))?;
            tx.commit().map_err(pg("commit snapshot"))
        })
    }

    fn get_snapshot(
        &self,
        customer: &CustomerId,
        id: &str,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        let (customer, id) = (customer.to_string(), id.to_string());
        self.pool
            .run(move |client, _| read_snapshot(client, &id, Some(&customer)))
    }

    fn list_snapshots(&self, customer: &CustomerId) -> Result<Vec<SnapshotRecord>, StoreError> {
        let customer = customer.to_string();
        self.pool.run(move |client, _| {
            client
                .query(
                    &format!(
                        "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE customer_id = $1
                         ORDER BY seq"
                    ),
                    &[&customer],
                )
                .map_err(pg("list snapshots"))?
                .iter()
                .map(read_snapshot_row)
                .collect()
        })
    }

    fn all_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        let host = self.host.clone();
        self.pool.run(move |client, _| {
            client
                .query(
                    &format!(
                        "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE host_id = $1 ORDER BY seq"
                    ),
                    &[&&*host],
                )
                .map_err(pg("list snapshots"))?
                .iter()
                .map(read_snapshot_row)
                .collect()
        })
    }

    fn delete_snapshot(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.pool.run(move |client, _| {
            client
                .execute("DELETE FROM snapshots WHERE id = $1", &[&id])
                .map_err(pg("delete snapshot"))?;
            Ok(())
        })
    }

    fn insert_clone_within(
        &self,
        vm: &VmRecord,
        plan: Option<&AllocationPlan>,
        disk_bytes: u64,
        limits: &StoredLimits,
        snapshot_id: &str,
        inner: Option<&InnerIdentity>,
    ) -> Result<VmRecord, StoreError> {
        let (vm, plan, limits, host) = (vm.clone(), plan.cloned(), *limits, self.host.clone());
        let (snapshot_id, inner) = (snapshot_id.to_string(), inner.cloned());
        self.pool.run(move |client, attempt| {
            let mut tx = client.transaction().map_err(pg("begin"))?;
            let inserted = insert_vm_tx(
                &mut tx,
                &host,
                &vm,
                plan.as_ref(),
                disk_bytes,
                &limits,
                attempt.lost_connection,
            )?;
            let mut saved = inserted.record;
            if inserted.earlier {
                // Its MAC and identity committed with it.
                return Ok(saved);
            }
            if let (Some(inner), Some(net)) = (&inner, saved.net.as_mut()) {
                // The guest's MAC is in its memory: the clone's interface keeps it, so
                // host-side neighbour entries stay right across its later cold boots too.
                tx.execute(
                    "UPDATE vm_network SET mac = $2 WHERE vm_id = $1",
                    &[&vm.id.as_str(), &inner.mac],
                )
                .map_err(pg("record clone MAC"))?;
                net.mac = inner.mac.clone();
                tx.execute(
                    "INSERT INTO vm_inner_identity (vm_id, snapshot_id, ipv6, ipv4, mac)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &vm.id.as_str(),
                        &snapshot_id,
                        &inner.ipv6.to_string(),
                        &inner.ipv4.map(|a| a.to_string()),
                        &inner.mac,
                    ],
                )
                .map_err(pg("record inner identity"))?;
            }
            tx.commit().map_err(pg("commit clone"))?;
            Ok(saved)
        })
    }

    fn inner_identity(&self, vm: &VmId) -> Result<Option<InnerIdentity>, StoreError> {
        let vm = vm.to_string();
        self.pool.run(move |client, _| {
            let op = "read inner identity";
            let Some(row) = client
                .query_opt(
                    "SELECT ipv6, ipv4, mac FROM vm_inner_identity WHERE vm_id = $1",
                    &[&vm],
                )
                .map_err(pg(op))?
            else {
                return Ok(None);
            };
            parse_identity(
                row.try_get(0).map_err(pg(op))?,
                row.try_get(1).map_err(pg(op))?,
                row.try_get(2).map_err(pg(op))?,
            )
            .map_err(|reason| StoreError::Corrupt {
                id: vm.clone(),
                reason,
            })
        })
    }

    fn forget_inner_identity(&self, vm: &VmId) -> Result<(), StoreError> {
        let vm = vm.to_string();
        self.pool.run(move |client, _| {
            client
                .execute("DELETE FROM vm_inner_identity WHERE vm_id = $1", &[&vm])
                .map_err(pg("forget inner identity"))?;
            Ok(())
        })
    }
}

/// A snapshot by id (the customer's only, with `customer`).
fn read_snapshot(
    client: &mut impl postgres::GenericClient,
    id: &str,
    customer: Option<&str>,
) -> Result<Option<SnapshotRecord>, StoreError> {
    client
        .query_opt(
            &format!(
                "SELECT {SNAPSHOT_COLUMNS} FROM snapshots
                 WHERE id = $1 AND ($2::TEXT IS NULL OR customer_id = $2)"
            ),
            &[&id, &customer],
        )
        .map_err(pg("read snapshot"))?
        .map(|r| read_snapshot_row(&r))
        .transpose()
}

fn parse_identity(
    ipv6: Option<String>,
    ipv4: Option<String>,
    mac: Option<String>,
) -> Result<Option<InnerIdentity>, String> {
    let (Some(ipv6), Some(mac)) = (ipv6, mac) else {
        return Ok(None);
    };
    Ok(Some(InnerIdentity {
        ipv6: ipv6
            .parse::<Ipv6Addr>()
            .map_err(|_| format!("ipv6 {ipv6}"))?,
        ipv4: ipv4
            .map(|a| a.parse::<Ipv4Addr>().map_err(|_| format!("ipv4 {a}")))
            .transpose()?,
        mac,
    }))
}

fn read_snapshot_row(row: &Row) -> Result<SnapshotRecord, StoreError> {
    let op = "read snapshot";
    let id: String = row.try_get(0).map_err(pg(op))?;
    let customer: String = row.try_get(1).map_err(pg(op))?;
    let source: String = row.try_get(2).map_err(pg(op))?;
    let state: String = row.try_get(3).map_err(pg(op))?;
    let config: String = row.try_get(5).map_err(pg(op))?;
    let corrupt = |reason: String| StoreError::Corrupt {
        id: id.clone(),
        reason,
    };
    Ok(SnapshotRecord {
        id: id.clone(),
        customer: customer.parse().map_err(|e| corrupt(format!("{e}")))?,
        source_vm: source.parse().map_err(|e| corrupt(format!("{e}")))?,
        state: SnapshotState::parse(&state).ok_or_else(|| corrupt(format!("state {state}")))?,
        backend: row.try_get(4).map_err(pg(op))?,
        config: serde_json::from_str::<VmConfig>(&config)
            .map_err(|e| corrupt(format!("config: {e}")))?,
        inner: parse_identity(
            row.try_get(6).map_err(pg(op))?,
            row.try_get(7).map_err(pg(op))?,
            row.try_get(8).map_err(pg(op))?,
        )
        .map_err(corrupt)?,
        bytes: count(row.try_get(9).map_err(pg(op))?),
        created_at_ms: row.try_get(10).map_err(pg(op))?,
    })
}
