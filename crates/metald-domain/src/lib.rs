//! metald's nouns, free of any transport, OS or storage detail: ids, VM configuration and
//! records ([`domain`]), the state machine that is the only writer of a VM's state ([`state`]),
//! usage counters ([`usage`]), address and jail-slot arithmetic ([`ipam`]), the hosts of a fleet ([`fleet`]) and how errors read
//! ([`report`]). Every other metald crate depends on this one; it depends on none of them.

pub mod domain;
pub mod fleet;
#[doc(hidden)]
pub mod fuzzing;
pub mod ipam;
pub mod report;
pub mod state;
pub mod usage;
