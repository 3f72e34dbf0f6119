//! `outpost-hub serve` as a process: HTTPS with the certificates `tls generate` makes, and the
//! refusal of plain HTTP off loopback.
//!
//! Being an integration test of this package also makes `cargo test` build the `outpost-hub`
//! binary, which the end-to-end tests in `outpost-tests` run.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const HUB: &str = env!("CARGO_BIN_EXE_outpost-hub");

fn hub(dir: &Path, args: &[&str]) -> Output {
    Command::new(HUB)
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .env_remove("OUTPOST_HUB")
        .env_remove("OUTPOST_TOKEN")
        .env_remove("OUTPOST_CA")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Kills the server when the test ends, pass or fail.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls for the address `serve --address-file` writes once it listens.
fn wait_for_address(file: &Path, server: &mut Server) -> String {
    let started = Instant::now();
    loop {
        if let Ok(address) = std::fs::read_to_string(file) {
            return address;
        }
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!("serve exited early with {status}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "serve did not start listening within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn https_agent(ca_pem: &[u8]) -> ureq::Agent {
    let certificates: Vec<_> = ureq::tls::parse_pem(ca_pem)
        .filter_map(|item| match item.unwrap() {
            ureq::tls::PemItem::Certificate(certificate) => Some(certificate),
            _ => None,
        })
        .collect();
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::new_with_certs(&certificates))
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent()
}

#[test]
fn serves_https_with_a_generated_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let data = dir.path().join("data");
    let address_file = dir.path().join("address");
    let generated = hub(
        dir.path(),
        &["tls", "generate", "--out", certs.to_str().unwrap()],
    );
    assert!(generated.status.success(), "{}", text(&generated.stderr));
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(certs.join("hub.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600, "the hub's private key is private");

    let bootstrap = hub(
        dir.path(),
        &["admin", "bootstrap", "--data", data.to_str().unwrap()],
    );
    assert!(bootstrap.status.success(), "{}", text(&bootstrap.stderr));
    let token = text(&bootstrap.stdout).trim().to_owned();

    let mut server = Server(
        Command::new(HUB)
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(&data)
            .arg("--tls-cert")
            .arg(certs.join("hub.pem"))
            .arg("--tls-key")
            .arg(certs.join("hub.key"))
            .arg("--address-file")
            .arg(&address_file)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let address = wait_for_address(&address_file, &mut server);
    let port = address.rsplit(':').next().unwrap();
    let url = format!("https://localhost:{port}");
    let ca = certs.join("ca.pem");

    // The CLI trusts the hub through the generated CA, by name and by IP address.
    for base in [url.clone(), format!("https://127.0.0.1:{port}")] {
        let whoami = hub(
            dir.path(),
            &[
                "whoami",
                "--hub",
                &base,
                "--token",
                &token,
                "--ca",
                ca.to_str().unwrap(),
            ],
        );
        assert!(whoami.status.success(), "{}", text(&whoami.stderr));
        assert!(
            text(&whoami.stdout).contains("admin"),
            "{}",
            text(&whoami.stdout)
        );
    }

    // Without the CA the certificate is not trusted, and the CLI says so.
    let untrusted = hub(dir.path(), &["whoami", "--hub", &url, "--token", &token]);
    assert!(!untrusted.status.success());
    let error = text(&untrusted.stderr).to_lowercase();
    assert!(
        error.contains("certificate") || error.contains("issuer"),
        "{error}"
    );

    // Plain HTTP on the TLS port gets no answer.
    let plain = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent()
        .get(&format!("http://127.0.0.1:{port}/metrics"))
        .call();
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");

    // Metrics over HTTPS count the requests above by route and status.
    let mut response = https_agent(&std::fs::read(&ca).unwrap())
        .get(&format!("{url}/metrics"))
        .header("Authorization", &format!("Bearer {token}"))
        .call()
        .unwrap();
    assert_eq!(response.status(), 200);
    let metrics = response.body_mut().read_to_string().unwrap();
    assert!(
        metrics.lines().any(|line| line
            == "outpost_hub_http_requests_total{route=\"/admin/v1/whoami\",status=\"200\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE outpost_hub_http_request_duration_seconds histogram"),
        "{metrics}"
    );
}

#[test]
fn plain_http_off_loopback_needs_the_explicit_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let refused = hub(
        dir.path(),
        &[
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--data",
            data.to_str().unwrap(),
        ],
    );
    assert!(!refused.status.success());
    let error = text(&refused.stderr);
    assert!(
        error.contains("plain HTTP is only allowed on a loopback address"),
        "{error}"
    );
    assert!(error.contains("--insecure-http"), "{error}");
    assert!(!data.exists(), "a refused serve wrote no data");

    // A certificate without its key is refused by the argument parser, naming the missing flag.
    let half = hub(
        dir.path(),
        &["serve", "--tls-cert", "hub.pem", "--data", "data"],
    );
    assert!(!half.status.success());
    assert!(
        text(&half.stderr).contains("--tls-key"),
        "{}",
        text(&half.stderr)
    );
}
