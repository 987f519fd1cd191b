//! Wiring: builds the store, asset store, backend and service from a [`Config`] and serves the
//! API until SIGTERM or SIGINT. VMs keep running across a metald restart and are re-attached.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::assets::AssetStore;
use crate::backend::firecracker::FirecrackerBackend;
use crate::backend::qemu::{Accel, QemuBackend};
use crate::backend::{Backend, BackendKind, ExitEvent};
use crate::billing::{Billing, BillingConfig};
use crate::config::{AccelChoice, BackendChoice, Config, Isolation, IsolationConfig};
use crate::jailer::{Jailer, JailerConfig};
use crate::listener::tls::ReloadingTls;
use crate::membership::Membership;
use crate::metering::{Meter, MeterConfig};
use crate::network::ipam::AllocationPlan;
use crate::network::{Network, NetworkConfig};
use crate::report::Chain;
use crate::sandbox::Sandboxes;
use crate::service::{ServiceConfig, VmService};
use crate::starts::Starts;
use crate::store::{StateStore, Store};

/// Errors while starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No usable VMM.
    #[error("{0}")]
    NoBackend(String),
    /// The jail binary is not installed beside metald.
    #[error("{} is missing: metald starts every VMM through it; install it beside metald", .0.display())]
    NoJail(PathBuf),
    /// A directory could not be made.
    #[error("create {path}")]
    Dir {
        /// The directory.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The database failed to open.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The asset store failed to open.
    #[error(transparent)]
    Assets(#[from] crate::assets::AssetError),
    /// The jailer could not be set up.
    #[error("jailer")]
    Isolation(#[source] crate::jailer::JailError),
    /// The network could not be set up.
    #[error("network")]
    Network(#[source] crate::network::NetworkError),
    /// Authentication could not be set up.
    #[error("authentication")]
    Auth(#[source] crate::api::auth::AuthError),
    /// The TLS files did not load.
    #[error("TLS")]
    Tls(#[source] crate::listener::tls::TlsError),
    /// Reconciliation failed.
    #[error("reconciling VMs at start")]
    Reconcile(#[source] crate::service::ServiceError),
    /// The listener failed.
    #[error("listen on {addr}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Opens the store: the fleet's PostgreSQL database when one is configured, else SQLite in the
/// data directory (created if missing either way: VM directories and assets live there).
pub fn open_store(cfg: &Config) -> Result<Arc<dyn StateStore>, StartError> {
    let data_dir = &cfg.data_dir;
    std::fs::create_dir_all(data_dir).map_err(|source| StartError::Dir {
        path: data_dir.to_path_buf(),
        source,
    })?;
    match &cfg.fleet.database_url {
        Some(url) => {
            let tls = cfg
                .fleet
                .database_ca_file
                .as_deref()
                .map(crate::listener::tls::client_trusting)
                .transpose()
                .map_err(StartError::Tls)?;
            Ok(Arc::new(crate::store::PgStore::open_with(
                url.expose(),
                cfg.fleet.host_id.as_str(),
                tls,
            )?))
        }
        None => Ok(Arc::new(Store::open(&data_dir.join("metald.db"))?)),
    }
}

/// Opens the asset store under the data directory.
pub fn open_assets(
    data_dir: &Path,
    store: Arc<dyn StateStore>,
) -> Result<Arc<AssetStore>, StartError> {
    Ok(Arc::new(AssetStore::open(data_dir.join("assets"), store)?))
}

/// Picks the backend the configuration asks for, saying why in the log.
pub fn select_backend(
    cfg: &Config,
    events: mpsc::UnboundedSender<ExitEvent>,
) -> Result<Arc<dyn Backend>, StartError> {
    let (hw_kvm, kvm_why) = cfg.roots.hardware_kvm();
    let use_firecracker = match cfg.backend {
        BackendChoice::Firecracker => true,
        BackendChoice::Qemu => false,
        BackendChoice::Auto => match (&cfg.firecracker_bin, hw_kvm) {
            (Some(bin), true) => {
                tracing::info!(binary = %bin.display(), "backend auto: firecracker (binary found, {kvm_why})");
                true
            }
            (Some(bin), false) => {
                tracing::info!(binary = %bin.display(), "backend auto: qemu, because firecracker needs hardware KVM for full guests and {kvm_why}");
                false
            }
            (None, _) => {
                tracing::info!("backend auto: qemu (no firecracker binary on PATH or in UNKEY_METALD_FIRECRACKER_BIN)");
                false
            }
        },
    };
    if use_firecracker {
        let bin = cfg.firecracker_bin.clone().ok_or_else(|| {
            StartError::NoBackend("UNKEY_METALD_BACKEND=firecracker but no firecracker binary: set UNKEY_METALD_FIRECRACKER_BIN or put firecracker on PATH".into())
        })?;
        if !cfg.roots.kvm().exists() {
            return Err(StartError::NoBackend(
                "firecracker needs /dev/kvm, which does not exist".into(),
            ));
        }
        tracing::info!(binary = %bin.display(), "using firecracker");
        return Ok(Arc::new(FirecrackerBackend::new(bin, events)));
    }
    let bin = cfg.qemu_bin.clone().ok_or_else(|| {
        StartError::NoBackend(
            "no qemu-system-x86_64 binary: install qemu-system-x86 or set UNKEY_METALD_QEMU_BIN"
                .into(),
        )
    })?;
    let accel = match cfg.qemu_accel {
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Tcg => Accel::Tcg,
        AccelChoice::Auto if hw_kvm => Accel::Kvm,
        AccelChoice::Auto => Accel::Tcg,
    };
    tracing::info!(binary = %bin.display(), accel = accel.as_str(), reason = %kvm_why, "using qemu");
    Ok(Arc::new(QemuBackend::new(bin, accel, events)))
}

/// The jailer and network for `kind` VMMs.
pub fn sandboxes(
    cfg: &Config,
    iso: &IsolationConfig,
    kind: BackendKind,
) -> Result<Sandboxes, StartError> {
    let binary = match kind {
        BackendKind::Firecracker => cfg.firecracker_bin.clone(),
        BackendKind::Qemu => cfg.qemu_bin.clone(),
    }
    .ok_or_else(|| StartError::NoBackend(format!("no {} binary", kind.as_str())))?;
    let jail_exe = jail_exe()?;
    let starts = std::sync::Arc::new(Starts::default());
    let jailer = Jailer::new(
        JailerConfig {
            uid_base: iso.uid_base,
            gid_base: iso.gid_base,
            id_count: iso.id_count,
            chroot_dir: iso.chroot_dir.clone(),
            roots: cfg.roots.clone(),
            cgroup_parent: iso.cgroup_parent.clone(),
            jail_exe,
            tc_bin: iso.tc_bin.clone(),
            warm_jails: iso.warm_jails,
            starts: std::sync::Arc::clone(&starts),
        },
        kind,
        &binary,
    )
    .map_err(StartError::Isolation)?;
    tracing::info!(cgroups = ?jailer.cgroups().hierarchy(), chroot_dir = %iso.chroot_dir.display(), "jailer ready");
    let network = Network::new(NetworkConfig {
        ipv6_prefix: iso.ipv6_prefix,
        ipv4_subnet: iso.ipv4_subnet,
        outbound_interface: iso.outbound_interface.clone(),
        netns_dir: iso.run_dir.join("netns"),
        nft_bin: iso.nft_bin.clone(),
        proc_root: cfg.roots.proc.clone(),
        warm_pool: iso.warm_pool,
        spawner: Some(jailer.spawner()),
        starts: std::sync::Arc::clone(&starts),
    })
    .map_err(StartError::Network)?;
    tracing::info!(ipv6_prefix = %iso.ipv6_prefix, ipv4_subnet = ?iso.ipv4_subnet.map(|s| s.to_string()), outbound = ?iso.outbound_interface, "network ready");
    Ok(Sandboxes::new(
        jailer,
        network,
        AllocationPlan {
            slots: iso.id_count,
            ipv6: iso.ipv6_prefix,
            ipv4: iso.ipv4_subnet,
        },
        cfg.roots.proc.clone(),
        starts,
    ))
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(mut cfg: Config) -> Result<(), StartError> {
    if matches!(cfg.auth.mode, crate::config::AuthMode::Dev) {
        tracing::warn!("DEV AUTH IS ON: any 'Bearer dev_customer_<id>' token acts as customer <id> (loopback only)");
    }
    // Before anything else starts: a bad JWKS file stops metald here.
    let auth = crate::api::auth::Authenticator::new(&cfg.auth)
        .await
        .map_err(StartError::Auth)?;
    let store = open_store(&cfg)?;
    let assets = open_assets(&cfg.data_dir, Arc::clone(&store))?;
    let (membership, me) = Membership::join(Arc::clone(&store), &cfg.fleet)?;
    // The fleet gives each host its own blocks, kept with its registration, so its VMs'
    // routes stay per host and its addresses do not move across restarts.
    if let (Some((ipv6, ipv4)), Isolation::Jail(iso)) =
        (membership.blocks(me.index), &mut cfg.isolation)
    {
        iso.ipv6_prefix = ipv6;
        iso.ipv4_subnet = ipv4;
    }
    tracing::info!(host = %me.registration.id, place = me.index, shared = cfg.fleet.database_url.is_some(), "joined the fleet");
    membership.keep_lease();
    // Images this host lacks come from the operator's directory, then from its peers.
    assets.set_sources(crate::fleet_assets::sources(
        &cfg.fleet,
        cfg.tls.clone(),
        Arc::clone(&membership),
    ));
    let vms_dir = cfg.data_dir.join("vms");
    std::fs::create_dir_all(&vms_dir).map_err(|source| StartError::Dir {
        path: vms_dir.clone(),
        source,
    })?;
    // Snapshots hold tenants' memory: metald's alone (0700), never a VM uid's.
    let snapshots_dir = cfg.data_dir.join("snapshots");
    {
        use std::os::unix::fs::DirBuilderExt;
        match std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&snapshots_dir)
        {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(StartError::Dir {
                    path: snapshots_dir,
                    source: e,
                })
            }
            _ => {}
        }
    }
    let clone_net = match &cfg.isolation {
        Isolation::Jail(iso) => Some(crate::service::CloneNet {
            jail_exe: jail_exe()?,
            nft_bin: iso.nft_bin.clone(),
        }),
        Isolation::None => None,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let backend = select_backend(&cfg, tx)?;
    let isolation: Arc<dyn crate::sandbox::Isolation> = match &cfg.isolation {
        Isolation::Jail(iso) => Arc::new(sandboxes(&cfg, iso, backend.kind())?),
        Isolation::None => {
            tracing::warn!("ISOLATION IS OFF (UNKEY_METALD_ISOLATION=none): VMMs run as metald's own user, unjailed and without network; for development and benchmarks only");
            Arc::new(crate::sandbox::Unisolated {
                proc: cfg.roots.proc.clone(),
                vms_dir: vms_dir.clone(),
            })
        }
    };
    let meter = Meter::start(MeterConfig {
        interval: cfg.metrics_interval,
        retained_samples: cfg.metrics_retained_samples(),
        vmm_metrics_interval: cfg.vmm_metrics_interval,
    });
    tracing::info!(
        interval_ms = cfg.metrics_interval.as_millis() as u64,
        "metering every running VM"
    );
    let billing = cfg.billing.as_ref().map(|b| {
        tracing::info!(endpoint = %b.endpoint, batch_ms = b.batch_interval.as_millis() as u64, "sending usage to the billing service");
        Billing::start(
            Arc::clone(&store),
            Arc::clone(&meter),
            BillingConfig {
                endpoint: b.endpoint.clone(),
                batch_interval: b.batch_interval,
                heartbeat_interval: b.heartbeat_interval,
                instance_id: format!("metald@{}", cfg.data_dir.display()),
            },
        )
    });
    let quotas = Arc::new(crate::quota::QuotaTable::new(
        cfg.quotas.clone(),
        cfg.quota_file.clone(),
    ));
    quotas.watch(crate::quota::POLL_INTERVAL);
    let svc = VmService::start(
        store,
        assets,
        backend,
        isolation,
        Arc::clone(&meter),
        ServiceConfig {
            vms_dir,
            boot_timeout: cfg.boot_timeout,
            quotas: Arc::clone(&quotas),
            host: cfg.host,
            probe: Arc::new(crate::probe::LinuxHost::new(cfg.roots.proc.clone())),
            console_max_bytes: cfg.console_max_bytes,
            snapshots_dir,
            clone_net,
            membership: Arc::clone(&membership),
            warm_disks: cfg.warm_disks,
            warm_disk_max_bytes: cfg.warm_disk_max_bytes,
        },
        rx,
    );
    if let Some(b) = billing {
        svc.set_billing(b);
    }
    svc.reconcile().await.map_err(StartError::Reconcile)?;
    match svc.host_capacity() {
        Ok(c) => {
            tracing::info!(
                memory_mib = c.memory_bytes.total >> 20,
                vcpus = c.vcpus.total,
                disk_mib = c.disk_bytes.total >> 20,
                "host capacity"
            );
            let capacity = crate::fleet::HostCapacity {
                memory_bytes: Some(c.memory_bytes.total),
                vcpus: Some(c.vcpus.total),
            };
            if let Err(e) = membership.set_capacity(capacity) {
                tracing::error!(error = %Chain(&e), "host capacity not reported to the fleet");
            }
        }
        Err(e) => {
            tracing::error!(error = %Chain(&e), "host capacity cannot be measured; boots will fail")
        }
    }
    let addr = std::net::SocketAddr::new(cfg.address, cfg.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })?;
    let tls = match &cfg.tls {
        Some(t) => {
            let tls = ReloadingTls::load(t.clone()).map_err(StartError::Tls)?;
            // Ends with the runtime; the task holds only a weak reference.
            let _watch = tls.watch();
            Some(tls)
        }
        None => None,
    };
    let routers = crate::api::routers(
        Arc::clone(&svc),
        crate::api::ApiSettings {
            auth: Arc::new(auth),
            limits: cfg.requests,
            separate_metrics: cfg.metrics_port.is_some(),
            metrics_token: cfg.metrics_token.clone(),
            peers: Arc::new(crate::api::forward::Peers::new(
                cfg.fleet.host_id.clone(),
                cfg.tls.clone(),
            )),
        },
    );
    if let (Some(port), Some(app)) = (cfg.metrics_port, routers.metrics) {
        let maddr = std::net::SocketAddr::new(cfg.address, port);
        let mlistener = tokio::net::TcpListener::bind(maddr)
            .await
            .map_err(|source| StartError::Listen {
                addr: maddr,
                source,
            })?;
        tracing::info!(addr = %maddr, "serving /metrics on its own port");
        // Ends with the runtime when the API server has shut down.
        tokio::spawn(async move {
            if let Err(e) = axum::serve(mlistener, app).await {
                tracing::error!(error = %Chain(&e), "the metrics port stopped serving");
            }
        });
    }
    tracing::info!(%addr, data_dir = %cfg.data_dir.display(), backend = svc.backend_name(), tls = tls.is_some(), "metald listening");
    crate::listener::serve(listener, routers.api, tls, shutdown_signal())
        .await
        .map_err(|source| StartError::Listen { addr, source })?;
    // Deleted VMs' leftovers still being removed are finished and the warm pool removed (the
    // start-up sweep would do both too, but a clean stop leaves nothing behind).
    if tokio::time::timeout(SETTLE_TIMEOUT, svc.close())
        .await
        .is_err()
    {
        tracing::warn!("deleted VMs' leftovers or warm spares were still being removed at shutdown; the next start sweeps them");
    }
    membership.leave().await;
    tracing::info!("metald stopped; running VMs keep running and are re-attached at next start");
    Ok(())
}

/// The `metald-jail` binary, installed beside metald (scripts/install.sh, cargo's target
/// directory).
fn jail_exe() -> Result<PathBuf, StartError> {
    let exe = std::env::current_exe()
        .map_err(|source| StartError::Dir {
            path: "/proc/self/exe".into(),
            source,
        })?
        .with_file_name("metald-jail");
    if exe.is_file() {
        Ok(exe)
    } else {
        Err(StartError::NoJail(exe))
    }
}

/// How long a stopping metald waits for deleted VMs' leftovers and the warm pool to be removed.
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the daemon simply runs until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
