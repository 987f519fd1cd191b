//! A typed client for Firecracker's REST API over its Unix socket.
//!
//! Written against Firecracker v1.16.1's `src/firecracker/swagger/firecracker.yaml`; only the
//! endpoints metald uses are modelled. A client keeps its HTTP/1.1 connection between calls
//! (Firecracker's API server keeps connections alive), so a boot's six calls make one
//! connection, not six; a call that did not end cleanly drops it, and the next one connects
//! again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::BackendError;

/// How long one API call may take: the VMM may be taken over by its guest and never answer.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body read; Firecracker's are a few hundred bytes.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// How long a snapshot may take to write or load: its memory file is as large as the guest's
/// memory (1 GiB on a slow disk is seconds).
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

/// `PUT /boot-source`.
#[derive(Debug, Clone, Serialize)]
pub struct BootSource {
    /// Host path of the ELF kernel.
    pub kernel_image_path: String,
    /// Kernel command line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Host path of the initrd.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, Serialize)]
pub struct Drive {
    /// Drive name (also the path segment).
    pub drive_id: String,
    /// Host path of the image.
    pub path_on_host: String,
    /// The guest's root device.
    pub is_root_device: bool,
    /// Attached read-only.
    pub is_read_only: bool,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkInterface {
    /// Interface name (also the path segment).
    pub iface_id: String,
    /// The TAP on the host (inside the VM's namespace).
    pub host_dev_name: String,
    /// The guest's MAC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Limit on traffic to the guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Limit on traffic from the guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// Firecracker's rate limiter (only its bandwidth bucket is used).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateLimiter {
    /// Bytes.
    pub bandwidth: TokenBucket,
}

/// A token bucket: `size` tokens refilled every `refill_time` ms, plus a one-time burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TokenBucket {
    /// Bucket size.
    pub size: u64,
    /// Extra tokens available once, at the start.
    pub one_time_burst: u64,
    /// Milliseconds to refill `size` tokens.
    pub refill_time: u64,
}

/// Refill period used for metald's limits: short enough to keep the rate smooth.
const REFILL_MS: u64 = 100;

impl From<crate::domain::RateLimit> for RateLimiter {
    /// A sustained rate of `bandwidth_bytes_per_sec` (a bucket refilled every 100 ms) plus
    /// `burst_bytes` once.
    fn from(l: crate::domain::RateLimit) -> Self {
        Self {
            bandwidth: TokenBucket {
                size: (l.bandwidth_bytes_per_sec * REFILL_MS / 1000).max(1),
                one_time_burst: l.burst_bytes,
                refill_time: REFILL_MS,
            },
        }
    }
}

/// `PUT /machine-config`.
#[derive(Debug, Clone, Serialize)]
pub struct MachineConfiguration {
    /// vCPUs (1-32).
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading.
    pub smt: bool,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
}

/// Actions Firecracker accepts on `PUT /actions`.
#[derive(Debug, Clone, Copy, Serialize)]
pub enum ActionType {
    /// Boot the configured guest.
    InstanceStart,
    /// Press Ctrl-Alt-Del on the guest's i8042 keyboard.
    SendCtrlAltDel,
    /// Write metrics now.
    FlushMetrics,
}

/// `PUT /snapshot/create`: a full snapshot of a paused VM.
#[derive(Debug, Clone, Serialize)]
struct SnapshotCreate<'a> {
    snapshot_type: &'static str,
    snapshot_path: &'a str,
    mem_file_path: &'a str,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, Serialize)]
struct SnapshotLoad<'a> {
    snapshot_path: &'a str,
    mem_backend: MemBackend<'a>,
    resume_vm: bool,
}

/// Where a loaded snapshot's memory comes from.
#[derive(Debug, Clone, Serialize)]
struct MemBackend<'a> {
    backend_type: &'static str,
    backend_path: &'a str,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Serialize)]
pub struct Vm {
    /// Target state.
    pub state: VmRunState,
}

/// States `PATCH /vm` moves to.
#[derive(Debug, Clone, Copy, Serialize)]
pub enum VmRunState {
    /// Freeze vCPUs.
    Paused,
    /// Unfreeze vCPUs.
    Resumed,
}

