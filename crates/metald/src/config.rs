//! Configuration from `UNKEY_METALD_*` environment variables, validated once at start. A bad
//! value stops metald with one line naming the variable and what is allowed.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use metald_host::probe::{hardware_kvm, is_executable, HostRoots};

use crate::domain::MIB;
use crate::fleet::{BadHostId, FleetPrefixes, HostId};
use crate::network::ipam::{Ipv4Subnet, Ipv6Prefix};
use crate::quota::{QuotaBook, Quotas};
use crate::service::{HostSettings, Ratio};
use crate::store::{RunLimits, StoredLimits};

/// Which VMM to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// Firecracker.
    Firecracker,
    /// QEMU.
    Qemu,
    /// Firecracker where it can run full guests, else QEMU.
    Auto,
}

/// QEMU's accelerator choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// Hardware KVM.
    Kvm,
    /// Software emulation.
    Tcg,
    /// KVM where the host has hardware KVM, TCG otherwise.
    Auto,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

/// How VMMs are isolated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// Every VMM in its own jail and network namespace (production).
    Jail(IsolationConfig),
    /// VMMs run directly as metald's user with no network (development and benchmarks only).
    None,
}

/// Jailer and network settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsolationConfig {
    /// First uid of the per-VM range.
    pub uid_base: u32,
    /// First gid of the per-VM range.
    pub gid_base: u32,
    /// Number of per-VM ids (and so of VMs) available.
    pub id_count: u32,
    /// Where jail roots live.
    pub chroot_dir: PathBuf,
    /// Runtime state (network namespace files).
    pub run_dir: PathBuf,
    /// Parent cgroup of every VM's cgroup.
    pub cgroup_parent: String,
    /// VM IPv6 addresses come from here.
    pub ipv6_prefix: Ipv6Prefix,
    /// VM IPv4 addresses come from here; IPv4 is off without it.
    pub ipv4_subnet: Option<Ipv4Subnet>,
    /// The interface VMs reach the outside world through; none (no outbound access) by default.
    pub outbound_interface: Option<String>,
    /// The `nft` binary.
    pub nft_bin: PathBuf,
    /// The `tc` binary.
    pub tc_bin: PathBuf,
    /// Networks kept made ahead of boots (`UNKEY_METALD_WARM_POOL`).
    pub warm_pool: usize,
    /// Jail children kept started ahead of boots (`UNKEY_METALD_WARM_JAILS`).
    pub warm_jails: usize,
}

/// metald's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Listen address.
    pub address: IpAddr,
    /// Listen port.
    pub port: u16,
    /// A separate port for `/metrics` (and the health checks), on the same address; `None`:
    /// `/metrics` is served on the API port.
    pub metrics_port: Option<u16>,
    /// Where the database, assets and VM directories live.
    pub data_dir: PathBuf,
    /// Which VMM.
    pub backend: BackendChoice,
    /// Firecracker binary, if configured or found on PATH.
    pub firecracker_bin: Option<PathBuf>,
    /// QEMU binary, if configured or found on PATH.
    pub qemu_bin: Option<PathBuf>,
    /// QEMU accelerator.
    pub qemu_accel: AccelChoice,
    /// How long a guest may take to print its readiness line.
    pub boot_timeout: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// VMM isolation.
    pub isolation: Isolation,
    /// How often every running VM is sampled.
    pub metrics_interval: Duration,
    /// How long samples are kept in memory.
    pub metrics_retention: Duration,
    /// How often VMMs that keep their own metrics (Firecracker) are asked to flush them.
    pub vmm_metrics_interval: Duration,
    /// Where usage is sent, if billing is on.
    pub billing: Option<BillingSettings>,
    /// OTLP/HTTP collector base URL, if trace export is on.
    pub otel_endpoint: Option<String>,
    /// Where the host's /proc, /sys and /dev are (not from the environment: tests set it).
    pub roots: HostRoots,
    /// Per-customer quotas: the UNKEY_METALD_QUOTA_* defaults with the quota file's overrides,
    /// as read at start.
    pub quotas: QuotaBook,
    /// The quota file, read again whenever it changes.
    pub quota_file: Option<PathBuf>,
    /// What metald leaves to the host and how far it overcommits.
    pub host: HostSettings,
    /// Who callers are.
    pub auth: AuthSettings,
    /// HTTPS (and client certificates), if configured; plain HTTP otherwise.
    pub tls: Option<TlsSettings>,
    /// Per-customer request rate and deadline caps.
    pub requests: RequestLimits,
    /// The operator token `/metrics` requires.
    pub metrics_token: Option<Secret>,
    /// Most bytes a VM's console log keeps.
    pub console_max_bytes: u64,
    /// Spare disk copies kept per image (`UNKEY_METALD_WARM_DISKS`).
    pub warm_disks: usize,
    /// Largest image given spare copies, bytes (`UNKEY_METALD_WARM_DISK_MAX_MIB`).
    pub warm_disk_max_bytes: u64,
    /// This host among its peers, and the database they share if there is one.
    pub fleet: FleetSettings,
}

/// This host in a fleet (`UNKEY_METALD_HOST_*`, `UNKEY_METALD_DATABASE_URL`,
/// `UNKEY_METALD_FLEET_*`). Without a database URL the fleet is this host alone, on SQLite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    /// This host's id: `UNKEY_METALD_HOST_ID`, else the machine's hostname made a DNS label.
    pub host_id: HostId,
    /// The base URL peers call this host at; required with a database URL.
    pub advertise_url: Option<String>,
    /// Labels shown to operators and used for placement (`k=v,k=v`).
    pub labels: BTreeMap<String, String>,
    /// How long a lease lasts; it is renewed three times as often.
    pub lease: Duration,
    /// The PostgreSQL database the fleet shares (`postgres://…`); `None`: SQLite in the data
    /// directory.
    pub database_url: Option<Secret>,
    /// PEM CA certificates the database server's certificate must chain to: TLS to the
    /// database; `None`: plain (a Unix socket or a trusted network).
    pub database_ca_file: Option<PathBuf>,
    /// The fleet's address space, of which this host is given a /64 (and an IPv4 block) at
    /// registration; `None`: the host's own `UNKEY_METALD_IPV6_PREFIX`/`IPV4_SUBNET`.
    pub prefixes: Option<FleetPrefixes>,
    /// A directory (an NFS mount, say) holding asset files named by their sha256 or their id,
    /// which this host copies an image it lacks from before asking its peers
    /// (`UNKEY_METALD_ASSET_SOURCE`).
    pub asset_source: Option<PathBuf>,
}

/// A secret from the environment: never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `s`.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// How callers are authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSettings {
    /// Which credentials are accepted.
    pub mode: AuthMode,
    /// SPIFFE IDs of services (client certificates) that may act for the customer named in
    /// the `metald-customer` header.
    pub trusted_services: Vec<String>,
    /// Whether a trusted service must also present a JWT for that customer (`jwt` mode).
    pub services_need_token: bool,
}

/// The credentials metald accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    /// `Bearer dev_customer_<id>`: loopback development only.
    Dev,
    /// Bearer JWTs verified against a JWKS.
    Jwt(JwtSettings),
    /// Client certificates of trusted services only.
    Mtls,
}

/// Where JWT keys come from and what tokens must say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSettings {
    /// A JWKS document on disk.
    pub jwks_file: Option<PathBuf>,
    /// A JWKS document fetched over HTTP(S).
    pub jwks_url: Option<http::Uri>,
    /// The required `iss`.
    pub issuer: String,
    /// The required `aud`.
    pub audience: String,
    /// The claim naming the customer.
    pub customer_claim: String,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
}

