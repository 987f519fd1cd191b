//! The VM starts in flight, which the warm pools' refills wait out.
//!
//! A refill is kernel work a start also needs: a spare network is a namespace, a veth pair and
//! a TAP (the kernel's RTNL lock, which the start's own interface work and the VMM's TAP take
//! too), a warm jail is a process with its own mounts and a `pivot_root`. Made beside a start
//! on a host with few cores, it slows that start by several milliseconds; made once the start
//! is over, it costs the start nothing. A steady stream of starts must not starve the pools:
//! a refill waits at most [`MAX_REFILL_WAIT`], and a pool with nothing left refills at once
//! (the next start would make its own, which costs it more than a refill beside it). A pool
//! holding more than half its target refills only when no start runs at all ([`Stock`]).
//!
//! For a pool running low, a start counts until its VMM's TAP is open, not until its guest
//! runs ([`StartHold`]): in a steady stream, the quiet moment after a start's end is the next
//! start's create and request, and the refills then ran into its network and jail. Beside the
//! VMM's own start (Firecracker's `InstanceStart`), they slow only that.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The longest a refill waits for a quiet moment before it goes ahead anyway. Longer than a
/// start near 1000 VMs (40-60 ms on 2 cores): at 30 ms a refill started in the middle of the
/// very start that took from the pool, and that start's VMM took 19-32 ms to configure and
/// start its guest instead of 13 ms (a bare Firecracker beside it: 12 ms).
const MAX_REFILL_WAIT: Duration = Duration::from_millis(150);

/// How long after the last start a moment counts as quiet: the new guest's first instants (a
/// tiny guest prints its banner within a millisecond of its start) are on the cores too. Short
/// enough to fit between the starts of a stream (a create and its boot request come 2-3 ms
/// after the previous start ends): with 10 ms, refills only ever ran at their limit.
const SETTLE: Duration = Duration::from_millis(2);

/// How many VM starts are in flight; refills wait until none is (see the module's doc).
#[derive(Debug, Default)]
pub struct Starts {
    state: Mutex<State>,
    /// Woken when the last start in flight ends either of its phases: refills on threads.
    quiet: Condvar,
    /// The same for refills on the runtime.
    quiet_async: tokio::sync::Notify,
}

/// Which part of the starts a refill waits out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Until the VMM's TAP is open: the part that takes the locks a refill takes.
    Locks,
    /// The whole start, its VMM's own start of the guest included.
    Whole,
}

#[derive(Debug, Default)]
struct State {
    /// Starts still in their [`Phase::Locks`].
    in_flight: usize,
    /// Starts not over yet ([`Phase::Whole`]).
    running: usize,
    /// When the last start left its [`Phase::Locks`].
    last_end: Option<Instant>,
    /// When the last start was over.
    last_done: Option<Instant>,
}

impl State {
    /// `None` when `phase` has been quiet for `settle` already; else how long to wait before
    /// looking again (`None` in the second place: until a start ends it).
    fn wait_for(&self, phase: Phase, settle: Duration) -> Option<Option<Duration>> {
        let (busy, last) = match phase {
            Phase::Locks => (self.in_flight, self.last_end),
            Phase::Whole => (self.running, self.last_done),
        };
        if busy > 0 {
            return Some(None);
        }
        let quiet_for = last.map_or(settle, |t| t.elapsed());
        (quiet_for < settle).then(|| Some(settle - quiet_for))
    }
}

/// How much a pool holds against its target: how long its refill defers to starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stock {
    /// Nothing left: the next start would make its own, so the refill goes at once.
    Empty,
    /// Half the target or less: the refill waits for the starts' [`Phase::Locks`] only, at
    /// most [`MAX_REFILL_WAIT`], so a steady stream of starts does not drain the pool.
    Low,
    /// More than half the target: the refill waits until no start at all has run for
    /// [`PLENTY_SETTLE`], however long, while the pool stays above half. A refill beside a
    /// start's VMM costs it CPU, and the kernel's part of a spare network grows with the VMs
    /// (see [`Starts::before_refill`]).
    Plenty,
}

impl Stock {
    /// The stock of a pool holding `left` of its `target`.
    pub fn of(left: usize, target: usize) -> Self {
        if left == 0 {
            Self::Empty
        } else if left > target / 2 {
            Self::Plenty
        } else {
            Self::Low
        }
    }
}

