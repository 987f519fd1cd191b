//! The VM state machine: the one place that decides which operation is legal in which state.

use std::fmt;

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmState {
    /// Recorded with its disks; no VMM process yet.
    Created,
    /// VMM process up, vCPUs running.
    Running,
    /// VMM process up, vCPUs frozen.
    Paused,
    /// Shut down; no VMM process.
    Shutdown,
    /// The VMM died on its own or the guest never became ready.
    Failed,
    /// Memory and device state saved next to the disks; no VMM process. Resume wakes it.
    Suspended,
}

impl VmState {
    /// Every state, for exhaustive tests and parsing.
    pub const ALL: [VmState; 6] = [
        VmState::Created,
        VmState::Running,
        VmState::Paused,
        VmState::Shutdown,
        VmState::Failed,
        VmState::Suspended,
    ];

    /// Stable name used in storage and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "CREATED",
            VmState::Running => "RUNNING",
            VmState::Paused => "PAUSED",
            VmState::Shutdown => "SHUTDOWN",
            VmState::Failed => "FAILED",
            VmState::Suspended => "SUSPENDED",
        }
    }

    /// Parses a name written by [`VmState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// True while a VMM process should exist for the VM.
    pub fn has_vmm(self) -> bool {
        matches!(self, VmState::Running | VmState::Paused)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that moves a VM between states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Start the VMM and the guest.
    Boot,
    /// Freeze the vCPUs.
    Pause,
    /// Unfreeze the vCPUs, or wake a suspended VM from its saved state.
    Resume,
    /// Save memory and device state to disk and end the VMM.
    Suspend,
    /// Stop the guest and the VMM.
    Shutdown,
    /// Stop and start again.
    Reboot,
    /// Remove the VM; `force` allows it while a VMM runs.
    Delete {
        /// Kill a running VMM first.
        force: bool,
    },
    /// The VMM exited without being asked, or the guest never became ready.
    Fail,
    /// The VM's files are gone (found at start): it can never boot again, only be deleted.
    Lose,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Boot => "boot",
            Operation::Pause => "pause",
            Operation::Resume => "resume",
            Operation::Suspend => "suspend",
            Operation::Shutdown => "shut down",
            Operation::Reboot => "reboot",
            Operation::Delete { force: false } => "delete (without force)",
            Operation::Delete { force: true } => "delete",
            Operation::Fail => "fail",
            Operation::Lose => "mark lost",
        })
    }
}

/// An operation that is not legal in the VM's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {op} a VM in state {from}{hint}")]
pub struct InvalidTransition {
    /// The VM's state.
    pub from: VmState,
    /// What was asked.
    pub op: Operation,
    /// A short hint on what would be legal.
    pub hint: &'static str,
}

/// Where a legal operation leads: `None` means the VM ceases to exist.
pub fn transition(from: VmState, op: Operation) -> Result<Option<VmState>, InvalidTransition> {
    use Operation as O;
    use VmState as S;
    let next = match (from, op) {
        (S::Created | S::Shutdown | S::Failed, O::Boot) => Some(S::Running),
        (S::Running, O::Pause) => Some(S::Paused),
        (S::Paused | S::Suspended, O::Resume) => Some(S::Running),
        (S::Running | S::Paused, O::Suspend) => Some(S::Suspended),
        // From Suspended, a shutdown drops the saved state: the next boot is a cold one.
        (S::Running | S::Paused | S::Suspended, O::Shutdown) => Some(S::Shutdown),
        (S::Running | S::Paused, O::Reboot) => Some(S::Running),
        (S::Created | S::Shutdown | S::Failed | S::Suspended, O::Delete { .. }) => None,
        (S::Running | S::Paused, O::Delete { force: true }) => None,
        (S::Running | S::Paused, O::Fail) => Some(S::Failed),
        (S::Created | S::Shutdown | S::Failed | S::Suspended, O::Lose) => Some(S::Failed),
        // The VMM has its disks open: it runs on; the loss is found when it stops.
        (S::Running | S::Paused, O::Lose) => return Err(invalid(from, op, "; its VMM still runs")),
        (S::Running | S::Paused, O::Delete { force: false }) => {
            return Err(invalid(from, op, "; shut it down first or pass force"))
        }
        (S::Running | S::Paused, O::Boot) => return Err(invalid(from, op, "; it is already up")),
        (S::Suspended, O::Boot) => {
            return Err(invalid(
                from,
                op,
                "; resume it, or shut it down to boot afresh",
            ))
        }
        (S::Created | S::Shutdown | S::Failed, O::Shutdown | O::Reboot | O::Pause | O::Suspend) => {
            return Err(invalid(from, op, "; boot it first"))
        }
        (S::Suspended, O::Reboot | O::Pause | O::Suspend | O::Fail) => {
            return Err(invalid(from, op, "; resume it first"))
        }
        (S::Paused, O::Pause) | (S::Running, O::Resume) => return Err(invalid(from, op, "")),
        (S::Created | S::Shutdown | S::Failed, O::Resume | O::Fail) => {
            return Err(invalid(from, op, ""))
        }
    };
    Ok(next)
}

