//! A minimal QMP (QEMU Machine Protocol) client.
//!
//! Hand-written because QMP is a few lines of newline-delimited JSON and the crates that model
//! the whole QAPI schema (qapi-rs) pull in far more than metald's five commands need. One
//! connection per command: QEMU's QMP socket serves one client at a time and accepts the next
//! as soon as one leaves, so nothing stays connected while idle.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::BackendError;

/// How long one QMP exchange may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes read from QMP for one command (greeting, replies and events); replies here are
/// a few KiB.
const MAX_EXCHANGE_BYTES: u64 = 1 << 20;

/// Client for one QMP socket.
#[derive(Debug, Clone)]
pub struct Qmp {
    socket: PathBuf,
}

impl Qmp {
    /// A client for the socket at `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    /// Waits until QMP answers `query-status`, for at most `timeout`; returns the run status.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<String, BackendError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.query_status().await {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// `query-status`: "running", "paused", ...
    pub async fn query_status(&self) -> Result<String, BackendError> {
        status_of(&self.execute("query-status", None).await?)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, BackendError> {
        tokio::time::timeout(
            COMMAND_TIMEOUT,
            self.execute_inner(command, arguments, None),
        )
        .await
        .map_err(|_| qmp_err(command, format!("no answer within {COMMAND_TIMEOUT:?}")))?
    }

    /// Runs one command that takes a file descriptor by name (`fd:NAME` migration URIs): on
    /// the same connection, `getfd` first hands `fd` to QEMU as `fdname`, passed over the
    /// socket (SCM_RIGHTS), so QEMU never opens a path itself.
    pub async fn execute_with_fd(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        fdname: &str,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, BackendError> {
        tokio::time::timeout(
            COMMAND_TIMEOUT,
            self.execute_inner(command, arguments, Some((fd, fdname))),
        )
        .await
        .map_err(|_| qmp_err(command, format!("no answer within {COMMAND_TIMEOUT:?}")))?
    }

    async fn execute_inner(
        &self,
        command: &str,
        arguments: Option<Value>,
        pass: Option<(std::os::fd::BorrowedFd<'_>, &str)>,
    ) -> Result<Value, BackendError> {
        let stream = crate::console::connect_vm_socket(&self.socket)
            .await
            .map_err(|e| qmp_err(command, format!("connect {}: {e}", self.socket.display())))?;
        if let Some((fd, fdname)) = pass {
            // Written before anything else: QEMU reads commands in order, and the greeting it
            // sends first waits in the socket meanwhile.
            let capabilities = format!("{}\n", json!({"execute": "qmp_capabilities"}));
            write_all(&stream, capabilities.as_bytes(), None, command).await?;
            let getfd = format!(
                "{}\n",
                json!({"execute": "getfd", "arguments": {"fdname": fdname}})
            );
            write_all(&stream, getfd.as_bytes(), Some(fd), command).await?;
        }
        let (read, mut write) = stream.into_split();
        // A QEMU taken over by its guest could send one endless line: the whole exchange is
        // capped, and beyond the cap the reply is "connection closed".
        let mut lines = BufReader::new(read.take(MAX_EXCHANGE_BYTES)).lines();
        let greeting = next_message(&mut lines, command).await?;
        if greeting.get("QMP").is_none() {
            return Err(qmp_err(command, format!("not a QMP greeting: {greeting}")));
        }
        let mut request = json!({"execute": command});
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let wire = if pass.is_some() {
            format!("{request}\n")
        } else {
            format!("{}\n{request}\n", json!({"execute": "qmp_capabilities"}))
        };
        write
            .write_all(wire.as_bytes())
            .await
            .map_err(|e| qmp_err(command, e.to_string()))?;
        // The replies follow in order (capabilities, getfd when an fd is passed, then the
        // command), with events interleaved.
        let expected = if pass.is_some() { 3 } else { 2 };
        let mut replies = 0;
        loop {
            let msg = next_message(&mut lines, command).await?;
            let Message::Return(ret) = read_message(command, msg)? else {
                continue;
            };
            replies += 1;
            if replies == expected {
                return Ok(ret);
            }
        }
    }
}

/// Writes all of `bytes` to the socket, with `fd` attached to the first byte (SCM_RIGHTS)
/// when given: tokio's stream has no way to pass descriptors, so this is `sendmsg` on its fd.
async fn write_all(
    stream: &tokio::net::UnixStream,
    mut bytes: &[u8],
    mut fd: Option<std::os::fd::BorrowedFd<'_>>,
    command: &str,
) -> Result<(), BackendError> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    while !bytes.is_empty() {
        stream
            .writable()
            .await
            .map_err(|e| qmp_err(command, e.to_string()))?;
        let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let fds = fd.as_slice();
            let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                return Err(std::io::Error::other("no room for the descriptor"));
            }
            rustix::net::sendmsg(
                stream,
                &[std::io::IoSlice::new(bytes)],
                &mut control,
                SendFlags::NOSIGNAL,
            )
            .map_err(std::io::Error::from)
        });
        match sent {
            Ok(n) => {
                bytes = &bytes[n..];
                // The descriptor went with the first byte sent.
                fd = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(qmp_err(command, e.to_string())),
        }
    }
    Ok(())
}