/// Server certificate files, and the CA client certificates must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// PEM CA certificates; when set, every client must present a certificate.
    pub client_ca_file: Option<PathBuf>,
}

/// Per-customer request rate and server-side deadline caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Sustained requests per second per customer.
    pub rate_per_second: u32,
    /// Requests a customer may send at once above the rate.
    pub burst: u32,
    /// The longest a call may run, whatever deadline the client sent.
    pub max_deadline: Duration,
}

/// Billing delivery settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingSettings {
    /// The billing service's base URL.
    pub endpoint: http::Uri,
    /// How often samples are batched.
    pub batch_interval: Duration,
    /// How often the running VMs are reported as a heartbeat.
    pub heartbeat_interval: Duration,
}

impl Config {
    /// Samples kept per VM.
    pub fn metrics_retained_samples(&self) -> usize {
        let n = self.metrics_retention.as_millis() / self.metrics_interval.as_millis().max(1);
        usize::try_from(n).unwrap_or(usize::MAX).max(1)
    }
}

/// `100ms`, `2s` or a bare number of milliseconds.
fn parse_duration(v: &str) -> Option<Duration> {
    let (num, unit) = match v.strip_suffix("ms") {
        Some(n) => (n, 1),
        None => match v.strip_suffix('s') {
            Some(n) => (n, 1000),
            None => (v, 1),
        },
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .map(|n| Duration::from_millis(n * unit))
}

/// A bad environment variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}={value:?} is invalid: {allowed}")]
pub struct ConfigError {
    /// The variable.
    pub var: &'static str,
    /// Its value.
    pub value: String,
    /// What is allowed.
    pub allowed: String,
}

/// Warm jails kept by default (`UNKEY_METALD_WARM_JAILS`). Each is a waiting process of about
/// 1 MB with its own small tmpfs root. Three, so that one boot leaves the pool more than half
/// full: its refill then waits until no start runs, where with two it ran beside the boot's
/// `InstanceStart` and made it about 1.3 ms longer than a bare Firecracker's (the scale bench's
/// settled boots, `crates/metald-host/src/starts.rs`).
pub const DEFAULT_WARM_JAILS: usize = 3;

/// Longest data directory path: VM control sockets live at
/// `<data dir>/vms/vm-<uuid>/control.sock` and a Unix socket path has at most 107 bytes.
pub const MAX_DATA_DIR_LEN: usize = crate::backend::MAX_SOCKET_PATH
    - "/vms/vm-00000000-0000-0000-0000-000000000000/control.sock".len();

/// Longest jail directory path: a jailed VMM's control socket lives at
/// `<chroot dir>/<backend>/vm-<uuid>/ctl/control.sock`.
pub const MAX_CHROOT_DIR_LEN: usize = crate::backend::MAX_SOCKET_PATH
    - "/firecracker/vm-00000000-0000-0000-0000-000000000000/ctl/control.sock".len();

impl Config {
    /// Reads the configuration through `var` (the process environment in production).
    pub fn from_env(
        var: impl Fn(&str) -> Option<String>,
        path_lookup: impl Fn(&str) -> Option<PathBuf>,
    ) -> Result<Self, ConfigError> {
        let env = Env {
            var: &var,
            path_lookup: &path_lookup,
        };
        let port = env.parsed("UNKEY_METALD_PORT", 8080, PORT, |v| {
            v.parse::<u16>().ok().filter(|p| *p != 0)
        })?;
        let address = env.parsed(
            "UNKEY_METALD_ADDRESS",
            IpAddr::from([127, 0, 0, 1]),
            "expected an IPv4 or IPv6 address such as 127.0.0.1 or ::",
            |v| v.parse().ok(),
        )?;
        let tls = tls_settings(&env)?;
        let auth = auth_settings(&env, tls.as_ref())?;
        // Dev tokens name their customer in clear: anyone who can reach the port can be anyone.
        if matches!(auth.mode, AuthMode::Dev) && !address.to_canonical().is_loopback() {
            return Err(bad(
                "UNKEY_METALD_ADDRESS",
                &address.to_string(),
                "UNKEY_METALD_AUTH_MODE=dev serves loopback addresses only (127.0.0.0/8, ::1): dev tokens let any caller act as any customer",
            ));
        }
        // 96 bytes per sample: 600 samples (60 s at 100 ms) are 56 KiB per VM. The billing
        // service holds the history; this is the live view.
        let metrics_retention =
            env.seconds("UNKEY_METALD_METRICS_RETENTION_SECONDS", 60, 1..=86_400)?;
        let quota_file = env.optional_abs_path(QUOTA_FILE)?;
        Ok(Self {
            address,
            port,
            metrics_port: env.optional(
                "UNKEY_METALD_OTEL_PROMETHEUS_PORT",
                "expected a port number 1-65535 other than the API port",
                |v| v.parse::<u16>().ok().filter(|p| *p != 0 && *p != port),
            )?,
            data_dir: data_dir(&env)?,
            backend: env.choice(
                "UNKEY_METALD_BACKEND",
                BackendChoice::Auto,
                &[
                    ("firecracker", BackendChoice::Firecracker),
                    ("qemu", BackendChoice::Qemu),
                    ("auto", BackendChoice::Auto),
                ],
            )?,
            firecracker_bin: env.executable("UNKEY_METALD_FIRECRACKER_BIN", "firecracker")?,
            qemu_bin: env.executable("UNKEY_METALD_QEMU_BIN", "qemu-system-x86_64")?,
            qemu_accel: env.choice(
                "UNKEY_METALD_QEMU_ACCEL",
                AccelChoice::Auto,
                &[
                    ("kvm", AccelChoice::Kvm),
                    ("tcg", AccelChoice::Tcg),
                    ("auto", AccelChoice::Auto),
                ],
            )?,
            boot_timeout: env.seconds("UNKEY_METALD_BOOT_TIMEOUT_SECONDS", 120, 1..=3600)?,
            log_format: env.choice(
                "UNKEY_METALD_LOG_FORMAT",
                LogFormat::Json,
                &[("json", LogFormat::Json), ("text", LogFormat::Text)],
            )?,
            isolation: match env.choice(
                "UNKEY_METALD_ISOLATION",
                true,
                &[("jail", true), ("none", false)],
            )? {
                true => Isolation::Jail(isolation_config(&env)?),
                false => Isolation::None,
            },
            metrics_interval: env.duration(
                "UNKEY_METALD_METRICS_INTERVAL",
                Duration::from_millis(100),
                Duration::from_millis(10)..=Duration::from_secs(60),
                "expected a duration such as 100ms or 1s, 10ms-60s",
            )?,
            vmm_metrics_interval: env.duration(
                "UNKEY_METALD_VMM_METRICS_INTERVAL",
                // Firecracker's own period: its records come by themselves, with no API call.
                Duration::from_secs(60),
                Duration::from_secs(1)..=Duration::from_secs(600),
                "expected a duration such as 10s, 1s-600s",
            )?,
            metrics_retention,
            billing: billing_settings(&env)?,
            otel_endpoint: otel_endpoint(&env)?,
            roots: HostRoots::default(),
            quotas: quota_book(&env, quota_file.as_deref())?,
            quota_file,
            host: host_settings(&env)?,
            auth,
            tls,
            requests: request_limits(&env)?,
            console_max_bytes: env.parsed(
                "UNKEY_METALD_CONSOLE_MAX_BYTES",
                16 << 20,
                "expected whole bytes, 65536-1073741824 (64 KiB-1 GiB)",
                |v| {
                    v.parse::<u64>()
                        .ok()
                        .filter(|n| (65_536..=1 << 30).contains(n))
                },
            )?,
            // Each spare is a synced copy on the VMs' disk: a few per image cover a burst of
            // creates; images above the size limit are copied at create only.
            warm_disks: env.pool_size(
                "UNKEY_METALD_WARM_DISKS",
                2,
                crate::service::spare_disks::MAX_PER_IMAGE,
            )?,
            warm_disk_max_bytes: env.parsed(
                "UNKEY_METALD_WARM_DISK_MAX_MIB",
                256u64 << 20,
                "expected whole MiB, 1-65536",
                |v| {
                    v.parse::<u64>()
                        .ok()
                        .filter(|n| (1..=65_536).contains(n))
                        .map(|n| n << 20)
                },
            )?,
            fleet: fleet_settings(&env)?,
            metrics_token: env.optional(
                "UNKEY_METALD_METRICS_TOKEN",
                "expected a token of 32-256 printable ASCII characters",
                |v| {
                    { (32..=256).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()) }
                        .then(|| Secret(v.to_string()))
                },
            )?,
        })
    }
}

