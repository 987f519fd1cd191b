//! Configuration from `UNKEY_METALD_*` environment variables, validated once at start. A bad
//! value stops metald with one line naming the variable and what is allowed.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use metald_host::probe::{hardware_kvm, is_executable};

use crate::network::ipam::{Ipv4Subnet, Ipv6Prefix};

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

/// Longest data directory path: VM control sockets live at
/// `<data dir>/vms/vm-<uuid>/control.sock` and a Unix socket path has at most 107 bytes.
pub const MAX_DATA_DIR_LEN: usize = crate::backend::MAX_SOCKET_PATH
    - "/vms/vm-00000000-0000-0000-0000-000000000000/control.sock".len();

impl Config {
    /// Reads the configuration through `var` (the process environment in production).
    pub fn from_env(
        var: impl Fn(&str) -> Option<String>,
        path_lookup: impl Fn(&str) -> Option<PathBuf>,
    ) -> Result<Self, ConfigError> {
        let get = |name: &'static str| var(name).filter(|v| !v.is_empty()).map(|v| (name, v));
        let bad = |var: &'static str, value: &str, allowed: &str| ConfigError {
            var,
            value: value.to_string(),
            allowed: allowed.to_string(),
        };
        let address = match get("UNKEY_METALD_ADDRESS") {
            None => IpAddr::from([127, 0, 0, 1]),
            Some((n, v)) => v.parse().map_err(|_| {
                bad(
                    n,
                    &v,
                    "expected an IPv4 or IPv6 address such as 127.0.0.1 or ::",
                )
            })?,
        };
        let port = match get("UNKEY_METALD_PORT") {
            None => 8080,
            Some((n, v)) => v
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(n, &v, "expected a port number 1-65535"))?,
        };
        let metrics_port = match get("UNKEY_METALD_OTEL_PROMETHEUS_PORT") {
            None => None,
            Some((n, v)) => Some(
                v.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0 && *p != port)
                    .ok_or_else(|| {
                        bad(
                            n,
                            &v,
                            "expected a port number 1-65535 other than the API port",
                        )
                    })?,
            ),
        };
        let data_dir = match get("UNKEY_METALD_DATA_DIR") {
            None => PathBuf::from("/var/lib/metald"),
            Some((n, v)) => {
                let p = PathBuf::from(&v);
                if !p.is_absolute() {
                    return Err(bad(n, &v, "expected an absolute path"));
                }
                if v.len() > MAX_DATA_DIR_LEN {
                    return Err(bad(
                        n,
                        &v,
                        &format!("at most {MAX_DATA_DIR_LEN} bytes long (VM sockets inside it must fit a Unix socket path)"),
                    ));
                }
                p
            }
        };
        let backend = match get("UNKEY_METALD_BACKEND") {
            None => BackendChoice::Auto,
            Some((n, v)) => match v.as_str() {
                "firecracker" => BackendChoice::Firecracker,
                "qemu" => BackendChoice::Qemu,
                "auto" => BackendChoice::Auto,
                _ => return Err(bad(n, &v, "expected firecracker, qemu or auto")),
            },
        };
        let binary = |name: &'static str, default: &str| -> Result<Option<PathBuf>, ConfigError> {
            match get(name) {
                None => Ok(path_lookup(default)),
                Some((n, v)) => {
                    let p = PathBuf::from(&v);
                    if is_executable(&p) {
                        Ok(Some(p))
                    } else {
                        Err(bad(n, &v, "expected the path of an executable file"))
                    }
                }
            }
        };
        let firecracker_bin = binary("UNKEY_METALD_FIRECRACKER_BIN", "firecracker")?;
        let qemu_bin = binary("UNKEY_METALD_QEMU_BIN", "qemu-system-x86_64")?;
        let qemu_accel = match get("UNKEY_METALD_QEMU_ACCEL") {
            None => AccelChoice::Auto,
            Some((n, v)) => match v.as_str() {
                "kvm" => AccelChoice::Kvm,
                "tcg" => AccelChoice::Tcg,
                "auto" => AccelChoice::Auto,
                _ => return Err(bad(n, &v, "expected kvm, tcg or auto")),
            },
        };
        let boot_timeout = match get("UNKEY_METALD_BOOT_TIMEOUT_SECONDS") {
            None => Duration::from_secs(120),
            Some((n, v)) => v
                .parse::<u64>()
                .ok()
                .filter(|s| (1..=3600).contains(s))
                .map(Duration::from_secs)
                .ok_or_else(|| bad(n, &v, "expected whole seconds, 1-3600"))?,
        };
        let log_format = match get("UNKEY_METALD_LOG_FORMAT") {
            None => LogFormat::Json,
            Some((n, v)) => match v.as_str() {
                "json" => LogFormat::Json,
                "text" => LogFormat::Text,
                _ => return Err(bad(n, &v, "expected json or text")),
            },
        };
        if let Some((n, v)) = get("UNKEY_METALD_AUTH_MODE") {
            if v != "dev" {
                return Err(bad(n, &v, "expected dev (the only mode so far)"));
            }
        }
        let isolation = match get("UNKEY_METALD_ISOLATION") {
            None => Isolation::Jail(isolation_config(&get, &path_lookup)?),
            Some((n, v)) => match v.as_str() {
                "jail" => Isolation::Jail(isolation_config(&get, &path_lookup)?),
                "none" => Isolation::None,
                _ => return Err(bad(n, &v, "expected jail or none")),
            },
        };
        // A duration variable: `default` when unset, otherwise a value within `range`.
        let duration = |name: &'static str,
                        default: Duration,
                        range: std::ops::RangeInclusive<Duration>,
                        allowed: &str| match get(name) {
            None => Ok(default),
            Some((n, v)) => parse_duration(&v)
                .filter(|d| range.contains(d))
                .ok_or_else(|| bad(n, &v, allowed)),
        };
        let metrics_interval = duration(
            "UNKEY_METALD_METRICS_INTERVAL",
            Duration::from_millis(100),
            Duration::from_millis(10)..=Duration::from_secs(60),
            "expected a duration such as 100ms or 1s, 10ms-60s",
        )?;
        let vmm_metrics_interval = duration(
            "UNKEY_METALD_VMM_METRICS_INTERVAL",
            Duration::from_secs(10),
            Duration::from_secs(1)..=Duration::from_secs(600),
            "expected a duration such as 10s, 1s-600s",
        )?;
        // 96 bytes per sample: 600 samples (60 s at 100 ms) are 56 KiB per VM. The billing
        // service holds the history; this is the live view.
        let metrics_retention = match get("UNKEY_METALD_METRICS_RETENTION_SECONDS") {
            None => Duration::from_secs(60),
            Some((n, v)) => v
                .parse::<u64>()
                .ok()
                .filter(|s| (1..=86_400).contains(s))
                .map(Duration::from_secs)
                .ok_or_else(|| bad(n, &v, "expected whole seconds, 1-86400"))?,
        };
        let billing = match get("UNKEY_METALD_BILLING_ENABLED") {
            None => None,
            Some((_, v)) if v == "false" => None,
            Some((_, v)) if v == "true" => {
                let endpoint = match get("UNKEY_METALD_BILLING_ENDPOINT") {
                    Some((n, e)) => e
                        .parse::<http::Uri>()
                        .ok()
                        .filter(|u| {
                            u.scheme_str().is_some_and(|s| s == "http" || s == "https")
                                && u.host().is_some()
                        })
                        .ok_or_else(|| {
                            bad(
                                n,
                                &e,
                                "expected an http(s) URL such as http://127.0.0.1:9090",
                            )
                        })?,
                    None => {
                        return Err(bad(
                            "UNKEY_METALD_BILLING_ENDPOINT",
                            "",
                            "required when UNKEY_METALD_BILLING_ENABLED=true",
                        ))
                    }
                };
                let batch_interval = duration(
                    "UNKEY_METALD_BILLING_BATCH_INTERVAL",
                    Duration::from_secs(1),
                    Duration::from_millis(100)..=Duration::from_secs(300),
                    "expected a duration such as 1s, 100ms-300s",
                )?;
                let heartbeat_interval = duration(
                    "UNKEY_METALD_BILLING_HEARTBEAT_INTERVAL",
                    Duration::from_secs(10),
                    Duration::from_secs(1)..=Duration::from_secs(600),
                    "expected a duration such as 10s, 1s-600s",
                )?;
                Some(BillingSettings {
                    endpoint,
                    batch_interval,
                    heartbeat_interval,
                })
            }
            Some((n, v)) => return Err(bad(n, &v, "expected true or false")),
        };
        let otel_endpoint = match get("UNKEY_METALD_OTEL_ENABLED") {
            None => None,
            Some((_, v)) if v == "false" => None,
            Some((_, v)) if v == "true" => Some(match get("UNKEY_METALD_OTEL_ENDPOINT") {
                None => "http://127.0.0.1:4318".to_string(),
                Some((n, e)) => {
                    let ok = e.parse::<http::Uri>().ok().is_some_and(|u| {
                        u.scheme_str().is_some_and(|s| s == "http" || s == "https")
                            && u.host().is_some()
                    });
                    if !ok {
                        return Err(bad(
                            n,
                            &e,
                            "expected an OTLP/HTTP base URL such as http://127.0.0.1:4318",
                        ));
                    }
                    e
                }
            }),
            Some((n, v)) => return Err(bad(n, &v, "expected true or false")),
        };
        Ok(Self {
            address,
            port,
            metrics_port,
            data_dir,
            backend,
            firecracker_bin,
            qemu_bin,
            qemu_accel,
            boot_timeout,
            log_format,
            isolation,
            metrics_interval,
            vmm_metrics_interval,
            metrics_retention,
            billing,
            otel_endpoint,
        })
    }
}

