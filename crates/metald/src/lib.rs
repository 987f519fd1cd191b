//! metald: runs microVMs for customers behind a ConnectRPC/REST API.
//!
//! Layers, dependencies pointing down only:
//! - [`api`]: Connect + REST adapters, auth, error mapping (no OS access)
//! - [`service`]: validation and every state transition ([`state`])
//! - [`store`] (SQLite), [`assets`] (image files), [`backend`] (VMM processes)
//! - [`jailer`] (chroot, namespaces, cgroups, privilege drop) and [`network`] (namespaces,
//!   veths, addresses, firewall) isolate each VMM
//!
//! [`config`] and [`daemon`] wire them together for the binary.

pub mod api;
pub mod assets;
pub mod backend;
pub mod billing;
pub mod config;
pub mod daemon;
pub mod domain;
pub mod jailer;
pub mod metering;
pub mod network;
pub mod report;
pub mod sandbox;
pub mod service;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod timings;