/// `GET /`.
#[derive(Debug, Clone, Deserialize)]
pub struct InstanceInfo {
    /// Instance id given with `--id`.
    pub id: String,
    /// "Not started", "Running" or "Paused".
    pub state: String,
    /// Firecracker's version.
    pub vmm_version: String,
}

/// Firecracker's error body.
#[derive(Debug, Clone, Deserialize)]
struct ApiError {
    fault_message: String,
}

/// Client for one Firecracker API socket. Clones share its connection.
#[derive(Clone)]
pub struct FirecrackerApi {
    socket: PathBuf,
    /// The connection a finished call left open, taken by the next call; a call holds the lock
    /// for its whole exchange, so calls through clones wait for each other, as the API server
    /// answers one request at a time anyway.
    kept: Arc<tokio::sync::Mutex<Option<Connection>>>,
}

impl std::fmt::Debug for FirecrackerApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirecrackerApi")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// One HTTP/1.1 connection to the API server, driven by its own task.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    /// Aborted with the connection however the call using it ends: never a stray task.
    _driver: AbortOnDrop<Result<(), hyper::Error>>,
}

impl FirecrackerApi {
    /// A client for the socket at `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
            kept: Arc::default(),
        }
    }

    /// Waits until the API answers `GET /`, for at most `timeout`. The socket file can appear
    /// before Firecracker listens on it (seen with 150+ VMs starting at once), so refused
    /// connections are retried too.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<InstanceInfo, BackendError> {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            match self.instance_info().await {
                Ok(info) => return Ok(info),
                Err(e) if Instant::now() >= deadline => return Err(e),
                // A failed connect costs microseconds, and a start's first milliseconds are
                // spent here: ask often at first, then back off for a VMM that is slow to come
                // up.
                Err(_) if start.elapsed() < Duration::from_millis(100) => pause(READY_POLL).await,
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// `GET /`.
    pub async fn instance_info(&self) -> Result<InstanceInfo, BackendError> {
        let body = self.call(Method::GET, "/", None).await?;
        serde_json::from_slice(&body).map_err(|e| api_err("GET /", e.to_string()))
    }

    /// `PUT /machine-config`.
    pub async fn put_machine_config(&self, cfg: &MachineConfiguration) -> Result<(), BackendError> {
        self.send(Method::PUT, "/machine-config", cfg).await
    }

    /// `PUT /boot-source`.
    pub async fn put_boot_source(&self, src: &BootSource) -> Result<(), BackendError> {
        self.send(Method::PUT, "/boot-source", src).await
    }

    /// `PUT /drives/{drive_id}`.
    pub async fn put_drive(&self, drive: &Drive) -> Result<(), BackendError> {
        self.send(Method::PUT, &format!("/drives/{}", drive.drive_id), drive)
            .await
    }

    /// `PUT /network-interfaces/{iface_id}`.
    pub async fn put_network_interface(&self, nic: &NetworkInterface) -> Result<(), BackendError> {
        self.send(
            Method::PUT,
            &format!("/network-interfaces/{}", nic.iface_id),
            nic,
        )
        .await
    }

    /// `PUT /actions`.
    pub async fn action(&self, action_type: ActionType) -> Result<(), BackendError> {
        self.send(Method::PUT, "/actions", &InstanceActionInfo { action_type })
            .await
    }

    /// `PUT /snapshot/create`: writes the paused VM's device state to `state` and its memory
    /// to `memory` (paths as the VMM sees them). Writing the memory takes time in proportion
    /// to its size: this call waits up to [`SNAPSHOT_TIMEOUT`].
    pub async fn create_snapshot(&self, state: &Path, memory: &Path) -> Result<(), BackendError> {
        let body = SnapshotCreate {
            snapshot_type: "Full",
            snapshot_path: utf8(state)?,
            mem_file_path: utf8(memory)?,
        };
        self.send_within(SNAPSHOT_TIMEOUT, Method::PUT, "/snapshot/create", &body)
            .await
    }

    /// `PUT /snapshot/load` into this fresh VMM, resuming the guest at once; its memory is
    /// mapped from `memory`, which must stay while the VM runs.
    pub async fn load_snapshot(&self, state: &Path, memory: &Path) -> Result<(), BackendError> {
        let body = SnapshotLoad {
            snapshot_path: utf8(state)?,
            mem_backend: MemBackend {
                backend_type: "File",
                backend_path: utf8(memory)?,
            },
            resume_vm: true,
        };
        self.send_within(SNAPSHOT_TIMEOUT, Method::PUT, "/snapshot/load", &body)
            .await
    }

    /// `PATCH /vm`.
    pub async fn patch_vm(&self, state: VmRunState) -> Result<(), BackendError> {
        self.send(Method::PATCH, "/vm", &Vm { state }).await
    }

    async fn send<T: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: &T,
    ) -> Result<(), BackendError> {
        self.send_within(API_TIMEOUT, method, path, body).await
    }

    async fn send_within<T: Serialize>(
        &self,
        timeout: Duration,
        method: Method,
        path: &str,
        body: &T,
    ) -> Result<(), BackendError> {
        let json = serde_json::to_vec(body).map_err(|e| api_err(path, e.to_string()))?;
        self.call_within(timeout, method, path, Some(json))
            .await
            .map(drop)
    }

    /// One request, capped in time ([`API_TIMEOUT`]) and in response size.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, BackendError> {
        self.call_within(API_TIMEOUT, method, path, body).await
    }

    /// One request, capped at `timeout` and in response size.
    async fn call_within(
        &self,
        timeout: Duration,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, BackendError> {
        let what = format!("{method} {path}");
        tokio::time::timeout(timeout, self.exchange(&what, method, path, body))
            .await
            .map_err(|_| api_err(&what, format!("no answer within {timeout:?}")))?
    }

    async fn exchange(
        &self,
        what: &str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, BackendError> {
        let mut kept = self.kept.lock().await;
        // A kept connection the server has closed since is replaced before anything is sent
        // on it.
        let reusable = match kept.take() {
            Some(mut c) => c.sender.ready().await.is_ok().then_some(c),
            None => None,
        };
        let reused = reusable.is_some();
        let mut conn = match reusable {
            Some(c) => c,
            None => self.connect(what).await?,
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| api_err(what, e.to_string()))?;
        let resp = match conn.sender.try_send_request(req).await {
            Ok(resp) => resp,
            // A kept connection that closed after the check: the request was handed back
            // unsent, so it goes once, on a new connection. A request that went out is never
            // sent again.
            Err(mut e) => match e.take_message().filter(|_| reused) {
                Some(req) => {
                    conn = self.connect(what).await?;
                    conn.sender
                        .send_request(req)
                        .await
                        .map_err(|e| api_err(what, e.to_string()))?
                }
                None => return Err(api_err(what, e.into_error().to_string())),
            },
        };
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| api_err(what, e.to_string()))?
            .to_bytes();
        // The whole answer was read: the connection is ready for the next call. Any error or
        // timeout above dropped it instead.
        *kept = Some(conn);
        if status.is_success() {
            return Ok(bytes);
        }
        let reason = serde_json::from_slice::<ApiError>(&bytes)
            .map(|e| e.fault_message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        Err(api_err(what, format!("{}: {reason}", status_text(status))))
    }

    /// A new connection to the API socket (checked to be a socket, never followed).
    async fn connect(&self, what: &str) -> Result<Connection, BackendError> {
        let stream = crate::console::connect_vm_socket(&self.socket)
            .await
            .map_err(|e| api_err(what, format!("connect {}: {e}", self.socket.display())))?;
        let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| api_err(what, e.to_string()))?;
        Ok(Connection {
            sender,
            _driver: AbortOnDrop(tokio::spawn(driver)),
        })
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often [`FirecrackerApi::wait_ready`] asks during a start's first 100 ms. Firecracker's
/// API server comes up about 1 ms after its exec here.
const READY_POLL: Duration = Duration::from_micros(250);

/// Sleeps `d` on a timerfd. tokio's timer counts whole milliseconds, so a sleep of 500 µs
/// lasted 1-2 ms: a VMM whose API came up just after the first probe was asked again that
/// much later (the start's wait for it read 0.3-0.5 ms when the first probe found it up and
/// 1.5-2.8 ms otherwise, scale bench, 2026-12-04). Falls back to tokio's sleep if the kernel
/// refuses a timerfd.
async fn pause(d: Duration) {
    use rustix::time::{
        timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags,
        TimerfdTimerFlags, Timespec,
    };
    let timer = || -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        let value = Timespec::try_from(d).map_err(std::io::Error::other)?;
        timerfd_settime(
            &fd,
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: value,
            },
        )?;
        // SAFETY: the AsyncFd owns the timerfd, so it stays open and unchanged while
        // registered.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(std::io::Error::from)
    };
    match timer() {
        Ok(fd) => {
            if fd.readable().await.is_err() {
                tokio::time::sleep(d).await;
            }
        }
        Err(_) => tokio::time::sleep(d).await,
    }
}

