//! Production identity on the real binary, with real clients (`curl`, `buf curl`) and keys
//! and certificates the test makes: JWT mode with a JWKS file and a JWKS URL (rotated), and
//! mTLS where a trusted service acts for a customer. No VM is booted: CreateVm, ListVms and
//! GetVmInfo show who the caller is; metald runs unisolated, so no root is needed.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;
use crate::Need;

/// The identity tests.
pub fn tests() -> Vec<crate::E2e> {
    let mut t =
        crate::e2e![&[Need::Qemu]; jwt_mode_verifies_tokens_from_a_jwks_file_and_a_rotating_url];
    t.extend(crate::e2e![&[Need::Qemu, Need::Buf]; mtls_trusted_services_act_for_customers_and_rotated_certificates_are_served]);
    t
}

/// One answer of `curl`: the HTTP status (0 when no HTTP exchange happened) and the body.
struct Reply {
    status: u16,
    body: Value,
    stderr: String,
}

fn curl(args: &[&str]) -> Reply {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Reply {
        status: code.trim().parse().unwrap_or(0),
        body: serde_json::from_str(body).unwrap_or(Value::String(body.to_string())),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

fn create_body() -> String {
    json!({"config": {"cpu": {"vcpu_count": 1}, "memory": {"size_bytes": 128 << 20},
        "kernel": {"image_id": "tiny-elf"}, "rootfs": {"image_id": "tiny-disk"}}})
    .to_string()
}

/// Serves `doc` at `http://127.0.0.1:<port>/jwks.json` on a thread, one request at a time.
fn jwks_server(doc: Arc<Mutex<String>>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let body = doc.lock().unwrap().clone();
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

fn jwt_mode_verifies_tokens_from_a_jwks_file_and_a_rotating_url() {
    let from_file = Issuer::generate("file");
    let from_url = Issuer::generate("url");
    let keys = tempfile::tempdir().unwrap();
    let file = keys.path().join("jwks.json");
    std::fs::write(&file, from_file.jwks().to_string()).unwrap();
    let served = Arc::new(Mutex::new(from_url.jwks().to_string()));
    let url = jwks_server(Arc::clone(&served));
    let m = metald()
        .unisolated()
        .env("UNKEY_METALD_AUTH_MODE", "jwt")
        .env("UNKEY_METALD_AUTH_JWKS_FILE", &file.display().to_string())
        .env("UNKEY_METALD_AUTH_JWKS_URL", &url)
        .env("UNKEY_METALD_AUTH_ISSUER", ISSUER)
        .env("UNKEY_METALD_AUTH_AUDIENCE", AUDIENCE)
        .start_with(|m| m.import_tiny_guest());
    let call = |token: &str, method: &str, path: &str, body: Option<&str>| {
        let auth = format!("Authorization: Bearer {token}");
        let target = format!("{}{path}", m.url);
        let mut args = vec!["-X", method, "-H", &auth, &target];
        if let Some(b) = body {
            args.extend(["-H", "Content-Type: application/json", "--data", b]);
        }
        curl(&args)
    };
    let rw = Issuer::claims("acme", "vms:read vms:write");
    let body = create_body();
    let r = call(
        &from_file.sign("file-ed", &rw),
        "POST",
        "/v1/vms",
        Some(&body),
    );
    assert_eq!(r.status, 201, "{:?} {}", r.body, m.log_text());
    let id = r.body["vm"]["vmId"].as_str().unwrap().to_string();
    // A key from the URL, a read-only token, over Connect JSON.
    let ro = from_url.sign("url-rs", &Issuer::claims("acme", "vms:read"));
    let r = call(
        &ro,
        "POST",
        "/metald.v1.VmService/GetVmInfo",
        Some(&json!({ "vmId": id }).to_string()),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["vm"]["vmId"], id.as_str());
    let r = call(&ro, "POST", "/v1/vms", Some(&body));
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (403, Some("permission_denied"))
    );
    // The issuer rotates the URL's keys: the new kid is fetched on its first use.
    let rotated = Issuer::generate("rotated");
    *served.lock().unwrap() = rotated.jwks().to_string();
    let r = call(&rotated.sign("rotated-es", &rw), "GET", "/v1/vms", None);
    assert_eq!(r.status, 200, "{:?}", r.body);
    // Refusals, each 401 with its reason; none creates anything. (The unknown kid finds no
    // key even after the rotation: refreshes happen at most once a minute.)
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "file-ed"})),
        b64(&rw)
    );
    let mut expired = rw.clone();
    expired["exp"] = json!(1000);
    let mut wrong_aud = rw.clone();
    wrong_aud["aud"] = json!("not-metald");
    for (token, reason) in [
        (none, "algorithm not allowed"),
        (from_file.sign("file-es", &expired), "expired"),
        (rotated.sign("rotated-ed", &wrong_aud), "wrong audience"),
        (Issuer::generate("x").sign("x-ed", &rw), "unknown key"),
        ("dev_customer_acme".to_string(), "malformed token"),
    ] {
        let r = call(&token, "POST", "/v1/vms", Some(&body));
        assert_eq!(r.status, 401, "{reason}: {:?}", r.body);
        assert!(
            r.body["message"].as_str().unwrap().starts_with(reason),
            "{reason}: {:?}",
            r.body
        );
    }
    let r = call(&rotated.sign("rotated-ed", &rw), "GET", "/v1/vms", None);
    let vms = r.body["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "only the one create succeeded: {vms:?}");
    // Another customer's token sees none of acme's VMs.
    let other = from_file.sign("file-rs", &Issuer::claims("other", "vms:read"));
    let r = call(&other, "GET", &format!("/v1/vms/{id}"), None);
    assert_eq!(r.status, 404, "{:?}", r.body);
    let r = call(
        &from_file.sign("file-ed", &rw),
        "DELETE",
        &format!("/v1/vms/{id}"),
        None,
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
}

fn mtls_trusted_services_act_for_customers_and_rotated_certificates_are_served() {
    let ctl_id = "spiffe://example.org/ns/cp/sa/control-plane";
    let pki = Pki::new("main");
    let server = pki.server("server", "metald-one");
    let ctl = pki.client("ctl", Some(ctl_id), false);
    let intruder = pki.client("intruder", Some("spiffe://example.org/intruder"), false);
    let expired = pki.client("expired", Some(ctl_id), true);
    let foreign = Pki::new("foreign");
    let stranger = foreign.client("stranger", Some(ctl_id), false);
    let mut m = metald()
        .unisolated()
        .env("UNKEY_METALD_AUTH_MODE", "mtls")
        .env("UNKEY_METALD_AUTH_TRUSTED_SERVICES", ctl_id)
        .env(
            "UNKEY_METALD_TLS_CERT_FILE",
            &server.cert.display().to_string(),
        )
        .env(
            "UNKEY_METALD_TLS_KEY_FILE",
            &server.key.display().to_string(),
        )
        .env(
            "UNKEY_METALD_TLS_CLIENT_CA_FILE",
            &pki.ca_file().display().to_string(),
        )
        .prepare(|m| m.import_tiny_guest());
    m.spawn();
    let base = format!("https://127.0.0.1:{}", m.port);
    let ca = pki.ca_file().display().to_string();
    let as_client =
        |who: &Pair, customer: Option<&str>, method: &str, path: &str, body: Option<&str>| {
            let (cert, key) = (
                who.cert.display().to_string(),
                who.key.display().to_string(),
            );
            let target = format!("{base}{path}");
            let header = customer.map(|c| format!("metald-customer: {c}"));
            let mut args = vec![
                "--cacert", &ca, "--cert", &cert, "--key", &key, "-X", method,
            ];
            if let Some(h) = &header {
                args.extend(["-H", h.as_str()]);
            }
            if let Some(b) = body {
                args.extend(["-H", "Content-Type: application/json", "--data", b]);
            }
            args.push(&target);
            curl(&args)
        };
    let body = create_body();
    let mut ids = Vec::new();
    for customer in ["a", "b"] {
        let r = as_client(&ctl, Some(customer), "POST", "/v1/vms", Some(&body));
        assert_eq!(r.status, 201, "{:?} {} {}", r.body, r.stderr, m.log_text());
        ids.push(r.body["vm"]["vmId"].as_str().unwrap().to_string());
    }
    let r = as_client(&ctl, Some("a"), "GET", "/v1/vms", None);
    let seen: Vec<&str> = r.body["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vmId"].as_str().unwrap())
        .collect();
    assert_eq!(
        seen,
        [ids[0].as_str()],
        "the service acting for a sees only a's VMs"
    );
    let r = as_client(&ctl, Some("a"), "GET", &format!("/v1/vms/{}", ids[1]), None);
    assert_eq!(r.status, 404, "b's VM is invisible to a: {:?}", r.body);
    // gRPC over TLS with buf curl, as the control plane would call.
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let out = Command::new(buf_bin().unwrap())
        .args(["curl", "--schema"])
        .arg(&proto)
        .args(["--protocol", "grpc", "--cacert", &ca])
        .args(["--cert", &ctl.cert.display().to_string()])
        .args(["--key", &ctl.key.display().to_string()])
        .args(["-H", "metald-customer: b", "--data", "{}"])
        .arg(format!("{base}/metald.v1.VmService/ListVms"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&ids[1]) && !text.contains(&ids[0]), "{text}");
    // An untrusted service, or a trusted one naming no customer: 401.
    let r = as_client(&intruder, Some("a"), "GET", "/v1/vms", None);
    assert_eq!(r.status, 401, "{:?}", r.body);
    let r = as_client(&ctl, None, "GET", "/v1/vms", None);
    assert_eq!(r.status, 401, "{:?}", r.body);
    // Another CA's certificate, an expired one, or none: refused in the handshake.
    for (what, who) in [
        ("foreign CA", Some(&stranger)),
        ("expired", Some(&expired)),
        ("no certificate", None),
    ] {
        let r = match who {
            Some(p) => as_client(p, Some("a"), "GET", "/v1/vms", None),
            None => curl(&[
                "--cacert",
                &ca,
                "-H",
                "metald-customer: a",
                &format!("{base}/v1/vms"),
            ]),
        };
        assert_eq!(r.status, 0, "{what}: {:?}", r.body);
    }
    // Rotation: the files are replaced; a new connection gets the new certificate.
    let subject = || {
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{certs}", "--cacert", &ca])
            .args(["--cert", &ctl.cert.display().to_string()])
            .args(["--key", &ctl.key.display().to_string()])
            .args(["-H", "metald-customer: a"])
            .arg(format!("{base}/v1/vms"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(subject().contains("metald-one"), "{}", subject());
    pki.server("server", "metald-two");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !subject().contains("metald-two") {
        assert!(
            Instant::now() < deadline,
            "rotation not seen: {}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(m.log_text().contains("TLS certificate files reloaded"));
    for (customer, id) in ["a", "b"].into_iter().zip(&ids) {
        let r = as_client(
            &ctl,
            Some(customer),
            "DELETE",
            &format!("/v1/vms/{id}"),
            None,
        );
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    m.stop();
}
