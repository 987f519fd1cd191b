//! Calling metald as a client does: REST with JSON bodies, and the requests the tests send.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;

/// Minimal blocking HTTP helpers on reqwest's async client (one runtime per call keeps tests
/// plain synchronous code).
pub mod reqwest {
    /// GET and return the status code.
    pub fn blocking_get(url: &str) -> Result<u16, String> {
        super::block_on(async {
            let r = ::reqwest::get(url).await.map_err(|e| e.to_string())?;
            Ok(r.status().as_u16())
        })
    }
}

/// Runs a future to completion on a fresh current-thread runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// A REST client for one customer.
pub struct Rest {
    base: String,
    token: Option<String>,
    /// Extra headers on every request.
    headers: Vec<(String, String)>,
    /// How long one call may take, answer included (none: as long as metald takes).
    timeout: Option<Duration>,
    client: ::reqwest::Client,
    /// The runtime every call runs on, when the client keeps its connection between calls
    /// (see [`Rest::keep_alive`]); none: a fresh runtime, and so a fresh connection, per call.
    rt: Option<std::sync::Arc<tokio::runtime::Runtime>>,
}

/// An HTTP answer: status and JSON body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// JSON body (Null if none).
    pub body: Value,
}

impl Answer {
    /// The Connect error code of an error answer.
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    /// The error message of an error answer.
    pub fn message(&self) -> &str {
        self.body["message"].as_str().unwrap_or("")
    }

    /// Asserts success and returns the body.
    pub fn ok(self) -> Value {
        assert!(
            (200..300).contains(&self.status),
            "expected success, got {} {}",
            self.status,
            self.body
        );
        self.body
    }
}

impl Rest {
    /// A client acting as `customer` (None: no Authorization header).
    pub fn new(m: &Metald, customer: Option<&str>) -> Self {
        Self {
            base: m.url.clone(),
            token: customer.map(|c| format!("Bearer dev_customer_{c}")),
            headers: Vec::new(),
            timeout: None,
            client: ::reqwest::Client::new(),
            rt: None,
        }
    }

