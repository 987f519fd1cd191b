//! Per-customer quotas: the defaults from `UNKEY_METALD_QUOTA_*`, overridden per customer by
//! the TOML file `UNKEY_METALD_QUOTA_FILE`, which is read again whenever it changes.
//!
//! ```toml
//! [customers.acme]
//! vms = 500
//! disk_mib = 204800
//! snapshots = 50
//! running_vms = 20
//! running_vcpus = 64
//! running_memory_mib = 131072
//! ```
//!
//! A key left out keeps the default. Lookups read one snapshot, swapped whole on reload, so a
//! request never sees half of a file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Deserialize;

use crate::domain::{CustomerId, MIB};
use crate::file_stamp::FileStamp;
use crate::report::Chain;
use crate::store::{RunLimits, StoredLimits};

/// Largest count quota (VMs, vCPUs).
pub const MAX_COUNT: u64 = 1_000_000;
/// Largest size quota, in MiB (1 PiB).
pub const MAX_MIB: u64 = 1 << 30;
/// How often the quota file is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// One customer's quotas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quotas {
    /// What the customer may store.
    pub stored: StoredLimits,
    /// What the customer may run at once.
    pub run: RunLimits,
}

/// Every customer's quotas: the defaults and the file's overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaBook {
    defaults: Quotas,
    customers: HashMap<CustomerId, Quotas>,
}

/// A quota file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum QuotaFileError {
    /// The file cannot be read.
    #[error("cannot be read")]
    Read(#[source] std::io::Error),
    /// The file is not a valid quota file.
    #[error("line {line}: {message}")]
    Invalid {
        /// 1-based line of the fault.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// The file's shape; unknown keys are errors.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    customers: HashMap<Customer, Override>,
}

/// A table key that must be a customer id.
#[derive(PartialEq, Eq, Hash)]
struct Customer(CustomerId);

impl<'de> Deserialize<'de> for Customer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Customer).map_err(serde::de::Error::custom)
    }
}

/// One customer's keys; each one left out keeps the default.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Override {
    vms: Option<Count>,
    disk_mib: Option<Mib>,
    snapshots: Option<Count>,
    running_vms: Option<Count>,
    running_vcpus: Option<Count>,
    running_memory_mib: Option<Mib>,
}

/// A count quota, 1 to [`MAX_COUNT`].
struct Count(u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        count_ok(n)
            .then_some(Count(n))
            .ok_or_else(|| serde::de::Error::custom(COUNT_ALLOWED))
    }
}

/// A size quota in MiB, 1 to [`MAX_MIB`]; held in bytes.
struct Mib(u64);

impl<'de> Deserialize<'de> for Mib {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        mib_bytes(n)
            .map(Mib)
            .ok_or_else(|| serde::de::Error::custom(MIB_ALLOWED))
    }
}

/// What a count quota may be.
pub const COUNT_ALLOWED: &str = "expected a whole number, 1-1000000";
/// What a size quota may be.
pub const MIB_ALLOWED: &str = "expected whole MiB, 1-1073741824 (1 PiB)";

/// Whether `n` is a valid count quota.
pub fn count_ok(n: u64) -> bool {
    (1..=MAX_COUNT).contains(&n)
}

/// A valid size quota of `mib` MiB, in bytes.
pub fn mib_bytes(mib: u64) -> Option<u64> {
    (1..=MAX_MIB).contains(&mib).then(|| mib * MIB)
}

impl QuotaBook {
    /// The same `defaults` for every customer.
    pub fn new(defaults: Quotas) -> Self {
        Self {
            defaults,
            customers: HashMap::new(),
        }
    }