const PORT: &str = "expected a port number 1-65535";

fn bad(var: &'static str, value: &str, allowed: &str) -> ConfigError {
    ConfigError {
        var,
        value: value.to_string(),
        allowed: allowed.to_string(),
    }
}

/// Reads variables one at a time: an unset or empty variable is its default, anything else
/// must parse or becomes a [`ConfigError`] naming the variable and what is allowed.
struct Env<'a> {
    var: &'a dyn Fn(&str) -> Option<String>,
    path_lookup: &'a dyn Fn(&str) -> Option<PathBuf>,
}

impl Env<'_> {
    fn get(&self, name: &'static str) -> Option<(&'static str, String)> {
        (self.var)(name)
            .filter(|v| !v.is_empty())
            .map(|v| (name, v))
    }

    fn optional<T>(
        &self,
        name: &'static str,
        allowed: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some((n, v)) => parse(&v).map(Some).ok_or_else(|| bad(n, &v, allowed)),
        }
    }

    fn parsed<T>(
        &self,
        name: &'static str,
        default: T,
        allowed: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<T, ConfigError> {
        Ok(self.optional(name, allowed, parse)?.unwrap_or(default))
    }

    /// A pool's size: a whole number from 0 (no pool) to `max`.
    fn pool_size(
        &self,
        name: &'static str,
        default: usize,
        max: usize,
    ) -> Result<usize, ConfigError> {
        self.parsed(
            name,
            default,
            &format!("expected a whole number from 0 to {max}"),
            |v| v.parse::<usize>().ok().filter(|n| *n <= max),
        )
    }

    /// One of `options` by name ("expected a, b or c" otherwise).
    fn choice<T: Copy>(
        &self,
        name: &'static str,
        default: T,
        options: &[(&str, T)],
    ) -> Result<T, ConfigError> {
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        let allowed = match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => {
                format!("expected {} or {last}", rest.join(", "))
            }
            _ => format!("expected {}", names.join("")),
        };
        self.parsed(name, default, &allowed, |v| {
            options.iter().find(|(n, _)| *n == v).map(|(_, t)| *t)
        })
    }

    /// A count quota, 1 to a million; unset is `None`.
    fn count(&self, name: &'static str) -> Result<Option<u64>, ConfigError> {
        self.optional(name, crate::quota::COUNT_ALLOWED, |v| {
            v.parse::<u64>().ok().filter(|n| crate::quota::count_ok(*n))
        })
    }

    /// A size quota in whole MiB, 1 MiB to 1 PiB, as bytes; unset is `None`.
    fn mib_quota(&self, name: &'static str) -> Result<Option<u64>, ConfigError> {
        self.optional(name, crate::quota::MIB_ALLOWED, |v| {
            v.parse::<u64>().ok().and_then(crate::quota::mib_bytes)
        })
    }

    /// Whole MiB from 0 to 1 TiB, as bytes.
    fn mib(&self, name: &'static str, default_mib: u64) -> Result<u64, ConfigError> {
        let mib = self.parsed(
            name,
            default_mib,
            "expected whole MiB, 0-1048576 (1 TiB)",
            |v| v.parse::<u64>().ok().filter(|n| *n <= 1 << 20),
        )?;
        Ok(mib * MIB)
    }

    /// A ratio such as `1.5`, within `min..=max` hundredths.
    fn ratio(
        &self,
        name: &'static str,
        default: Ratio,
        (min, max): (u32, u32),
        allowed: &str,
    ) -> Result<Ratio, ConfigError> {
        self.parsed(name, default, allowed, |v| Ratio::parse(v, min, max))
    }

    /// Whole seconds within `range`.
    fn seconds(
        &self,
        name: &'static str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Duration, ConfigError> {
        let allowed = format!("expected whole seconds, {}-{}", range.start(), range.end());
        let secs = self.parsed(name, default, &allowed, |v| {
            v.parse::<u64>().ok().filter(|s| range.contains(s))
        })?;
        Ok(Duration::from_secs(secs))
    }

    /// A duration such as `100ms` or `2s` within `range`.
    fn duration(
        &self,
        name: &'static str,
        default: Duration,
        range: std::ops::RangeInclusive<Duration>,
        allowed: &str,
    ) -> Result<Duration, ConfigError> {
        self.parsed(name, default, allowed, |v| {
            parse_duration(v).filter(|d| range.contains(d))
        })
    }

    /// `true` or `false`; unset is false.
    fn flag(&self, name: &'static str) -> Result<bool, ConfigError> {
        self.choice(name, false, &[("true", true), ("false", false)])
    }

    /// An http(s) URL with a host, parsed and as written.
    fn http_url(
        &self,
        name: &'static str,
        allowed: &str,
    ) -> Result<Option<(http::Uri, String)>, ConfigError> {
        self.optional(name, allowed, |v| {
            v.parse::<http::Uri>()
                .ok()
                .filter(|u| {
                    u.scheme_str().is_some_and(|s| s == "http" || s == "https")
                        && u.host().is_some()
                })
                .map(|u| (u, v.to_string()))
        })
    }

    /// An absolute path.
    fn abs_path(&self, name: &'static str, default: &str) -> Result<PathBuf, ConfigError> {
        Ok(self
            .optional_abs_path(name)?
            .unwrap_or_else(|| PathBuf::from(default)))
    }

    /// An absolute path, if set.
    fn optional_abs_path(&self, name: &'static str) -> Result<Option<PathBuf>, ConfigError> {
        self.optional(name, "expected an absolute path", |v| {
            Path::new(v).is_absolute().then(|| PathBuf::from(v))
        })
    }

    /// An executable named by `name`, or `program` found on PATH (`None` if neither).
    fn executable(
        &self,
        name: &'static str,
        program: &str,
    ) -> Result<Option<PathBuf>, ConfigError> {
        match self.optional(name, "expected the path of an executable file", |v| {
            is_executable(Path::new(v)).then(|| PathBuf::from(v))
        })? {
            Some(p) => Ok(Some(p)),
            None => Ok((self.path_lookup)(program)),
        }
    }
}

const QUOTA_FILE: &str = "UNKEY_METALD_QUOTA_FILE";

