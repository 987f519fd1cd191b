//! A throwaway PostgreSQL server for tests (feature `testing`): Debian's PostgreSQL 15,
//! socket-only, in a temporary directory, run as the `postgres` user (PostgreSQL refuses to
//! run as root), with an empty database per [`TestPostgres::create_database`].
//!
//! The server goes when the [`TestPostgres`] is dropped or [`TestPostgres::stop`]ped, and also
//! when the test process dies any other way: a watchdog shell, in a process group of its own,
//! waits for the end of a pipe this process holds and then stops the server and removes its
//! directory.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// Where Debian's `postgresql-15` package puts the server's programs (not on PATH).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The system user the server runs as (created by Debian's package).
const PG_USER: &str = "postgres";

/// Why a test server could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum TestPostgresError {
    /// This machine cannot run one (see [`TestPostgres::unavailable`]).
    #[error("{0}")]
    Unavailable(String),
    /// A command failed.
    #[error("{what} failed: {output}")]
    Command {
        /// The command.
        what: String,
        /// Its exit status and output.
        output: String,
    },
    /// A file or process operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server refused a statement or a connection.
    #[error("{what}")]
    Postgres {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: postgres::Error,
    },
}

/// A running test server.
#[derive(Debug)]
pub struct TestPostgres {
    dir: PathBuf,
    databases: AtomicU32,
    /// With TLS: the loopback TCP port it also listens on.
    tls_port: Option<u16>,
    /// The watchdog and the pipe it waits on; `None` once stopped.
    watchdog: Mutex<Option<(Child, ChildStdin)>>,
}

impl TestPostgres {
    /// Why this machine cannot start a test server (`None`: it can): PostgreSQL's programs
    /// missing, not root (to run the server as `postgres`), or no `postgres` user.
    pub fn unavailable() -> Option<String> {
        if !Path::new(PG_BIN).join("initdb").exists() {
            return Some(format!(
                "PostgreSQL 15 is not installed ({PG_BIN}/initdb missing; Debian package \
                 postgresql-15, scripts/install-deps.sh)"
            ));
        }
        if !rustix::process::geteuid().is_root() {
            return Some("needs root (to run the test PostgreSQL server as `postgres`)".into());
        }
        if user_ids(PG_USER).is_none() {
            return Some(format!(
                "no `{PG_USER}` system user (made by postgresql-15)"
            ));
        }
        None
    }

    /// Initializes and starts a server in a new temporary directory; returns once it accepts
    /// connections.
    pub fn start() -> Result<Self, TestPostgresError> {
        Self::start_with(None)
    }

