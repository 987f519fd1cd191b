//! Network isolation for tests: each metald runs its host side inside a network namespace the
//! test makes (so no VM traffic, veth, route or nftables rule ever touches the machine's own
//! namespace), reached through a loopback-to-loopback relay. Every namespace, interface,
//! cgroup, mount and jail directory a test's metald made is removed when it ends.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

/// A network namespace made by the test (`ip netns add`), deleted on drop.
pub struct TestNetns {
    /// Its name under /run/netns.
    pub name: String,
}

impl TestNetns {
    /// Makes a fresh namespace with loopback up.
    pub fn new() -> Self {
        let name = format!("mdt{}", &uuid_hex()[..10]);
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// Its file.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command run inside the namespace (network only; same mounts).
    pub fn command(&self, program: &str) -> Command {
        command_in(&self.path(), program)
    }

    /// Output of a command run in the namespace.
    pub fn output(&self, program: &str, args: &[&str]) -> String {
        output_in(&self.path(), program, args)
    }

    /// Fails the test unless `addr` (a VM's) answers one ping from the namespace within 5 s.
    pub fn assert_pings(&self, addr: &str) {
        let out = self
            .command("ping")
            .args(["-c1", "-W5", addr])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ping {addr}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A bridge in a namespace of its own joining test namespaces, as a switch joins hosts: each
/// member gets a veth into it and an address of 10.250.0.0/24. Dropping it deletes the bridge
/// and every veth (their members' ends go with them).
pub struct Fabric {
    /// The namespace holding the bridge.
    pub ns: TestNetns,
    members: u8,
}

impl Fabric {
    /// An empty fabric.
    pub fn new() -> Self {
        let ns = TestNetns::new();
        run(
            "ip",
            &["-n", &ns.name, "link", "add", "br0", "type", "bridge"],
        );
        run("ip", &["-n", &ns.name, "link", "set", "br0", "up"]);
        Self { ns, members: 0 }
    }

    /// Joins `member` (as interface `fabric0`); its address on the fabric.
    pub fn join(&mut self, member: &TestNetns) -> std::net::IpAddr {
        self.members += 1;
        let n = self.members;
        let outer = format!("fp{n}");
        let fab = &self.ns.name;
        run(
            "ip",
            &[
                "-n",
                fab,
                "link",
                "add",
                &outer,
                "type",
                "veth",
                "peer",
                "name",
                "fabric0",
                "netns",
                &member.name,
            ],
        );
        run("ip", &["-n", fab, "link", "set", &outer, "master", "br0"]);
        run("ip", &["-n", fab, "link", "set", &outer, "up"]);
        let addr = format!("10.250.0.{n}");
        run(
            "ip",
            &[
                "-n",
                &member.name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "fabric0",
            ],
        );
        run("ip", &["-n", &member.name, "link", "set", "fabric0", "up"]);
        addr.parse().unwrap()
    }
}

/// A command run inside the network namespace of file `ns` (same mounts).
pub fn command_in(ns: &Path, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", ns.display()))
        .arg("--")
        .arg(program);
    c
}

/// Standard output of a command run inside the network namespace of file `ns`.
pub fn output_in(ns: &Path, program: &str, args: &[&str]) -> String {
    let out = command_in(ns, program).args(args).output().expect(program);
    String::from_utf8_lossy(&out.stdout).to_string()
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Random hex (for names).
pub fn uuid_hex() -> String {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Connects to `addr` from inside the namespace at `ns` (a socket keeps the namespace it was
/// made in, so only the connecting thread enters it).
pub fn connect_in(ns: &Path, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let ns = ns.to_path_buf();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&ns)?;
        rustix::thread::move_into_link_name_space(
            f.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
        TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
    })
    .join()
    .expect("connect thread")
}

/// Relays connections to a loopback port in the root namespace to a loopback port inside a
/// test namespace (the target port can change when metald restarts).
pub struct Relay {
    /// The local port to connect to.
    pub port: u16,
    /// Where connections go inside the namespace.
    pub target: Arc<AtomicU16>,
}

impl Relay {
    /// Starts relaying to `target` in the namespace at `ns`.
    pub fn start(ns: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay bind");
        let port = listener.local_addr().expect("relay addr").port();
        let target = Arc::new(AtomicU16::new(0));
        let (ns, t) = (ns.to_path_buf(), Arc::clone(&target));
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let port = t.load(Ordering::SeqCst);
                let Ok(upstream) = connect_in(&ns, SocketAddr::from(([127, 0, 0, 1], port))) else {
                    continue;
                };
                pipe(client, upstream);
            }
        });
        Self { port, target }
    }
}

fn pipe(a: TcpStream, b: TcpStream) {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 16384];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    };
    copy(a, b2);
    copy(b, a2);
}
