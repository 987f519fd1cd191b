//! Where a VM's counters are read from. Each file is opened once per VMM run and re-read with
//! `pread` at offset 0 (no reopen, no seek); a file that vanished (the VMM exited) keeps its
//! last value.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::time::ClockId;
use rtnetlink::packet_core::{
    DecodeError, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator,
    Parseable, NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP, NLM_F_REQUEST,
};
use rtnetlink::packet_route::stats::{StatsAttribute, StatsFilterMask, StatsHeader, StatsMessage};
use rtnetlink::packet_route::RouteNetlinkMessage;

use super::Counters;
use crate::jailer::cgroup::CgroupFiles;

/// Counters of one interface (host side of the VM's veth).
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

/// Interface counters of metald's network namespace, keyed by interface index.
pub type NetTable = HashMap<u32, NetDev>;

/// Reads every interface's counters with one `RTM_GETSTATS` dump asking for the 64-bit link
/// statistics only. `/proc/net/dev` gives the same numbers but the kernel formats 16 numbers per
/// interface as text and metald parses them back: that was a third of the sampler's cost.
pub struct NetStats {
    socket: rtnetlink::sys::Socket,
    /// Any socket of metald's namespace, for interface name lookups (SIOCGIFINDEX).
    ioctl: OwnedFd,
    buf: Vec<u8>,
    seq: u32,
    table: NetTable,
    /// The last refresh failed.
    failing: bool,
}

impl std::fmt::Debug for NetStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetStats")
            .field("interfaces", &self.table.len())
            .finish()
    }
}

impl NetStats {
    /// Opens the netlink socket in the calling thread's network namespace.
    pub fn open() -> std::io::Result<Self> {
        let mut socket = rtnetlink::sys::Socket::new(rtnetlink::sys::protocols::NETLINK_ROUTE)?;
        socket.bind_auto()?;
        // The kernel answers a dump at once; a bound on the wait keeps a misbehaving socket from
        // stalling the sampler.
        rustix::net::sockopt::set_socket_timeout(
            &socket,
            rustix::net::sockopt::Timeout::Recv,
            Some(std::time::Duration::from_secs(1)),
        )?;
        let ioctl = rustix::net::socket(
            rustix::net::AddressFamily::INET6,
            rustix::net::SocketType::DGRAM,
            None,
        )?;
        Ok(Self {
            socket,
            ioctl,
            // A dump part is at most 32 KiB (the kernel's netlink dump skb limit).
            buf: Vec::with_capacity(64 * 1024),
            seq: 0,
            table: HashMap::new(),
            failing: false,
        })
    }

    /// The index of interface `name`, if it exists.
    pub fn index(&self, name: &str) -> Option<u32> {
        rustix::net::netdevice::name_to_index(&self.ioctl, name).ok()
    }

    /// Whether the last [`NetStats::refresh`] failed.
    pub fn failing(&self) -> bool {
        self.failing
    }

    /// The counters of the last [`NetStats::refresh`].
    pub fn table(&self) -> &NetTable {
        &self.table
    }

    /// Re-reads every interface's counters (`only` `None`, one dump), or only those of
    /// interface `only` (one request: a VM starting or stopping needs its own, and a dump costs
    /// about 1.5 µs per interface of the namespace). On a netlink error the table holds only
    /// what was read before it (the other VMs' network counters keep their last values) and the
    /// error is returned.
    pub fn refresh(&mut self, only: Option<u32>) -> Result<(), std::io::Error> {
        match only {
            None => self.table.clear(),
            Some(i) => {
                self.table.remove(&i);
            }
        }
        let result = self.request(only);
        self.failing = result.is_err();
        result
    }