/// UNKEY_METALD_QUOTA_*: every customer's quotas, overridden per customer by the quota file
/// (read here, so a bad file stops metald naming the variable and the line).
fn quota_book(env: &Env<'_>, file: Option<&Path>) -> Result<QuotaBook, ConfigError> {
    let defaults = Quotas {
        stored: StoredLimits {
            // Each stored VM holds a jail slot and addresses from pools every customer shares.
            vms: Some(env.count("UNKEY_METALD_QUOTA_VMS")?.unwrap_or(100)),
            disk_bytes: env.mib_quota("UNKEY_METALD_QUOTA_DISK_MIB")?,
            // Each snapshot holds a copy of its VM's disks and memory.
            snapshots: Some(env.count("UNKEY_METALD_QUOTA_SNAPSHOTS")?.unwrap_or(20)),
        },
        // What one customer may run at once; unset is no limit (the host's own capacity
        // still applies).
        run: RunLimits {
            vms: env.count("UNKEY_METALD_QUOTA_RUNNING_VMS")?,
            vcpus: env.count("UNKEY_METALD_QUOTA_RUNNING_VCPUS")?,
            memory_bytes: env.mib_quota("UNKEY_METALD_QUOTA_RUNNING_MEMORY_MIB")?,
        },
    };
    match file {
        None => Ok(QuotaBook::new(defaults)),
        Some(path) => QuotaBook::load(defaults, path).map_err(|e| {
            bad(
                QUOTA_FILE,
                &path.display().to_string(),
                &crate::report::chain(&e),
            )
        }),
    }
}

/// UNKEY_METALD_HOST_*: host capacity. 1 GiB of memory and of disk is left to the host by
/// default; memory is not overcommitted (a guest touching all its memory must not push the
/// host into swap or the OOM killer), vCPUs 4 to 1 (most guests idle most of the time).
fn host_settings(env: &Env<'_>) -> Result<HostSettings, ConfigError> {
    Ok(HostSettings {
        memory_reserve_bytes: env.mib("UNKEY_METALD_HOST_MEMORY_RESERVE_MIB", 1024)?,
        memory_overcommit: env.ratio(
            "UNKEY_METALD_HOST_MEMORY_OVERCOMMIT",
            Ratio::ONE,
            (10, 10_000),
            "expected a ratio such as 1 or 1.5, 0.1-100",
        )?,
        cpu_overcommit: env.ratio(
            "UNKEY_METALD_HOST_CPU_OVERCOMMIT",
            Ratio::from_hundredths(400),
            (10, 100_000),
            "expected a ratio such as 4 or 2.5, 0.1-1000",
        )?,
        disk_reserve_bytes: env.mib("UNKEY_METALD_HOST_DISK_RESERVE_MIB", 1024)?,
    })
}

/// UNKEY_METALD_DATA_DIR: absolute, and short enough for the VM sockets inside it.
fn data_dir(env: &Env<'_>) -> Result<PathBuf, ConfigError> {
    short_dir(
        env,
        "UNKEY_METALD_DATA_DIR",
        "/var/lib/metald",
        MAX_DATA_DIR_LEN,
    )
}

/// An absolute directory (`default` when unset) at most `max` bytes long, so the VM sockets
/// inside it fit a Unix socket path.
fn short_dir(
    env: &Env<'_>,
    name: &'static str,
    default: &str,
    max: usize,
) -> Result<PathBuf, ConfigError> {
    let dir = env.abs_path(name, default)?;
    if dir.as_os_str().len() > max {
        return Err(bad(
            name,
            &dir.display().to_string(),
            &format!("at most {max} bytes long (VM sockets inside it must fit a Unix socket path)"),
        ));
    }
    Ok(dir)
}

/// The billing service, when UNKEY_METALD_BILLING_ENABLED=true.
fn billing_settings(env: &Env<'_>) -> Result<Option<BillingSettings>, ConfigError> {
    if !env.flag("UNKEY_METALD_BILLING_ENABLED")? {
        return Ok(None);
    }
    let (endpoint, _) = env
        .http_url(
            "UNKEY_METALD_BILLING_ENDPOINT",
            "expected an http(s) URL such as http://127.0.0.1:9090",
        )?
        .ok_or_else(|| {
            bad(
                "UNKEY_METALD_BILLING_ENDPOINT",
                "",
                "required when UNKEY_METALD_BILLING_ENABLED=true",
            )
        })?;
    Ok(Some(BillingSettings {
        endpoint,
        batch_interval: env.duration(
            "UNKEY_METALD_BILLING_BATCH_INTERVAL",
            Duration::from_secs(1),
            Duration::from_millis(100)..=Duration::from_secs(300),
            "expected a duration such as 1s, 100ms-300s",
        )?,
        heartbeat_interval: env.duration(
            "UNKEY_METALD_BILLING_HEARTBEAT_INTERVAL",
            Duration::from_secs(10),
            Duration::from_secs(1)..=Duration::from_secs(600),
            "expected a duration such as 10s, 1s-600s",
        )?,
    }))
}

/// The machine's hostname as a host id: lowercase, other characters as `-`, at most 63.
fn hostname_id() -> HostId {
    let name = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .to_lowercase();
    let label: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    label
        .trim_matches('-')
        .parse()
        .unwrap_or_else(|_| HostId::local())
}