    /// The same client, keeping one connection open across calls as a control plane does
    /// (benches: a new runtime and TCP connection per call costs the client milliseconds
    /// that are not metald's). Tests keep the default: a metald restarted on the same port
    /// never meets a stale pooled connection.
    pub fn keep_alive(mut self) -> Self {
        self.rt = Some(std::sync::Arc::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
        ));
        self
    }

    /// The same client, giving up on a call after `timeout` (a killed or hung metald then
    /// ends the call with an error instead of blocking its caller).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The same client, sending `name: value` on every request too.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Sends a request with a raw body.
    pub fn raw(&self, method: &str, path: &str, body: Option<&str>) -> Answer {
        self.try_raw(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Sends a request with a raw body; an error when no answer came (connection refused or
    /// cut, or the timeout passed).
    pub fn try_raw(&self, method: &str, path: &str, body: Option<&str>) -> Result<Answer, String> {
        let method: ::reqwest::Method = method.parse().expect("method");
        let mut req = self
            .client
            .request(method, format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            req = req.header("authorization", t);
        }
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        if let Some(t) = self.timeout {
            req = req.timeout(t);
        }
        let call = async {
            let resp = req.send().await.map_err(|e| format!("request: {e}"))?;
            let status = resp.status().as_u16();
            let text = resp.text().await.map_err(|e| format!("body: {e}"))?;
            let body = if text.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or(Value::String(text))
            };
            Ok(Answer { status, body })
        };
        match &self.rt {
            Some(rt) => rt.block_on(call),
            None => block_on(call),
        }
    }

    /// Sends a JSON body; an error when no answer came (see [`Rest::try_raw`]).
    pub fn try_call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Answer, String> {
        self.try_raw(method, path, body.map(|b| b.to_string()).as_deref())
    }

    /// Sends a JSON body.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        self.raw(method, path, body.map(|b| b.to_string()).as_deref())
    }

    /// Creates a VM with the README's request (ids of the imported default guest); its id.
    pub fn create_default(&self) -> String {
        self.create(readme_request(1, 256 << 20))
    }

    /// POST /v1/vms with `body`; the new VM's id.
    pub fn create(&self, body: Value) -> String {
        let created = self.call("POST", "/v1/vms", Some(body)).ok();
        created["vm"]["vmId"].as_str().expect("vm id").to_string()
    }

    /// The VM's console (its last MiB), through the API.
    pub fn console_text(&self, id: &str) -> String {
        self.call(
            "GET",
            &format!("/v1/vms/{id}/console?tail_bytes=1048576"),
            None,
        )
        .ok()["output"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Boots the VM and waits until its guest is ready; the VM as it is then.
    pub fn boot_ready(&self, id: &str) -> Value {
        self.call("POST", &format!("/v1/vms/{id}/boot"), None).ok();
        self.wait_ready(id)
    }

    /// Stops the VM at once (`force`), without asking its guest; the VM as it is then.
    pub fn force_shutdown(&self, id: &str) -> Value {
        self.call(
            "POST",
            &format!("/v1/vms/{id}/shutdown"),
            Some(serde_json::json!({"force": true})),
        )
        .ok()
    }

    /// Creates and boots a VM, waiting until its guest is ready; its id.
    pub fn create_booted(&self, body: Value) -> String {
        let id = self.create(body);
        self.boot_ready(&id);
        id
    }

    /// GET /v1/vms/{id}'s vm.
    pub fn vm(&self, id: &str) -> Value {
        self.call("GET", &format!("/v1/vms/{id}"), None).ok()["vm"].clone()
    }

    /// Waits until the VM reports its guest ready (or panics with its console).
    pub fn wait_ready(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let vm = self.vm(id);
            if vm["guestReady"] == json!(true) {
                return vm;
            }
            let console = self
                .call("GET", &format!("/v1/vms/{id}/console"), None)
                .body;
            assert!(
                vm["state"] != json!("VM_STATE_FAILED"),
                "vm failed: {vm}\nconsole: {console}"
            );
            assert!(
                Instant::now() < deadline,
                "guest not ready in time: {vm}\nconsole: {}",
                console["output"]
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for a VM state.
    pub fn wait_state(&self, id: &str, state: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let vm = self.vm(id);
            if vm["state"] == json!(state) {
                return vm;
            }
            assert!(Instant::now() < deadline, "vm never reached {state}: {vm}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The README's CreateVm body with the default guest's ids.
/// The default VM (1 vCPU, 256 MiB) running the script in rootfs asset `script_id` after boot.
pub fn script_request(script_id: Option<&str>) -> Value {
    let mut b = readme_request(1, 256 << 20);
    if let Some(s) = script_id {
        b["config"]["kernel_args"] = json!("metald.script=/dev/vdb");
        b["config"]["drives"] = json!([{"drive_id": "script", "image_id": s, "read_only": true}]);
    }
    b
}

/// A guest script that spins its vCPU for 900 guest seconds, announcing `METALD_SPIN` straight
/// on the console (not through the script output relay a spinning vCPU would delay).
pub const SPIN_SCRIPT: &str = "echo METALD_SPIN > /dev/console\nend=$(( $(cut -d. -f1 /proc/uptime) + 900 ))\nwhile [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do :; done\nexit 0\n";

/// A JSON number that protobuf JSON may have written as a string (64-bit integers). Absent is
/// 0 (proto3 JSON omits zeros); anything else that is not a count fails the test.
pub fn num(v: &Value) -> u64 {
    match v {
        Value::Null => 0,
        Value::String(s) => s
            .parse()
            .unwrap_or_else(|e| panic!("not a count ({e}): {v}")),
        _ => v.as_u64().unwrap_or_else(|| panic!("not a count: {v}")),
    }
}

pub fn readme_request(vcpus: u32, memory: u64) -> Value {
    json!({"config": {"cpu": {"vcpu_count": vcpus}, "memory": {"size_bytes": memory},
        "kernel": {"image_id": KERNEL_ID}, "rootfs": {"image_id": ROOTFS_ID}}})
}

/// A usage sample's host wall-clock time, Unix ms.
pub fn sample_ms(s: &Value) -> i64 {
    let t = s["timestamp"].as_str().expect("sample timestamp");
    let t = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("sample timestamp {t}: {e}"));
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap()
}