    fn request(&mut self, only: Option<u32>) -> Result<(), std::io::Error> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = if only.is_some() {
            NLM_F_REQUEST
        } else {
            NLM_F_REQUEST | NLM_F_DUMP
        };
        header.sequence_number = self.seq;
        let mut stats = StatsMessage::default();
        stats.header.filter_mask = StatsFilterMask::Link64;
        stats.header.ifindex = only.unwrap_or(0);
        let mut req = NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetStats(stats)),
        );
        req.finalize();
        let mut out = vec![0; req.buffer_len()];
        req.serialize(&mut out);
        self.socket.send(&out, 0)?;
        loop {
            self.buf.clear();
            let n = self.socket.recv(&mut self.buf, 0)?.min(self.buf.len());
            if read_stats(&mut self.table, &self.buf[..n], self.seq, only)? {
                return Ok(());
            }
        }
    }
}

/// Reads one received buffer of an `RTM_GETSTATS` answer with sequence number `seq` into
/// `table`; true when the answer is complete (the dump's end, or `only`'s one message). A
/// function of the bytes alone, hidden public, so the fuzz target reads them as `refresh` does.
#[doc(hidden)]
pub fn read_stats(
    table: &mut NetTable,
    buf: &[u8],
    seq: u32,
    only: Option<u32>,
) -> Result<bool, std::io::Error> {
    let n = buf.len();
    let mut off = 0;
    while off < n {
        // The messages are read in place through the crate's buffer views: the stats messages
        // (all but the dump's last) are not built into owned messages, which allocate a vector
        // each (a tenth of the sampler's user-space time).
        let msg = NetlinkBuffer::new_checked(&buf[off..n]).map_err(invalid)?;
        let len = msg.length() as usize;
        // Parts of an earlier dump that failed half way are skipped, their end too.
        if msg.sequence_number() == seq {
            match msg.message_type() {
                libc::RTM_NEWSTATS => {
                    add(table, msg.payload()).map_err(invalid)?;
                    // A single interface's answer is this one message.
                    if only.is_some() {
                        return Ok(true);
                    }
                }
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..n])
                        .map_err(invalid)?;
                    if let NetlinkPayload::Error(e) = m.payload {
                        // Not `ErrorMessage::to_io`: its `abs()` of the code panics (overflow
                        // checks) on i32::MIN, which the fuzzer sent; no errno is that large.
                        let e = std::io::Error::from_raw_os_error(e.raw_code().saturating_abs());
                        // Like a dump, which just leaves it out: an interface that is gone (a
                        // stopped VM's veth) has no counters, and that is no failure.
                        if only.is_some() && e.raw_os_error() == Some(libc::ENODEV) {
                            return Ok(true);
                        }
                        return Err(e);
                    }
                }
                _ => {}
            }
        }
        if len == 0 {
            break;
        }
        off += len;
    }
    Ok(false)
}

/// Takes the counters of one `RTM_NEWSTATS` message into `table`.
fn add(table: &mut NetTable, payload: &[u8]) -> Result<(), DecodeError> {
    let header = StatsHeader::parse(payload)?;
    let attrs = payload.get(STATS_HEADER_LEN..).unwrap_or_default();
    for nla in NlasIterator::new(attrs) {
        if let StatsAttribute::Link64(s) = StatsAttribute::parse(&nla?)? {
            table.insert(
                header.ifindex,
                NetDev {
                    rx_bytes: s.rx_bytes,
                    rx_packets: s.rx_packets,
                    tx_bytes: s.tx_bytes,
                    tx_packets: s.tx_packets,
                },
            );
        }
    }
    Ok(())
}

/// The `struct if_stats_msg` before a stats message's attributes (linux/if_link.h).
const STATS_HEADER_LEN: usize = 12;

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
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

/// How much of a VM's sources a read covers; each level includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Depth {
    /// A sampling tick: CPU time by the process clock, disk bytes while they move, network.
    Tick,
    /// Once a second: also the memory gauge, disk operations and idle disk byte counters.
    Second,
    /// Also CPU time from the cgroup, the authority (at a run's start and stop, and now and
    /// then to check the clock against it).
    Full,
}