/// One message QMP sends after the greeting.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// An asynchronous event (`{"event": ...}`), which can come between any two replies.
    Event,
    /// A command's success reply: its `return` value (null when QEMU sent none).
    Return(Value),
}

/// Sorts one parsed QMP message into an event, a success reply, or the command's error (its
/// `desc`). Public, though hidden, so the fuzz target and the corpus replay test read QEMU's
/// replies exactly as a live connection does.
#[doc(hidden)]
pub fn read_message(command: &str, msg: Value) -> Result<Message, BackendError> {
    if msg.get("event").is_some() {
        return Ok(Message::Event);
    }
    if let Some(err) = msg.get("error") {
        let desc = err.get("desc").and_then(Value::as_str).unwrap_or("error");
        return Err(qmp_err(command, desc.to_string()));
    }
    Ok(Message::Return(
        msg.get("return").cloned().unwrap_or(Value::Null),
    ))
}

async fn next_message(
    lines: &mut tokio::io::Lines<BufReader<tokio::io::Take<tokio::net::unix::OwnedReadHalf>>>,
    command: &str,
) -> Result<Value, BackendError> {
    let line = lines
        .next_line()
        .await
        .map_err(|e| qmp_err(command, e.to_string()))?
        .ok_or_else(|| qmp_err(command, "connection closed".into()))?;
    parse(command, &line)
}

/// Parses one line QMP sent; hidden public for the fuzz target, like [`read_message`].
#[doc(hidden)]
pub fn parse(command: &str, line: &str) -> Result<Value, BackendError> {
    serde_json::from_str(line).map_err(|e| {
        let shown = crate::domain::truncate_for_message(line);
        qmp_err(command, format!("bad JSON {shown:?}: {e}"))
    })
}

/// The run status in a `query-status` reply; hidden public for the fuzz target.
#[doc(hidden)]
pub fn status_of(ret: &Value) -> Result<String, BackendError> {
    ret.get("status")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| qmp_err("query-status", format!("unexpected reply {ret}")))
}

fn qmp_err(command: &str, reason: String) -> BackendError {
    BackendError::Api {
        request: format!("QMP {command}"),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A scripted QMP server: greeting, then answers with events sprinkled in.
    async fn fake_server(path: &Path, reply: Value) {
        let listener = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            write
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let caps = lines.next_line().await.unwrap().unwrap();
            assert!(caps.contains("qmp_capabilities"));
            write.write_all(b"{\"return\": {}}\n").await.unwrap();
            let _cmd = lines.next_line().await.unwrap().unwrap();
            write
                .write_all(b"{\"event\": \"STOP\", \"timestamp\": {}}\n")
                .await
                .unwrap();
            write
                .write_all(format!("{reply}\n").as_bytes())
                .await
                .unwrap();
        });
    }

    #[tokio::test]
    async fn skips_events_and_reads_the_return() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        fake_server(
            &sock,
            json!({"return": {"status": "paused", "running": false}}),
        )
        .await;
        assert_eq!(Qmp::new(&sock).query_status().await.unwrap(), "paused");
    }

    #[tokio::test]
    async fn reports_qmp_errors() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        fake_server(
            &sock,
            json!({"error": {"class": "GenericError", "desc": "nope"}}),
        )
        .await;
        let err = Qmp::new(&sock).execute("stop", None).await.unwrap_err();
        assert_eq!(err.to_string(), "VMM API QMP stop: nope");
    }

    #[tokio::test]
    async fn an_endless_greeting_is_cut_off_at_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = std::sync::Arc::clone(&sent);
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            // A line that never ends, as a QEMU taken over by its guest could send.
            let chunk = vec![b'x'; 64 * 1024];
            while stream.write_all(&chunk).await.is_ok() {
                counter.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let err = Qmp::new(&sock)
            .query_status()
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad JSON") || err.contains("closed"), "{err}");
        // Stopped near the cap, not after the whole timeout's worth of data.
        let read = sent.load(std::sync::atomic::Ordering::SeqCst);
        assert!(read < 8 * MAX_EXCHANGE_BYTES, "{read}");
    }
}