    /// `defaults`, overridden per customer by the quota file's `text`.
    pub fn parse(defaults: Quotas, text: &str) -> Result<Self, QuotaFileError> {
        let file: File = toml::from_str(text).map_err(|e| QuotaFileError::Invalid {
            line: e.span().map_or(1, |s| {
                text[..s.start.min(text.len())].matches('\n').count() + 1
            }),
            message: e.message().trim().to_string(),
        })?;
        let customers = file
            .customers
            .into_iter()
            .map(|(Customer(id), o)| {
                let mut q = defaults;
                let set = |slot: &mut Option<u64>, v: Option<u64>| *slot = v.or(*slot);
                set(&mut q.stored.vms, o.vms.map(|c| c.0));
                set(&mut q.stored.disk_bytes, o.disk_mib.map(|m| m.0));
                set(&mut q.stored.snapshots, o.snapshots.map(|c| c.0));
                set(&mut q.run.vms, o.running_vms.map(|c| c.0));
                set(&mut q.run.vcpus, o.running_vcpus.map(|c| c.0));
                set(&mut q.run.memory_bytes, o.running_memory_mib.map(|m| m.0));
                (id, q)
            })
            .collect();
        Ok(Self {
            defaults,
            customers,
        })
    }

    /// Reads and parses the quota file at `path`.
    pub fn load(defaults: Quotas, path: &Path) -> Result<Self, QuotaFileError> {
        let text = std::fs::read_to_string(path).map_err(QuotaFileError::Read)?;
        Self::parse(defaults, &text)
    }

    /// The customer's quotas.
    pub fn of(&self, customer: &CustomerId) -> Quotas {
        self.customers
            .get(customer)
            .copied()
            .unwrap_or(self.defaults)
    }

    /// The quotas of customers without an override.
    pub fn defaults(&self) -> Quotas {
        self.defaults
    }
}

/// The quotas in force: a [`QuotaBook`] snapshot, replaced when the quota file changes.
pub struct QuotaTable {
    current: RwLock<Arc<QuotaBook>>,
    file: Option<PathBuf>,
    /// The file as last read; `None` until the first check, which reads it again once.
    seen: Mutex<Option<FileStamp>>,
}

impl QuotaTable {
    /// Quotas from `book`, reloaded from `file` (which `book` came from) when it changes.
    pub fn new(book: QuotaBook, file: Option<PathBuf>) -> Self {
        Self {
            current: RwLock::new(Arc::new(book)),
            file,
            seen: Mutex::new(None),
        }
    }

    /// The customer's quotas now.
    pub fn of(&self, customer: &CustomerId) -> Quotas {
        self.snapshot().of(customer)
    }