/// The open files of one VMM run.
#[derive(Debug)]
pub struct Sources {
    /// The authority for CPU time (the cgroup's counter), read on [`Depth::Full`] reads and
    /// whenever `clock` can't be.
    cpu: Option<Cpu>,
    /// The VMM process's CPU clock (all its threads, exact to the nanosecond), read on the ticks
    /// in between: one `clock_gettime` with no file behind it. Measured among 50 busy VMs it
    /// cost 1.8 µs per VM against 3.4 µs for a `pread` of `cpuacct.usage`.
    clock: Option<ClockId>,
    /// The CPU total and the clock's reading at the last read of `cpu`; ticks in between add
    /// the clock's progress to it.
    cpu_anchor: Option<(u64, u64)>,
    memory: Option<Memory>,
    io: Option<File>,
    ops: Option<BlockOps>,
    /// The disk byte counters moved at the last read: keep reading them every tick.
    io_active: bool,
}

fn open(path: &Path) -> Option<File> {
    File::open(path).ok()
}

/// Reads a whole small counter file at offset 0 into `buf`, without allocating.
fn read<'a>(f: &File, buf: &'a mut [u8]) -> Option<&'a str> {
    let n = f.read_at(buf, 0).ok()?;
    std::str::from_utf8(buf.get(..n)?).ok()
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
    /// Sources of a jailed VMM: its cgroup, plus its process (under procfs `proc`) for disk
    /// bytes.
    pub fn for_cgroup(files: &CgroupFiles, proc: &Path, pid: u32) -> Self {
        Self {
            cpu: if files.v2 {
                open(&files.cpu).map(Cpu::V2)
            } else {
                open(&files.cpu).map(Cpu::V1)
            },
            clock: process_clock(pid),
            cpu_anchor: None,
            memory: open(&files.memory).map(Memory::Cgroup),
            io: open(&proc.join(pid.to_string()).join("io")),
            ops: files.block_ops.as_deref().and_then(open).map(|f| {
                if files.v2 {
                    BlockOps::V2(f)
                } else {
                    BlockOps::V1(f)
                }
            }),
            io_active: true,
        }
    }

    /// Sources of an unjailed VMM (isolation off): its process (under procfs `proc`) only.
    pub fn for_process(proc: &Path, pid: u32) -> Self {
        let p = |f: &str| open(&proc.join(pid.to_string()).join(f));
        Self {
            cpu: p("stat").map(Cpu::Proc),
            clock: process_clock(pid),
            cpu_anchor: None,
            memory: p("statm").map(Memory::Proc),
            io: p("io"),
            ops: None,
            io_active: true,
        }
    }

    /// Stops reading the cgroup's disk operation counts (the VMM reports its own).
    pub fn close_block_ops(&mut self) {
        self.ops = None;
    }

    /// Current counters, every source read (network from `net`, by the host-side interface's
    /// index); anything unreadable keeps its value from `last`.
    pub fn read(&mut self, ifindex: Option<u32>, net: &NetTable, last: &Counters) -> Counters {
        self.read_some(ifindex, net, last, Depth::Full)
    }

    /// Like [`Sources::read`], for a sampling tick that reads only what `depth` asks for.
    /// Between authoritative readings CPU time is the last cgroup reading plus what the VMM's
    /// process clock advanced since; the memory gauge and the disk operation counts (which
    /// change slowly) keep their values from `last` below [`Depth::Second`], and so do the disk
    /// byte counts unless they moved at the previous read: a VM that is not doing disk I/O
    /// costs one clock read per tick, and one doing I/O is followed at full resolution from the
    /// tick after its I/O is first seen. Totals are exact either way.
    pub fn read_some(
        &mut self,
        ifindex: Option<u32>,
        net: &NetTable,
        last: &Counters,
        depth: Depth,
    ) -> Counters {
        // Counter files are short (`cpuacct.usage` is one number, `/proc/<pid>/io` seven
        // lines); the per-device block statistics and `/proc/<pid>/stat` get a page.
        let mut small = [0u8; 512];
        let mut c = *last;
        let clock = self.clock.and_then(read_clock);
        match (clock, self.cpu_anchor) {
            (Some(now), Some((total, at))) if depth != Depth::Full => {
                c.cpu_ns = total + now.saturating_sub(at);
            }
            _ => {
                if let Some(v) = self.cpu.as_ref().and_then(|f| match f {
                    Cpu::Proc(_) => read_cpu(f, &mut [0u8; 4096]),
                    _ => read_cpu(f, &mut small),
                }) {
                    // The clock includes the running threads' time not yet charged to the
                    // cgroup (up to a scheduler tick each): never step back behind it.
                    c.cpu_ns = if self.cpu_anchor.is_some() {
                        v.max(last.cpu_ns)
                    } else {
                        v
                    };
                }
                self.cpu_anchor = clock.map(|k| (c.cpu_ns, k));
            }
        }
        let slow = depth >= Depth::Second;
        if slow {
            let mut buf = [0u8; 4096];
            c.memory_bytes = self
                .memory
                .as_ref()
                .and_then(|f| read_memory(f, &mut buf))
                .unwrap_or(0);
            if let Some((r, w)) = self.ops.as_ref().and_then(|f| read_ops(f, &mut buf)) {
                c.disk_read_ops = r;
                c.disk_write_ops = w;
            }
        }
        if slow || self.io_active {
            if let Some(t) = self.io.as_ref().and_then(|f| read(f, &mut small)) {
                if let (Some(r), Some(w)) = (keyed(t, "read_bytes"), keyed(t, "write_bytes")) {
                    c.disk_read_bytes = r;
                    c.disk_write_bytes = w;
                }
            }
            self.io_active = (c.disk_read_bytes, c.disk_write_bytes)
                != (last.disk_read_bytes, last.disk_write_bytes);
        }
        if let Some(n) = ifindex.and_then(|i| net.get(&i)) {
            // The host side sends what the guest receives.
            c.net_rx_bytes = n.tx_bytes;
            c.net_rx_packets = n.tx_packets;
            c.net_tx_bytes = n.rx_bytes;
            c.net_tx_packets = n.rx_packets;
        }
        c
    }
}