fn utf8(p: &Path) -> Result<&str, BackendError> {
    p.to_str()
        .ok_or_else(|| BackendError::Unsupported(format!("path {} is not UTF-8", p.display())))
}

fn status_text(status: StatusCode) -> String {
    format!("HTTP {}", status.as_u16())
}

fn api_err(request: &str, reason: String) -> BackendError {
    BackendError::Api {
        request: request.to_string(),
        reason,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn bodies_match_the_swagger_shapes() {
        let v = |x: &dyn erased::Ser| x.json();
        assert_eq!(
            v(&BootSource {
                kernel_image_path: "/k".into(),
                boot_args: Some("console=ttyS0".into()),
                initrd_path: None
            }),
            r#"{"kernel_image_path":"/k","boot_args":"console=ttyS0"}"#
        );
        assert_eq!(
            v(&InstanceActionInfo {
                action_type: ActionType::SendCtrlAltDel
            }),
            r#"{"action_type":"SendCtrlAltDel"}"#
        );
        assert_eq!(
            v(&Vm {
                state: VmRunState::Paused
            }),
            r#"{"state":"Paused"}"#
        );
        assert_eq!(
            v(&MachineConfiguration {
                vcpu_count: 2,
                mem_size_mib: 256,
                smt: false
            }),
            r#"{"vcpu_count":2,"mem_size_mib":256,"smt":false}"#
        );
    }

    mod erased {
        pub trait Ser {
            fn json(&self) -> String;
        }
        impl<T: serde::Serialize> Ser for T {
            fn json(&self) -> String {
                serde_json::to_string(self).unwrap()
            }
        }
    }

    /// A hostile "Firecracker" on a Unix socket: `answer` writes what it likes to each client.
    fn hostile(dir: &Path, answer: Vec<u8>) -> FirecrackerApi {
        let path = dir.join("api.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut s, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let _ = s.write_all(&answer).await;
                    // Then never answer again, never close.
                    std::future::pending::<()>().await;
                    drop(s);
                });
            }
        });
        FirecrackerApi::new(&path)
    }

    /// Called with each request line a fake Firecracker receives, before it answers.
    pub(crate) type OnRequest = Arc<dyn Fn(&str) + Send + Sync>;

    /// A "Firecracker" that answers each request with 204, closing the connection after
    /// `answers_per_connection` answers (none: keeps it), saying so in its last answer if
    /// `says_close`; the count of connections it took.
    fn counting(
        dir: &Path,
        answers_per_connection: Option<usize>,
        says_close: bool,
    ) -> (FirecrackerApi, Arc<std::sync::atomic::AtomicUsize>) {
        answering(
            dir,
            answers_per_connection,
            says_close,
            Arc::new(|_: &str| {}),
        )
    }

    /// [`counting`], calling `on_request` with each request line.
    pub(crate) fn answering(
        dir: &Path,
        answers_per_connection: Option<usize>,
        says_close: bool,
        on_request: OnRequest,
    ) -> (FirecrackerApi, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let path = dir.join("api.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
            while let Ok((s, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let on_request = Arc::clone(&on_request);
                tokio::spawn(async move {
                    let mut s = BufReader::new(s);
                    let mut answered = 0;
                    loop {
                        // Request line and headers, then the body its Content-Length names.
                        let mut length = 0;
                        let mut first = true;
                        loop {
                            let mut line = String::new();
                            if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if std::mem::take(&mut first) {
                                on_request(line.trim_end());
                            }
                            if let Some(v) =
                                line.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                length = v.trim().parse().unwrap();
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0; length];
                        s.read_exact(&mut body).await.unwrap();
                        answered += 1;
                        let last = answers_per_connection.is_some_and(|n| answered >= n);
                        let close = if last && says_close {
                            "Connection: close\r\n"
                        } else {
                            ""
                        };
                        let answer = format!("HTTP/1.1 204 No Content\r\n{close}\r\n");
                        s.get_mut().write_all(answer.as_bytes()).await.unwrap();
                        if last {
                            return;
                        }
                    }
                });
            }
        });
        (FirecrackerApi::new(&path), connections)
    }

    #[tokio::test]
    async fn calls_share_one_connection_and_connect_again_once_the_server_closed_it() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let (api, connections) = counting(dir.path(), None, false);
        api.patch_vm(VmRunState::Paused).await.unwrap();
        api.action(ActionType::InstanceStart).await.unwrap();
        api.clone().patch_vm(VmRunState::Resumed).await.unwrap();
        assert_eq!(connections.load(Ordering::SeqCst), 1);

        // A server that closes after each answer, saying so or not: every call still gets its
        // answer, each on a connection of its own.
        for says_close in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (api, connections) = counting(dir.path(), Some(1), says_close);
            for _ in 0..20 {
                api.patch_vm(VmRunState::Paused).await.unwrap();
            }
            assert_eq!(connections.load(Ordering::SeqCst), 20);
        }
    }

    #[tokio::test]
    async fn a_call_cut_off_mid_answer_leaves_no_connection_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        // Promises a body it never sends, and keeps the connection open.
        let cut = hostile(
            dir.path(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc".to_vec(),
        );
        let slow = cut.clone();
        let err = tokio::time::timeout(Duration::from_millis(200), slow.instance_info()).await;
        assert!(err.is_err(), "no whole answer came");
        assert!(
            cut.kept.lock().await.is_none(),
            "the cut connection was dropped"
        );
    }

    #[tokio::test]
    async fn a_pause_waits_at_least_its_time() {
        for d in [READY_POLL, Duration::from_millis(3)] {
            let t = Instant::now();
            pause(d).await;
            assert!(t.elapsed() >= d, "{:?} for {d:?}", t.elapsed());
        }
    }

    /// The API socket appears a while after the probes began (the VMM's exec and start).
    #[tokio::test]
    async fn wait_ready_finds_an_api_that_comes_up_late() {
        let dir = tempfile::tempdir().unwrap();
        let api = FirecrackerApi::new(&dir.path().join("api.sock"));
        let body = r#"{"id":"vm","state":"Not started","vmm_version":"1.16.1"}"#;
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let late = dir.path().to_path_buf();
        let server = tokio::spawn(async move {
            pause(Duration::from_millis(5)).await;
            hostile(&late, answer.into_bytes())
        });
        let info = api.wait_ready(Duration::from_secs(10)).await.unwrap();
        assert_eq!(info.state, "Not started");
        drop(server.await.unwrap());
    }

    // Paused clock: the 10 s timeout passes at once when nothing else can run.
    #[tokio::test(start_paused = true)]
    async fn a_silent_vmm_times_out_and_an_endless_one_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let silent = hostile(dir.path(), Vec::new());
        let err = silent.instance_info().await.unwrap_err().to_string();
        assert!(err.contains("no answer within"), "{err}");

        let big = tempfile::tempdir().unwrap();
        // Headers promise 100 MB and 1 MB follows: reading stops at the cap.
        let mut answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n".to_vec();
        answer.extend(std::iter::repeat_n(b'a', 1 << 20));
        let endless = hostile(big.path(), answer);
        let err = endless.instance_info().await.unwrap_err().to_string();
        assert!(err.contains("length limit exceeded"), "{err}");
    }
}