/// How often a refill waiting with [`Stock::Plenty`] looks at its pool again.
const PLENTY_RECHECK: Duration = Duration::from_millis(100);

/// How long after the last start's end a refill with [`Stock::Plenty`] goes: longer than the
/// 2-3 ms between one start's end and the next one's create in a back-to-back stream, whose
/// refills then wait until the pool runs low and go beside the VMMs' starts ([`Stock::Low`]),
/// instead of into the next start's create, network and jail (measured with 2 ms: the jail
/// and the host end's rename then grew by 0.7 and 1.3 ms over 1000 back-to-back boots).
const PLENTY_SETTLE: Duration = Duration::from_millis(20);

/// What a refill waits for, by its pool's [`Stock`]: the policy both
/// [`Starts::before_refill`] and [`Starts::before_refill_async`] follow.
struct RefillWait {
    phase: Phase,
    settle: Duration,
    max: Duration,
    /// Gives up at the first wake-up that leaves `phase` busy (a start's phase ended) or at
    /// `max`, so the stock is looked at again: a start that takes from the pool ends its
    /// locks soon after.
    look_again: bool,
}

impl RefillWait {
    /// `None`: the refill goes at once.
    fn of(stock: Stock) -> Option<Self> {
        match stock {
            Stock::Empty => None,
            Stock::Low => Some(Self {
                phase: Phase::Locks,
                settle: SETTLE,
                max: MAX_REFILL_WAIT,
                look_again: false,
            }),
            Stock::Plenty => Some(Self {
                phase: Phase::Whole,
                settle: PLENTY_SETTLE,
                max: PLENTY_RECHECK,
                look_again: true,
            }),
        }
    }
}

/// One start in flight; it ends when this is dropped (however the start ends). Its
/// [`Phase::Locks`] may end earlier ([`Starting::leave_locks`]).
#[derive(Debug)]
pub struct Starting {
    starts: Arc<Starts>,
    in_locks: bool,
}

impl Starting {
    /// Ends the start's [`Phase::Locks`] (once; later calls change nothing).
    fn leave_locks(&mut self) {
        if std::mem::take(&mut self.in_locks) {
            self.starts.end(Phase::Locks);
        }
    }
}

