//! The `vm_usage` table: usage totals that must survive a metald restart.

use crate::Cached as _;
use rusqlite::{params, OptionalExtension};

use crate::domain::VmId;
use crate::{sql, Store, StoreError};
use metald_domain::usage::Counters;

/// Each VM's usage totals: what its finished VMM runs used (carried) and, while a run is
/// counted, the counter readings it started from (base). They go with the VM's delete.
pub trait UsageStore: Send + Sync {
    /// Records a VM's usage totals of finished runs and, while a run is counted, where its
    /// counters started (replacing what was saved before).
    fn save_usage(
        &self,
        id: &VmId,
        carried: &Counters,
        base: Option<&Counters>,
    ) -> Result<(), StoreError>;

    /// A VM's saved usage: (carried, base of the running VMM's run); `None` if none was saved.
    fn load_usage(&self, id: &VmId) -> Result<Option<(Counters, Option<Counters>)>, StoreError>;
}

impl UsageStore for Store {
    fn save_usage(
        &self,
        id: &VmId,
        carried: &Counters,
        base: Option<&Counters>,
    ) -> Result<(), StoreError> {
        let json = |c: &Counters| {
            serde_json::to_string(c).map_err(|e| StoreError::Corrupt {
                id: id.to_string(),
                reason: format!("usage does not serialize: {e}"),
            })
        };
        let base = base.map(json).transpose()?;
        self.conn()
            .exec(
                "INSERT INTO vm_usage (vm_id, carried_json, base_json) VALUES (?1, ?2, ?3)
                 ON CONFLICT (vm_id) DO UPDATE SET carried_json = ?2, base_json = ?3",
                params![id.as_str(), json(carried)?, base],
            )
            .map_err(sql("save usage"))?;
        Ok(())
    }

    fn load_usage(&self, id: &VmId) -> Result<Option<(Counters, Option<Counters>)>, StoreError> {
        let row: Option<(String, Option<String>)> = self
            .conn()
            .row(
                "SELECT carried_json, base_json FROM vm_usage WHERE vm_id = ?1",
                params![id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("load usage"))?;
        let parse = |t: &str| {
            serde_json::from_str::<Counters>(t).map_err(|e| StoreError::Corrupt {
                id: id.to_string(),
                reason: format!("usage: {e}"),
            })
        };
        match row {
            None => Ok(None),
            Some((c, b)) => Ok(Some((parse(&c)?, b.as_deref().map(parse).transpose()?))),
        }
    }
}
