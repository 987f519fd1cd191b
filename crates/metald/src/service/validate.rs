//! Request validation: every field of a VM's configuration checked against metald's and the
//! backend's limits, naming the field, before anything is made.

use super::*;

impl VmService {
    /// Checks every field, naming the first bad one; also resolves image ids, among the assets
    /// `customer` may use (public ones and their own).
    pub(super) fn validate(&self, customer: &CustomerId, c: &VmConfig) -> Result<(), ServiceError> {
        let who = customer.as_str();
        let max = self.backend.max_vcpus();
        if c.vcpu_count == 0 || c.vcpu_count > max {
            return Err(invalid(
                "config.cpu.vcpu_count",
                format!(
                    "must be between 1 and {max} ({} limit), got {}",
                    self.backend_name(),
                    c.vcpu_count
                ),
            ));
        }
        if !c.memory_bytes.is_multiple_of(MIB) {
            return Err(invalid(
                "config.memory.size_bytes",
                format!(
                    "must be a whole number of MiB (multiple of 1048576), got {}",
                    c.memory_bytes
                ),
            ));
        }
        if c.memory_bytes < MIN_MEMORY_MIB * MIB {
            return Err(invalid(
                "config.memory.size_bytes",
                format!(
                    "must be at least {} ({MIN_MEMORY_MIB} MiB), got {}",
                    MIN_MEMORY_MIB * MIB,
                    c.memory_bytes
                ),
            ));
        }
        // A VM larger than the host admits could never boot here.
        let host = self.host_limits()?;
        if let Some(cpus) = host.vcpus.filter(|n| u64::from(c.vcpu_count) > *n) {
            return Err(invalid(
                "config.cpu.vcpu_count",
                format!(
                    "at most {cpus} on this host (its CPUs times the overcommit ratio), got {}",
                    c.vcpu_count
                ),
            ));
        }
        let headroom = self.backend.kind().memory_headroom_mib() * MIB;
        let most = host
            .memory_bytes
            .unwrap_or(u64::MAX)
            .saturating_sub(headroom)
            / MIB
            * MIB;
        if c.memory_bytes > most {
            return Err(invalid(
                "config.memory.size_bytes",
                format!(
                    "at most {most} on this host (what it admits, less the VMM's {} MiB), got {}",
                    headroom / MIB,
                    c.memory_bytes
                ),
            ));
        }
        for (name, limit) in [
            ("rx_rate_limit", &c.network.rx_rate_limit),
            ("tx_rate_limit", &c.network.tx_rate_limit),
        ] {
            let Some(l) = limit else { continue };
            if !(1..=MAX_RATE_BYTES).contains(&l.bandwidth_bytes_per_sec) {
                return Err(invalid(
                    format!("config.network.{name}.bandwidth_bytes_per_sec"),
                    format!(
                        "must be between 1 and {MAX_RATE_BYTES}, got {}",
                        l.bandwidth_bytes_per_sec
                    ),
                ));
            }
            if l.burst_bytes > MAX_RATE_BYTES {
                return Err(invalid(
                    format!("config.network.{name}.burst_bytes"),
                    format!("at most {MAX_RATE_BYTES}, got {}", l.burst_bytes),
                ));
            }
        }
        self.assets
            .get_for(who, &c.kernel_image_id, AssetKind::Kernel)
            .map_err(|e| asset_field_error("config.kernel.image_id", e))?;
        self.assets
            .get_for(who, &c.rootfs_image_id, AssetKind::Rootfs)
            .map_err(|e| asset_field_error("config.rootfs.image_id", e))?;
        validate_kernel_args(&c.kernel_args)?;
        if c.drives.len() > MAX_DRIVES {
            return Err(invalid(
                "config.drives",
                format!("at most {MAX_DRIVES} drives, got {}", c.drives.len()),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, d) in c.drives.iter().enumerate() {
            let field = format!("config.drives[{i}].drive_id");
            if !is_token(&d.drive_id, 32) || d.drive_id.chars().any(|ch| ch.is_ascii_uppercase()) {
                return Err(invalid(field, "1-32 of a-z 0-9 _ -"));
            }
            if d.drive_id == "rootfs" || !seen.insert(d.drive_id.as_str()) {
                return Err(invalid(field, format!("'{}' is already used", d.drive_id)));
            }
            self.assets
                .get_for(who, &d.image_id, AssetKind::Rootfs)
                .map_err(|e| asset_field_error(&format!("config.drives[{i}].image_id"), e))?;
        }
        validate_metadata(&c.metadata)
    }
}

/// The guest contract's promise for `config.kernel_args` (guest/README.md): at most
/// [`MAX_KERNEL_ARGS`] bytes and no control characters, so the addition stays on the one
/// command line the VMMs pass. A function of its own so the fuzz target checks exactly this.
pub(crate) fn validate_kernel_args(args: &str) -> Result<(), ServiceError> {
    if args.len() > MAX_KERNEL_ARGS {
        return Err(invalid(
            "config.kernel_args",
            format!("at most {MAX_KERNEL_ARGS} bytes, got {}", args.len()),
        ));
    }
    if args.chars().any(|ch| ch.is_control()) {
        return Err(invalid(
            "config.kernel_args",
            "must not contain control characters",
        ));
    }
    // The guest's init reads its addresses from metald's arguments: a customer's copy must
    // not override them, and an open quote must not swallow them (they come last).
    if let Some(name) = reserved_kernel_arg(args) {
        return Err(invalid(
            "config.kernel_args",
            format!(
                "{name} is set by metald (reserved: {})",
                crate::network::RESERVED_KERNEL_ARGS.join(", ")
            ),
        ));
    }
    if !args.matches('"').count().is_multiple_of(2) {
        return Err(invalid(
            "config.kernel_args",
            "has an unbalanced double quote",
        ));
    }
    Ok(())
}

/// The first argument in `args` that metald sets itself, if any.
fn reserved_kernel_arg(args: &str) -> Option<&'static str> {
    args.split_ascii_whitespace().find_map(|w| {
        let name = w.trim_start_matches('"').split('=').next().unwrap_or("");
        crate::network::RESERVED_KERNEL_ARGS
            .iter()
            .find(|r| r.eq_ignore_ascii_case(name))
            .copied()
    })
}

pub(super) fn asset_field_error(field: &str, e: AssetError) -> ServiceError {
    match e {
        AssetError::Unknown(_) | AssetError::WrongKind { .. } => invalid(field, e.to_string()),
        other => ServiceError::Asset(other),
    }
}

pub(super) fn validate_metadata(m: &BTreeMap<String, String>) -> Result<(), ServiceError> {
    if m.len() > MAX_METADATA {
        return Err(invalid(
            "config.metadata",
            format!("at most {MAX_METADATA} entries, got {}", m.len()),
        ));
    }
    for (k, v) in m {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'));
        if !key_ok {
            return Err(invalid(
                "config.metadata",
                format!(
                    "key '{}' must be 1-63 of A-Z a-z 0-9 _ - . /",
                    crate::domain::truncate_for_message(k)
                ),
            ));
        }
        if v.len() > 256 {
            return Err(invalid(
                "config.metadata",
                format!("value of '{k}' is longer than 256 bytes"),
            ));
        }
    }
    Ok(())
}
