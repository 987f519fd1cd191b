//! The TAP device and the bridge inside a VM's network namespace, made with ioctls.
//!
//! The kernel creates TAPs only through `/dev/net/tun` ioctls (TUNSETIFF; netlink refuses), and
//! this runs in the single-threaded jailer with no async runtime, so the few bridge and link
//! ioctls are done the same way instead of pulling in a netlink stack here. No crate wraps
//! these particular ioctls with ownership/persistence support, hence the small FFI below.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// `struct ifreq`: an interface name and a 24-byte union (flags or index at its start).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> io::Result<Self> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {name:?}"),
            ));
        }
        let mut r = Self {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..bytes.len()].copy_from_slice(bytes);
        Ok(r)
    }

    fn set_short(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_int(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
}

// Bridge and interface ioctls from <linux/sockios.h>.
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCGIFINDEX: libc::c_ulong = 0x8933;
const SIOCBRADDBR: libc::c_ulong = 0x89a0;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Creates (or takes over) the persistent TAP `name`, owned by `owner` (uid, gid) so the
/// unprivileged VMM can attach to it, with virtio-net headers as Firecracker and QEMU expect.
/// Without an owner only a process with CAP_NET_ADMIN can attach (a warm pool's TAP, until the
/// jail takes it over for the VM).
pub fn create_tap(name: &str, owner: Option<(u32, u32)>) -> io::Result<()> {
    // A TAP that exists is a persistent one (a warm pool's, or the VM's from an earlier run:
    // a TAP nobody holds open and not persistent is gone). Looking costs no lock; making it
    // persistent again would take the kernel's network lock for nothing.
    let existed = ifreq_ioctl(&ctl_socket()?, SIOCGIFINDEX, &mut IfReq::new(name)?).is_ok();
    let tun: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?
        .into();
    let mut req = IfReq::new(name)?;
    req.set_short((libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16);
    let fd = tun.as_raw_fd();
    // SAFETY: `req` is a valid, initialised ifreq-sized buffer that outlives the call, and `fd`
    // is an open /dev/net/tun descriptor; the int arguments are passed by value as the ABI wants.
    unsafe {
        check(libc::ioctl(fd, libc::TUNSETIFF, &mut req as *mut IfReq))?;
        if let Some((uid, gid)) = owner {
            check(libc::ioctl(fd, libc::TUNSETOWNER, libc::c_ulong::from(uid)))?;
            check(libc::ioctl(fd, libc::TUNSETGROUP, libc::c_ulong::from(gid)))?;
        }
        if !existed {
            check(libc::ioctl(fd, libc::TUNSETPERSIST, 1 as libc::c_ulong))?;
        }
    }
    Ok(())
}

/// A socket to issue interface ioctls on, in the current network namespace.
fn ctl_socket() -> io::Result<OwnedFd> {
    use rustix::net::{socket, AddressFamily, SocketType};
    Ok(socket(AddressFamily::UNIX, SocketType::DGRAM, None)?)
}

fn ifreq_ioctl(sock: &OwnedFd, op: libc::c_ulong, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: `req` is a valid ifreq-sized buffer for the duration of the call and `sock` is open.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), op, req as *mut IfReq) })
}

/// Creates the bridge `bridge` (if missing), adds `ports` to it and sets everything up.
pub fn bridge(bridge: &str, ports: &[&str]) -> io::Result<()> {
    let sock = ctl_socket()?;
    let name = std::ffi::CString::new(bridge)?;
    // SAFETY: SIOCBRADDBR takes a NUL-terminated name that lives across the call.
    let existed = match check(unsafe { libc::ioctl(sock.as_raw_fd(), SIOCBRADDBR, name.as_ptr()) })
    {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => true,
        Err(e) => return Err(e),
        Ok(()) => false,
    };
    let mut up: Vec<&str> = vec![];
    for port in ports {
        let mut idx = IfReq::new(port)?;
        match ifreq_ioctl(&sock, SIOCGIFINDEX, &mut idx) {
            Ok(()) => up.push(port),
            // A namespace wired by an older metald, whose veth end had another name: its
            // bridge already joins it.
            Err(e) if existed && e.raw_os_error() == Some(libc::ENODEV) => continue,
            Err(e) => return Err(e),
        }
        let mut add = IfReq::new(bridge)?;
        add.set_int(idx.int());
        match ifreq_ioctl(&sock, SIOCBRADDIF, &mut add) {
            // EBUSY: already a port of it (a reboot reuses the namespace).
            Err(e) if e.raw_os_error() != Some(libc::EBUSY) => return Err(e),
            _ => {}
        }
    }
    for name in up.iter().chain([&bridge, &"lo"]) {
        let mut r = IfReq::new(name)?;
        ifreq_ioctl(&sock, SIOCGIFFLAGS, &mut r)?;
        // Setting flags takes the kernel's network lock even when nothing changes, and a
        // namespace from the warm pool has everything up already.
        if r.short() & libc::IFF_UP as i16 == 0 {
            r.set_short(r.short() | libc::IFF_UP as i16);
            ifreq_ioctl(&sock, SIOCSIFFLAGS, &mut r)?;
        }
    }
    Ok(())
}
