//! What [`super::Network`] asks of the kernel, behind narrow traits: links, addresses and
//! routes ([`Links`], rtnetlink in production), the firewall's ruleset ([`Rules`], `nft`), and
//! pinned namespace files ([`Namespaces`]). The network's own logic (what is made in which
//! order, what a failure half way removes, what the sweep keeps) is then tested without root
//! against recording fakes.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoKind, InfoVeth, LinkAttribute,
};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::nfnetlink::Nfnetlink;
use super::{netns, nft, NetworkError};

/// Interfaces, addresses and routes in metald's own namespace.
#[async_trait::async_trait]
pub trait Links: Send + Sync {
    /// Creates a veth pair: `host_if` here, `peer_if` born inside the namespace pinned at
    /// `netns`.
    async fn add_veth(
        &self,
        host_if: &str,
        peer_if: &str,
        netns: &Path,
    ) -> Result<(), NetworkError>;
    /// The index of the interface `name`, if it exists.
    async fn index_of(&self, name: &str) -> Result<Option<u32>, NetworkError>;
    /// Adds `addr/len` to interface `index`, without duplicate detection or a prefix route.
    async fn add_address(&self, index: u32, addr: IpAddr, len: u8) -> Result<(), NetworkError>;
    /// Sets interface `index` up.
    async fn set_up(&self, index: u32) -> Result<(), NetworkError>;
    /// Sets interface `index` down.
    async fn set_down(&self, index: u32) -> Result<(), NetworkError>;
    /// Renames interface `index` (Linux before 6.2 wants it down).
    async fn rename(&self, index: u32, name: &str) -> Result<(), NetworkError>;
    /// Routes `dest/len` to interface `index`.
    async fn add_route(&self, dest: IpAddr, len: u8, index: u32) -> Result<(), NetworkError>;
    /// Deletes interface `index` (a veth takes its peer, addresses and routes with it).
    async fn delete(&self, index: u32) -> Result<(), NetworkError>;
    /// Every interface: index and name.
    async fn list(&self) -> Result<Vec<(u32, String)>, NetworkError>;
}

/// The firewall: writes metald's table and changes its elements.
#[async_trait::async_trait]
pub trait Rules: Send + Sync {
    /// Loads `script`, one nft transaction: all of it is applied or none.
    async fn load(&self, script: &str) -> Result<(), nft::NftError>;
    /// Adds and deletes elements, in order, in one transaction: all of it is applied or none.
    /// By default as the equivalent nft script.
    async fn change(&self, ops: &[nft::ElementOp]) -> Result<(), nft::NftError> {
        self.load(&nft::script(ops)).await
    }
}

/// Network namespaces pinned on files.
pub trait Namespaces: Send + Sync {
    /// Creates a namespace pinned on the new file `path`.
    fn create(&self, path: &Path) -> io::Result<()>;
    /// Pins the namespace pinned at `from` on the new file `to` instead.
    fn repin(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Inside the namespace at `path`: makes the persistent TAP `tap` (no owner yet: the jail
    /// gives it to the VM's uid) and the bridge `bridge` joining it and `peer`, all up.
    fn wire(&self, path: &Path, tap: &str, bridge: &str, peer: &str) -> io::Result<()>;
    /// Unpins and removes `path` (missing is fine).
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// The namespace files in `dir`.
    fn list(&self, dir: &Path) -> Vec<PathBuf>;
}

/// One transmit and one receive queue for a veth end. The kernel's default is one of each per
/// possible CPU, and reading a veth's counters (the sampler does, every tick, for every VM)
/// visits each receive queue of both ends; the queues only matter for XDP, which metald does
/// not use.
fn single_queue<T>(b: LinkMessageBuilder<T>) -> LinkMessageBuilder<T> {
    b.append_extra_attribute(LinkAttribute::NumTxQueues(1))
        .append_extra_attribute(LinkAttribute::NumRxQueues(1))
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let op = op.into();
    move |source| NetworkError::Netlink { op, source }
}

/// [`Links`] over rtnetlink.
pub struct Rtnetlink {
    handle: rtnetlink::Handle,
}

impl Rtnetlink {
    /// Opens a netlink socket in the calling thread's namespace (metald's own).
    pub fn connect() -> Result<Self, NetworkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| NetworkError::Io {
            op: "open netlink socket",
            path: PathBuf::new(),
            source,
        })?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }
}