impl Starts {
    /// Counts a start in flight until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> Starting {
        let mut st = self.lock();
        st.in_flight += 1;
        st.running += 1;
        drop(st);
        Starting {
            starts: Arc::clone(self),
            in_locks: true,
        }
    }

    /// How many starts are in flight now (in their part that takes the refills' locks).
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// How many starts are not over yet.
    pub fn running(&self) -> usize {
        self.lock().running
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Counters and times cannot be left inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One start's `phase` ended: wakes the refills when it was the last one in it.
    fn end(&self, phase: Phase) {
        let mut st = self.lock();
        let now = Some(Instant::now());
        let left = match phase {
            Phase::Locks => {
                st.last_end = now;
                st.in_flight = st.in_flight.saturating_sub(1);
                st.in_flight
            }
            Phase::Whole => {
                st.last_done = now;
                st.running = st.running.saturating_sub(1);
                st.running
            }
        };
        drop(st);
        if left == 0 {
            self.quiet.notify_all();
            self.quiet_async.notify_waiters();
        }
    }

    /// Before a pool's refill: waits as its [`Stock`] (`stock()`, looked at again while it
    /// waits) says.
    ///
    /// Measured over 1000 back-to-back boots (2 cores): with refills beside the VMMs' own
    /// starts, Firecracker's `InstanceStart` grew from 8 to 11-12 ms, since a spare network's
    /// kernel work grows with the VMs (its host end's link up walks every IPv6 route); held
    /// until each start was over, it stayed within 13 % (8.8-10.0 ms), and the refills then
    /// slowed the next start's network and jail instead. So a pool with stock to spare refills
    /// only between starts, and one running low, beside them.
    pub fn before_refill(&self, stock: impl Fn() -> Stock) {
        while let Some(w) = RefillWait::of(stock()) {
            if self.wait_quiet(w.phase, w.settle, w.max, w.look_again) || !w.look_again {
                return;
            }
        }
    }

    /// [`Starts::before_refill`] for a refill on the runtime.
    pub async fn before_refill_async(&self, stock: impl Fn() -> Stock) {
        while let Some(w) = RefillWait::of(stock()) {
            let quiet = self
                .wait_quiet_async(w.phase, w.settle, w.max, w.look_again)
                .await;
            if quiet || !w.look_again {
                return;
            }
        }
    }

    /// Blocks until `phase` has been quiet for `settle` (true), or `max` has passed (false);
    /// with `look_again`, it also gives up (false) at the first wake-up (a start's phase ended)
    /// that leaves `phase` not quiet, so its caller looks again.
    fn wait_quiet(&self, phase: Phase, settle: Duration, max: Duration, look_again: bool) -> bool {
        let deadline = Instant::now() + max;
        let mut st = self.lock();
        let mut waited = false;
        while let Some(wait) = st.wait_for(phase, settle) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || (look_again && waited && wait.is_none()) {
                return false;
            }
            st = self
                .quiet
                .wait_timeout(st, wait.map_or(left, |w| w.min(left)))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
            waited = true;
        }
        true
    }

    /// [`Starts::wait_quiet`] on the runtime.
    async fn wait_quiet_async(
        &self,
        phase: Phase,
        settle: Duration,
        max: Duration,
        look_again: bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + max;
        let mut waited = false;
        loop {
            // Made before the check: a `notify_waiters` after it is not missed.
            let quiet = self.quiet_async.notified();
            let Some(wait) = self.lock().wait_for(phase, settle) else {
                return true;
            };
            if look_again && waited && wait.is_none() {
                return false;
            }
            let until = wait.map_or(deadline, |w| {
                (tokio::time::Instant::now() + w).min(deadline)
            });
            let _either = tokio::time::timeout_at(until, quiet).await;
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            waited = true;
        }
    }
}

/// A start's hold on the refills, shared with its VMM's backend, which may end the hold's
/// [`Phase::Locks`] before the start is over ([`StartHold::release`]): once the VMM has opened
/// its TAP, what is left of its start (Firecracker's `InstanceStart`, about 8 ms here) takes
/// none of the locks a refill does. Without that, the refills of a steady stream of starts
/// ran in the few milliseconds between one start's end and the next one's network and jail,
/// the steps they slow most. A pool with [`Stock::Plenty`] still waits for the whole start.
#[derive(Debug, Clone, Default)]
pub struct StartHold(Arc<Mutex<Option<Starting>>>);

impl StartHold {
    /// A hold on `starting` (none: nothing to hold).
    pub fn new(starting: Option<Starting>) -> Self {
        Self(Arc::new(Mutex::new(starting)))
    }

    /// Ends the hold's part that keeps refills with [`Stock::Low`] waiting, if it is still on.
    pub fn release(&self) {
        if let Some(s) = self.0.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            s.leave_locks();
        }
    }

    /// A guard that ends the whole hold when it is dropped, whoever else keeps a copy of it
    /// (the start's owner holds it: the hold never outlives the start).
    pub fn until_dropped(&self) -> HoldGuard {
        HoldGuard(self.clone())
    }

    /// True while the hold keeps refills with [`Stock::Low`] waiting.
    pub fn is_held(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|s| s.in_locks)
    }
}

/// Ends a [`StartHold`] when dropped.
#[derive(Debug)]
pub struct HoldGuard(StartHold);

impl Drop for HoldGuard {
    fn drop(&mut self) {
        let held = (self.0).0.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(held);
    }
}

