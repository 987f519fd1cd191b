//! metald: runs microVMs for customers behind a ConnectRPC/REST API. This crate is the daemon:
//! the API, the lifecycle service, metering and billing, wired together by [`daemon`].
//!
//! The workspace's crates are its layers; each depends only on the ones below it, so an upward
//! import does not compile:
//! - `metald` (this crate): [`api`] (Connect + REST adapters, auth, error mapping) →
//!   [`service`] (validation and every state transition) → [`metering`], [`billing`],
//!   [`sandbox`] (a VM's jail and network together); [`config`] and [`daemon`] for the binary
//! - `metald-store` ([`store`], [`assets`]): SQLite and image files
//! - `metald-vmm` ([`backend`]): one Firecracker or QEMU process per VM
//! - `metald-host` ([`jailer`], [`network`], [`probe`]): isolation on the host
//! - `metald-domain` ([`domain`], [`state`], [`report`]): the nouns, the state machine
//!
//! The lower crates are re-exported under their layer's name, so paths read the same from here.

pub use metald_domain::{domain, fleet, report, state};
pub use metald_host::{jailer, network, probe, spawner, starts};
pub use metald_store as store;
pub use metald_store::assets;
pub use metald_vmm as backend;

pub mod api;
pub mod billing;
pub mod config;
pub mod daemon;
pub mod file_stamp;
pub mod fleet_assets;
#[doc(hidden)]
pub mod fuzzing;
pub mod listener;
pub mod membership;
pub mod metering;
pub mod peer_client;
pub mod quota;
pub mod sandbox;
pub mod service;
pub mod telemetry;
pub mod timings;

#[cfg(test)]
pub(crate) mod testing;
