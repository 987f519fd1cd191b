//! The VM starts in flight, which the warm pools' refills wait out.
//!
//! A refill is kernel work a start also needs: a spare network is a namespace, a veth pair and
//! a TAP (the kernel's RTNL lock, which the start's own interface work and the VMM's TAP take
//! too), a warm jail is a process with its own mounts and a `pivot_root`. Made beside a start
//! on a host with few cores, it slows that start by several milliseconds; made once the start
//! is over, it costs the start nothing. A steady stream of starts must not starve the pools:
//! a refill waits at most [`MAX_REFILL_WAIT`], and a pool with nothing left refills at once
//! (the next start would make its own, which costs it more than a refill beside it).
//!
//! A start counts until its VMM's TAP is open, not until its guest runs ([`StartHold`]): in a
//! steady stream, the quiet moment after a start's end is the next start's create and
//! request, and the refills then ran into its network and jail. Beside the VMM's own start
//! (Firecracker's `InstanceStart`), they slow only that.

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
    /// Woken when the last start in flight ends: refills on threads.
    quiet: Condvar,
    /// The same for refills on the runtime.
    quiet_async: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct State {
    in_flight: usize,
    /// When the last start ended.
    last_end: Option<Instant>,
}

impl State {
    /// `None` when quiet for `settle` already; else how long to wait before looking again
    /// (`None` in the second place: until a start ends).
    fn wait_for(&self, settle: Duration) -> Option<Option<Duration>> {
        if self.in_flight > 0 {
            return Some(None);
        }
        let quiet_for = self.last_end.map_or(settle, |t| t.elapsed());
        (quiet_for < settle).then(|| Some(settle - quiet_for))
    }
}

/// One start in flight; it ends when this is dropped (however the start ends).
#[derive(Debug)]
pub struct Starting(Arc<Starts>);

impl Starts {
    /// Counts a start in flight until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> Starting {
        self.lock().in_flight += 1;
        Starting(Arc::clone(self))
    }

    /// How many starts are in flight now.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A counter and a time cannot be left inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Before a pool's refill: blocks until a quiet moment ([`SETTLE`] without a start in
    /// flight, at most [`MAX_REFILL_WAIT`]), unless the pool has nothing left (`empty`: the
    /// next start would make its own, so it refills at once).
    pub fn before_refill(&self, empty: bool) {
        if !empty {
            self.wait_quiet(SETTLE, MAX_REFILL_WAIT);
        }
    }

    /// [`Starts::before_refill`] for a refill on the runtime.
    pub async fn before_refill_async(&self, empty: bool) {
        if !empty {
            self.wait_quiet_async(SETTLE, MAX_REFILL_WAIT).await;
        }
    }

    /// Blocks until no start has been in flight for `settle`, or `max` has passed.
    fn wait_quiet(&self, settle: Duration, max: Duration) {
        let deadline = Instant::now() + max;
        let mut st = self.lock();
        while let Some(wait) = st.wait_for(settle) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            st = self
                .quiet
                .wait_timeout(st, wait.map_or(left, |w| w.min(left)))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Waits until no start has been in flight for `settle`, or `max` has passed.
    async fn wait_quiet_async(&self, settle: Duration, max: Duration) {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            // Made before the check: a `notify_waiters` after it is not missed.
            let quiet = self.quiet_async.notified();
            let Some(wait) = self.lock().wait_for(settle) else {
                return;
            };
            let until = wait.map_or(deadline, |w| {
                (tokio::time::Instant::now() + w).min(deadline)
            });
            let _either = tokio::time::timeout_at(until, quiet).await;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
        }
    }
}

/// A start's hold on the refills, shared with its VMM's backend, which may end it before the
/// start is over ([`StartHold::release`]): once the VMM has opened its TAP, what is left of its
/// start (Firecracker's `InstanceStart`, about 8 ms here) takes none of the locks a refill
/// does. Without that, the refills of a steady stream of starts ran in the few milliseconds
/// between one start's end and the next one's network and jail, the steps they slow most.
#[derive(Debug, Clone, Default)]
pub struct StartHold(Arc<Mutex<Option<Starting>>>);

impl StartHold {
    /// A hold on `starting` (none: nothing to hold).
    pub fn new(starting: Option<Starting>) -> Self {
        Self(Arc::new(Mutex::new(starting)))
    }

    /// Ends the hold, if it is still on.
    pub fn release(&self) {
        let held = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(held);
    }

    /// A guard that releases the hold when it is dropped, whoever else keeps a copy of it
    /// (the start's owner holds it: the hold never outlives the start).
    pub fn until_dropped(&self) -> HoldGuard {
        HoldGuard(self.clone())
    }

    /// True while the hold is on.
    pub fn is_held(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

/// Releases a [`StartHold`] when dropped.
#[derive(Debug)]
pub struct HoldGuard(StartHold);

impl Drop for HoldGuard {
    fn drop(&mut self) {
        self.0.release();
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
        let mut st = self.0.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        st.last_end = Some(Instant::now());
        if st.in_flight == 0 {
            self.0.quiet.notify_all();
            self.0.quiet_async.notify_waiters();
        }
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
    fn a_wait_ends_when_the_last_start_does() {
        let starts = Arc::new(Starts::default());
        let (a, b) = (starts.begin(), starts.begin());
        assert_eq!(starts.in_flight(), 2);
        let waiter = {
            let starts = Arc::clone(&starts);
            std::thread::spawn(move || {
                let t0 = Instant::now();
                starts.wait_quiet(Duration::ZERO, Duration::from_secs(30));
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
        starts.wait_quiet(Duration::ZERO, Duration::from_millis(30));
        assert!(t0.elapsed() >= Duration::from_millis(30));
        assert_eq!(starts.in_flight(), 1);
        // Once the start is over, a quiet moment is `settle` after it.
        drop(_held);
        let t0 = Instant::now();
        starts.wait_quiet(Duration::from_millis(40), Duration::from_secs(30));
        assert!(t0.elapsed() >= Duration::from_millis(35));
        // And no start at all is quiet at once.
        let t0 = Instant::now();
        Starts::default().wait_quiet(Duration::from_secs(30), Duration::from_secs(60));
        assert!(t0.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn a_pool_with_nothing_left_refills_at_once_and_any_other_waits() {
        let starts = Arc::new(Starts::default());
        let _held = starts.begin();
        let t0 = Instant::now();
        starts.before_refill(false);
        assert!(
            t0.elapsed() >= MAX_REFILL_WAIT,
            "waited for the start, up to the limit"
        );
        let t0 = Instant::now();
        starts.before_refill(true);
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
                    .wait_quiet_async(Duration::from_millis(40), Duration::from_secs(30))
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
            .wait_quiet_async(Duration::ZERO, Duration::from_millis(30))
            .await;
        assert!(t0.elapsed() >= Duration::from_millis(30));
    }
}