/// Launches that carry a hold compare by what they launch, not by their hold.
impl PartialEq for StartHold {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for StartHold {}

/// The same count is the same object (configurations holding it compare equal when they
/// share it).
impl PartialEq for Starts {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for Starts {}

impl Drop for Starting {
    fn drop(&mut self) {
        self.leave_locks();
        self.starts.end(Phase::Whole);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_hold_ends_its_start_before_the_hold_goes() {
        let starts = Arc::new(Starts::default());
        let hold = StartHold::new(Some(starts.begin()));
        let backends = hold.clone();
        assert!(hold.is_held());
        assert_eq!(starts.in_flight(), 1);
        backends.release();
        assert_eq!(starts.in_flight(), 0, "released by the backend's copy");
        assert!(!hold.is_held());
        hold.release();
        assert_eq!(starts.in_flight(), 0, "a second release changes nothing");
        // A guard ends the hold however its start ends, while another copy lives on.
        let hold = StartHold::new(Some(starts.begin()));
        let kept = hold.clone();
        drop(hold.until_dropped());
        assert_eq!(starts.in_flight(), 0);
        assert!(!kept.is_held());
    }

    #[test]
    fn a_released_hold_still_counts_its_start_as_running_until_the_guard_goes() {
        let starts = Arc::new(Starts::default());
        let hold = StartHold::new(Some(starts.begin()));
        let guard = hold.until_dropped();
        assert_eq!((starts.in_flight(), starts.running()), (1, 1));
        hold.release();
        assert_eq!((starts.in_flight(), starts.running()), (0, 1));
        hold.release();
        assert_eq!((starts.in_flight(), starts.running()), (0, 1), "once");
        drop(guard);
        assert_eq!((starts.in_flight(), starts.running()), (0, 0));
    }

    #[test]
    fn more_than_half_of_the_target_is_plenty() {
        assert_eq!(Stock::of(0, 4), Stock::Empty);
        assert_eq!(Stock::of(1, 4), Stock::Low);
        assert_eq!(Stock::of(2, 4), Stock::Low);
        assert_eq!(Stock::of(3, 4), Stock::Plenty);
        assert_eq!(Stock::of(1, 2), Stock::Low);
        assert_eq!(Stock::of(1, 1), Stock::Plenty);
        assert_eq!(Stock::of(0, 0), Stock::Empty);
        assert_eq!(Stock::of(usize::MAX, usize::MAX), Stock::Plenty);
    }

    #[test]
    fn a_plenty_refill_waits_for_the_whole_start_and_a_low_one_for_its_locks_only() {
        let starts = Arc::new(Starts::default());
        let hold = StartHold::new(Some(starts.begin()));
        let guard = hold.until_dropped();
        hold.release();
        // Low: the locks are released, so it goes once they have been quiet for SETTLE.
        let t0 = Instant::now();
        starts.before_refill(|| Stock::Low);
        assert!(
            t0.elapsed() < MAX_REFILL_WAIT,
            "did not wait for the whole start"
        );
        // Plenty: it waits for the whole start, however long.
        let waiter = {
            let starts = Arc::clone(&starts);
            std::thread::spawn(move || starts.before_refill(|| Stock::Plenty))
        };
        std::thread::sleep(MAX_REFILL_WAIT + PLENTY_RECHECK * 2);
        assert!(!waiter.is_finished(), "the start is not over");
        drop(guard);
        waiter.join().unwrap();
    }

    #[test]
    fn a_plenty_refill_goes_as_low_once_its_pool_runs_low() {
        let starts = Arc::new(Starts::default());
        let _running = starts.begin();
        let left = Arc::new(Mutex::new(3usize));
        let waiter = {
            let (starts, left) = (Arc::clone(&starts), Arc::clone(&left));
            std::thread::spawn(move || {
                starts.before_refill(|| Stock::of(*left.lock().unwrap(), 4));
                Instant::now()
            })
        };
        std::thread::sleep(PLENTY_RECHECK * 3);
        assert!(!waiter.is_finished(), "plenty waits while the start runs");
        let dropped = Instant::now();
        *left.lock().unwrap() = 2;
        let went = waiter.join().unwrap();
        let waited = went - dropped;
        assert!(
            waited >= MAX_REFILL_WAIT && waited < MAX_REFILL_WAIT + PLENTY_RECHECK * 3,
            "low: waits for the start's locks up to the limit, {waited:?}"
        );
    }

    #[tokio::test]
    async fn a_plenty_refill_looks_at_its_pool_again_when_a_start_leaves_its_locks() {
        let starts = Arc::new(Starts::default());
        let hold = StartHold::new(Some(starts.begin()));
        let _guard = hold.until_dropped();
        let left = Arc::new(Mutex::new(3usize));
        let waiter = tokio::spawn({
            let (starts, left) = (Arc::clone(&starts), Arc::clone(&left));
            async move {
                let t0 = tokio::time::Instant::now();
                starts
                    .before_refill_async(|| Stock::of(*left.lock().unwrap(), 4))
                    .await;
                t0.elapsed()
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        // The start took a spare, then opened its TAP: low now, and its locks are over.
        *left.lock().unwrap() = 2;
        hold.release();
        let waited = waiter.await.unwrap();
        // About SETTLE after the release; the next look would have been at PLENTY_RECHECK.
        assert!(
            waited < PLENTY_RECHECK / 2,
            "went at the locks' end, not at the next look: {waited:?}"
        );
    }

    #[tokio::test]
    async fn an_async_plenty_refill_waits_for_the_whole_start() {
        let starts = Arc::new(Starts::default());
        let mut started = starts.begin();
        started.leave_locks();
        let waiter = tokio::spawn({
            let starts = Arc::clone(&starts);
            async move { starts.before_refill_async(|| Stock::Plenty).await }
        });
        tokio::time::sleep(MAX_REFILL_WAIT + PLENTY_RECHECK * 2).await;
        assert!(!waiter.is_finished(), "the start is not over");
        drop(started);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn a_wait_ends_when_the_last_start_does() {
        let starts = Arc::new(Starts::default());
        let (a, b) = (starts.begin(), starts.begin());
        assert_eq!(starts.in_flight(), 2);
        let waiter = {
            let starts = Arc::clone(&starts);
            std::thread::spawn(move || {
                let t0 = Instant::now();
                starts.wait_quiet(Phase::Locks, Duration::ZERO, Duration::from_secs(30), false);
                (t0.elapsed(), starts.in_flight())
            })
        };
        drop(a);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "one start is still in flight");
        drop(b);
        let (waited, left) = waiter.join().unwrap();
        assert_eq!(left, 0);
        assert!(waited < Duration::from_secs(30));
    }

    #[test]
    fn a_wait_gives_up_after_its_limit() {
        let starts = Arc::new(Starts::default());
        let _held = starts.begin();
        let t0 = Instant::now();
        starts.wait_quiet(
            Phase::Locks,
            Duration::ZERO,
            Duration::from_millis(30),
            false,
        );
        assert!(t0.elapsed() >= Duration::from_millis(30));
        assert_eq!(starts.in_flight(), 1);
        // Once the start is over, a quiet moment is `settle` after it.
        drop(_held);
        let t0 = Instant::now();
        starts.wait_quiet(
            Phase::Locks,
            Duration::from_millis(40),
            Duration::from_secs(30),
            false,
        );
        assert!(t0.elapsed() >= Duration::from_millis(35));
        // And no start at all is quiet at once.
        let t0 = Instant::now();
        Starts::default().wait_quiet(
            Phase::Locks,
            Duration::from_secs(30),
            Duration::from_secs(60),
            false,
        );
        assert!(t0.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn a_pool_with_nothing_left_refills_at_once_and_any_other_waits() {
        let starts = Arc::new(Starts::default());
        let _held = starts.begin();
        let t0 = Instant::now();
        starts.before_refill(|| Stock::Low);
        assert!(
            t0.elapsed() >= MAX_REFILL_WAIT,
            "waited for the start, up to the limit"
        );
        let t0 = Instant::now();
        starts.before_refill(|| Stock::Empty);
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "an empty pool does not wait"
        );
    }

    #[tokio::test]
    async fn an_async_wait_ends_when_the_start_does_or_at_its_limit() {
        let starts = Arc::new(Starts::default());
        let held = starts.begin();
        let waiter = tokio::spawn({
            let starts = Arc::clone(&starts);
            async move {
                starts
                    .wait_quiet_async(
                        Phase::Locks,
                        Duration::from_millis(40),
                        Duration::from_secs(30),
                        false,
                    )
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the start is still in flight");
        let ended = Instant::now();
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(
            ended.elapsed() >= Duration::from_millis(35),
            "settled after the end"
        );
        let _again = starts.begin();
        let t0 = Instant::now();
        starts
            .wait_quiet_async(
                Phase::Locks,
                Duration::ZERO,
                Duration::from_millis(30),
                false,
            )
            .await;
        assert!(t0.elapsed() >= Duration::from_millis(30));
    }
}
