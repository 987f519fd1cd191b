//! What identity costs: `GetVmInfo` latency (p50, p99) and throughput at 50 concurrent
//! connections with `hey`, for dev tokens vs verified JWTs (Ed25519, ES256, RS256), over plain
//! HTTP vs TLS; and TLS handshakes per second with `openssl s_time`, with and without a
//! required client certificate. Each metald runs unisolated with one stored VM (no VMM: the
//! call reads the store); keys and certificates are made by the bench. Prints tables.
//!
//! `make bench` (or `cargo bench -p metald --bench identity`); `BENCH_REQUESTS=n` sets the
//! requests per row (default 20000), `BENCH_HANDSHAKE_SECS` the s_time window (default 10).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;

use serde_json::json;
use support::*;

/// What `hey` reported.
struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_200: String,
}

fn hey(url: &str, token: &str, body: &str, requests: u64) -> Load {
    let mut cmd = Command::new("hey");
    // hey sends its Host, port included, as the TLS server name, which is not a valid SNI
    // name (rustls refuses it); a Host header without the port fixes the name.
    if url.starts_with("https:") {
        cmd.args(["-host", "localhost"]);
    }
    let out = cmd
        .args(["-n", &requests.to_string(), "-c", "50", "-m", "POST"])
        .args(["-T", "application/json", "-d", body])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(url)
        .output()
        .expect("hey (scripts/install-deps.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let after = |key: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("no '{key}' in hey's output:\n{text}"));
        let rest = line.trim_start().trim_start_matches(key);
        rest.split_whitespace()
            .find_map(|w| w.parse::<f64>().ok())
            .unwrap()
    };
    let codes: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("Status code distribution:"))
        .skip(1)
        .map(str::trim)
        .filter(|l| l.starts_with('['))
        .collect();
    Load {
        rps: after("Requests/sec:"),
        p50_ms: after("50% in") * 1000.0,
        p99_ms: after("99% in") * 1000.0,
        non_200: codes
            .iter()
            .filter(|l| !l.starts_with("[200]"))
            .copied()
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Handshakes per second of one sequential `openssl s_time` client making new sessions.
fn handshakes(port: u16, ca: &str, client: Option<&Pair>, secs: u64) -> f64 {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_time", "-connect", &format!("127.0.0.1:{port}"), "-new"])
        .args(["-CAfile", ca, "-time", &secs.to_string()]);
    if let Some(c) = client {
        cmd.args([
            "-cert",
            c.cert.to_str().unwrap(),
            "-key",
            c.key.to_str().unwrap(),
        ]);
    }
    let out = cmd.output().expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // "1234 connections in 10.01 real seconds, ..."
    let line = text
        .lines()
        .find(|l| l.contains("connections in") && l.contains("real seconds"))
        .unwrap_or_else(|| {
            panic!(
                "openssl s_time said:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let words: Vec<&str> = line.split_whitespace().collect();
    let n: f64 = words[0].parse().unwrap();
    let t: f64 = words[3].parse().unwrap();
    n / t
}

fn main() {
    if support::qemu_bin().is_none() {
        eprintln!("qemu-system-x86_64 not installed (metald needs a VMM binary to start)");
        std::process::exit(2);
    }
    let requests = env_num("BENCH_REQUESTS", 20_000);
    let secs = env_num("BENCH_HANDSHAKE_SECS", 10);
    let pki = Pki::new("bench");
    let server = pki.server("server", "metald-bench");
    let ctl_id = "spiffe://example.org/control-plane";
    let ctl = pki.client("ctl", Some(ctl_id), false);
    let ca = pki.ca_file().display().to_string();
    let issuer = Issuer::generate("bench");
    let jwks = pki.dir.path().join("jwks.json");
    std::fs::write(&jwks, issuer.jwks().to_string()).unwrap();

    println!(
        "GetVmInfo (Connect JSON) at 50 concurrent connections, {requests} requests per row, hey:"
    );
    println!("| auth | transport | requests/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    let tls_env = [
        (
            "UNKEY_METALD_TLS_CERT_FILE",
            server.cert.display().to_string(),
        ),
        (
            "UNKEY_METALD_TLS_KEY_FILE",
            server.key.display().to_string(),
        ),
    ];
    let jwt_env = [
        ("UNKEY_METALD_AUTH_MODE", "jwt".to_string()),
        ("UNKEY_METALD_AUTH_JWKS_FILE", jwks.display().to_string()),
        ("UNKEY_METALD_AUTH_ISSUER", ISSUER.to_string()),
        ("UNKEY_METALD_AUTH_AUDIENCE", AUDIENCE.to_string()),
    ];
    let claims = Issuer::claims("bench", "vms:read vms:write");
    let rows: Vec<(&str, String, bool)> = vec![
        ("dev", "dev_customer_bench".into(), false),
        ("jwt EdDSA", issuer.sign("bench-ed", &claims), false),
        ("jwt ES256", issuer.sign("bench-es", &claims), false),
        ("jwt RS256", issuer.sign("bench-rs", &claims), false),
        ("dev", "dev_customer_bench".into(), true),
        ("jwt EdDSA", issuer.sign("bench-ed", &claims), true),
    ];
    for (auth, token, tls) in rows {
        let mut b = metald()
            .unisolated()
            // The bench is one customer at full speed: no rate limit.
            .env("UNKEY_METALD_RATE_LIMIT_PER_SECOND", "1000000")
            .env("UNKEY_METALD_RATE_LIMIT_BURST", "1000000");
        if auth != "dev" {
            for (k, v) in &jwt_env {
                b = b.env(k, v);
            }
        }
        if tls {
            for (k, v) in &tls_env {
                b = b.env(k, v);
            }
        }
        let mut m = b.prepare(|m| m.import_tiny_guest());
        m.spawn();
        let base = format!(
            "{}://127.0.0.1:{}",
            if tls { "https" } else { "http" },
            m.port
        );
        let create = Command::new("curl")
            .args(["-sS", "--cacert", &ca, "-X", "POST"])
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args(["-H", "Content-Type: application/json", "--data"])
            .arg(
                json!({"config": {"cpu": {"vcpu_count": 1}, "memory": {"size_bytes": 128 << 20},
                "kernel": {"image_id": "tiny-elf"}, "rootfs": {"image_id": "tiny-disk"}}})
                .to_string(),
            )
            .arg(format!("{base}/v1/vms"))
            .output()
            .unwrap();
        let vm: serde_json::Value = serde_json::from_slice(&create.stdout).unwrap();
        let id = vm["vm"]["vmId"].as_str().unwrap().to_string();
        let body = json!({ "vmId": id }).to_string();
        let url = format!("{base}/metald.v1.VmService/GetVmInfo");
        // Warm-up: connections, caches, the allocator.
        hey(&url, &token, &body, 2000);
        let l = hey(&url, &token, &body, requests);
        assert!(
            l.non_200.is_empty(),
            "{auth}: non-200 answers: {}",
            l.non_200
        );
        println!(
            "| {auth} | {} | {:.0} | {:.2} | {:.2} |",
            if tls {
                "TLS (HTTP/1.1)"
            } else {
                "plain HTTP/1.1"
            },
            l.rps,
            l.p50_ms,
            l.p99_ms
        );
        let del = Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                &ca,
            ])
            .args([
                "-X",
                "DELETE",
                "-H",
                &format!("Authorization: Bearer {token}"),
            ])
            .arg(format!("{base}/v1/vms/{id}"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&del.stdout), "200");
        m.stop();
    }

    println!();
    println!("TLS handshakes per second, one sequential client (openssl s_time -new, {secs} s):");
    println!("| server | handshakes/s |");
    println!("|---|---|");
    for mtls in [false, true] {
        let mut b = metald().unisolated();
        for (k, v) in &tls_env {
            b = b.env(k, v);
        }
        if mtls {
            b = b
                .env("UNKEY_METALD_AUTH_MODE", "mtls")
                .env("UNKEY_METALD_AUTH_TRUSTED_SERVICES", ctl_id)
                .env("UNKEY_METALD_TLS_CLIENT_CA_FILE", &ca);
        }
        let mut m = b.prepare(|m| m.import_tiny_guest());
        m.spawn();
        let rate = handshakes(m.port, &ca, mtls.then_some(&ctl), secs);
        println!(
            "| {} | {rate:.0} |",
            if mtls {
                "mTLS (client certificate required and verified, ECDSA P-256)"
            } else {
                "TLS (server certificate only, ECDSA P-256)"
            }
        );
        m.stop();
    }
}
