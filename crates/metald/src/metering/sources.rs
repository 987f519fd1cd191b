//! Where a VM's counters are read from. Each file is opened once per VMM run and re-read with
//! `pread` at offset 0 (no reopen, no seek); a file that vanished (the VMM exited) keeps its
//! last value.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::Counters;
use crate::jailer::cgroup::CgroupFiles;

/// Counters of one interface from `/proc/net/dev` (host side of the VM's veth).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetDev {
    /// Bytes received by the interface.
    pub rx_bytes: u64,
    /// Packets received by the interface.
    pub rx_packets: u64,
    /// Bytes sent by the interface.
    pub tx_bytes: u64,
    /// Packets sent by the interface.
    pub tx_packets: u64,
}

/// Reads `/proc/net/dev` of metald's network namespace: every interface in one read.
pub fn read_net_dev() -> HashMap<String, NetDev> {
    std::fs::read_to_string("/proc/net/dev")
        .map(|t| parse_net_dev(&t))
        .unwrap_or_default()
}

/// Parses `/proc/net/dev`.
pub fn parse_net_dev(text: &str) -> HashMap<String, NetDev> {
    let mut out = HashMap::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        if f.len() >= 10 {
            out.insert(
                name.trim().to_string(),
                NetDev {
                    rx_bytes: f[0],
                    rx_packets: f[1],
                    tx_bytes: f[8],
                    tx_packets: f[9],
                },
            );
        }
    }
    out
}

#[derive(Debug)]
enum Cpu {
    /// cgroup v1 `cpuacct.usage` (nanoseconds).
    V1(File),
    /// cgroup v2 `cpu.stat` (`usage_usec`).
    V2(File),
    /// `/proc/<pid>/stat` utime + stime (clock ticks), without a cgroup.
    Proc(File),
}

#[derive(Debug)]
enum Memory {
    /// cgroup `memory.usage_in_bytes` (v1) or `memory.current` (v2).
    Cgroup(File),
    /// `/proc/<pid>/statm` resident pages, without a cgroup.
    Proc(File),
}

#[derive(Debug)]
enum BlockOps {
    /// cgroup v1 `blkio.throttle.io_serviced`.
    V1(File),
    /// cgroup v2 `io.stat`.
    V2(File),
}

/// The open files of one VMM run.
#[derive(Debug)]
pub struct Sources {
    cpu: Option<Cpu>,
    memory: Option<Memory>,
    io: Option<File>,
    ops: Option<BlockOps>,
}

fn open(path: &Path) -> Option<File> {
    File::open(path).ok()
}

fn read(f: &File) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let n = f.read_at(&mut buf, 0).ok()?;
    buf.truncate(n);
    String::from_utf8(buf).ok()
}

fn first_number(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?;
        rest.trim_start_matches(':').trim().parse().ok()
    })
}

impl Sources {
    /// Sources of a jailed VMM: its cgroup, plus its process for disk bytes.
    pub fn for_cgroup(files: &CgroupFiles, pid: u32) -> Self {
        Self {
            cpu: if files.v2 {
                open(&files.cpu).map(Cpu::V2)
            } else {
                open(&files.cpu).map(Cpu::V1)
            },
            memory: open(&files.memory).map(Memory::Cgroup),
            io: open(Path::new(&format!("/proc/{pid}/io"))),
            ops: files.block_ops.as_deref().and_then(open).map(|f| {
                if files.v2 {
                    BlockOps::V2(f)
                } else {
                    BlockOps::V1(f)
                }
            }),
        }
    }

    /// Sources of an unjailed VMM (isolation off): its process only.
    pub fn for_process(pid: u32) -> Self {
        let p = |f: &str| open(Path::new(&format!("/proc/{pid}/{f}")));
        Self {
            cpu: p("stat").map(Cpu::Proc),
            memory: p("statm").map(Memory::Proc),
            io: p("io"),
            ops: None,
        }
    }

    /// Current counters (network from `net`, keyed by the host-side interface); anything
    /// unreadable keeps its value from `last`.
    pub fn read(
        &self,
        host_if: Option<&str>,
        net: &HashMap<String, NetDev>,
        last: &Counters,
    ) -> Counters {
        self.read_some(host_if, net, last, true)
    }

    /// Like [`Sources::read`]; without `all`, the memory gauge and the disk operation counts
    /// (which cost a syscall each and change slowly) keep their values from `last`.
    pub fn read_some(
        &self,
        host_if: Option<&str>,
        net: &HashMap<String, NetDev>,
        last: &Counters,
        all: bool,
    ) -> Counters {
        let mut c = *last;
        if let Some(v) = self.cpu.as_ref().and_then(read_cpu) {
            c.cpu_ns = v;
        }
        if all {
            c.memory_bytes = self.memory.as_ref().and_then(read_memory).unwrap_or(0);
            if let Some((r, w)) = self.ops.as_ref().and_then(read_ops) {
                c.disk_read_ops = r;
                c.disk_write_ops = w;
            }
        }
        if let Some(t) = self.io.as_ref().and_then(read) {
            if let (Some(r), Some(w)) = (keyed(&t, "read_bytes"), keyed(&t, "write_bytes")) {
                c.disk_read_bytes = r;
                c.disk_write_bytes = w;
            }
        }
        if let Some(n) = host_if.and_then(|i| net.get(i)) {
            // The host side sends what the guest receives.
            c.net_rx_bytes = n.tx_bytes;
            c.net_rx_packets = n.tx_packets;
            c.net_tx_bytes = n.rx_bytes;
            c.net_tx_packets = n.rx_packets;
        }
        c
    }
}