    /// [`TestPostgres::start`], also listening on a loopback TCP port with TLS only, serving
    /// `cert_pem` (for 127.0.0.1) with `key_pem` (TLS applies to TCP, not the Unix socket).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Result<Self, TestPostgresError> {
        Self::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Result<Self, TestPostgresError> {
        if let Some(why) = Self::unavailable() {
            return Err(TestPostgresError::Unavailable(why));
        }
        static SERVERS: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "metald-pg-{}-{}",
            std::process::id(),
            SERVERS.fetch_add(1, Ordering::Relaxed)
        ));
        let io = |what: &str| {
            let what = what.to_string();
            move |source| TestPostgresError::Io { what, source }
        };
        std::fs::create_dir(&dir).map_err(io("create the server's directory"))?;
        let (uid, gid) = user_ids(PG_USER)
            .ok_or_else(|| TestPostgresError::Unavailable(format!("no `{PG_USER}` user")))?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .map_err(io("hand the server's directory to postgres"))?;
        // From here on the watchdog removes the directory whatever happens to this process.
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(
                r#"read _ignored
                runuser -u postgres -- "$1/pg_ctl" -D "$2/data" -m immediate stop >/dev/null 2>&1
                rm -rf "$2""#,
            )
            .arg("watchdog")
            .arg(PG_BIN)
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(io("start the server's watchdog"))?;
        let Some(pipe) = watchdog.stdin.take() else {
            return Err(TestPostgresError::Command {
                what: "watchdog".into(),
                output: "no stdin pipe".into(),
            });
        };
        let tls_port = match tls {
            None => None,
            Some((cert, key)) => {
                for (name, text) in [("server.crt", cert), ("server.key", key)] {
                    let path = dir.join(name);
                    std::fs::write(&path, text).map_err(io("write the server's TLS files"))?;
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                        .map_err(io("hand the TLS files to postgres"))?;
                    std::fs::set_permissions(
                        &path,
                        std::os::unix::fs::PermissionsExt::from_mode(0o600),
                    )
                    .map_err(io("make the TLS key private"))?;
                }
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map(|a| a.port())
                    .map_err(io("find a free port"))?;
                Some(port)
            }
        };
        let server = Self {
            dir,
            databases: AtomicU32::new(0),
            tls_port,
            watchdog: Mutex::new(Some((watchdog, pipe))),
        };
        server.as_postgres(
            "initdb",
            &[
                "-D",
                &server.data().to_string_lossy(),
                "--auth=trust",
                "-U",
                PG_USER,
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        if server.tls_port.is_some() {
            // TCP only with TLS: a plain connection to the port is refused.
            let hba = server.data().join("pg_hba.conf");
            let text = std::fs::read_to_string(&hba).map_err(io("read pg_hba.conf"))?;
            let text: String = text
                .lines()
                .map(|l| match l.strip_prefix("host ") {
                    Some(rest) => format!("hostssl {rest}\n"),
                    None => format!("{l}\n"),
                })
                .collect();
            std::fs::write(&hba, text).map_err(io("write pg_hba.conf"))?;
        }
        server.pg_ctl(&["start"])?;
        Ok(server)
    }

    /// The directory of the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The URL of database `db` on this server, over its Unix socket as `postgres`.
    pub fn url(&self, db: &str) -> String {
        let port = self
            .tls_port
            .map(|p| format!("&port={p}"))
            .unwrap_or_default();
        format!(
            "postgres:///{db}?host={}&user={PG_USER}{port}",
            self.dir.to_string_lossy()
        )
    }

    /// The URL of database `db` over TLS (`sslmode=require`), on a server started with
    /// [`TestPostgres::start_tls`].
    pub fn tls_url(&self, db: &str) -> Option<String> {
        self.tls_port
            .map(|port| format!("postgres://{PG_USER}@127.0.0.1:{port}/{db}?sslmode=require"))
    }

    /// Creates a new, empty database and returns its URL.
    pub fn create_database(&self) -> Result<String, TestPostgresError> {
        let name = format!("t_{}", self.databases.fetch_add(1, Ordering::Relaxed));
        let pg = |what: &str| {
            let what = what.to_string();
            move |source| TestPostgresError::Postgres { what, source }
        };
        let mut admin = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .map_err(pg("connect to the test server"))?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .map_err(pg("create a test database"))?;
        Ok(self.url(&name))
    }

    /// Restarts the server (`pg_ctl restart -m fast`): every connection is cut; returns once
    /// it accepts connections again.
    pub fn restart(&self) -> Result<(), TestPostgresError> {
        self.pg_ctl(&["-m", "fast", "restart"])
    }

    /// Stops the server now and removes its directory (what dropping it does).
    pub fn stop(&self) {
        let taken = self
            .watchdog
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((mut watchdog, mut pipe)) = taken {
            // The watchdog stops the server and removes the directory once it reads a line (or
            // the pipe's end); waiting for it means both are done when this returns.
            if let Err(e) = pipe.write_all(b"stop\n") {
                eprintln!("test PostgreSQL: telling the watchdog to stop: {e}");
            }
            drop(pipe);
            if let Err(e) = watchdog.wait() {
                eprintln!("test PostgreSQL: waiting for the watchdog: {e}");
            }
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), TestPostgresError> {
        let dir = self.dir.to_string_lossy();
        let options = match self.tls_port {
            None => format!("-k {dir} -h '' -F -c max_connections=300"),
            Some(port) => format!(
                "-k {dir} -h 127.0.0.1 -p {port} -F -c max_connections=300 -c ssl=on \
                 -c ssl_cert_file={dir}/server.crt -c ssl_key_file={dir}/server.key"
            ),
        };
        let data = self.data().to_string_lossy().into_owned();
        let log = self.dir.join("log").to_string_lossy().into_owned();
        let mut all = vec!["-D", &data, "-l", &log, "-w", "-t", "60", "-o", &options];
        all.extend_from_slice(args);
        self.as_postgres("pg_ctl", &all)
    }

    /// Runs one of PostgreSQL's programs as the `postgres` user, in the server's directory.
    fn as_postgres(&self, program: &str, args: &[&str]) -> Result<(), TestPostgresError> {
        let what = format!("{program} {}", args.join(" "));
        let out = Command::new("runuser")
            .args(["-u", PG_USER, "--"])
            .arg(Path::new(PG_BIN).join(program))
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| TestPostgresError::Io {
                what: what.clone(),
                source,
            })?;
        if out.status.success() {
            return Ok(());
        }
        let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        Err(TestPostgresError::Command {
            what,
            output: format!(
                "{}: {}{}\n{log}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The uid and gid of `user`, from /etc/passwd.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        if f.next()? != user {
            return None;
        }
        let (_, uid, gid) = (f.next()?, f.next()?, f.next()?);
        Some((uid.parse().ok()?, gid.parse().ok()?))
    })
}
