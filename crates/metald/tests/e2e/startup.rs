//! Starting the real binary with settings it must refuse: it exits non-zero at once with one
//! line naming the variable, before it opens anything. Needs neither root nor a VMM.

use std::process::{Command, Stdio};

/// The start-up tests.
pub fn tests() -> Vec<crate::E2e> {
    crate::e2e![&[]; dev_auth_on_a_non_loopback_address_refuses_to_start]
}

fn dev_auth_on_a_non_loopback_address_refuses_to_start() {
    for address in ["0.0.0.0", "::", "192.0.2.1"] {
        let data = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_metald"))
            .arg("serve")
            .env_clear()
            .env("UNKEY_METALD_ADDRESS", address)
            .env("UNKEY_METALD_DATA_DIR", data.path())
            .env("UNKEY_METALD_ISOLATION", "none")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{address}: started: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{address}: one line: {err}");
        assert!(
            lines[0].contains("UNKEY_METALD_ADDRESS")
                && lines[0].contains("UNKEY_METALD_AUTH_MODE=dev")
                && lines[0].contains("loopback"),
            "{address}: {err}"
        );
        // Nothing was made in the data directory.
        assert_eq!(
            std::fs::read_dir(data.path()).unwrap().count(),
            0,
            "{address}"
        );
    }
}
