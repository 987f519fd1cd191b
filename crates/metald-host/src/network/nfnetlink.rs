//! The firewall's element changes sent to the kernel over nfnetlink, instead of by an `nft` run.
//!
//! Why: an `nft` run spends 4-6 ms of CPU (its exec, a dozen libraries, its table cache) to
//! send a few hundred bytes, and a boot's run competes with the VMM's start for the host's
//! cores; the same batch sent from metald costs about 0.1 ms. Only element changes go this
//! way. The table itself (set types, rules) is still written by `nft` at start and whenever a
//! change is refused: rules are nft's expression language, not something to encode here.
//! The messages are `netlink-packet-netfilter`'s (rust-netlink, like rtnetlink); the bytes of
//! a key are nft's: the parts one after another, interface names as 16 bytes, marks in host
//! order, addresses in network order; a comment is nftnl's user data (type 0, length, the
//! text with its NUL).

use std::sync::Mutex;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST,
};
use netlink_packet_netfilter::nftables::{
    DataAttribute, ListAttribute, NfTablesMessage, SetElementAttribute, SetElementList,
    SetElementMessage,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

use super::nft::{Element, ElementOp, KeyPart, NftError, TABLE};

/// nfnetlink's subsystem id of nf_tables (`NFNL_SUBSYS_NFTABLES`): a batch's resource id.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// A netlink message header's size.
const NETLINK_HEADER_LEN: usize = 16;
/// Interface names take IFNAMSIZ bytes in a key, NUL-padded.
const IFNAMSIZ: usize = 16;
/// Room for one datagram of answers (each is an error of at most one message of ours).
const REPLY_BUF: usize = 16 * 1024;
/// nftnl's user data type of an element's comment (`NFTNL_UDATA_SET_ELEM_COMMENT`).
const UDATA_COMMENT: u8 = 0;

/// A netfilter netlink socket in the namespace it was opened in, its next sequence number and
/// the largest batch its send buffer takes.
pub struct Nfnetlink {
    socket: Mutex<(Socket, u32, usize)>,
}

impl Nfnetlink {
    /// Opens a socket in the calling thread's network namespace (metald's own).
    pub fn connect() -> std::io::Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.set_non_blocking(true)?;
        // The kernel doubles what is set and reports that; half of it is usable for data.
        let sndbuf = rustix::net::sockopt::socket_send_buffer_size(&socket)? / 2;
        Ok(Self {
            socket: Mutex::new((socket, 0, sndbuf)),
        })
    }

    /// Applies `ops` in order as one transaction: all of them or, refused, none.
    ///
    /// The kernel handles a batch inside the send, so its answers are queued when the send
    /// returns: an error for each refused operation (it goes on through the batch, then drops
    /// all of it) and, asked for on the last message only (an answer per message could
    /// overflow the socket on a large batch), an acknowledgement once the batch is through.
    pub fn apply(&self, ops: &[ElementOp]) -> Result<(), NftError> {
        if ops.is_empty() {
            return Ok(());
        }
        // The socket and counter stay consistent whatever a panicking holder did.
        let mut guard = self.socket.lock().unwrap_or_else(|p| p.into_inner());
        let (socket, seq, sndbuf) = &mut *guard;
        // Answers a failed call left behind must not be read as this batch's.
        let mut stale = Vec::with_capacity(REPLY_BUF);
        while socket.recv(&mut stale, 0).is_ok() {
            stale.clear();
        }
        let first = seq.wrapping_add(1);
        // The batch's start is `first`, the operations follow; the last is acknowledged.
        let count = u32::try_from(ops.len()).map_err(|_| {
            NftError::Netlink(format!("{} element changes in one batch", ops.len()))
        })?;
        let last = first.wrapping_add(count);
        let mut buf = Vec::new();
        let mut push = |inner: NetfilterMessage, flags: u16| {
            *seq = seq.wrapping_add(1);
            let mut msg = NetlinkMessage::new(NetlinkHeader::default(), inner.into());
            msg.header.flags = NLM_F_REQUEST | flags;
            msg.header.sequence_number = *seq;
            msg.finalize();
            let at = buf.len();
            buf.resize(at + msg.buffer_len(), 0);
            msg.serialize(&mut buf[at..]);
        };
        let control = |m| {
            NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
                m,
            )
        };
        push(control(ControlMessage::BatchBegin), 0);
        for (i, op) in ops.iter().enumerate() {
            let mut flags = if op.add { NLM_F_CREATE } else { 0 };
            if i + 1 == ops.len() {
                flags |= NLM_F_ACK;
            }
            push(message(op), flags);
        }
        push(control(ControlMessage::BatchEnd), 0);
        // The kernel takes a batch in one message, which must fit the socket's send buffer
        // (about 200 KiB by default: some 500 VMs' removals); grown as nft grows its own.
        if buf.len() > *sndbuf {
            let want = buf.len().saturating_mul(2);
            rustix::net::sockopt::set_socket_send_buffer_size_force(&*socket, want)
                .or_else(|_| rustix::net::sockopt::set_socket_send_buffer_size(&*socket, want))
                .map_err(|e| NftError::Netlink(format!("grow the send buffer: {e}")))?;
            *sndbuf = rustix::net::sockopt::socket_send_buffer_size(&*socket)
                .map_err(|e| NftError::Netlink(format!("read the send buffer size: {e}")))?
                / 2;
        }
        let sent = socket
            .send(&buf, 0)
            .map_err(|e| NftError::Netlink(format!("send: {e}")))?;
        if sent != buf.len() {
            return Err(NftError::Netlink(format!(
                "sent {sent} of {} bytes",
                buf.len()
            )));
        }
        let ours = |s: u32| s.wrapping_sub(first) <= last.wrapping_sub(first);
        let mut acked = false;
        let mut refused = Vec::new();
        let mut reply = Vec::with_capacity(REPLY_BUF);
        loop {
            reply.clear();
            match socket.recv(&mut reply, 0) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(NftError::Netlink(format!("receive: {e}"))),
            }
            let mut rest = &reply[..];
            while let Ok(msg) = NetlinkMessage::<NetfilterMessage>::deserialize(rest) {
                let seq = msg.header.sequence_number;
                if let NetlinkPayload::Error(e) = &msg.payload {
                    match e.code {
                        None if seq == last => acked = true,
                        Some(code) if ours(seq) => {
                            refused.push(describe(ops, seq.wrapping_sub(first), code.get()))
                        }
                        _ => {}
                    }
                }
                // Messages are 4-byte aligned; a length too short to hold a header ends it.
                let len = (msg.header.length as usize).next_multiple_of(4);
                if len < NETLINK_HEADER_LEN || len >= rest.len() {
                    break;
                }
                rest = &rest[len..];
            }
        }
        if !refused.is_empty() {
            return Err(NftError::Refused(refused.join("; ")));
        }
        if !acked {
            return Err(NftError::Netlink(
                "the kernel did not acknowledge the batch".into(),
            ));
        }
        Ok(())
    }
}