#[async_trait::async_trait]
impl Links for Rtnetlink {
    async fn add_veth(
        &self,
        host_if: &str,
        peer_if: &str,
        netns: &Path,
    ) -> Result<(), NetworkError> {
        let ns = std::fs::File::open(netns).map_err(|source| NetworkError::Io {
            op: "open network namespace",
            path: netns.to_path_buf(),
            source,
        })?;
        // The peer is born inside the VM's namespace: moving an interface between namespaces
        // afterwards costs 30-50 ms of RCU synchronisation, creating it there about 3 ms.
        let peer = {
            use std::os::fd::AsRawFd;
            single_queue(LinkMessageBuilder::<LinkUnspec>::new())
                .name(peer_if.to_string())
                .setns_by_fd(ns.as_raw_fd())
                .build()
        };
        self.handle
            .link()
            .add(
                single_queue(LinkMessageBuilder::<LinkVeth>::new_with_info_kind(
                    InfoKind::Veth,
                ))
                .name(host_if.to_string())
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("create veth {host_if}")))?;
        // No kernel-made IPv6 link-local address on the host end (set while it is still down):
        // its duplicate detection, its fe80::/64 prefix route and anycast route (the same on
        // every VM's veth) each walk one route per VM under the kernel's global network lock,
        // which the next VM's jail then waits for to hand over its TAP (a `perf` profile of
        // 1000 starts, issue 14).
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_name(host_if)
                    .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                        vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
                    )]))
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("turn off IPv6 link-local on {host_if}")))?;
        // The kernel only solicits a neighbour from a link-local address, so the host end gets
        // one of its own making: fe80::<interface index>/128, without duplicate detection (no
        // other host is on the link, the guest has its own) and unique in the namespace, so
        // its local route is not one more in a list of one per VM.
        let index = self
            .index_of(host_if)
            .await?
            .ok_or_else(|| NetworkError::NoInterface(host_if.to_string()))?;
        let ll = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, (index >> 16) as u16, index as u16);
        let mut req = self.handle.address().add(index, IpAddr::V6(ll), 128);
        req.message_mut().attributes.push(AddressAttribute::Flags(
            AddressFlags::Nodad | AddressFlags::Noprefixroute,
        ));
        req.execute()
            .await
            .map_err(nl(format!("add address {ll}/128 to {host_if}")))
    }

    async fn index_of(&self, name: &str) -> Result<Option<u32>, NetworkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(msg.header.index)),
            Ok(None) => Ok(None),
            // ENODEV: no such interface.
            Err(rtnetlink::Error::NetlinkError(e))
                if e.code.map(|c| c.get()) == Some(-libc::ENODEV) =>
            {
                Ok(None)
            }
            Err(source) => Err(NetworkError::Netlink {
                op: format!("look up {name}"),
                source,
            }),
        }
    }

    async fn add_address(&self, index: u32, addr: IpAddr, len: u8) -> Result<(), NetworkError> {
        let mut req = self.handle.address().add(index, addr, len);
        // The gateway address sits on every VM's veth; duplicate detection would only delay it.
        // Nor does it get a prefix route (for IPv6 `gateway/128` on this veth, and on every
        // other VM's veth the same): the guests are routed one address each, and each such
        // route added (here and again at every link up) walked the list of all VMs' under the
        // kernel's network lock.
        req.message_mut().attributes.push(AddressAttribute::Flags(
            AddressFlags::Nodad | AddressFlags::Noprefixroute,
        ));
        req.execute()
            .await
            .map_err(nl(format!("add address {addr}/{len}")))
    }

    async fn set_up(&self, index: u32) -> Result<(), NetworkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl(format!("set interface {index} up")))
    }

    async fn set_down(&self, index: u32) -> Result<(), NetworkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(nl(format!("set interface {index} down")))
    }

    async fn rename(&self, index: u32, name: &str) -> Result<(), NetworkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).name(name).build())
            .execute()
            .await
            .map_err(nl(format!("rename interface {index} to {name}")))
    }

    async fn add_route(&self, dest: IpAddr, len: u8, index: u32) -> Result<(), NetworkError> {
        let msg = match dest {
            IpAddr::V6(d) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d, len)
                .output_interface(index)
                .build(),
            IpAddr::V4(d) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d, len)
                .output_interface(index)
                .build(),
        };
        self.handle
            .route()
            .add(msg)
            .execute()
            .await
            .map_err(nl(format!("route {dest}/{len}")))
    }

    async fn delete(&self, index: u32) -> Result<(), NetworkError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(nl(format!("delete interface {index}")))
    }

    async fn list(&self) -> Result<Vec<(u32, String)>, NetworkError> {
        let mut links = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(msg) = links.try_next().await.map_err(nl("list interfaces"))? {
            let name = msg.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            if let Some(name) = name {
                out.push((msg.header.index, name));
            }
        }
        Ok(out)
    }
}

/// [`Rules`]: the table through the `nft` binary, element changes over nfnetlink.
pub struct Nft {
    /// The `nft` binary.
    pub binary: PathBuf,
    /// Starts it, when given (see [`crate::spawner`]).
    pub spawner: Option<std::sync::Arc<crate::spawner::Spawner>>,
    /// Sends element changes, when it could be opened; `nft` takes them otherwise.
    pub netlink: Option<Nfnetlink>,
}

#[async_trait::async_trait]
impl Rules for Nft {
    async fn load(&self, script: &str) -> Result<(), nft::NftError> {
        nft::apply(&self.binary, script, self.spawner.as_deref()).await
    }

    async fn change(&self, ops: &[nft::ElementOp]) -> Result<(), nft::NftError> {
        match &self.netlink {
            // Not moved to a blocking thread: the kernel handles the batch within the send
            // (about 0.1 ms) and the socket never waits.
            Some(netlink) => netlink.apply(ops),
            None => self.load(&nft::script(ops)).await,
        }
    }
}

/// [`Namespaces`] as bind-mounted files ([`netns`]).
pub struct PinnedNamespaces;

impl Namespaces for PinnedNamespaces {
    fn create(&self, path: &Path) -> io::Result<()> {
        netns::create(path)
    }
    fn repin(&self, from: &Path, to: &Path) -> io::Result<()> {
        netns::repin(from, to)
    }
    fn wire(&self, path: &Path, tap: &str, bridge: &str, peer: &str) -> io::Result<()> {
        netns::wire(path, tap, bridge, peer)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        netns::remove(path)
    }
    fn list(&self, dir: &Path) -> Vec<PathBuf> {
        netns::list(dir)
    }
}
