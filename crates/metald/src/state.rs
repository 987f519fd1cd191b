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
}

impl VmState {
    /// Every state, for exhaustive tests and parsing.
    pub const ALL: [VmState; 5] = [
        VmState::Created,
        VmState::Running,
        VmState::Paused,
        VmState::Shutdown,
        VmState::Failed,
    ];

    /// Stable name used in storage and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "CREATED",
            VmState::Running => "RUNNING",
            VmState::Paused => "PAUSED",
            VmState::Shutdown => "SHUTDOWN",
            VmState::Failed => "FAILED",
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
    /// Unfreeze the vCPUs.
    Resume,
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
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Boot => "boot",
            Operation::Pause => "pause",
            Operation::Resume => "resume",
            Operation::Shutdown => "shut down",
            Operation::Reboot => "reboot",
            Operation::Delete { force: false } => "delete (without force)",
            Operation::Delete { force: true } => "delete",
            Operation::Fail => "fail",
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
        (S::Paused, O::Resume) => Some(S::Running),
        (S::Running | S::Paused, O::Shutdown) => Some(S::Shutdown),
        (S::Running | S::Paused, O::Reboot) => Some(S::Running),
        (S::Created | S::Shutdown | S::Failed, O::Delete { .. }) => None,
        (S::Running | S::Paused, O::Delete { force: true }) => None,
        (S::Running | S::Paused, O::Fail) => Some(S::Failed),
        (S::Running | S::Paused, O::Delete { force: false }) => {
            return Err(invalid(from, op, "; shut it down first or pass force"))
        }
        (S::Running | S::Paused, O::Boot) => return Err(invalid(from, op, "; it is already up")),
        (S::Created | S::Shutdown | S::Failed, O::Shutdown | O::Reboot | O::Pause) => {
            return Err(invalid(from, op, "; boot it first"))
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

#[cfg(test)]
mod tests {
    use super::*;

    const OPS: [Operation; 8] = [
        Operation::Boot,
        Operation::Pause,
        Operation::Resume,
        Operation::Shutdown,
        Operation::Reboot,
        Operation::Delete { force: false },
        Operation::Delete { force: true },
        Operation::Fail,
    ];

    #[test]
    fn every_state_and_operation_has_one_answer() {
        use VmState as S;
        let expect = |from, op| -> Option<Option<VmState>> {
            match (from, op) {
                (S::Created | S::Shutdown | S::Failed, Operation::Boot) => Some(Some(S::Running)),
                (S::Running, Operation::Pause) => Some(Some(S::Paused)),
                (S::Paused, Operation::Resume) => Some(Some(S::Running)),
                (S::Running | S::Paused, Operation::Shutdown) => Some(Some(S::Shutdown)),
                (S::Running | S::Paused, Operation::Reboot) => Some(Some(S::Running)),
                (S::Running | S::Paused, Operation::Fail) => Some(Some(S::Failed)),
                (S::Created | S::Shutdown | S::Failed, Operation::Delete { .. }) => Some(None),
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

    #[test]
    fn names_round_trip() {
        for s in VmState::ALL {
            assert_eq!(VmState::parse(s.as_str()), Some(s));
        }
        assert_eq!(VmState::parse("running"), None);
    }
}
