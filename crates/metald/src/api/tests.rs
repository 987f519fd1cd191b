//! The API in-process: the real router served on a loopback port and called with a real HTTP
//! client, over the lifecycle service with a fake backend and isolation. Routes, auth, tenancy
//! and error mapping need neither root nor a VMM.

use std::sync::Arc;

use connectrpc::client::{ClientConfig, HttpClient};
use connectrpc::{ErrorCode, Protocol};
use metald_proto::metald::v1 as pb;
use serde_json::{json, Value};

use super::auth::Authenticator;
use super::{routers, ApiSettings};
use crate::config::RequestLimits;
use crate::testing::{fixture, Fixture, QUOTA_VMS};

/// The router `routers` builds, listening on a free loopback port until the test ends.
struct Served {
    base: String,
    client: reqwest::Client,
    _server: tokio::task::JoinHandle<()>,
}

async fn serve(app: axum::Router) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        crate::listener::serve(listener, app, None, std::future::pending())
            .await
            .unwrap();
    });
    Served {
        base,
        client: reqwest::Client::new(),
        _server: server,
    }
}

/// One answer: status, Connect error code (if any) and body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
    fn message(&self) -> &str {
        self.body["message"].as_str().unwrap_or("")
    }
}

impl Served {
    /// One request with `authorization` as its Authorization header (none if `None`).
    async fn call(
        &self,
        authorization: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Answer {
        let mut req = self.client.request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            format!("{}{path}", self.base),
        );
        if let Some(value) = authorization {
            req = req.header("Authorization", value);
        }
        if path.starts_with("/metald.v1.VmService/") {
            req = req.header("Content-Type", "application/json");
        }
        if let Some(body) = body {
            req = req.body(body.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn rest(&self, who: &str, method: &str, path: &str, body: Option<Value>) -> Answer {
        self.call(
            Some(&bearer(who)),
            method,
            path,
            body.map(|b| b.to_string()).as_deref(),
        )
        .await
    }

    /// BootVm over Connect JSON asking for a `timeout_ms` deadline; the answer's body.
    async fn boot_with_deadline(&self, who: &str, id: &str, timeout_ms: u64) -> Value {
        self.client
            .post(format!("{}/metald.v1.VmService/BootVm", self.base))
            .header("Authorization", bearer(who))
            .header("Content-Type", "application/json")
            .header("Connect-Timeout-Ms", timeout_ms.to_string())
            .body(json!({ "vmId": id }).to_string())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn create(&self, who: &str) -> String {
        let r = self.rest(who, "POST", "/v1/vms", Some(request())).await;
        assert_eq!(r.status, 201, "{r:?}");
        r.body["vm"]["vmId"].as_str().unwrap().to_string()
    }
}

/// The dev token of customer `who`.
fn bearer(who: &str) -> String {
    format!("Bearer dev_customer_{who}")
}

/// A valid CreateVm body for the fixture's images.
fn request() -> Value {
    json!({"config": {"cpu": {"vcpu_count": 1}, "memory": {"size_bytes": 128 << 20},
        "kernel": {"image_id": "k"}, "rootfs": {"image_id": "r"}}})
}

/// Dev auth, a rate no test reaches, and `/metrics` on the API port unless `separate`.
fn settings(separate_metrics: bool) -> ApiSettings {
    ApiSettings {
        auth: Arc::new(Authenticator::dev()),
        limits: RequestLimits {
            rate_per_second: 100_000,
            burst: 100_000,
            max_deadline: std::time::Duration::from_secs(60),
        },
        separate_metrics,
        metrics_token: None,
        peers: Arc::new(crate::api::forward::Peers::new(
            crate::fleet::HostId::local(),
            None,
        )),
    }
}

async fn api(f: &Fixture) -> Served {
    serve(routers(Arc::clone(&f.svc), settings(false)).api).await
}

#[tokio::test]
async fn every_rest_route_and_connect_answers_through_the_router() {
    let f = fixture();
    let s = api(&f).await;
    let id = s.create("acme").await;
    let state = |r: &Answer| r.body["vm"]["state"].as_str().unwrap_or("").to_string();
    for (method, path, want) in [
        ("GET", format!("/v1/vms/{id}"), "VM_STATE_CREATED"),
        ("POST", format!("/v1/vms/{id}/boot"), "VM_STATE_RUNNING"),
        ("POST", format!("/v1/vms/{id}/pause"), "VM_STATE_PAUSED"),
        ("POST", format!("/v1/vms/{id}/resume"), "VM_STATE_RUNNING"),
        ("POST", format!("/v1/vms/{id}/reboot"), "VM_STATE_RUNNING"),
        (
            "POST",
            format!("/v1/vms/{id}/shutdown"),
            "VM_STATE_SHUTDOWN",
        ),
    ] {
        let r = s.rest("acme", method, &path, None).await;
        assert_eq!(
            (r.status, state(&r).as_str()),
            (200, want),
            "{method} {path}: {r:?}"
        );
    }
    let listed = s.rest("acme", "GET", "/v1/vms", None).await;
    assert_eq!(listed.body["vms"][0]["vmId"], json!(id), "{listed:?}");
    let console = s
        .rest("acme", "GET", &format!("/v1/vms/{id}/console"), None)
        .await;
    assert_eq!(console.status, 200, "{console:?}");
    let usage = s
        .rest("acme", "GET", &format!("/v1/vms/{id}/usage"), None)
        .await;
    assert_eq!(usage.status, 200, "{usage:?}");
    let window = s.rest("acme", "GET", "/v1/usage", None).await;
    assert_eq!(window.status, 200, "{window:?}");
    // The same service over Connect JSON, on the same port.
    let body = json!({"vm_id": id}).to_string();
    let r = s
        .call(
            Some(&bearer("acme")),
            "POST",
            "/metald.v1.VmService/GetVmInfo",
            Some(&body),
        )
        .await;
    assert_eq!(
        (r.status, state(&r).as_str()),
        (200, "VM_STATE_SHUTDOWN"),
        "{r:?}"
    );
    let r = s
        .rest("acme", "DELETE", &format!("/v1/vms/{id}"), None)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        f.backend.calls(),
        [
            "create",
            "boot",
            "pause",
            "resume",
            "shutdown Graceful(10s)",
            "boot",
            "shutdown Graceful(10s)",
            "delete"
        ]
        .map(String::from)
    );
    // Unknown routes and methods.
    assert_eq!(s.rest("acme", "GET", "/v1/nothing", None).await.status, 404);
    assert_eq!(s.rest("acme", "PUT", "/v1/vms", None).await.status, 405);
}

#[tokio::test]
async fn callers_without_valid_credentials_are_refused_and_health_needs_none() {
    let f = fixture();
    let s = api(&f).await;
    let body = json!({"vm_id": "vm-00000000-0000-4000-8000-000000000000"}).to_string();
    for header in [
        None,
        Some("Basic YWxpY2U6eA=="),
        Some("Bearer dev_customer_"),
        Some("Bearer dev_customer_a/b"),
        Some("Bearer eyJhbGciOiJub25lIn0.e30."),
    ] {
        for (method, path, body) in [
            ("GET", "/v1/vms", None),
            ("POST", "/v1/vms", Some(request().to_string())),
            ("POST", "/metald.v1.VmService/GetVmInfo", Some(body.clone())),
        ] {
            let r = s.call(header, method, path, body.as_deref()).await;
            assert_eq!(
                (r.status, r.code()),
                (401, "unauthenticated"),
                "{header:?} {path}: {r:?}"
            );
        }
    }
    assert!(f.backend.calls().is_empty(), "nothing reached the backend");
    for path in ["/healthz", "/readyz"] {
        assert_eq!(s.call(None, "GET", path, None).await.status, 200, "{path}");
    }
}

#[tokio::test]
async fn another_customers_vm_is_indistinguishable_from_one_that_never_existed() {
    let f = fixture();
    let s = api(&f).await;
    let id = s.create("alice").await;
    s.rest("alice", "POST", &format!("/v1/vms/{id}/boot"), None)
        .await;
    let never = "vm-00000000-0000-4000-8000-000000000000";
    for target in [id.as_str(), never] {
        for (method, path) in [
            ("GET", format!("/v1/vms/{target}")),
            ("GET", format!("/v1/vms/{target}/console")),
            ("GET", format!("/v1/vms/{target}/usage")),
            ("POST", format!("/v1/vms/{target}/boot")),
            ("POST", format!("/v1/vms/{target}/pause")),
            ("POST", format!("/v1/vms/{target}/resume")),
            ("POST", format!("/v1/vms/{target}/reboot")),
            ("POST", format!("/v1/vms/{target}/shutdown")),
            ("DELETE", format!("/v1/vms/{target}?force=true")),
        ] {
            let r = s.rest("bob", method, &path, None).await;
            assert_eq!(
                (r.status, r.code()),
                (404, "not_found"),
                "{method} {path}: {r:?}"
            );
            assert_eq!(r.message(), format!("vm {target} not found"));
        }
        let body = json!({"vm_id": target}).to_string();
        let r = s
            .call(
                Some(&bearer("bob")),
                "POST",
                "/metald.v1.VmService/PauseVm",
                Some(&body),
            )
            .await;
        assert_eq!((r.status, r.code()), (404, "not_found"), "{r:?}");
    }
    // Over gRPC and Connect's protobuf encoding too, with the generated client.
    for protocol in [Protocol::Grpc, Protocol::Connect] {
        let cfg = ClientConfig::new(s.base.parse().unwrap())
            .with_default_header("authorization", "Bearer dev_customer_bob")
            .with_protocol(protocol);
        let http = match protocol {
            Protocol::Grpc => HttpClient::plaintext_http2_only(),
            _ => HttpClient::plaintext(),
        };
        let c = pb::VmServiceClient::new(http, cfg);
        let err = c
            .get_vm_info(pb::GetVmInfoRequest {
                vm_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound, "{protocol:?}");
    }
    let listed = s.rest("bob", "GET", "/v1/vms", None).await;
    assert_eq!(listed.body["vms"], Value::Null, "{listed:?}");
    let window = s.rest("bob", "GET", "/v1/usage", None).await;
    assert_eq!(window.body["vms"], Value::Null, "{window:?}");
    let vm = s.rest("alice", "GET", &format!("/v1/vms/{id}"), None).await;
    assert_eq!(vm.body["vm"]["state"], "VM_STATE_RUNNING");
    assert_eq!(f.backend.calls(), ["create", "boot"]);
}

#[tokio::test]
async fn errors_keep_their_codes_and_internal_details_stay_in_the_log() {
    let f = fixture();
    let s = api(&f).await;
    let mut zero = request();
    zero["config"]["cpu"]["vcpu_count"] = json!(0);
    let r = s.rest("acme", "POST", "/v1/vms", Some(zero)).await;
    assert_eq!((r.status, r.code()), (400, "invalid_argument"), "{r:?}");
    assert!(r.message().starts_with("config.cpu.vcpu_count: "), "{r:?}");
    let mut unknown = request();
    unknown["config"]["gpu"] = json!(1);
    let r = s.rest("acme", "POST", "/v1/vms", Some(unknown)).await;
    assert_eq!((r.status, r.code()), (400, "invalid_argument"), "{r:?}");
    assert!(r.message().contains("gpu"), "{r:?}");
    let r = s
        .call(Some(&bearer("acme")), "POST", "/v1/vms", Some("{not json"))
        .await;
    assert_eq!((r.status, r.code()), (400, "invalid_argument"), "{r:?}");
    let id = s.create("acme").await;
    let r = s
        .rest("acme", "POST", &format!("/v1/vms/{id}/pause"), None)
        .await;
    assert_eq!((r.status, r.code()), (400, "failed_precondition"), "{r:?}");
    assert_eq!(
        r.message(),
        "cannot pause a VM in state CREATED; boot it first"
    );
    // A create whose rootfs image file vanished, with no source to fetch it from: the host
    // cannot have it now, and the caller learns which image, not where.
    let image = f._dir.path().join("assets").join("r");
    std::fs::remove_file(&image).unwrap();
    let r = s.rest("acme", "POST", "/v1/vms", Some(request())).await;
    assert_eq!((r.status, r.code()), (503, "unavailable"), "{r:?}");
    assert!(!r.message().contains('/'), "{r:?}");
    // One that cannot be copied fails inside metald: the caller learns a request id and
    // nothing of the host; the half-made VM is rolled back.
    std::fs::create_dir(&image).unwrap();
    let r = s.rest("acme", "POST", "/v1/vms", Some(request())).await;
    assert_eq!((r.status, r.code()), (500, "internal"), "{r:?}");
    assert!(
        r.message().starts_with("internal error (request id "),
        "{r:?}"
    );
    assert!(
        !r.message().contains('/'),
        "a host path reached the caller: {r:?}"
    );
    let listed = s.rest("acme", "GET", "/v1/vms", None).await;
    assert_eq!(
        listed.body["vms"].as_array().map(Vec::len),
        Some(1),
        "{listed:?}"
    );
    assert_eq!(std::fs::read_dir(&f.vms_dir).unwrap().count(), 1);
}

#[tokio::test]
async fn metrics_move_to_a_router_of_their_own_when_asked() {
    let f = fixture();
    let together = serve(routers(Arc::clone(&f.svc), settings(false)).api).await;
    let r = together.call(None, "GET", "/metrics", None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.body.as_str().unwrap().contains("# TYPE metald_vms gauge"),
        "{r:?}"
    );
    let split = routers(Arc::clone(&f.svc), settings(true));
    let api = serve(split.api).await;
    let metrics = serve(split.metrics.unwrap()).await;
    // The API port no longer has it.
    assert_eq!(api.call(None, "GET", "/metrics", None).await.status, 404);
    let r = metrics.call(None, "GET", "/metrics", None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.body.as_str().unwrap().contains("# TYPE metald_vms gauge"),
        "{r:?}"
    );
    for s in [&api, &metrics] {
        assert_eq!(s.call(None, "GET", "/healthz", None).await.status, 200);
        assert_eq!(s.call(None, "GET", "/readyz", None).await.status, 200);
    }
}

#[tokio::test]
async fn fifty_parallel_creates_against_a_quota_of_ten_store_exactly_ten() {
    let f = fixture();
    let s = Arc::new(api(&f).await);
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let s = Arc::clone(&s);
            tokio::spawn(async move { s.rest("acme", "POST", "/v1/vms", Some(request())).await })
        })
        .collect();
    let mut created = 0;
    for call in calls {
        let r = call.await.unwrap();
        match r.status {
            201 => created += 1,
            _ => {
                assert_eq!((r.status, r.code()), (429, "resource_exhausted"), "{r:?}");
                assert_eq!(
                    r.message(),
                    format!(
                        "quota UNKEY_METALD_QUOTA_VMS exceeded: {QUOTA_VMS} in use, 1 more asked, limit {QUOTA_VMS}"
                    )
                );
            }
        }
    }
    assert_eq!(created, QUOTA_VMS);
    let listed = s.rest("acme", "GET", "/v1/vms", None).await;
    assert_eq!(
        listed.body["vms"].as_array().map(Vec::len),
        Some(10),
        "{listed:?}"
    );
    // The refused creates left no disk copies behind.
    assert_eq!(std::fs::read_dir(&f.vms_dir).unwrap().count(), 10);
    // Another customer has a quota of their own.
    s.create("other").await;
}

#[tokio::test]
async fn parallel_boots_against_a_running_memory_quota_admit_exactly_what_fits() {
    let f = fixture();
    let s = Arc::new(api(&f).await);
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(s.create("acme").await);
    }
    let boots: Vec<_> = ids
        .iter()
        .map(|id| {
            let (s, path) = (Arc::clone(&s), format!("/v1/vms/{id}/boot"));
            tokio::spawn(async move { s.rest("acme", "POST", &path, None).await })
        })
        .collect();
    let mut running = 0;
    for boot in boots {
        let r = boot.await.unwrap();
        match r.status {
            200 => running += 1,
            _ => {
                assert_eq!((r.status, r.code()), (429, "resource_exhausted"), "{r:?}");
                assert_eq!(
                    r.message(),
                    "quota UNKEY_METALD_QUOTA_RUNNING_MEMORY_MIB exceeded: 512 in use, 128 more asked, limit 512"
                );
            }
        }
    }
    // The fixture's limit is the memory of four 128 MiB VMs.
    assert_eq!(running, 4);
    let boots = f.backend.calls().iter().filter(|c| *c == "boot").count();
    assert_eq!(boots, 4, "refused boots never reached the backend");
    let setups = f
        .isolation
        .calls()
        .iter()
        .filter(|c| c.starts_with("setup "))
        .count();
    assert_eq!(setups, 4, "nor isolation");
    // A paused VM still holds its memory; a stopped one frees it for another boot.
    let up: Vec<String> = {
        let listed = s
            .rest("acme", "GET", "/v1/vms?state=VM_STATE_RUNNING", None)
            .await;
        listed.body["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["vmId"].as_str().unwrap().to_string())
            .collect()
    };
    let down: Vec<&String> = ids.iter().filter(|id| !up.contains(id)).collect();
    s.rest("acme", "POST", &format!("/v1/vms/{}/pause", up[0]), None)
        .await;
    let r = s
        .rest("acme", "POST", &format!("/v1/vms/{}/boot", down[0]), None)
        .await;
    assert_eq!(r.status, 429, "{r:?}");
    let body = json!({"force": true});
    s.rest(
        "acme",
        "POST",
        &format!("/v1/vms/{}/shutdown", up[1]),
        Some(body),
    )
    .await;
    let r = s
        .rest("acme", "POST", &format!("/v1/vms/{}/boot", down[0]), None)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
}

/// A router in `jwt` mode trusting `issuer`'s keys from a JWKS file.
async fn jwt_api(f: &Fixture, issuer: &crate::testing::Issuer, limits: RequestLimits) -> Served {
    use crate::config::{AuthMode, AuthSettings, JwtSettings};
    let path = f._dir.path().join("jwks.json");
    std::fs::write(&path, issuer.jwks().to_string()).unwrap();
    let auth = Authenticator::new(&AuthSettings {
        mode: AuthMode::Jwt(JwtSettings {
            jwks_file: Some(path),
            jwks_url: None,
            issuer: crate::testing::ISSUER.into(),
            audience: crate::testing::AUDIENCE.into(),
            customer_claim: "customer_id".into(),
            leeway: std::time::Duration::from_secs(30),
        }),
        trusted_services: Vec::new(),
        services_need_token: false,
    })
    .await
    .unwrap();
    let mut s = settings(false);
    s.auth = Arc::new(auth);
    s.limits = limits;
    serve(routers(Arc::clone(&f.svc), s).api).await
}

#[tokio::test]
async fn jwt_callers_act_as_their_customer_within_their_scopes() {
    use crate::testing::Issuer;
    let f = fixture();
    let issuer = Issuer::generate("k");
    let s = jwt_api(&f, &issuer, settings(false).limits).await;
    let writer = format!(
        "Bearer {}",
        issuer.sign("k-ed", &Issuer::claims("acme", "vms:read vms:write"))
    );
    let reader = format!(
        "Bearer {}",
        issuer.sign("k-rs", &Issuer::claims("acme", "vms:read"))
    );
    let body = request().to_string();
    let r = s.call(Some(&writer), "POST", "/v1/vms", Some(&body)).await;
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.body["vm"]["vmId"].as_str().unwrap().to_string();
    let r = s
        .call(Some(&writer), "POST", &format!("/v1/vms/{id}/boot"), None)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = s
        .call(Some(&reader), "GET", &format!("/v1/vms/{id}"), None)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    // A customer sees no host details: no VMM pid, namespace file or host interface.
    assert!(r.body["vm"].get("vmmPid").is_none(), "{r:?}");
    assert!(
        r.body["vm"]["network"].get("networkNamespace").is_none(),
        "{r:?}"
    );
    // An operator of acme (host:read) does.
    let operator_of_acme = format!(
        "Bearer {}",
        issuer.sign("k-es", &Issuer::claims("acme", "vms:read host:read"))
    );
    let r = s
        .call(
            Some(&operator_of_acme),
            "GET",
            &format!("/v1/vms/{id}"),
            None,
        )
        .await;
    assert!(
        r.body["vm"]["vmmPid"].as_u64().is_some_and(|p| p > 0),
        "{r:?}"
    );
    // Read scope only: 403 on REST and Connect, and nothing changes.
    let r = s.call(Some(&reader), "POST", "/v1/vms", Some(&body)).await;
    assert_eq!((r.status, r.code()), (403, "permission_denied"), "{r:?}");
    assert!(r.message().contains("vms:write"), "{r:?}");
    let r = s
        .call(
            Some(&reader),
            "POST",
            "/metald.v1.VmService/DeleteVm",
            Some(&json!({ "vmId": id }).to_string()),
        )
        .await;
    assert_eq!((r.status, r.code()), (403, "permission_denied"), "{r:?}");
    let r = s.call(Some(&reader), "GET", "/v1/host", None).await;
    assert_eq!((r.status, r.code()), (403, "permission_denied"), "{r:?}");
    let operator = format!(
        "Bearer {}",
        issuer.sign("k-ed", &Issuer::claims("ops", "host:read"))
    );
    let r = s.call(Some(&operator), "GET", "/v1/host", None).await;
    assert_eq!(r.status, 200, "{r:?}");
    // The fleet is the operator's too: a fleet of one here, UP, holding the one VM.
    let r = s.call(Some(&reader), "GET", "/v1/fleet", None).await;
    assert_eq!((r.status, r.code()), (403, "permission_denied"), "{r:?}");
    for (method, path) in [
        ("GET", "/v1/fleet"),
        ("POST", "/metald.v1.VmService/GetFleet"),
    ] {
        let body = (method == "POST").then_some("{}");
        let r = s.call(Some(&operator), method, path, body).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["thisHost"], "local", "{r:?}");
        assert_eq!(r.body["hosts"][0]["hostId"], "local", "{r:?}");
        assert_eq!(r.body["hosts"][0]["status"], "HOST_STATUS_UP", "{r:?}");
        assert_eq!(r.body["hosts"][0]["vmCount"], "1", "{r:?}");
    }
    // Refusals: 401 with the reason, and another customer's VM stays invisible.
    let stranger = format!(
        "Bearer {}",
        issuer.sign("k-es", &Issuer::claims("other", "vms:read vms:write"))
    );
    let r = s
        .call(Some(&stranger), "GET", &format!("/v1/vms/{id}"), None)
        .await;
    assert_eq!(r.status, 404, "{r:?}");
    let expired = {
        let mut c = Issuer::claims("acme", "vms:write");
        c["exp"] = json!(1);
        format!("Bearer {}", issuer.sign("k-ed", &c))
    };
    let long = format!("Bearer {}", "a".repeat(64 << 10));
    for (auth, reason) in [
        (expired.as_str(), "expired"),
        ("Bearer dev_customer_acme", "malformed token"),
        ("Bearer a.b.c", "malformed token"),
        (long.as_str(), "token longer than 8192 bytes"),
    ] {
        let r = s.call(Some(auth), "POST", "/v1/vms", Some(&body)).await;
        assert_eq!((r.status, r.code()), (401, "unauthenticated"), "{r:?}");
        assert_eq!(r.message(), reason);
    }
    let listed = s.call(Some(&reader), "GET", "/v1/vms", None).await;
    assert_eq!(listed.body["vms"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn a_customer_over_its_rate_gets_429_with_retry_after_and_others_do_not() {
    let f = fixture();
    let mut s = settings(false);
    s.limits.rate_per_second = 1;
    s.limits.burst = 2;
    let s = serve(routers(Arc::clone(&f.svc), s).api).await;
    for _ in 0..2 {
        assert_eq!(s.rest("acme", "GET", "/v1/vms", None).await.status, 200);
    }
    let r = s.rest("acme", "POST", "/v1/vms", Some(request())).await;
    assert_eq!((r.status, r.code()), (429, "resource_exhausted"), "{r:?}");
    assert!(r.message().contains("retry after 1 s"), "{r:?}");
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(s.rest("other", "GET", "/v1/vms", None).await.status, 200);
    assert_eq!(std::fs::read_dir(&f.vms_dir).unwrap().count(), 0);
}

/// A log sink for one test's tracing events.
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn every_mutating_call_writes_one_audit_event() {
    let logs = Logs::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let f = fixture();
    let s = api(&f).await;
    let id = s.create("acme").await;
    s.rest("acme", "POST", &format!("/v1/vms/{id}/boot"), None)
        .await;
    s.rest("acme", "GET", &format!("/v1/vms/{id}"), None).await;
    s.rest("other", "DELETE", &format!("/v1/vms/{id}"), None)
        .await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let audits: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "metald::audit")
        .map(|v| v["fields"].clone())
        .collect();
    let seen: Vec<(&str, &str, &str, &str)> = audits
        .iter()
        .map(|a| {
            (
                a["method"].as_str().unwrap(),
                a["customer"].as_str().unwrap(),
                a["vm_id"].as_str().unwrap(),
                a["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("CreateVm", "acme", id.as_str(), "ok"),
            ("BootVm", "acme", id.as_str(), "ok"),
            ("DeleteVm", "other", id.as_str(), "not_found"),
        ],
        "{text}"
    );
    for a in &audits {
        assert!(a["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{a}");
        assert!(!a["request_id"].as_str().unwrap().is_empty(), "{a}");
    }
}

/// A protobuf JSON uint64 (a string) or a plain JSON number.
fn uint(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not a uint64: {v}"))
}

#[tokio::test]
async fn host_capacity_answers_any_caller_over_rest_and_connect_and_a_full_host_is_429() {
    let f = fixture();
    let s = api(&f).await;
    let id = s.create("alice").await;
    let r = s
        .rest("alice", "POST", &format!("/v1/vms/{id}/boot"), None)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    s.create("bob").await;
    // Every customer's VMs, whoever asks: 1 vCPU and 128 MiB + QEMU's 384 MiB run.
    let rest = s.rest("carol", "GET", "/v1/host", None).await;
    assert_eq!(rest.status, 200, "{rest:?}");
    let b = &rest.body;
    let triple = |k: &str| {
        (
            uint(&b[k]["total"]),
            uint(&b[k]["used"]),
            uint(&b[k]["free"]),
        )
    };
    assert_eq!(
        triple("memoryBytes"),
        (15 << 30, 512 << 20, (15 << 30) - (512 << 20))
    );
    assert_eq!(triple("vcpus"), (32, 1, 31));
    assert_eq!(triple("diskBytes"), (99 << 30, 50 << 30, 49 << 30));
    assert_eq!(uint(&b["vms"]["used"]), 2);
    assert_eq!(b["cpuOvercommit"].as_f64(), Some(4.0));
    assert_eq!(b["memoryOvercommit"].as_f64(), Some(1.0));
    let connect = s
        .call(
            Some(&bearer("carol")),
            "POST",
            "/metald.v1.VmService/GetHostCapacity",
            Some("{}"),
        )
        .await;
    assert_eq!((connect.status, &connect.body), (200, &rest.body));
    for (method, path, body) in [
        ("GET", "/v1/host", None),
        ("POST", "/metald.v1.VmService/GetHostCapacity", Some("{}")),
    ] {
        let r = s.call(None, method, path, body).await;
        assert_eq!((r.status, r.code()), (401, "unauthenticated"), "{path}");
    }
    // A host with room for nothing more: the boot is 429 naming the resource.
    f.probe
        .memory_bytes
        .store((1024 + 512) << 20, std::sync::atomic::Ordering::SeqCst);
    let other = s.create("alice").await;
    let r = s
        .rest("alice", "POST", &format!("/v1/vms/{other}/boot"), None)
        .await;
    assert_eq!(
        (r.status, r.code(), r.message()),
        (
            429,
            "resource_exhausted",
            "host memory exhausted: 512 MiB in use, 512 MiB asked, capacity 512 MiB"
        ),
        "{r:?}"
    );
}

#[tokio::test]
async fn a_boot_whose_caller_gives_up_still_completes_and_is_saved() {
    let f = fixture();
    let s = api(&f).await;
    let id = s.create("acme").await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *f.backend.hold_boot.lock().unwrap() = Some(Arc::clone(&gate));
    // A 50 ms Connect deadline, and a REST client that hangs up after 50 ms.
    let body = s.boot_with_deadline("acme", &id, 50).await;
    assert_eq!(body["code"], "deadline_exceeded", "{body}");
    let id2 = s.create("acme").await;
    let hung_up = s
        .client
        .post(format!("{}/v1/vms/{id2}/boot", s.base))
        .header("Authorization", bearer("acme"))
        .timeout(std::time::Duration::from_millis(50))
        .send()
        .await;
    assert!(hung_up.is_err(), "{hung_up:?}");
    // Both boots were waiting in the backend when their callers left; they finish now.
    gate.add_permits(2);
    for vm in [&id, &id2] {
        let mut state = String::new();
        for _ in 0..100 {
            let r = s.rest("acme", "GET", &format!("/v1/vms/{vm}"), None).await;
            state = r.body["vm"]["state"].as_str().unwrap_or("").to_string();
            if state == "VM_STATE_RUNNING" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(state, "VM_STATE_RUNNING", "{vm}");
    }
}

#[tokio::test]
async fn the_server_caps_how_long_a_call_may_run_whatever_the_client_asks() {
    let f = fixture();
    let mut settings = settings(false);
    settings.limits.max_deadline = std::time::Duration::from_secs(1);
    let s = serve(routers(Arc::clone(&f.svc), settings).api).await;
    let (a, b) = (s.create("acme").await, s.create("acme").await);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *f.backend.hold_boot.lock().unwrap() = Some(Arc::clone(&gate));
    let t0 = std::time::Instant::now();
    // Ten minutes asked over Connect, none over REST: both end at the server's one second.
    let body = s.boot_with_deadline("acme", &a, 600000).await;
    assert_eq!(body["code"], "deadline_exceeded", "{body}");
    let r = s
        .rest("acme", "POST", &format!("/v1/vms/{b}/boot"), None)
        .await;
    assert_eq!((r.status, r.code()), (504, "deadline_exceeded"), "{r:?}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(10));
    gate.add_permits(2);
}

#[tokio::test]
async fn metrics_are_for_operators_outside_dev_mode() {
    use crate::config::{AuthMode, AuthSettings, Secret};
    let f = fixture();
    let production = || AuthSettings {
        mode: AuthMode::Mtls,
        trusted_services: vec!["spiffe://example.org/cp".into()],
        services_need_token: false,
    };
    let mut closed = settings(false);
    closed.auth = Arc::new(Authenticator::new(&production()).await.unwrap());
    let s = serve(routers(Arc::clone(&f.svc), closed).api).await;
    let r = s.call(None, "GET", "/metrics", None).await;
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r
        .body
        .as_str()
        .unwrap()
        .contains("UNKEY_METALD_METRICS_TOKEN"));

    let token = "an-operator-token-of-at-least-32-characters";
    let mut guarded = settings(false);
    guarded.auth = Arc::new(Authenticator::new(&production()).await.unwrap());
    guarded.metrics_token = Some(Secret::new(token));
    let s = serve(routers(Arc::clone(&f.svc), guarded).api).await;
    for auth in [None, Some("Bearer wrong"), Some("Bearer dev_customer_ops")] {
        let r = s.call(auth, "GET", "/metrics", None).await;
        assert_eq!(r.status, 401, "{auth:?}: {r:?}");
    }
    let r = s
        .call(Some(&format!("Bearer {token}")), "GET", "/metrics", None)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.as_str().unwrap().contains("# TYPE metald_vms gauge"));
}

#[tokio::test]
async fn made_up_paths_do_not_grow_the_metric_labels() {
    let f = fixture();
    let s = api(&f).await;
    for i in 0..20 {
        s.call(
            None,
            "POST",
            &format!("/metald.v1.VmService/Made{i}Up"),
            Some("{}"),
        )
        .await;
        s.call(None, "GET", &format!("/nowhere/{i}"), None).await;
    }
    let text = s.call(None, "GET", "/metrics", None).await.body;
    let text = text.as_str().unwrap();
    assert!(!text.contains("Made"), "{text}");
    assert!(!text.contains("nowhere"), "{text}");
    assert!(text.contains("method=\"other\""), "{text}");
}

/// Snapshots over REST and Connect: create (201), list, a clone from `fromSnapshot` with only
/// labels beside it, the strict body check, another customer's snapshot answered like a
/// made-up one on every route, and delete.
#[tokio::test]
async fn snapshot_routes_create_list_clone_and_delete_within_the_callers_scope() {
    let f = fixture();
    let s = api(&f).await;
    let id = s.create("alice").await;
    s.rest("alice", "POST", &format!("/v1/vms/{id}/boot"), None)
        .await;
    let made = s
        .rest("alice", "POST", &format!("/v1/vms/{id}/snapshots"), None)
        .await;
    assert_eq!(made.status, 201, "{made:?}");
    let sid = made.body["snapshot"]["snapshotId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(made.body["snapshot"]["state"], "SNAPSHOT_STATE_READY");
    assert_eq!(made.body["snapshot"]["sourceVmId"], id.as_str());
    let listed = s.rest("alice", "GET", "/v1/snapshots", None).await;
    assert_eq!(listed.body["snapshots"][0]["snapshotId"], sid.as_str());
    let over_connect = s
        .call(
            Some(&bearer("alice")),
            "POST",
            "/metald.v1.VmService/ListSnapshots",
            Some("{}"),
        )
        .await;
    assert_eq!(
        over_connect.body["snapshots"][0]["snapshotId"],
        sid.as_str()
    );

    let clone = s
        .rest(
            "alice",
            "POST",
            "/v1/vms",
            Some(json!({"from_snapshot": sid, "config": {"metadata": {"a": "b"}}})),
        )
        .await;
    assert_eq!(clone.status, 201, "{clone:?}");
    assert_eq!(clone.body["vm"]["config"]["metadata"]["a"], "b");
    assert_eq!(clone.body["vm"]["config"]["cpu"]["vcpuCount"], 1);
    let with_config = s
        .rest(
            "alice",
            "POST",
            "/v1/vms",
            Some(json!({"fromSnapshot": sid, "config": {"cpu": {"vcpu_count": 2}}})),
        )
        .await;
    assert_eq!(with_config.status, 400, "{with_config:?}");
    assert!(with_config.message().contains("only config.metadata"));
    let unknown = s
        .rest(
            "alice",
            "POST",
            "/v1/vms",
            Some(json!({"from_snapshots": sid})),
        )
        .await;
    assert_eq!(unknown.status, 400, "{unknown:?}");

    let made_up = "snap-00000000-0000-4000-8000-000000000000";
    for target in [sid.as_str(), made_up] {
        let del = s
            .rest("bob", "DELETE", &format!("/v1/snapshots/{target}"), None)
            .await;
        let from = s
            .rest(
                "bob",
                "POST",
                "/v1/vms",
                Some(json!({"fromSnapshot": target})),
            )
            .await;
        for r in [del, from] {
            assert_eq!((r.status, r.code()), (404, "not_found"), "{r:?}");
            assert_eq!(r.message(), format!("snapshot {target} not found"));
        }
    }
    let theirs = s
        .rest("bob", "POST", &format!("/v1/vms/{id}/snapshots"), None)
        .await;
    assert_eq!(theirs.message(), format!("vm {id} not found"));
    assert_eq!(
        s.rest("bob", "GET", "/v1/snapshots", None).await.body["snapshots"],
        Value::Null
    );
    let gone = s
        .rest("alice", "DELETE", &format!("/v1/snapshots/{sid}"), None)
        .await;
    assert_eq!(gone.status, 200, "{gone:?}");
    assert_eq!(
        s.rest("alice", "GET", "/v1/snapshots", None).await.body["snapshots"],
        Value::Null
    );
}

/// `GET /internal/v1/assets/{sha256}` streams this host's file of that content to a fleet peer
/// (a trusted service's certificate), 404 when it has none; a customer's token is refused.
#[tokio::test]
async fn only_fleet_peers_get_an_asset_file_by_its_sha256() {
    use sha2::Digest;
    let f = fixture();
    let peer = "spiffe://example.org/metald/host-2";
    let mut trusting = settings(false);
    trusting.auth = Arc::new(Authenticator::dev_trusting(peer));
    // What the TLS listener records for a client certificate with that SPIFFE id.
    let as_peer = routers(Arc::clone(&f.svc), trusting)
        .api
        .layer(axum::Extension(super::auth::Peer {
            addr: "127.0.0.1:9".parse().unwrap(),
            service: Some(Arc::from(peer)),
        }));
    let p = serve(as_peer).await;
    let sha = hex_of(&sha2::Sha256::digest(b"image"));
    let path = format!("/internal/v1/assets/{sha}");
    let get = |s: &Served, path: String| {
        s.client
            .get(format!("{}{path}", s.base))
            .header(
                super::auth::CUSTOMER_HEADER,
                crate::fleet_assets::PEER_CUSTOMER,
            )
            .header(super::auth::FORWARDED_HEADER, "host-2")
            .send()
    };
    let r = get(&p, path.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "5");
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"image");
    let other = format!("/internal/v1/assets/{}", "0".repeat(64));
    assert_eq!(get(&p, other).await.unwrap().status(), 404);
    let bad = "/internal/v1/assets/..%2Fdb".to_string();
    assert_eq!(get(&p, bad).await.unwrap().status(), 400);

    // A customer's token, even one holding every scope a token can, is no peer.
    let s = api(&f).await;
    let r = s.rest("acme", "GET", &path, None).await;
    assert_eq!((r.status, r.code()), (403, "permission_denied"), "{r:?}");
    // Nor is a certificate that is not a trusted service's, naming a customer.
    let r = get(&s, path.clone()).await.unwrap();
    assert_eq!(r.status(), 401);
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