fn read_cpu(cpu: &Cpu) -> Option<u64> {
    match cpu {
        Cpu::V1(f) => first_number(&read(f)?),
        Cpu::V2(f) => keyed(&read(f)?, "usage_usec").map(|us| us * 1000),
        Cpu::Proc(f) => {
            let t = read(f)?;
            // Fields after the command name (which may contain spaces): utime is 14, stime 15.
            let after = t.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            let hz = rustix::param::clock_ticks_per_second();
            Some(ticks * (1_000_000_000 / hz.max(1)))
        }
    }
}

fn read_memory(m: &Memory) -> Option<u64> {
    match m {
        Memory::Cgroup(f) => first_number(&read(f)?),
        Memory::Proc(f) => {
            let pages: u64 = read(f)?.split_whitespace().nth(1)?.parse().ok()?;
            Some(pages * rustix::param::page_size() as u64)
        }
    }
}

fn read_ops(o: &BlockOps) -> Option<(u64, u64)> {
    let (mut r, mut w) = (0, 0);
    match o {
        BlockOps::V1(f) => {
            for l in read(f)?.lines() {
                let p: Vec<&str> = l.split_whitespace().collect();
                if let [_, kind, n] = p[..] {
                    let n: u64 = n.parse().unwrap_or(0);
                    match kind {
                        "Read" => r += n,
                        "Write" => w += n,
                        _ => {}
                    }
                }
            }
        }
        BlockOps::V2(f) => {
            for l in read(f)?.lines() {
                for kv in l.split_whitespace().skip(1) {
                    match kv.split_once('=') {
                        Some(("rios", n)) => r += n.parse::<u64>().unwrap_or(0),
                        Some(("wios", n)) => w += n.parse::<u64>().unwrap_or(0),
                        _ => {}
                    }
                }
            }
        }
    }
    Some((r, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_is_parsed_per_interface() {
        let t = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0\nmv0123456789ab: 5000 40 0 0 0 0 0 0 7000 50 0 0 0 0 0 0\n";
        let m = parse_net_dev(t);
        assert_eq!(
            m["mv0123456789ab"],
            NetDev {
                rx_bytes: 5000,
                rx_packets: 40,
                tx_bytes: 7000,
                tx_packets: 50
            }
        );
        assert_eq!(m["lo"].rx_bytes, 100);
    }

    #[test]
    fn cgroup_and_proc_files_are_read_and_vanished_ones_keep_their_value() {
        let d = tempfile::tempdir().unwrap();
        let w = |n: &str, t: &str| std::fs::write(d.path().join(n), t).unwrap();
        w("cpuacct.usage", "123456789\n");
        w("memory.usage_in_bytes", "4096\n");
        w(
            "blkio.throttle.io_serviced",
            "8:0 Read 3\n8:0 Write 5\n8:16 Read 1\n8:16 Write 0\nTotal 9\n",
        );
        let files = CgroupFiles {
            v2: false,
            cpu: d.path().join("cpuacct.usage"),
            memory: d.path().join("memory.usage_in_bytes"),
            block_ops: Some(d.path().join("blkio.throttle.io_serviced")),
        };
        let s = Sources::for_cgroup(&files, std::process::id());
        let mut net = HashMap::new();
        net.insert(
            "mvx".to_string(),
            NetDev {
                rx_bytes: 1,
                rx_packets: 2,
                tx_bytes: 3,
                tx_packets: 4,
            },
        );
        let c = s.read(Some("mvx"), &net, &Counters::default());
        assert_eq!(
            (c.cpu_ns, c.memory_bytes, c.disk_read_ops, c.disk_write_ops),
            (123456789, 4096, 4, 5)
        );
        assert_eq!(
            (
                c.net_rx_bytes,
                c.net_tx_bytes,
                c.net_rx_packets,
                c.net_tx_packets
            ),
            (3, 1, 4, 2)
        );
        // Re-read in place: a new value shows without reopening.
        w("cpuacct.usage", "223456789\n");
        assert_eq!(s.read(None, &net, &c).cpu_ns, 223456789);
        // v2 files.
        w("cpu.stat", "usage_usec 1500\nuser_usec 1000\n");
        w(
            "io.stat",
            "8:0 rbytes=10 wbytes=20 rios=2 wios=7 dbytes=0 dios=0\n",
        );
        let v2 = Sources::for_cgroup(
            &CgroupFiles {
                v2: true,
                cpu: d.path().join("cpu.stat"),
                memory: d.path().join("memory.usage_in_bytes"),
                block_ops: Some(d.path().join("io.stat")),
            },
            std::process::id(),
        );
        let c2 = v2.read(None, &net, &Counters::default());
        assert_eq!(
            (c2.cpu_ns, c2.disk_read_ops, c2.disk_write_ops),
            (1_500_000, 2, 7)
        );
        // This test process's own /proc files work without a cgroup.
        let p = Sources::for_process(std::process::id()).read(None, &net, &Counters::default());
        assert!(p.memory_bytes > 0);
    }
}