/// The `NEWSETELEM` or `DELSETELEM` message of `op`.
fn message(op: &ElementOp) -> NetfilterMessage {
    let e = &op.element;
    let mut attrs = vec![SetElementAttribute::Key(DataAttribute::Value(key(e)))];
    if op.add {
        if let Some(v) = e.value {
            attrs.push(SetElementAttribute::Data(DataAttribute::Value(
                v.to_ne_bytes().to_vec(),
            )));
        }
        if let Some(c) = &e.comment {
            attrs.push(SetElementAttribute::UserData(comment(c)));
        }
    }
    let list = SetElementMessage {
        attributes: vec![
            SetElementList::Table(TABLE.to_string()),
            SetElementList::Set(e.set.to_string()),
            SetElementList::Elements(vec![ListAttribute::Element(attrs)]),
        ],
    };
    let msg = if op.add {
        NfTablesMessage::NewSetElement(list)
    } else {
        NfTablesMessage::DeleteSetElement(list)
    };
    NetfilterMessage::new(NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0), msg)
}

/// The key's bytes as nft lays them out: each part in turn, each a multiple of 4 bytes.
fn key(e: &Element) -> Vec<u8> {
    let mut out = Vec::new();
    for part in &e.key {
        match part {
            KeyPart::Ifname(n) => {
                // Names are metald's own (`mv` + 12 hex digits), shorter than IFNAMSIZ; a
                // longer one is cut as the kernel would refuse it anyway.
                let mut b = [0u8; IFNAMSIZ];
                let n = &n.as_bytes()[..n.len().min(IFNAMSIZ - 1)];
                b[..n.len()].copy_from_slice(n);
                out.extend_from_slice(&b);
            }
            KeyPart::Ipv6(a) => out.extend_from_slice(&a.octets()),
            KeyPart::Ipv4(a) => out.extend_from_slice(&a.octets()),
            KeyPart::Mark(m) => out.extend_from_slice(&m.to_ne_bytes()),
        }
    }
    out
}

/// An element comment as nftnl stores it: one user data item of type 0 holding the text and
/// its NUL (nft keeps comments far below the 255 bytes an item can hold; longer is cut).
fn comment(text: &str) -> Vec<u8> {
    let text = &text.as_bytes()[..text.len().min(254)];
    let mut out = vec![UDATA_COMMENT, (text.len() + 1) as u8];
    out.extend_from_slice(text);
    out.push(0);
    out
}

/// What the kernel refused: the operation (by its place in the batch) and the error.
fn describe(ops: &[ElementOp], at: u32, code: i32) -> String {
    let err = std::io::Error::from_raw_os_error(code.saturating_neg());
    // `at` 0 is the batch's start: the kernel answers there for the batch as a whole.
    match at.checked_sub(1).and_then(|i| ops.get(i as usize)) {
        Some(op) => format!(
            "{} element {} {{ {} }}: {err}",
            if op.add { "add" } else { "delete" },
            op.element.set,
            super::nft::text(&op.element)
        ),
        None => format!("the batch: {err}"),
    }
}
