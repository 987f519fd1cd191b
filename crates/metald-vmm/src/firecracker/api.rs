//! A typed client for Firecracker's REST API over its Unix socket.
//!
//! Written against Firecracker v1.16.1's `src/firecracker/swagger/firecracker.yaml`; only the
//! endpoints metald uses are modelled. Each request uses a fresh HTTP/1.1 connection, which the
//! API server handles cheaply and which keeps this client free of connection state.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
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

/// Client for one Firecracker API socket.
#[derive(Debug, Clone)]
pub struct FirecrackerApi {
    socket: PathBuf,
}

impl FirecrackerApi {
    /// A client for the socket at `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
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
                // A failed connect costs microseconds, and a start's first ~10 ms are spent
                // here: ask often at first, then back off for a VMM that is slow to come up.
                Err(_) if start.elapsed() < Duration::from_millis(100) => {
                    tokio::time::sleep(Duration::from_micros(500)).await
                }
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
        let what = what.to_string();
        let stream = crate::console::connect_vm_socket(&self.socket)
            .await
            .map_err(|e| api_err(&what, format!("connect {}: {e}", self.socket.display())))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| api_err(&what, e.to_string()))?;
        // Aborted however this call ends (a timeout drops it mid-way): never a stray task.
        let conn_task = AbortOnDrop(tokio::spawn(conn));
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
            .map_err(|e| api_err(&what, e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| api_err(&what, e.to_string()))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| api_err(&what, e.to_string()))?
            .to_bytes();
        drop(conn_task);
        if status.is_success() {
            return Ok(bytes);
        }
        let reason = serde_json::from_slice::<ApiError>(&bytes)
            .map(|e| e.fault_message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        Err(api_err(&what, format!("{}: {reason}", status_text(status))))
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
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
mod tests {
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
