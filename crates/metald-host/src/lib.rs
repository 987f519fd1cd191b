//! What isolates each VMM on the host: the [`jailer`] (its own mount namespace and root, cgroup,
//! uid and gid, no capabilities), the [`network`] (a namespace per VM with its TAP, a veth to
//! the host, addresses, routes and the nftables rules that keep tenants apart) [`probe`]s
//! of what the host offers, and the [`spawner`] that starts their processes. Depends only on `metald-domain`.

pub mod jailer;
pub mod network;
pub mod probe;
pub mod spawner;
pub mod starts;

use metald_domain::{domain, report};