/// The CPU clock of process `pid`. Pids are handed out in a cycle (4 million by default), so
/// the VMM's pid is not someone else's in the moment between its exit and metald, told through
/// a pidfd, ending the run; the cgroup's counter, read every 10 s, stays the authority anyway.
fn process_clock(pid: u32) -> Option<ClockId> {
    let pid = i32::try_from(pid).ok()?;
    nix::time::clock_getcpuclockid(nix::unistd::Pid::from_raw(pid)).ok()
}

/// Nanoseconds on `clock`; `None` once its process is gone.
fn read_clock(clock: ClockId) -> Option<u64> {
    let t = nix::time::clock_gettime(clock).ok()?;
    Some(u64::try_from(t.tv_sec()).ok()? * 1_000_000_000 + u64::try_from(t.tv_nsec()).ok()?)
}

fn read_cpu(cpu: &Cpu, buf: &mut [u8]) -> Option<u64> {
    match cpu {
        Cpu::V1(f) => first_number(read(f, buf)?),
        Cpu::V2(f) => keyed(read(f, buf)?, "usage_usec").map(|us| us * 1000),
        Cpu::Proc(f) => {
            let t = read(f, buf)?;
            // Fields after the command name (which may contain spaces): utime is 14, stime 15.
            let mut after = t.rsplit_once(')')?.1.split_whitespace().skip(11);
            let ticks = after.next()?.parse::<u64>().ok()? + after.next()?.parse::<u64>().ok()?;
            let hz = rustix::param::clock_ticks_per_second();
            Some(ticks * (1_000_000_000 / hz.max(1)))
        }
    }
}

fn read_memory(m: &Memory, buf: &mut [u8]) -> Option<u64> {
    match m {
        Memory::Cgroup(f) => first_number(read(f, buf)?),
        Memory::Proc(f) => {
            let pages: u64 = read(f, buf)?.split_whitespace().nth(1)?.parse().ok()?;
            Some(pages * rustix::param::page_size() as u64)
        }
    }
}