/// UNKEY_METALD_HOST_*, UNKEY_METALD_DATABASE_URL and UNKEY_METALD_FLEET_*.
fn fleet_settings(env: &Env<'_>) -> Result<FleetSettings, ConfigError> {
    let host_id = env
        .optional("UNKEY_METALD_HOST_ID", &BadHostId.to_string(), |v| {
            v.parse::<HostId>().ok()
        })?
        .unwrap_or_else(hostname_id);
    let labels = env
        .optional(
            "UNKEY_METALD_HOST_LABELS",
            "expected key=value pairs separated by commas, keys and values of 1-63 characters of a-z, A-Z, 0-9, '.', '_' and '-', at most 32 pairs",
            parse_labels,
        )?
        .unwrap_or_default();
    let lease = env.seconds("UNKEY_METALD_HOST_LEASE_SECONDS", 10, 3..=300)?;
    let database_url = env.optional(
        "UNKEY_METALD_DATABASE_URL",
        "expected a PostgreSQL URL: postgres://user@host/dbname (or postgresql://…)",
        |v| {
            (v.starts_with("postgres://") || v.starts_with("postgresql://")).then(|| Secret::new(v))
        },
    )?;
    let database_ca_file = env.optional_abs_path("UNKEY_METALD_DATABASE_CA_FILE")?;
    if database_ca_file.is_some() && database_url.is_none() {
        return Err(bad(
            "UNKEY_METALD_DATABASE_CA_FILE",
            "",
            "needs UNKEY_METALD_DATABASE_URL",
        ));
    }
    let advertise_url = env
        .http_url(
            "UNKEY_METALD_ADVERTISE_URL",
            "expected the http(s) base URL other hosts reach this one at, such as https://10.0.0.5:8080",
        )?
        .map(|(_, raw)| raw);
    if database_url.is_some() && advertise_url.is_none() {
        return Err(bad(
            "UNKEY_METALD_ADVERTISE_URL",
            "",
            "required with UNKEY_METALD_DATABASE_URL: the URL other hosts reach this one at",
        ));
    }
    let fleet_v6 = env.optional(
        "UNKEY_METALD_FLEET_IPV6_PREFIX",
        "expected an IPv6 prefix of length 16-63 such as fd6d:6574:616c::/48 (each host gets a /64 of it)",
        |v| Ipv6Prefix::parse_len(v, 16..=63).ok(),
    )?;
    let fleet_v4 = env.optional(
        "UNKEY_METALD_FLEET_IPV4_SUBNET",
        "expected an IPv4 subnet such as 10.200.0.0/16 (each host gets a block of it)",
        |v| v.parse::<Ipv4Subnet>().ok(),
    )?;
    let block_len = env.parsed(
        "UNKEY_METALD_FLEET_IPV4_BLOCK_LENGTH",
        24u8,
        "expected a prefix length 16-29, longer than UNKEY_METALD_FLEET_IPV4_SUBNET's",
        |v| v.parse::<u8>().ok().filter(|l| (16..=29).contains(l)),
    )?;
    if let Some(v4) = fleet_v4 {
        if block_len <= v4.len {
            return Err(bad(
                "UNKEY_METALD_FLEET_IPV4_BLOCK_LENGTH",
                &block_len.to_string(),
                &format!("longer than the fleet subnet's /{}", v4.len),
            ));
        }
    }
    if fleet_v6.is_none() && fleet_v4.is_some() {
        return Err(bad(
            "UNKEY_METALD_FLEET_IPV4_SUBNET",
            "",
            "needs UNKEY_METALD_FLEET_IPV6_PREFIX too (IPv6 first)",
        ));
    }
    for (var, set) in [
        ("UNKEY_METALD_IPV6_PREFIX", fleet_v6.is_some()),
        ("UNKEY_METALD_IPV4_SUBNET", fleet_v4.is_some()),
    ] {
        if set && env.get(var).is_some() {
            return Err(bad(
                var,
                "",
                "unset it: with UNKEY_METALD_FLEET_* the host's block comes from the fleet",
            ));
        }
    }
    // A fleet without its own prefixes shares one default: every host gets its /64 of it.
    let prefixes = match (&database_url, fleet_v6) {
        (_, Some(ipv6)) => Some(FleetPrefixes {
            ipv6,
            ipv4: fleet_v4,
            ipv4_block_len: block_len,
        }),
        (Some(_), None) if env.get("UNKEY_METALD_IPV6_PREFIX").is_none() => Some(FleetPrefixes {
            ipv6: Ipv6Prefix {
                addr: std::net::Ipv6Addr::new(0xfd6d, 0x6574, 0x616c, 0, 0, 0, 0, 0),
                len: 48,
            },
            ipv4: None,
            ipv4_block_len: block_len,
        }),
        _ => None,
    };
    let asset_source = env.optional_abs_path("UNKEY_METALD_ASSET_SOURCE")?;
    Ok(FleetSettings {
        host_id,
        advertise_url,
        labels,
        lease,
        database_url,
        database_ca_file,
        prefixes,
        asset_source,
    })
}

/// `k=v,k=v`: at most 32 pairs, keys and values of 1-63 characters of `[A-Za-z0-9._-]`.
fn parse_labels(v: &str) -> Option<BTreeMap<String, String>> {
    let word = |w: &str| {
        (1..=63).contains(&w.len())
            && w.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    let mut labels = BTreeMap::new();
    for pair in v.split(',') {
        let (k, val) = pair.split_once('=')?;
        if !word(k) || !word(val) || labels.insert(k.to_string(), val.to_string()).is_some() {
            return None;
        }
    }
    (labels.len() <= 32).then_some(labels)
}

/// Where traces go, when UNKEY_METALD_OTEL_ENABLED=true.
fn otel_endpoint(env: &Env<'_>) -> Result<Option<String>, ConfigError> {
    if !env.flag("UNKEY_METALD_OTEL_ENABLED")? {
        return Ok(None);
    }
    Ok(Some(
        env.http_url(
            "UNKEY_METALD_OTEL_ENDPOINT",
            "expected an OTLP/HTTP base URL such as http://127.0.0.1:4318",
        )?
        .map_or_else(|| "http://127.0.0.1:4318".to_string(), |(_, raw)| raw),
    ))
}

fn isolation_config(env: &Env<'_>) -> Result<IsolationConfig, ConfigError> {
    let number = |name: &'static str, default: u32, min: u32| {
        env.parsed(
            name,
            default,
            &format!("expected a whole number >= {min}"),
            |v| v.parse::<u32>().ok().filter(|x| *x >= min),
        )
    };
    // Above every regular and system account on common distributions (and below 2^31).
    let uid_base = number("UNKEY_METALD_JAILER_UID", 900_000, 1)?;
    let gid_base = number("UNKEY_METALD_JAILER_GID", 900_000, 1)?;
    let id_count = number("UNKEY_METALD_JAILER_ID_COUNT", 65_536, 1)?;
    // A few spares cover a burst of boots; each is a namespace and a veth pair, kB of kernel
    // memory. 0 turns the pool off (every boot makes its own network).
    let warm_pool = env.pool_size(
        "UNKEY_METALD_WARM_POOL",
        4,
        crate::network::pool::MAX_WARM_POOL,
    )?;
    let warm_jails = env.pool_size(
        "UNKEY_METALD_WARM_JAILS",
        DEFAULT_WARM_JAILS,
        metald_host::jailer::warm::MAX_WARM_JAILS,
    )?;
    for (n, base) in [
        ("UNKEY_METALD_JAILER_UID", uid_base),
        ("UNKEY_METALD_JAILER_GID", gid_base),
    ] {
        if base
            .checked_add(id_count)
            .is_none_or(|end| end > i32::MAX as u32)
        {
            return Err(bad(
                n,
                &base.to_string(),
                "the range base + UNKEY_METALD_JAILER_ID_COUNT must stay below 2^31",
            ));
        }
    }
    let cgroup_parent = env.parsed(
        "UNKEY_METALD_CGROUP_PARENT",
        "metald".to_string(),
        "expected a relative cgroup path like metald or machine/metald",
        |v| {
            let ok = v.split('/').filter(|p| !p.is_empty()).all(|p| {
                p != ".."
                    && p != "."
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            }) && !v.trim_matches('/').is_empty();
            ok.then(|| v.to_string())
        },
    )?;
    // A unique local prefix ("metal" in ASCII); set one per host where VMs of several hosts
    // share a network.
    fn prefix<T: std::str::FromStr<Err = crate::network::ipam::PrefixError>>(
        env: &Env<'_>,
        name: &'static str,
        example: &str,
    ) -> Result<Option<T>, ConfigError> {
        env.get(name)
            .map(|(n, v)| {
                v.parse()
                    .map_err(|e| bad(n, &v, &format!("expected {example} ({e})")))
            })
            .transpose()
    }
    let ipv6_prefix = prefix(
        env,
        "UNKEY_METALD_IPV6_PREFIX",
        "an IPv6 prefix such as fd6d:6574:616c::/64",
    )?
    .unwrap_or(Ipv6Prefix {
        addr: std::net::Ipv6Addr::new(0xfd6d, 0x6574, 0x616c, 0, 0, 0, 0, 0),
        len: 64,
    });
    let ipv4_subnet = prefix(
        env,
        "UNKEY_METALD_IPV4_SUBNET",
        "an IPv4 subnet such as 10.200.0.0/24",
    )?;
    let outbound_interface = env.optional(
        "UNKEY_METALD_OUTBOUND_INTERFACE",
        "expected an interface name (1-15 of A-Z a-z 0-9 . _ -)",
        |v| {
            (v.len() <= 15
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
            .then(|| v.to_string())
        },
    )?;
    let tool = |name: &'static str, var: &'static str, pkg: &str| -> Result<PathBuf, ConfigError> {
        env.executable(var, name)?.ok_or_else(|| {
            bad(var, "", &format!("{name} is not on PATH: install {pkg} or set {var} (or UNKEY_METALD_ISOLATION=none for unisolated development runs)"))
        })
    };
    Ok(IsolationConfig {
        uid_base,
        gid_base,
        id_count,
        chroot_dir: short_dir(
            env,
            "UNKEY_METALD_JAILER_CHROOT_DIR",
            "/srv/jailer",
            MAX_CHROOT_DIR_LEN,
        )?,
        run_dir: env.abs_path("UNKEY_METALD_RUN_DIR", "/run/metald")?,
        cgroup_parent,
        ipv6_prefix,
        ipv4_subnet,
        outbound_interface,
        nft_bin: tool("nft", "UNKEY_METALD_NFT_BIN", "nftables")?,
        tc_bin: tool("tc", "UNKEY_METALD_TC_BIN", "iproute2")?,
        warm_pool,
        warm_jails,
    })
}

/// UNKEY_METALD_TLS_*: all three files are absolute paths; cert and key come together.
fn tls_settings(env: &Env<'_>) -> Result<Option<TlsSettings>, ConfigError> {
    let cert = env.optional_abs_path("UNKEY_METALD_TLS_CERT_FILE")?;
    let key = env.optional_abs_path("UNKEY_METALD_TLS_KEY_FILE")?;
    let client_ca_file = env.optional_abs_path("UNKEY_METALD_TLS_CLIENT_CA_FILE")?;
    match (cert, key, client_ca_file) {
        (Some(cert_file), Some(key_file), client_ca_file) => Ok(Some(TlsSettings {
            cert_file,
            key_file,
            client_ca_file,
        })),
        (None, None, None) => Ok(None),
        (Some(c), None, _) => Err(bad(
            "UNKEY_METALD_TLS_CERT_FILE",
            &c.display().to_string(),
            "needs UNKEY_METALD_TLS_KEY_FILE too",
        )),
        (_, Some(k), _) => Err(bad(
            "UNKEY_METALD_TLS_KEY_FILE",
            &k.display().to_string(),
            "needs UNKEY_METALD_TLS_CERT_FILE too",
        )),
        (None, None, Some(ca)) => Err(bad(
            "UNKEY_METALD_TLS_CLIENT_CA_FILE",
            &ca.display().to_string(),
            "needs UNKEY_METALD_TLS_CERT_FILE and UNKEY_METALD_TLS_KEY_FILE",
        )),
    }
}

/// UNKEY_METALD_AUTH_*: the mode and what it needs.
fn auth_settings(env: &Env<'_>, tls: Option<&TlsSettings>) -> Result<AuthSettings, ConfigError> {
    let mode = env.choice(
        "UNKEY_METALD_AUTH_MODE",
        "dev",
        &[("dev", "dev"), ("jwt", "jwt"), ("mtls", "mtls")],
    )?;
    let trusted_services =
        match env.get("UNKEY_METALD_AUTH_TRUSTED_SERVICES") {
            None => Vec::new(),
            Some((n, v)) => {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        crate::api::auth::spiffe_id(s).map(str::to_string).ok_or_else(|| {
                    bad(n, &v, "expected comma-separated SPIFFE IDs (spiffe://trust-domain/path)")
                })
                    })
                    .collect::<Result<_, _>>()?
            }
        };
    let mtls = tls.is_some_and(|t| t.client_ca_file.is_some());
    if !trusted_services.is_empty() && !mtls {
        return Err(bad(
            "UNKEY_METALD_AUTH_TRUSTED_SERVICES",
            &trusted_services.join(","),
            "services are known by client certificate: set UNKEY_METALD_TLS_CLIENT_CA_FILE (and the server's certificate and key)",
        ));
    }
    let mode =
        match mode {
            "jwt" => AuthMode::Jwt(jwt_settings(env)?),
            "mtls" if trusted_services.is_empty() => return Err(bad(
                "UNKEY_METALD_AUTH_MODE",
                "mtls",
                "needs UNKEY_METALD_AUTH_TRUSTED_SERVICES (and UNKEY_METALD_TLS_CLIENT_CA_FILE)",
            )),
            "mtls" => AuthMode::Mtls,
            _ => AuthMode::Dev,
        };
    Ok(AuthSettings {
        mode,
        trusted_services,
        services_need_token: env.flag("UNKEY_METALD_AUTH_TRUSTED_SERVICES_NEED_TOKEN")?,
    })
}

