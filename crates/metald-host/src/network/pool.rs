//! The warm pool: networks made ahead of any boot, so a boot only takes one (issue 14). Each
//! spare is a namespace pinned at `<netns dir>/pool-<n>`, holding the TAP, the bridge and one
//! end of a veth pair; the other end, `mw<n>`, waits up with the gateway addresses in metald's
//! namespace. A boot moves the pin to the VM's name; beside its VMM's start, `mw<n>` is renamed
//! to the VM's `mv` name and routed to the guest's addresses; the pool is refilled in the
//! background.
//!
//! Spares belong to no VM: the start-up sweep removes what a killed metald left of them like
//! any other leftover (their names are no VM's), and a clean stop removes them.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Prefix of a spare's veth end in metald's namespace.
pub const POOL_IF_PREFIX: &str = "mw";
/// Prefix of a spare's namespace file.
pub const POOL_NETNS_PREFIX: &str = "pool-";
/// Most spares a host may keep ready.
pub const MAX_WARM_POOL: usize = 1024;

/// A network made ahead of a boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spare {
    /// Where its namespace is pinned.
    pub netns: PathBuf,
    /// Its veth end in metald's namespace (up, with the gateway addresses).
    pub host_if: String,
}

/// The spares ready now, and how many there should be.
#[derive(Debug)]
pub struct Pool {
    target: usize,
    spares: Mutex<VecDeque<Spare>>,
    next: AtomicU64,
    closed: AtomicBool,
    /// Woken when a spare is taken (or the pool closes): the refill task's signal.
    pub(crate) wake: tokio::sync::Notify,
}

impl Pool {
    /// An empty pool that is to hold `target` spares.
    pub fn new(target: usize) -> Self {
        Self {
            target: target.min(MAX_WARM_POOL),
            spares: Mutex::new(VecDeque::new()),
            next: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn spares(&self) -> std::sync::MutexGuard<'_, VecDeque<Spare>> {
        // Queue operations cannot leave it inconsistent.
        self.spares.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many spares it should hold.
    pub fn target(&self) -> usize {
        self.target
    }

    /// How many spares it holds now.
    pub fn len(&self) -> usize {
        self.spares().len()
    }

    /// True when it holds no spare.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True while it should be refilled: open and short of its target.
    pub fn wants_more(&self) -> bool {
        !self.closed.load(Ordering::SeqCst) && self.len() < self.target
    }

    /// A spare for a boot, if one is ready; the refill task is woken either way.
    pub fn take(&self) -> Option<Spare> {
        let spare = self.spares().pop_front();
        self.wake.notify_one();
        spare
    }

    /// Adds a spare just made; refused (handed back) once the pool is closed.
    pub fn put(&self, spare: Spare) -> Result<(), Spare> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(spare);
        }
        self.spares().push_back(spare);
        Ok(())
    }

    /// The names of the next spare: its namespace file in `dir` and its veth end.
    pub fn next_names(&self, dir: &Path) -> Spare {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        Spare {
            netns: dir.join(format!("{POOL_NETNS_PREFIX}{n:012x}")),
            host_if: format!("{POOL_IF_PREFIX}{n:012x}"),
        }
    }

    /// Closes the pool (no more refills) and hands back every spare, to be removed.
    pub fn close(&self) -> Vec<Spare> {
        self.closed.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        self.spares().drain(..).collect()
    }

    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// True for a spare's veth end (`mw` + 12 hex digits).
pub fn is_pool_interface(name: &str) -> bool {
    name.strip_prefix(POOL_IF_PREFIX)
        .is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spares_are_taken_in_order_and_a_closed_pool_takes_no_more() {
        let pool = Pool::new(2);
        assert!(pool.wants_more());
        let a = pool.next_names(Path::new("/run/ns"));
        let b = pool.next_names(Path::new("/run/ns"));
        assert_ne!(a, b);
        assert!(is_pool_interface(&a.host_if), "{a:?}");
        assert!(a.netns.starts_with("/run/ns"));
        pool.put(a.clone()).unwrap();
        pool.put(b.clone()).unwrap();
        assert!(!pool.wants_more(), "full");
        assert_eq!(pool.take(), Some(a));
        assert!(pool.wants_more());
        assert_eq!(pool.close(), vec![b]);
        assert!(!pool.wants_more(), "closed");
        let c = pool.next_names(Path::new("/run/ns"));
        assert_eq!(pool.put(c.clone()), Err(c), "handed back to be removed");
        assert_eq!(pool.take(), None);
    }

    #[test]
    fn the_target_is_capped() {
        assert_eq!(Pool::new(usize::MAX).target(), MAX_WARM_POOL);
    }
}