fn read_ops(o: &BlockOps, buf: &mut [u8]) -> Option<(u64, u64)> {
    let (mut r, mut w) = (0, 0);
    match o {
        BlockOps::V1(f) => {
            for l in read(f, buf)?.lines() {
                let mut p = l.split_whitespace();
                if let (Some(_), Some(kind), Some(n), None) =
                    (p.next(), p.next(), p.next(), p.next())
                {
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
            for l in read(f, buf)?.lines() {
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
    fn a_dump_buffer_reads_every_interface_until_done() {
        // A fuzz seed: the mode byte, then two RTM_NEWSTATS (the second with a pre-6.9 kernel's
        // shorter rtnl_link_stats64) and NLMSG_DONE, all with sequence number 1.
        let seed =
            include_bytes!("../../../../fuzz/corpus/netlink_stats/dump_two_interfaces_done.bin");
        let mut table = NetTable::new();
        assert!(read_stats(&mut table, &seed[1..], 1, None).unwrap());
        let dev = |base| NetDev {
            rx_packets: base,
            tx_packets: base + 1,
            rx_bytes: base + 2,
            tx_bytes: base + 3,
        };
        assert_eq!(table, NetTable::from([(5, dev(100)), (7, dev(900))]));
        // Another request's answer is skipped whole, its end included.
        let mut table = NetTable::new();
        assert!(!read_stats(&mut table, &seed[1..], 2, None).unwrap());
        assert!(table.is_empty());
    }

    #[test]
    fn an_error_code_of_i32_min_is_an_error_not_a_panic() {
        // The fuzzer's find: the mode byte, then an NLMSG_ERROR of the right sequence whose
        // code is i32::MIN.
        let seed = include_bytes!("../../../../fuzz/corpus/netlink_stats/error_code_i32_min.bin");
        let mut table = NetTable::new();
        assert!(read_stats(&mut table, &seed[1..], 1, Some(1)).is_err());
    }

    #[test]
    fn one_netlink_dump_gives_every_interfaces_counters() {
        let mut n = NetStats::open().unwrap();
        let lo = n.index("lo").unwrap();
        assert_eq!(n.index("no-such-if0"), None);
        n.refresh(None).unwrap();
        let before = n.table()[&lo];
        // 10 datagrams of 1000 bytes over loopback: lo sends and receives each one.
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..10 {
            tx.send_to(&[7u8; 1000], rx.local_addr().unwrap()).unwrap();
        }
        n.refresh(None).unwrap();
        let after = n.table()[&lo];
        assert!(
            after.tx_packets >= before.tx_packets + 10,
            "{before:?} {after:?}"
        );
        assert!(
            after.rx_bytes >= before.rx_bytes + 10 * 1000,
            "{before:?} {after:?}"
        );
        // Repeated dumps reuse the socket and see the same interfaces.
        let count = n.table().len();
        n.refresh(None).unwrap();
        assert!(count >= 1 && n.table().len() == count);
        // One interface alone: its entry is read again, the others stay as they were.
        tx.send_to(&[7u8; 1000], rx.local_addr().unwrap()).unwrap();
        let others = n.table().clone();
        n.refresh(Some(lo)).unwrap();
        assert!(n.table()[&lo].tx_packets > after.tx_packets);
        assert_eq!(n.table().len(), count);
        assert!(others.iter().all(|(i, d)| *i == lo || n.table()[i] == *d));
        // An interface that is gone has no entry, as in a dump; that is no failure.
        n.refresh(Some(u32::MAX)).unwrap();
        assert!(!n.failing() && !n.table().contains_key(&u32::MAX));
        // The next request is not confused by the error reply.
        n.refresh(Some(lo)).unwrap();
        assert!(n.table().contains_key(&lo));
    }

    #[test]
    fn between_authoritative_reads_cpu_time_follows_the_process_clock() {
        let d = tempfile::tempdir().unwrap();
        let usage = d.path().join("cpuacct.usage");
        std::fs::write(&usage, "1000000000\n").unwrap();
        let mut s = Sources {
            cpu: open(&usage).map(Cpu::V1),
            // This test process stands in for the VMM.
            clock: process_clock(std::process::id()),
            cpu_anchor: None,
            memory: None,
            io: None,
            ops: None,
            io_active: false,
        };
        let net = NetTable::new();
        let c0 = s.read(None, &net, &Counters::default());
        assert_eq!(c0.cpu_ns, 1_000_000_000);
        // Burn 50 ms of this process's CPU time, however long that takes on a busy machine; the
        // cgroup file (not rewritten) would say nothing happened.
        let own = || {
            let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID).unwrap();
            t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
        };
        let start = own();
        while own() < start + 50_000_000 {
            std::hint::black_box(start);
        }
        let c1 = s.read_some(None, &net, &c0, Depth::Second);
        let gained = c1.cpu_ns - c0.cpu_ns;
        assert!(gained >= 50_000_000, "{gained} ns");
        // An authoritative read goes back to the cgroup, and never behind the clock's lead.
        std::fs::write(&usage, "1000000001\n").unwrap();
        assert_eq!(s.read_some(None, &net, &c1, Depth::Full).cpu_ns, c1.cpu_ns);
        std::fs::write(&usage, "9000000000\n").unwrap();
        let c2 = s.read_some(None, &net, &c1, Depth::Full);
        assert_eq!(c2.cpu_ns, 9_000_000_000);
        // Without a clock (the process is gone), every tick reads the cgroup.
        s.clock = None;
        std::fs::write(&usage, "9500000000\n").unwrap();
        assert_eq!(
            s.read_some(None, &net, &c2, Depth::Tick).cpu_ns,
            9_500_000_000
        );
    }

    #[test]
    fn disk_bytes_are_read_every_tick_only_while_they_move() {
        let d = tempfile::tempdir().unwrap();
        let io = d.path().join("io");
        let w = |t: &str| std::fs::write(&io, t).unwrap();
        w("rchar: 1\nread_bytes: 100\nwrite_bytes: 200\n");
        let mut s = Sources {
            cpu: None,
            clock: None,
            cpu_anchor: None,
            memory: None,
            io: open(&io),
            ops: None,
            io_active: true,
        };
        let net = NetTable::new();
        let c = s.read(None, &net, &Counters::default());
        assert_eq!((c.disk_read_bytes, c.disk_write_bytes), (100, 200));
        // Moved at that read: the next tick reads again and sees them stand still.
        w("rchar: 1\nread_bytes: 100\nwrite_bytes: 200\n");
        let c = s.read_some(None, &net, &c, Depth::Tick);
        assert!(!s.io_active);
        // Standing still: ticks skip the file until the next full read finds it moved.
        w("rchar: 1\nread_bytes: 150\nwrite_bytes: 900\n");
        let c = s.read_some(None, &net, &c, Depth::Tick);
        assert_eq!((c.disk_read_bytes, c.disk_write_bytes), (100, 200));
        let c = s.read_some(None, &net, &c, Depth::Second);
        assert_eq!((c.disk_read_bytes, c.disk_write_bytes), (150, 900));
        assert!(s.io_active);
        w("rchar: 1\nread_bytes: 151\nwrite_bytes: 901\n");
        let c = s.read_some(None, &net, &c, Depth::Tick);
        assert_eq!((c.disk_read_bytes, c.disk_write_bytes), (151, 901));
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
        let mut s = Sources::for_cgroup(&files, Path::new("/proc"), std::process::id());
        let mut net = NetTable::new();
        net.insert(
            7,
            NetDev {
                rx_bytes: 1,
                rx_packets: 2,
                tx_bytes: 3,
                tx_packets: 4,
            },
        );
        let c = s.read(Some(7), &net, &Counters::default());
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
        let mut v2 = Sources::for_cgroup(
            &CgroupFiles {
                v2: true,
                cpu: d.path().join("cpu.stat"),
                memory: d.path().join("memory.usage_in_bytes"),
                block_ops: Some(d.path().join("io.stat")),
            },
            Path::new("/proc"),
            std::process::id(),
        );
        let c2 = v2.read(None, &net, &Counters::default());
        assert_eq!(
            (c2.cpu_ns, c2.disk_read_ops, c2.disk_write_ops),
            (1_500_000, 2, 7)
        );
        // This test process's own /proc files work without a cgroup.
        let p = Sources::for_process(Path::new("/proc"), std::process::id()).read(
            None,
            &net,
            &Counters::default(),
        );
        assert!(p.memory_bytes > 0);
    }
}