/// UNKEY_METALD_AUTH_JWKS_* and the claims a token must carry.
fn jwt_settings(env: &Env<'_>) -> Result<JwtSettings, ConfigError> {
    let jwks_file = env.optional_abs_path("UNKEY_METALD_AUTH_JWKS_FILE")?;
    let jwks_url = env
        .http_url(
            "UNKEY_METALD_AUTH_JWKS_URL",
            "expected an http(s) URL such as https://issuer.example/.well-known/jwks.json",
        )?
        .map(|(u, _)| u);
    if jwks_file.is_none() && jwks_url.is_none() {
        return Err(bad(
            "UNKEY_METALD_AUTH_MODE",
            "jwt",
            "needs UNKEY_METALD_AUTH_JWKS_FILE and/or UNKEY_METALD_AUTH_JWKS_URL",
        ));
    }
    let required = |name: &'static str| {
        env.get(name)
            .map(|(_, v)| v)
            .ok_or_else(|| bad(name, "", "required with UNKEY_METALD_AUTH_MODE=jwt"))
    };
    Ok(JwtSettings {
        jwks_file,
        jwks_url,
        issuer: required("UNKEY_METALD_AUTH_ISSUER")?,
        audience: required("UNKEY_METALD_AUTH_AUDIENCE")?,
        customer_claim: env.parsed(
            "UNKEY_METALD_AUTH_CUSTOMER_CLAIM",
            "customer_id".to_string(),
            "expected a claim name (1-64 characters)",
            |v| (v.len() <= 64).then(|| v.to_string()),
        )?,
        leeway: env.seconds("UNKEY_METALD_AUTH_LEEWAY_SECONDS", 30, 0..=300)?,
    })
}

/// UNKEY_METALD_RATE_LIMIT_* and UNKEY_METALD_MAX_DEADLINE.
fn request_limits(env: &Env<'_>) -> Result<RequestLimits, ConfigError> {
    let per_second = |name, default| {
        env.parsed(name, default, "expected a whole number, 1-1000000", |v| {
            v.parse::<u32>()
                .ok()
                .filter(|n| (1..=1_000_000).contains(n))
        })
    };
    Ok(RequestLimits {
        rate_per_second: per_second("UNKEY_METALD_RATE_LIMIT_PER_SECOND", 100)?,
        burst: per_second("UNKEY_METALD_RATE_LIMIT_BURST", 200)?,
        max_deadline: env.duration(
            "UNKEY_METALD_MAX_DEADLINE",
            Duration::from_secs(300),
            Duration::from_secs(1)..=Duration::from_secs(3600),
            "expected a duration such as 300s, 1s-3600s",
        )?,
    })
}

