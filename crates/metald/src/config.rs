//! Configuration from `UNKEY_METALD_*` environment variables, validated once at start. A bad
//! value stops metald with one line naming the variable and what is allowed.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// metald's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Listen address.
    pub address: IpAddr,
    /// Listen port.
    pub port: u16,
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
        Ok(Self {
            address,
            port,
            data_dir,
            backend,
            firecracker_bin,
            qemu_bin,
            qemu_accel,
            boot_timeout,
            log_format,
        })
    }
}

/// True for a regular file with an execute bit.
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds an executable on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

/// Whether the host has hardware KVM (not the software kvm-pvm many nested hosts have, which
/// stock guest kernels crash under), judged from `<sys>/module` and `<dev>/kvm`.
pub fn hardware_kvm(sys: &Path, dev: &Path) -> (bool, String) {
    if !dev.join("kvm").exists() {
        return (
            false,
            format!("{} does not exist", dev.join("kvm").display()),
        );
    }
    for module in ["kvm_intel", "kvm_amd"] {
        if sys.join("module").join(module).exists() {
            return (true, format!("{module} is loaded"));
        }
    }
    if sys.join("module/kvm_pvm").exists() {
        return (
            false,
            "/dev/kvm is kvm_pvm (software nested virtualization), not hardware KVM".into(),
        );
    }
    (false, "neither kvm_intel nor kvm_amd is loaded".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_env(|k| map.get(k).cloned(), |_| None)
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/metald"));
        assert_eq!(c.backend, BackendChoice::Auto);
        assert_eq!(c.qemu_accel, AccelChoice::Auto);
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
        ];
        for (var, value, allowed) in cases {
            let err = parse(&[(var, value)]).unwrap_err();
            let line = err.to_string();
            assert!(line.starts_with(&format!("{var}=")), "{line}");
            assert!(line.contains(allowed), "{line}");
            assert!(!line.contains('\n'));
        }
        let long = format!("/{}", "d".repeat(MAX_DATA_DIR_LEN));
        assert!(parse(&[("UNKEY_METALD_DATA_DIR", &long)])
            .unwrap_err()
            .allowed
            .contains("Unix socket"));
    }

    #[test]
    fn hardware_kvm_is_told_apart_from_kvm_pvm() {
        let root = tempfile::tempdir().unwrap();
        let sys = root.path().join("sys");
        let dev = root.path().join("dev");
        std::fs::create_dir_all(sys.join("module/kvm_pvm")).unwrap();
        std::fs::create_dir_all(&dev).unwrap();
        assert!(!hardware_kvm(&sys, &dev).0);
        std::fs::write(dev.join("kvm"), "").unwrap();
        let (hw, why) = hardware_kvm(&sys, &dev);
        assert!(!hw);
        assert!(why.contains("kvm_pvm"), "{why}");
        std::fs::create_dir_all(sys.join("module/kvm_intel")).unwrap();
        assert!(hardware_kvm(&sys, &dev).0);
    }
}