fn invalid(from: VmState, op: Operation, hint: &'static str) -> InvalidTransition {
    InvalidTransition { from, op, hint }
}

/// What an operation did to a VM's VMM, applied to its record by [`VmLife::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new VMM runs the guest (boot).
    Booted {
        /// The VMM's pid.
        pid: u32,
        /// Its start time in clock ticks since host boot (tells a reused pid apart).
        start_ticks: u64,
    },
    /// The guest runs again in a new VMM (reboot).
    Rebooted {
        /// The new VMM's pid.
        pid: u32,
        /// Its start time in clock ticks since host boot.
        start_ticks: u64,
    },
    /// The vCPUs were frozen; the VMM stays.
    Paused,
    /// The vCPUs run again; the VMM stays.
    Resumed,
    /// The guest and its VMM were stopped on request.
    ShutDown,
    /// The guest's state was saved to disk and its VMM ended.
    Suspended,
    /// A new VMM runs the guest again from its saved state.
    Woken {
        /// The VMM's pid.
        pid: u32,
        /// Its start time in clock ticks since host boot.
        start_ticks: u64,
    },
    /// The VMM is gone without a request (exit, crash, readiness timeout, failed reboot, gone
    /// after a metald restart), for this reason.
    Failed(String),
    /// The VM's files are gone, for this reason; it has no VMM.
    Lost(String),
}

impl Change {
    /// The state-machine operation this change is the outcome of.
    pub fn operation(&self) -> Operation {
        match self {
            Change::Booted { .. } => Operation::Boot,
            Change::Rebooted { .. } => Operation::Reboot,
            Change::Paused => Operation::Pause,
            Change::Resumed => Operation::Resume,
            Change::ShutDown => Operation::Shutdown,
            Change::Suspended => Operation::Suspend,
            Change::Woken { .. } => Operation::Resume,
            Change::Failed(_) => Operation::Fail,
            Change::Lost(_) => Operation::Lose,
        }
    }
}

/// A VM's life as recorded: its state and the VMM facts that go with it. The fields are private
/// so that they change together, only through [`VmLife::apply`] (the store restores what it
/// saved with [`VmLife::restore`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmLife {
    state: VmState,
    vmm_pid: Option<u32>,
    vmm_start_ticks: Option<u64>,
    failure: Option<String>,
    guest_ready: bool,
}

impl VmLife {
    /// A VM just created: no VMM yet.
    pub fn created() -> Self {
        Self::restore(VmState::Created, None, None, None, false)
    }

    /// What the store saved, as it saved it.
    pub fn restore(
        state: VmState,
        vmm_pid: Option<u32>,
        vmm_start_ticks: Option<u64>,
        failure: Option<String>,
        guest_ready: bool,
    ) -> Self {
        Self {
            state,
            vmm_pid,
            vmm_start_ticks,
            failure,
            guest_ready,
        }
    }

    /// Applies an operation's outcome: the state through [`transition`], and with it the VMM's
    /// process, readiness and failure. Nothing changes when the transition is not legal.
    pub fn apply(&mut self, change: Change) -> Result<(), InvalidTransition> {
        let op = change.operation();
        let Some(next) = transition(self.state, op)? else {
            // Only Delete removes a VM, and no Change is a delete.
            return Err(invalid(self.state, op, ""));
        };
        self.state = next;
        match change {
            Change::Booted { pid, start_ticks }
            | Change::Rebooted { pid, start_ticks }
            | Change::Woken { pid, start_ticks } => {
                self.vmm_pid = Some(pid);
                self.vmm_start_ticks = Some(start_ticks);
                self.failure = None;
                self.guest_ready = false;
            }
            Change::Paused | Change::Resumed => {}
            Change::ShutDown | Change::Suspended => self.vmm_gone(None),
            Change::Failed(reason) | Change::Lost(reason) => self.vmm_gone(Some(reason)),
        }
        Ok(())
    }

    fn vmm_gone(&mut self, failure: Option<String>) {
        self.vmm_pid = None;
        self.vmm_start_ticks = None;
        self.guest_ready = false;
        self.failure = failure;
    }

    /// The guest printed its readiness line; false (and no change) when no VMM runs it.
    pub fn mark_guest_ready(&mut self) -> bool {
        if self.state.has_vmm() {
            self.guest_ready = true;
        }
        self.guest_ready
    }