/// Finds an executable on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_env_file_example_lists_every_variable_metald_reads() {
        let example = include_str!("../../../deploy/metald.env.example");
        let source = include_str!("config.rs");
        let vars: std::collections::BTreeSet<&str> = source
            .split('"')
            .filter(|w| w.starts_with("UNKEY_METALD_") && w.len() > 13 && !w.contains(' '))
            .collect();
        assert!(vars.len() > 25, "{vars:?}");
        let missing: Vec<&&str> = vars
            .iter()
            .filter(|v| !example.contains(&format!("#{v}=")))
            .collect();
        assert!(
            missing.is_empty(),
            "not in deploy/metald.env.example: {missing:?}"
        );
    }

    fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_env(
            |k| map.get(k).cloned(),
            |name| matches!(name, "nft" | "tc").then(|| PathBuf::from(format!("/usr/sbin/{name}"))),
        )
    }

    #[test]
    fn a_fleet_needs_an_advertised_url_and_gives_each_host_a_block() {
        // Alone: SQLite, the host's own prefix, a host id from the hostname.
        let c = parse(&[]).unwrap();
        assert_eq!(c.fleet.database_url, None);
        assert_eq!(c.fleet.prefixes, None);
        assert_eq!(c.fleet.lease, Duration::from_secs(10));
        assert!(c.fleet.host_id.as_str().parse::<HostId>().is_ok());
        let url = ("UNKEY_METALD_DATABASE_URL", "postgres://metald@db/metald");
        let err = parse(&[url]).unwrap_err();
        assert_eq!(err.var, "UNKEY_METALD_ADVERTISE_URL");
        let advertise = ("UNKEY_METALD_ADVERTISE_URL", "https://10.0.0.5:8080");
        let c = parse(&[
            url,
            advertise,
            ("UNKEY_METALD_HOST_ID", "host-a"),
            ("UNKEY_METALD_HOST_LABELS", "zone=a,disk=nvme"),
        ])
        .unwrap();
        assert_eq!(c.fleet.host_id.as_str(), "host-a");
        assert_eq!(c.fleet.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(c.fleet.database_url.unwrap().expose(), url.1);
        // The shared default: a /48, a /64 for each host.
        let p = c.fleet.prefixes.unwrap();
        assert_eq!(p.ipv6.to_string(), "fd6d:6574:616c::/48");
        assert_eq!(
            p.host_blocks(2).unwrap().0.to_string(),
            "fd6d:6574:616c:2::/64"
        );
        let c = parse(&[
            url,
            advertise,
            ("UNKEY_METALD_FLEET_IPV6_PREFIX", "fd00:aa::/56"),
            ("UNKEY_METALD_FLEET_IPV4_SUBNET", "10.200.0.0/16"),
            ("UNKEY_METALD_FLEET_IPV4_BLOCK_LENGTH", "26"),
        ])
        .unwrap();
        let p = c.fleet.prefixes.unwrap();
        assert_eq!(p.capacity(), 256);
        assert_eq!(
            p.host_blocks(1).unwrap().1.unwrap().to_string(),
            "10.200.0.64/26"
        );
        for (vars, var) in [
            (
                vec![("UNKEY_METALD_DATABASE_URL", "mysql://x")],
                "UNKEY_METALD_DATABASE_URL",
            ),
            (
                vec![("UNKEY_METALD_HOST_ID", "Host_A")],
                "UNKEY_METALD_HOST_ID",
            ),
            (
                vec![("UNKEY_METALD_HOST_LABELS", "a")],
                "UNKEY_METALD_HOST_LABELS",
            ),
            (
                vec![("UNKEY_METALD_HOST_LABELS", "a=1,a=2")],
                "UNKEY_METALD_HOST_LABELS",
            ),
            (
                vec![("UNKEY_METALD_FLEET_IPV6_PREFIX", "fd00::/64")],
                "UNKEY_METALD_FLEET_IPV6_PREFIX",
            ),
            (
                vec![
                    ("UNKEY_METALD_FLEET_IPV6_PREFIX", "fd00::/48"),
                    ("UNKEY_METALD_IPV6_PREFIX", "fd01::/64"),
                ],
                "UNKEY_METALD_IPV6_PREFIX",
            ),
            (
                vec![
                    ("UNKEY_METALD_FLEET_IPV6_PREFIX", "fd00::/48"),
                    ("UNKEY_METALD_FLEET_IPV4_SUBNET", "10.0.0.0/24"),
                ],
                "UNKEY_METALD_FLEET_IPV4_BLOCK_LENGTH",
            ),
            (
                vec![("UNKEY_METALD_HOST_LEASE_SECONDS", "1")],
                "UNKEY_METALD_HOST_LEASE_SECONDS",
            ),
        ] {
            assert_eq!(parse(&vars).unwrap_err().var, var, "{vars:?}");
        }
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/metald"));
        assert_eq!(c.backend, BackendChoice::Auto);
        assert_eq!(c.qemu_accel, AccelChoice::Auto);
        assert_eq!((c.warm_disks, c.warm_disk_max_bytes), (2, 256 << 20));
        let Isolation::Jail(iso) = c.isolation else {
            panic!("isolation is on by default")
        };
        assert_eq!(iso.uid_base, 900_000);
        assert_eq!(iso.chroot_dir, PathBuf::from("/srv/jailer"));
        assert_eq!(iso.ipv6_prefix.to_string(), "fd6d:6574:616c::/64");
        assert_eq!(iso.ipv4_subnet, None);
        assert_eq!(
            iso.outbound_interface, None,
            "no outbound access unless asked"
        );
        let acme: crate::domain::CustomerId = "acme".parse().unwrap();
        let q = c.quotas.of(&acme);
        assert_eq!((q.stored.vms, q.stored.disk_bytes), (Some(100), None));
        assert_eq!(q.run, RunLimits::default());
        assert_eq!(
            c.host,
            HostSettings {
                memory_reserve_bytes: 1024 * MIB,
                memory_overcommit: Ratio::ONE,
                cpu_overcommit: Ratio::from_hundredths(400),
                disk_reserve_bytes: 1024 * MIB,
            }
        );
    }

    #[test]
    fn the_quota_file_overrides_the_defaults_and_a_bad_one_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quotas.toml");
        std::fs::write(&path, "[customers.acme]\nrunning_vcpus = 64\n").unwrap();
        let file = path.to_str().unwrap();
        let c = parse(&[
            ("UNKEY_METALD_QUOTA_FILE", file),
            ("UNKEY_METALD_QUOTA_DISK_MIB", "2048"),
            ("UNKEY_METALD_HOST_CPU_OVERCOMMIT", "2.5"),
        ])
        .unwrap();
        let q = c.quotas.of(&"acme".parse().unwrap());
        assert_eq!(q.run.vcpus, Some(64));
        assert_eq!(q.stored.disk_bytes, Some(2048 * MIB), "the default stays");
        assert_eq!(c.quota_file.as_deref(), Some(path.as_path()));
        assert_eq!(c.host.cpu_overcommit.apply(10), 25);
        std::fs::write(&path, "[customers.acme]\nrunning_vcpus = 64\nvmz = 1\n").unwrap();
        let err = parse(&[("UNKEY_METALD_QUOTA_FILE", file)]).unwrap_err();
        let line = err.to_string();
        assert!(
            line.starts_with(&format!("{QUOTA_FILE}="))
                && line.contains("line 3: unknown field `vmz`"),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");
    }

    #[test]
    fn bad_values_name_the_variable_and_what_is_allowed() {
        let cases = [
            (
                "UNKEY_METALD_PORT",
                "http",
                "expected a port number 1-65535",
            ),
            ("UNKEY_METALD_PORT", "0", "expected a port number"),
            (
                "UNKEY_METALD_OTEL_PROMETHEUS_PORT",
                "8080",
                "other than the API port",
            ),
            (
                "UNKEY_METALD_ADDRESS",
                "localhost:1",
                "expected an IPv4 or IPv6 address",
            ),
            (
                "UNKEY_METALD_BACKEND",
                "kvm",
                "expected firecracker, qemu or auto",
            ),
            (
                "UNKEY_METALD_QEMU_ACCEL",
                "hvf",
                "expected kvm, tcg or auto",
            ),
            (
                "UNKEY_METALD_DATA_DIR",
                "rel/dir",
                "expected an absolute path",
            ),
            (
                "UNKEY_METALD_FIRECRACKER_BIN",
                "/nonexistent/fc",
                "expected the path of an executable",
            ),
            ("UNKEY_METALD_BOOT_TIMEOUT_SECONDS", "0", "1-3600"),
            (
                "UNKEY_METALD_WARM_JAILS",
                "65",
                "expected a whole number from 0 to 64",
            ),
            (
                "UNKEY_METALD_WARM_DISKS",
                "17",
                "expected a whole number from 0 to 16",
            ),
            ("UNKEY_METALD_WARM_DISK_MAX_MIB", "0", "whole MiB, 1-65536"),
            (
                "UNKEY_METALD_AUTH_MODE",
                "oauth",
                "expected dev, jwt or mtls",
            ),
            (
                "UNKEY_METALD_AUTH_MODE",
                "jwt",
                "needs UNKEY_METALD_AUTH_JWKS_FILE",
            ),
            (
                "UNKEY_METALD_AUTH_MODE",
                "mtls",
                "needs UNKEY_METALD_AUTH_TRUSTED_SERVICES",
            ),
            (
                "UNKEY_METALD_TLS_CERT_FILE",
                "/c.pem",
                "needs UNKEY_METALD_TLS_KEY_FILE",
            ),
            (
                "UNKEY_METALD_TLS_CLIENT_CA_FILE",
                "/ca.pem",
                "needs UNKEY_METALD_TLS_CERT_FILE",
            ),
            ("UNKEY_METALD_TLS_KEY_FILE", "k.pem", "absolute path"),
            (
                "UNKEY_METALD_AUTH_TRUSTED_SERVICES",
                "spiffe://x/y",
                "UNKEY_METALD_TLS_CLIENT_CA_FILE",
            ),
            ("UNKEY_METALD_RATE_LIMIT_PER_SECOND", "0", "1-1000000"),
            ("UNKEY_METALD_MAX_DEADLINE", "2h", "1s-3600s"),
            ("UNKEY_METALD_METRICS_TOKEN", "short", "32-256 printable"),
            ("UNKEY_METALD_CONSOLE_MAX_BYTES", "1000", "64 KiB-1 GiB"),
            ("UNKEY_METALD_ADDRESS", "0.0.0.0", "loopback addresses only"),
            ("UNKEY_METALD_QUOTA_VMS", "0", "1-1000000"),
            ("UNKEY_METALD_QUOTA_RUNNING_VCPUS", "many", "1-1000000"),
            ("UNKEY_METALD_QUOTA_RUNNING_MEMORY_MIB", "-1", "whole MiB"),
            (
                "UNKEY_METALD_QUOTA_DISK_MIB",
                "0",
                "whole MiB, 1-1073741824",
            ),
            ("UNKEY_METALD_QUOTA_FILE", "quotas.toml", "absolute path"),
            (
                "UNKEY_METALD_QUOTA_FILE",
                "/nonexistent/q.toml",
                "cannot be read",
            ),
            (
                "UNKEY_METALD_HOST_MEMORY_RESERVE_MIB",
                "-1",
                "whole MiB, 0-1048576",
            ),
            (
                "UNKEY_METALD_HOST_MEMORY_RESERVE_MIB",
                "2000000",
                "0-1048576",
            ),
            ("UNKEY_METALD_HOST_MEMORY_OVERCOMMIT", "0", "0.1-100"),
            ("UNKEY_METALD_HOST_MEMORY_OVERCOMMIT", "lots", "a ratio"),
            ("UNKEY_METALD_HOST_CPU_OVERCOMMIT", "1001", "0.1-1000"),
            ("UNKEY_METALD_HOST_DISK_RESERVE_MIB", "1.5", "whole MiB"),
            ("UNKEY_METALD_ADDRESS", "::", "loopback addresses only"),
            (
                "UNKEY_METALD_ADDRESS",
                "192.0.2.1",
                "loopback addresses only",
            ),
            ("UNKEY_METALD_ISOLATION", "off", "expected jail or none"),
            ("UNKEY_METALD_JAILER_UID", "-1", "whole number"),
            ("UNKEY_METALD_JAILER_UID", "2147480000", "below 2^31"),
            ("UNKEY_METALD_JAILER_CHROOT_DIR", "srv", "absolute path"),
            ("UNKEY_METALD_CGROUP_PARENT", "../x", "relative cgroup path"),
            ("UNKEY_METALD_IPV6_PREFIX", "fd00::1/64", "host bits"),
            (
                "UNKEY_METALD_IPV6_PREFIX",
                "10.0.0.0/8",
                "not an IPv6 address",
            ),
            ("UNKEY_METALD_IPV4_SUBNET", "10.0.0.0/31", "8-29"),
            (
                "UNKEY_METALD_OUTBOUND_INTERFACE",
                "eth0; rm",
                "interface name",
            ),
            ("UNKEY_METALD_NFT_BIN", "/nonexistent/nft", "executable"),
            ("UNKEY_METALD_METRICS_INTERVAL", "5ms", "10ms-60s"),
            ("UNKEY_METALD_METRICS_INTERVAL", "fast", "duration"),
            ("UNKEY_METALD_VMM_METRICS_INTERVAL", "500ms", "1s-600s"),
            ("UNKEY_METALD_METRICS_RETENTION_SECONDS", "0", "1-86400"),
            ("UNKEY_METALD_BILLING_ENABLED", "yes", "true or false"),
            ("UNKEY_METALD_OTEL_ENABLED", "1", "true or false"),
        ];
        for (var, value, allowed) in cases {
            let err = parse(&[(var, value)]).unwrap_err();
            let line = err.to_string();
            assert!(line.starts_with(&format!("{var}=")), "{line}");
            assert!(line.contains(allowed), "{line}");
            assert!(!line.contains('\n'));
        }
        let no_endpoint = parse(&[("UNKEY_METALD_BILLING_ENABLED", "true")]).unwrap_err();
        assert_eq!(no_endpoint.var, "UNKEY_METALD_BILLING_ENDPOINT");
        assert!(no_endpoint
            .allowed
            .contains("required when UNKEY_METALD_BILLING_ENABLED=true"));
        let bad_endpoint = parse(&[
            ("UNKEY_METALD_BILLING_ENABLED", "true"),
            ("UNKEY_METALD_BILLING_ENDPOINT", "billing:9090"),
        ])
        .unwrap_err();
        assert!(
            bad_endpoint.allowed.contains("http(s) URL"),
            "{bad_endpoint}"
        );
        let long = format!("/{}", "d".repeat(MAX_DATA_DIR_LEN));
        assert!(parse(&[("UNKEY_METALD_DATA_DIR", &long)])
            .unwrap_err()
            .allowed
            .contains("Unix socket"));
        let long = format!("/{}", "j".repeat(MAX_CHROOT_DIR_LEN));
        assert!(parse(&[("UNKEY_METALD_JAILER_CHROOT_DIR", &long)])
            .unwrap_err()
            .allowed
            .contains("Unix socket"));
    }
}
