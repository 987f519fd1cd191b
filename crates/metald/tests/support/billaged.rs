//! The real `billaged`, inside a metald's test namespace, keeping its database (and log) in that
//! metald's data directory.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// A running billaged; killed on drop.
pub struct Billaged {
    child: Child,
    /// Its SQLite database.
    pub db: PathBuf,
}

impl Billaged {
    /// Starts it on `port` in `m`'s namespace and waits until it accepts connections.
    pub fn start(m: &Metald, port: u16) -> Self {
        let bin = workspace_bin("billaged").expect("required prerequisite missing: billaged");
        let iso = m
            .iso
            .as_ref()
            .expect("billaged runs beside an isolating metald");
        let db = m.data_dir.join("billaged.db");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.data_dir.join("billaged.log"))
            .unwrap();
        let child = iso
            .netns
            .command(bin.to_str().unwrap())
            .args(["--address", &format!("127.0.0.1:{port}")])
            .args(["--db", db.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        while netns::connect_in(&iso.netns.path(), addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "billaged never listened on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, db }
    }

    /// Stops it now (a billing outage).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Billaged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