    /// Where the VM is in its life.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// The VMM's pid while one runs.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm_pid
    }

    /// The VMM's start time (clock ticks since host boot) while one runs.
    pub fn vmm_start_ticks(&self) -> Option<u64> {
        self.vmm_start_ticks
    }

    /// Why the VM is FAILED.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// The guest printed its readiness line since its VMM started.
    pub fn guest_ready(&self) -> bool {
        self.guest_ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPS: [Operation; 10] = [
        Operation::Boot,
        Operation::Pause,
        Operation::Resume,
        Operation::Suspend,
        Operation::Shutdown,
        Operation::Reboot,
        Operation::Delete { force: false },
        Operation::Delete { force: true },
        Operation::Fail,
        Operation::Lose,
    ];

    #[test]
    fn every_state_and_operation_has_one_answer() {
        use VmState as S;
        let expect = |from, op| -> Option<Option<VmState>> {
            match (from, op) {
                (S::Created | S::Shutdown | S::Failed, Operation::Boot) => Some(Some(S::Running)),
                (S::Running, Operation::Pause) => Some(Some(S::Paused)),
                (S::Paused | S::Suspended, Operation::Resume) => Some(Some(S::Running)),
                (S::Running | S::Paused, Operation::Suspend) => Some(Some(S::Suspended)),
                (S::Running | S::Paused | S::Suspended, Operation::Shutdown) => {
                    Some(Some(S::Shutdown))
                }
                (S::Running | S::Paused, Operation::Reboot) => Some(Some(S::Running)),
                (S::Running | S::Paused, Operation::Fail) => Some(Some(S::Failed)),
                (S::Created | S::Shutdown | S::Failed | S::Suspended, Operation::Lose) => {
                    Some(Some(S::Failed))
                }
                (S::Created | S::Shutdown | S::Failed | S::Suspended, Operation::Delete { .. }) => {
                    Some(None)
                }
                (S::Running | S::Paused, Operation::Delete { force: true }) => Some(None),
                _ => None,
            }
        };
        for from in VmState::ALL {
            for op in OPS {
                match (transition(from, op), expect(from, op)) {
                    (Ok(next), Some(want)) => assert_eq!(next, want, "{from} {op}"),
                    (Err(e), None) => {
                        assert_eq!(e.from, from);
                        assert!(e.to_string().contains(from.as_str()), "{e}");
                    }
                    (got, want) => panic!("{from} {op}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn messages_name_the_state() {
        let e = transition(VmState::Shutdown, Operation::Pause).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot pause a VM in state SHUTDOWN; boot it first"
        );
        let e = transition(VmState::Running, Operation::Boot).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot boot a VM in state RUNNING; it is already up"
        );
    }

    /// Every outcome sets the record's fields together: a started VMM clears an old failure and
    /// readiness, every ending (shutdown, exit, crash, timeout, failed reboot, adopt failure:
    /// all `Failed`) clears the process, and an illegal change leaves everything as it was.
    #[test]
    fn a_change_sets_state_process_readiness_and_failure_together() {
        let mut life = VmLife::restore(VmState::Failed, None, None, Some("old".into()), false);
        life.apply(Change::Booted {
            pid: 7,
            start_ticks: 70,
        })
        .unwrap();
        assert_eq!(
            life,
            VmLife::restore(VmState::Running, Some(7), Some(70), None, false)
        );
        assert!(life.mark_guest_ready());
        life.apply(Change::Paused).unwrap();
        assert_eq!(
            life,
            VmLife::restore(VmState::Paused, Some(7), Some(70), None, true)
        );
        life.apply(Change::Resumed).unwrap();
        life.apply(Change::Rebooted {
            pid: 8,
            start_ticks: 80,
        })
        .unwrap();
        assert_eq!(
            life,
            VmLife::restore(VmState::Running, Some(8), Some(80), None, false)
        );
        let running = life.clone();

        let mut down = running.clone();
        down.apply(Change::ShutDown).unwrap();
        assert_eq!(
            down,
            VmLife::restore(VmState::Shutdown, None, None, None, false)
        );

        let mut ready = running.clone();
        ready.mark_guest_ready();
        for from in [ready.clone(), {
            let mut p = ready.clone();
            p.apply(Change::Paused).unwrap();
            p
        }] {
            let mut failed = from;
            failed.apply(Change::Failed("VMM exited".into())).unwrap();
            assert_eq!(
                failed,
                VmLife::restore(
                    VmState::Failed,
                    None,
                    None,
                    Some("VMM exited".into()),
                    false
                )
            );
        }

        // Illegal: nothing changes.
        for change in [
            Change::Paused,
            Change::Resumed,
            Change::ShutDown,
            Change::Failed("x".into()),
            Change::Rebooted {
                pid: 9,
                start_ticks: 90,
            },
        ] {
            let mut d = down.clone();
            assert!(d.apply(change.clone()).is_err(), "{change:?}");
            assert_eq!(d, down, "{change:?}");
        }
        let mut r = running.clone();
        assert!(r
            .apply(Change::Booted {
                pid: 1,
                start_ticks: 1
            })
            .is_err());
        assert_eq!(r, running);
        let mut d = down.clone();
        assert!(!d.mark_guest_ready());
        assert_eq!(d, down);
    }

    #[test]
    fn names_round_trip() {
        for s in VmState::ALL {
            assert_eq!(VmState::parse(s.as_str()), Some(s));
        }
        assert_eq!(VmState::parse("running"), None);
    }
}