    fn snapshot(&self) -> Arc<QuotaBook> {
        // A writer only swaps an Arc: a poisoned lock still holds a whole book.
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reads the quota file again if it changed since the last check; returns whether the
    /// quotas were replaced. A file that cannot be used leaves the quotas as they were.
    pub fn reload_if_changed(&self) -> Result<bool, QuotaFileError> {
        let Some(path) = &self.file else {
            return Ok(false);
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let now = FileStamp::of(path).map_err(QuotaFileError::Read)?;
        if *seen == Some(now) {
            return Ok(false);
        }
        // Remembered before parsing: a bad file is reported once, not every poll.
        *seen = Some(now);
        let book = QuotaBook::load(self.snapshot().defaults(), path)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(book);
        Ok(true)
    }

    /// Checks the quota file every `every` until the table is dropped, logging each reload
    /// and each file it had to refuse.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let Some(path) = self.file.clone() else {
            return;
        };
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(table) = weak.upgrade() else { break };
                // A stat and a small read: cheap enough not to need the blocking pool.
                match table.reload_if_changed() {
                    Ok(true) => tracing::info!(path = %path.display(), "quota file reloaded"),
                    Ok(false) => {}
                    Err(e) => tracing::error!(
                        path = %path.display(),
                        error = %Chain(&e),
                        "quota file refused; the previous quotas stay in force"
                    ),
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: Quotas = Quotas {
        stored: StoredLimits {
            vms: Some(100),
            disk_bytes: None,
            snapshots: Some(20),
        },
        run: RunLimits {
            vms: None,
            vcpus: Some(8),
            memory_bytes: None,
        },
    };

    fn who(s: &str) -> CustomerId {
        s.parse().unwrap()
    }

    #[test]
    fn overrides_replace_only_the_keys_they_give() {
        let book = QuotaBook::parse(
            DEFAULTS,
            "[customers.acme]\nvms = 500\nrunning_memory_mib = 2048\nsnapshots = 3\n\n[customers.\"b-2\"]\ndisk_mib = 10\n",
        )
        .unwrap();
        let acme = book.of(&who("acme"));
        assert_eq!(acme.stored.vms, Some(500));
        assert_eq!(acme.stored.snapshots, Some(3));
        assert_eq!(
            book.of(&who("b-2")).stored.snapshots,
            Some(20),
            "kept the default"
        );
        assert_eq!(acme.run.vcpus, Some(8), "kept the default");
        assert_eq!(acme.run.memory_bytes, Some(2048 * MIB));
        assert_eq!(book.of(&who("b-2")).stored.disk_bytes, Some(10 * MIB));
        assert_eq!(book.of(&who("other")), DEFAULTS);
        assert_eq!(
            QuotaBook::parse(DEFAULTS, "").unwrap().of(&who("acme")),
            DEFAULTS
        );
    }

    #[test]
    fn bad_files_name_the_line() {
        for (text, line, says) in [
            (
                "[customers.acme]\nvms = 5\nvmz = 5\n",
                3,
                "unknown field `vmz`",
            ),
            ("[customers.acme]\n\nvms = 0\n", 3, "1-1000000"),
            ("[customers.acme]\nrunning_memory_mib = -1\n", 2, ""),
            ("[customers.\"a/b\"]\nvms = 1\n", 1, "not a customer id"),
            ("[customer.acme]\n", 1, "unknown field `customer`"),
            ("[customers.acme]\nvms = \"many\"\n", 2, ""),
            ("[customers.acme\n", 1, ""),
        ] {
            match QuotaBook::parse(DEFAULTS, text) {
                Err(QuotaFileError::Invalid { line: l, message }) => {
                    assert_eq!(l, line, "{text:?}: {message}");
                    assert!(message.contains(says), "{text:?}: {message}");
                    assert!(!message.contains('\n'), "{message}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_bad_one_keeps_the_previous_quotas() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quotas.toml");
        std::fs::write(&path, "[customers.acme]\nvms = 5\n").unwrap();
        let book = QuotaBook::load(DEFAULTS, &path).unwrap();
        let table = QuotaTable::new(book, Some(path.clone()));
        assert_eq!(table.of(&who("acme")).stored.vms, Some(5));
        // The first check reads the file once more; then nothing changes until it does.
        assert!(table.reload_if_changed().unwrap());
        assert!(!table.reload_if_changed().unwrap());
        // A new size: two writes within one clock tick can share an mtime.
        std::fs::write(&path, "[customers.acme]\nvms = 77\n").unwrap();
        assert!(table.reload_if_changed().unwrap());
        assert_eq!(table.of(&who("acme")).stored.vms, Some(77));
        std::fs::write(&path, "[customers.acme]\nvms = 77\nbogus = 1\n").unwrap();
        assert!(matches!(
            table.reload_if_changed(),
            Err(QuotaFileError::Invalid { line: 3, .. })
        ));
        assert_eq!(table.of(&who("acme")).stored.vms, Some(77));
        assert!(!table.reload_if_changed().unwrap(), "reported once");
        // Replaced by rename (a new inode), as editors and config management do.
        let next = dir.path().join("next.toml");
        std::fs::write(&next, "[customers.acme]\nrunning_vcpus = 3\n").unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert!(table.reload_if_changed().unwrap());
        let q = table.of(&who("acme"));
        assert_eq!((q.stored.vms, q.run.vcpus), (Some(100), Some(3)));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            table.reload_if_changed(),
            Err(QuotaFileError::Read(_))
        ));
        assert_eq!(table.of(&who("acme")).run.vcpus, Some(3));
    }
}