/// Reads the jailer and network variables.
fn isolation_config(
    get: &impl Fn(&'static str) -> Option<(&'static str, String)>,
    path_lookup: &impl Fn(&str) -> Option<PathBuf>,
) -> Result<IsolationConfig, ConfigError> {
    let bad = |var: &'static str, value: &str, allowed: &str| ConfigError {
        var,
        value: value.to_string(),
        allowed: allowed.to_string(),
    };
    let number = |name: &'static str, default: u32, min: u32| -> Result<u32, ConfigError> {
        match get(name) {
            None => Ok(default),
            Some((n, v)) => v
                .parse::<u32>()
                .ok()
                .filter(|x| *x >= min)
                .ok_or_else(|| bad(n, &v, &format!("expected a whole number >= {min}"))),
        }
    };
    // Above every regular and system account on common distributions (and below 2^31).
    let uid_base = number("UNKEY_METALD_JAILER_UID", 900_000, 1)?;
    let gid_base = number("UNKEY_METALD_JAILER_GID", 900_000, 1)?;
    let id_count = number("UNKEY_METALD_JAILER_ID_COUNT", 65_536, 1)?;
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
    let abs_dir = |name: &'static str, default: &str| -> Result<PathBuf, ConfigError> {
        match get(name) {
            None => Ok(PathBuf::from(default)),
            Some((_, v)) if Path::new(&v).is_absolute() => Ok(PathBuf::from(v)),
            Some((n, v)) => Err(bad(n, &v, "expected an absolute path")),
        }
    };
    let chroot_dir = abs_dir("UNKEY_METALD_JAILER_CHROOT_DIR", "/srv/jailer")?;
    let run_dir = abs_dir("UNKEY_METALD_RUN_DIR", "/run/metald")?;
    let cgroup_parent = match get("UNKEY_METALD_CGROUP_PARENT") {
        None => "metald".to_string(),
        Some((n, v)) => {
            let ok = v.split('/').filter(|p| !p.is_empty()).all(|p| {
                p != ".."
                    && p != "."
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            }) && !v.trim_matches('/').is_empty();
            if !ok {
                return Err(bad(
                    n,
                    &v,
                    "expected a relative cgroup path like metald or machine/metald",
                ));
            }
            v
        }
    };
    let ipv6_prefix = match get("UNKEY_METALD_IPV6_PREFIX") {
        // A unique local prefix ("metal" in ASCII); set one per host where VMs of several hosts
        // share a network.
        None => Ipv6Prefix {
            addr: std::net::Ipv6Addr::new(0xfd6d, 0x6574, 0x616c, 0, 0, 0, 0, 0),
            len: 64,
        },
        Some((n, v)) => v.parse().map_err(|e: crate::network::ipam::PrefixError| {
            bad(
                n,
                &v,
                &format!("expected an IPv6 prefix such as fd6d:6574:616c::/64 ({e})"),
            )
        })?,
    };
    let ipv4_subnet = match get("UNKEY_METALD_IPV4_SUBNET") {
        None => None,
        Some((n, v)) => Some(v.parse().map_err(|e: crate::network::ipam::PrefixError| {
            bad(
                n,
                &v,
                &format!("expected an IPv4 subnet such as 10.200.0.0/24 ({e})"),
            )
        })?),
    };
    let outbound_interface = match get("UNKEY_METALD_OUTBOUND_INTERFACE") {
        None => None,
        Some((n, v)) => {
            if v.is_empty()
                || v.len() > 15
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(bad(
                    n,
                    &v,
                    "expected an interface name (1-15 of A-Z a-z 0-9 . _ -)",
                ));
            }
            Some(v)
        }
    };
    let tool = |name: &'static str, var: &'static str, pkg: &str| -> Result<PathBuf, ConfigError> {
        match get(var) {
            Some((_, v)) if is_executable(Path::new(&v)) => Ok(PathBuf::from(v)),
            Some((n, v)) => Err(bad(n, &v, "expected the path of an executable file")),
            None => path_lookup(name).ok_or_else(|| {
                bad(var, "", &format!("{name} is not on PATH: install {pkg} or set {var} (or UNKEY_METALD_ISOLATION=none for unisolated development runs)"))
            }),
        }
    };
    let nft_bin = tool("nft", "UNKEY_METALD_NFT_BIN", "nftables")?;
    let tc_bin = tool("tc", "UNKEY_METALD_TC_BIN", "iproute2")?;
    Ok(IsolationConfig {
        uid_base,
        gid_base,
        id_count,
        chroot_dir,
        run_dir,
        cgroup_parent,
        ipv6_prefix,
        ipv4_subnet,
        outbound_interface,
        nft_bin,
        tc_bin,
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
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/metald"));
        assert_eq!(c.backend, BackendChoice::Auto);
        assert_eq!(c.qemu_accel, AccelChoice::Auto);
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
            ("UNKEY_METALD_AUTH_MODE", "jwt", "expected dev"),
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
    }
}
