//! The hub's refusals, end to end: device request authentication, revocation, the admin API's
//! roles, tamper evidence of the audit log and hostile input, against a real hub process.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outpost_hub::api::{
    AdminTokenInfo, AuditEntry, AuditVerdict, CreatedToken, DeviceSummary, EnrollTokenInfo, Role,
};
use outpost_protocol::auth::{HEADER_DEVICE, HEADER_SIGNATURE};
use outpost_protocol::device::AgentState;
use outpost_protocol::SecretKey;
use outpost_tests::agent::AGENT_WAIT;
use outpost_tests::device_sim::{http_agent, unix_now, SimDevice};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::proxy::{Proxy, Verdict as ProxyVerdict};
use outpost_tests::wait_until;

fn hub_with_device() -> (TestHub, Fleet, SimDevice) {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    let token = hub.enroll_token("site=lab", 10);
    let device = SimDevice::enroll(&hub.url(), &token, &[], &fleet.root);
    (hub, fleet, device)
}

#[test]
fn device_requests_must_be_fresh_signed_and_from_known_devices() {
    let (_hub, _fleet, device) = hub_with_device();
    let body = device.check_in_body(AgentState::Steady);

    // The exact same signed request twice: the second is a replay.
    let request = device.sign("POST", "/device/v1/checkin", Some(&body));
    assert_eq!(request.send().status, 200);
    request.send().refused(401, "replayed");

    // Signed ten minutes ago, beyond the allowed clock skew.
    device
        .sign_at("POST", "/device/v1/checkin", Some(&body), unix_now() - 600)
        .send()
        .refused(401, "stale");

    // A signature that does not cover the body sent.
    let mut tampered = device.sign("POST", "/device/v1/checkin", Some(&body));
    let mut other_body = body.clone();
    *other_body.last_mut().unwrap() ^= 1;
    tampered.body = Some(other_body);
    tampered.send().refused(401, "bad request signature");

    // A signature by another key.
    let impostor = SecretKey::from_seed([7; 32]);
    let forged = device.sign("POST", "/device/v1/checkin", Some(&body));
    let signature = outpost_protocol::auth::RequestToSign {
        method: "POST",
        path_and_query: "/device/v1/checkin",
        body_sha256: outpost_protocol::sha256(&body),
        timestamp: unix_now(),
        nonce: [1; 16],
    }
    .sign(&impostor);
    let signature = hex::encode(signature.0);
    forged
        .with_header(HEADER_SIGNATURE, &signature)
        .send()
        .refused(401, "bad request signature");

    // A device id the hub never issued.
    device
        .sign("POST", "/device/v1/checkin", Some(&body))
        .with_header(HEADER_DEVICE, &"ab".repeat(16))
        .send()
        .refused(401, &format!("unknown device {}", "ab".repeat(16)));

    // None of that got in the way of the real device.
    device.check_in(AgentState::Steady);
}

/// Requests that arrive together have their signatures checked in one batch: a bad one among them
/// is refused alone, and every good one goes through.
#[test]
fn signatures_checked_together_fail_only_their_own_request() {
    let (hub, fleet, first) = hub_with_device();
    let token = hub.enroll_token("site=lab", 10);
    let mut devices = vec![first];
    for _ in 0..7 {
        devices.push(SimDevice::enroll(&hub.url(), &token, &[], &fleet.root));
    }
    let rounds = 20;
    std::thread::scope(|scope| {
        for (index, device) in devices.iter().enumerate() {
            scope.spawn(move || {
                let body = device.check_in_body(AgentState::Steady);
                for round in 0..rounds {
                    let mut request = device.sign("POST", "/device/v1/checkin", Some(&body));
                    if (index + round) % 3 == 0 {
                        let mut other = body.clone();
                        *other.last_mut().unwrap() ^= 1;
                        request.body = Some(other);
                        request.send().refused(401, "bad request signature");
                    } else {
                        assert_eq!(request.send().status, 200, "device {index} round {round}");
                    }
                }
            });
        }
    });
    // Every one of those signatures went through the verifier.
    let metrics = hub.metrics();
    let counter = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    assert_eq!(
        counter("outpost_hub_signatures_checked_total"),
        devices.len() as u64 * rounds as u64
    );
    assert!(counter("outpost_hub_signature_batches_total") >= 1);
}

/// Issue 21, finding 9: a device enrolling with any token could add labels of its own choosing
/// and so join any rollout's selector and count in its gates (sybil devices). It gets its
/// token's labels only; what it claims beyond them is shown in its enrollment event.
#[test]
fn a_device_gets_its_tokens_labels_and_no_others() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    let token = hub.enroll_token("site=lab", 1);
    let device = SimDevice::enroll(
        &hub.url(),
        &token,
        &["tier=canary", "site=elsewhere", "site=lab"],
        &fleet.root,
    );
    let id = device.id.to_hex();
    let shown: Vec<DeviceSummary> = hub.cli_json(&["device", "list"]);
    let shown = shown.iter().find(|summary| summary.id == id).unwrap();
    assert_eq!(shown.labels, ["site=lab"]);
    let canaries: Vec<DeviceSummary> =
        hub.cli_json(&["device", "list", "--selector", "tier=canary"]);
    assert!(canaries.is_empty(), "{canaries:?}");
    let detail: outpost_hub::api::DeviceDetail = hub.cli_json(&["device", "show", &id]);
    let enrolled = detail
        .events
        .iter()
        .find(|event| event.kind == "enrolled")
        .unwrap();
    assert!(
        enrolled.detail.ends_with(
            "labels it claimed beyond its token's, not applied: tier=canary,site=elsewhere"
        ),
        "{enrolled:?}"
    );
    // An admin grants a label with `device label`.
    hub.cli(&["device", "label", &id, "--set", "tier=canary"])
        .ok();
    let canaries: Vec<DeviceSummary> =
        hub.cli_json(&["device", "list", "--selector", "tier=canary"]);
    assert_eq!(canaries.len(), 1);
}

#[test]
fn revoked_device_is_refused() {
    let (hub, _fleet, device) = hub_with_device();
    device.check_in(AgentState::Steady);
    let id = device.id.to_hex();
    let revoked: DeviceSummary = hub.cli_json(&["device", "revoke", &id]);
    assert!(revoked.revoked);
    assert_eq!(revoked.state, "revoked");

    let body = device.check_in_body(AgentState::Steady);
    device
        .sign("POST", "/device/v1/checkin", Some(&body))
        .send()
        .refused(403, "revoked");
    let download = device.signed_request(
        "GET",
        &format!("/device/v1/artifacts/{}", "00".repeat(32)),
        None,
    );
    download.refused(403, "revoked");
}

/// One admin request and the status it answered with.
fn admin_status(hub: &TestHub, token: Option<&str>, method: &str, path: &str, body: &Body) -> u16 {
    let agent = http_agent();
    let url = format!("{}/admin/v1{path}", hub.url());
    let result = match method {
        "GET" | "DELETE" => {
            let mut request = if method == "GET" {
                agent.get(&url)
            } else {
                agent.delete(&url)
            };
            if let Some(token) = token {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            request.call()
        }
        _ => {
            let mut request = agent.post(&url);
            if let Some(token) = token {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            match body {
                Body::Json(value) => request
                    .header("content-type", "application/json")
                    .send(serde_json::to_vec(value).unwrap().as_slice()),
                Body::Bytes(bytes) => request
                    .header("content-type", "application/octet-stream")
                    .send(bytes.as_slice()),
                Body::None => request.send_empty(),
            }
        }
    };
    result.unwrap().status().as_u16()
}

#[derive(Debug)]
enum Body {
    None,
    Json(serde_json::Value),
    Bytes(Vec<u8>),
}

#[test]
fn every_admin_action_needs_its_role() {
    let (hub, fleet, device) = hub_with_device();
    fleet.publish_example(&hub, "demo", 1, 1);
    fleet.publish_example(&hub, "demo", 2, 2);
    let rollout = fleet.create_rollout(
        &hub,
        "demo",
        2,
        1,
        &["--stages", "50,100", "--bake", "1h", "--manual-advance"],
    );
    let manifest = http_agent()
        .get(format!("{}/admin/v1/models/demo/1/manifest", hub.url()))
        .header("Authorization", format!("Bearer {}", hub.token()))
        .call()
        .unwrap()
        .body_mut()
        .read_to_vec()
        .unwrap();

    let roles = [Role::Viewer, Role::Operator, Role::Publisher, Role::Admin];
    let tokens: Vec<(Role, String)> = roles
        .iter()
        .map(|role| {
            let created: CreatedToken = hub.cli_json(&[
                "admin-token",
                "create",
                "--name",
                &format!("as-{}", role.as_str()),
                "--role",
                role.as_str(),
            ]);
            (*role, created.token)
        })
        .collect();

    let pause = format!("/rollouts/{}/pause", rollout.sequence);
    let resume = format!("/rollouts/{}/resume", rollout.sequence);
    let revoke = format!("/devices/{}/revoke", device.id.to_hex());
    // (name, method, path, body, weakest role allowed, status when allowed)
    let actions: Vec<(&str, &str, &str, Body, Role, u16)> = vec![
        ("whoami", "GET", "/whoami", Body::None, Role::Viewer, 200),
        (
            "model list",
            "GET",
            "/models",
            Body::None,
            Role::Viewer,
            200,
        ),
        (
            "rollout pause",
            "POST",
            &pause,
            Body::None,
            Role::Operator,
            200,
        ),
        // A re-publish of the exact manifest and root already stored is accepted as a no-op.
        (
            "model publish",
            "POST",
            "/models",
            Body::Bytes(manifest),
            Role::Publisher,
            200,
        ),
        (
            "root upload",
            "POST",
            "/roots",
            Body::Bytes(fleet.root.clone()),
            Role::Publisher,
            200,
        ),
        (
            "token create",
            "POST",
            "/enroll-tokens",
            Body::Json(serde_json::json!({"labels": [], "expires_in_secs": 3600, "uses": 1})),
            Role::Admin,
            201,
        ),
        (
            "device revoke",
            "POST",
            &revoke,
            Body::None,
            Role::Admin,
            200,
        ),
        (
            "admin-token create",
            "POST",
            "/admin-tokens",
            Body::Json(serde_json::json!({"name": "made-by-test", "role": "viewer"})),
            Role::Admin,
            201,
        ),
        (
            "admin-token list",
            "GET",
            "/admin-tokens",
            Body::None,
            Role::Admin,
            200,
        ),
        // No token has these ids: an admin learns so (404), anyone else is refused first.
        (
            "admin-token revoke",
            "DELETE",
            "/admin-tokens/0000000000000000",
            Body::None,
            Role::Admin,
            404,
        ),
        (
            "token revoke",
            "DELETE",
            "/enroll-tokens/0000000000000000",
            Body::None,
            Role::Admin,
            404,
        ),
    ];

    let mut failures = Vec::new();
    for (name, method, path, body, needs, allowed_status) in &actions {
        for (role, token) in &tokens {
            let expected = if role >= needs { *allowed_status } else { 403 };
            let got = admin_status(&hub, Some(token), method, path, body);
            if got != expected {
                failures.push(format!(
                    "{name} as {}: expected {expected}, got {got}",
                    role.as_str()
                ));
            }
            if *name == "rollout pause" && got == 200 {
                let resumed = admin_status(&hub, Some(hub.token()), "POST", &resume, &Body::None);
                assert_eq!(resumed, 200, "resuming after {name} as {}", role.as_str());
            }
        }
        for token in [None, Some("not-a-token")] {
            let got = admin_status(&hub, token, method, path, body);
            if got != 401 {
                failures.push(format!(
                    "{name} with token {token:?}: expected 401, got {got}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "RBAC mismatches:\n{}",
        failures.join("\n")
    );
}

/// Issue 21, finding 3: admin tokens could not be revoked and never expired, and enrollment
/// tokens could not be revoked before their expiry.
#[test]
fn admin_and_enrollment_tokens_are_listed_revoked_and_expire() {
    let hub = TestHub::start();
    let whoami = |token: &str| hub.cli_as(token, &["whoami"]);

    // Listed without their secrets, with role and expiry; 90 days unless told otherwise.
    let operator: CreatedToken = hub.cli_json(&[
        "admin-token",
        "create",
        "--name",
        "ci-bot",
        "--role",
        "operator",
    ]);
    whoami(&operator.token).ok();
    let listed: Vec<AdminTokenInfo> = hub.cli_json(&["admin-token", "list"]);
    let bot = listed
        .iter()
        .find(|token| token.id == operator.id)
        .unwrap_or_else(|| panic!("{listed:?}"));
    assert_eq!((bot.name.as_str(), bot.role), ("ci-bot", Role::Operator));
    let ninety_days = 90 * 24 * 3600;
    let expires = bot.expires.expect("a created token expires by default");
    assert!(
        (bot.created + ninety_days..=bot.created + ninety_days + 60).contains(&expires),
        "{bot:?}"
    );
    let bootstrap = listed.iter().find(|token| token.id != operator.id).unwrap();
    assert_eq!((bootstrap.role, bootstrap.expires), (Role::Admin, None));
    assert!(!serde_json::to_string(&listed)
        .unwrap()
        .contains(&operator.token));

    // Revoked, it stops working at once, and the audit log says who revoked it.
    hub.cli(&["admin-token", "revoke", &operator.id]).ok();
    whoami(&operator.token).fails_with("unknown or revoked token");
    let listed: Vec<AdminTokenInfo> = hub.cli_json(&["admin-token", "list"]);
    assert!(
        listed.iter().all(|token| token.id != operator.id),
        "{listed:?}"
    );
    hub.cli(&["admin-token", "revoke", &operator.id])
        .fails_with(&format!("no admin token {}", operator.id));

    // One that expires works until it does, then is refused naming the expiry.
    let brief: CreatedToken = hub.cli_json(&[
        "admin-token",
        "create",
        "--name",
        "brief",
        "--role",
        "viewer",
        "--expires",
        "2s",
    ]);
    whoami(&brief.token).ok();
    wait_until(
        Duration::from_secs(60),
        "the 2-second token to expire",
        || {
            let run = whoami(&brief.token);
            (!run.success).then_some(run)
        },
    )
    .fails_with("token \"brief\" expired at");

    // The last admin token that has not expired stays: revoking it would leave nobody able to
    // make tokens. With a second admin token the first can go.
    hub.cli(&["admin-token", "revoke", &bootstrap.id])
        .fails_with("is the hub's last admin token that has not expired");
    let second: CreatedToken = hub.cli_json(&[
        "admin-token",
        "create",
        "--name",
        "second-admin",
        "--role",
        "admin",
        "--expires",
        "never",
    ]);
    hub.cli_as(&second.token, &["admin-token", "revoke", &bootstrap.id])
        .ok();
    whoami(hub.token()).fails_with("unknown or revoked token");

    // An enrollment token, revoked before its expiry, enrolls nobody.
    let enroll: CreatedToken = hub.cli_as_json(
        &second.token,
        &["token", "create", "--uses", "5", "--expires", "1h"],
    );
    hub.cli_as(&second.token, &["token", "revoke", &enroll.id])
        .ok();
    let tokens: Vec<EnrollTokenInfo> = hub.cli_as_json(&second.token, &["token", "list"]);
    assert!(
        tokens.iter().all(|token| token.id != enroll.id),
        "{tokens:?}"
    );
    SimDevice::enroll_request(
        &hub.url(),
        &enroll.token,
        &SecretKey::from_seed([5; 32]),
        &[],
    )
    .refused(401, "unknown or revoked enrollment token");

    let audit: Vec<AuditEntry> = hub.cli_as_json(&second.token, &["audit", "log"]);
    let revocations: Vec<(&str, &str)> = audit
        .iter()
        .filter(|entry| entry.action.ends_with(" revoke"))
        .map(|entry| (entry.action.as_str(), entry.target.as_str()))
        .collect();
    assert_eq!(
        revocations,
        [
            ("admin-token revoke", operator.id.as_str()),
            ("admin-token revoke", bootstrap.id.as_str()),
            ("enroll-token revoke", enroll.id.as_str()),
        ]
    );
}

/// The staging files of uploads under way (the hub's `uploads/` directory), with their sizes.
fn partial_uploads(uploads: &std::path::Path) -> Vec<u64> {
    match std::fs::read_dir(uploads) {
        Ok(entries) => entries
            .map(|entry| entry.unwrap().metadata().map_or(0, |meta| meta.len()))
            .collect(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => panic!("listing {}: {error}", uploads.display()),
    }
}

/// Issue 21, finding 6: two uploads of one artifact at once shared one temporary file, so the
/// second's start truncated what the first had written and the first then stored a file with a
/// hole under the artifact's name; later publishes skipped it, because only its length was
/// checked. Each upload now writes a file of its own, and a stored file is hashed again before
/// it is relied on.
#[test]
fn concurrent_uploads_store_an_artifact_whole_and_a_damaged_one_is_uploaded_again() {
    let hub = TestHub::start();
    let bytes: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251 + 1) as u8).collect();
    let sha = outpost_protocol::sha256(&bytes).to_hex();
    let artifacts = hub.data().join("artifacts");
    let uploads = hub.data().join("uploads");
    let address = hub.url().trim_start_matches("http://").to_owned();
    let head = format!(
        "PUT /admin/v1/artifacts/{sha} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        hub.token(),
        bytes.len()
    );
    let half = bytes.len() / 2;

    // The first upload sends half its body, and the hub has written it.
    let mut first = std::net::TcpStream::connect(&address).unwrap();
    first.write_all(head.as_bytes()).unwrap();
    first.write_all(&bytes[..half]).unwrap();
    wait_until(AGENT_WAIT, "the first upload's half on disk", || {
        (partial_uploads(&uploads) == [half as u64]).then_some(())
    });
    // A second upload of the same artifact starts: the hub opens its temporary file (before
    // this change, the first one's, truncated).
    let mut second = std::net::TcpStream::connect(&address).unwrap();
    second.write_all(head.as_bytes()).unwrap();
    wait_until(AGENT_WAIT, "the second upload's temporary file", || {
        let partials = partial_uploads(&uploads);
        (partials.len() == 2 || partials.iter().any(|len| *len < half as u64)).then_some(())
    });
    // The first finishes; the second is abandoned.
    first.write_all(&bytes[half..]).unwrap();
    let mut answer = String::new();
    first.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    drop(second);
    let stored = std::fs::read(artifacts.join(&sha)).unwrap();
    assert!(
        stored == bytes,
        "the stored artifact differs from the upload from byte {:?} on",
        stored.iter().zip(&bytes).position(|(a, b)| a != b)
    );

    // A stored file that no longer hashes to its name is not taken as uploaded: it is set
    // aside, and the publisher's next upload stores it again.
    let mut damaged = bytes.clone();
    damaged[10] ^= 0xff;
    std::fs::write(artifacts.join(&sha), &damaged).unwrap();
    let url = format!("{}/admin/v1/artifacts/{sha}", hub.url());
    let auth = format!("Bearer {}", hub.token());
    let present = http_agent()
        .head(&url)
        .header("Authorization", &auth)
        .call()
        .unwrap()
        .status();
    assert_eq!(present, 404, "a damaged artifact was reported present");
    assert!(artifacts.join(format!("{sha}.corrupt")).exists());
    let put = http_agent()
        .put(&url)
        .header("Authorization", &auth)
        .header("content-type", "application/octet-stream")
        .send(&bytes[..])
        .unwrap()
        .status();
    assert_eq!(put, 201);
    assert!(std::fs::read(artifacts.join(&sha)).unwrap() == bytes);
}

#[test]
fn tampering_with_the_audit_log_is_detected() {
    let mut hub = TestHub::start();
    for name in ["alice", "bob", "carol"] {
        hub.cli(&["admin-token", "create", "--name", name, "--role", "viewer"])
            .ok();
    }
    let verdict: AuditVerdict = hub.cli_json(&["audit", "verify"]);
    assert!(verdict.intact, "{verdict:?}");
    let entries: Vec<AuditEntry> = hub.cli_json(&["audit", "log"]);
    let bob = entries
        .iter()
        .find(|entry| entry.detail.starts_with("bob as viewer"))
        .unwrap_or_else(|| panic!("no audit entry for bob: {entries:#?}"))
        .seq;
    let alice = entries
        .iter()
        .find(|entry| entry.detail.starts_with("alice as viewer"))
        .unwrap()
        .seq;

    // Alter bob's entry: "bob as viewer" becomes "rob as viewer", same length, valid postcard.
    assert!(hub.sigterm().success());
    let original = find_entry(hub.data(), b"bob as viewer");
    let mut altered = original.1.clone();
    let at = find(&altered, b"bob as viewer").unwrap();
    altered[at] = b'r';
    write_audit(hub.data(), original.0, Some(altered));
    hub.restart();
    hub.cli(&["audit", "verify"])
        .fails_with(&format!("entry {bob} was altered"));

    // Put bob's entry back and delete alice's, from the middle of the chain, instead.
    assert!(hub.sigterm().success());
    write_audit(hub.data(), original.0, Some(original.1.clone()));
    let (alice_seq, _) = find_entry(hub.data(), b"alice as viewer");
    write_audit(hub.data(), alice_seq, None);
    hub.restart();
    hub.cli(&["audit", "verify"])
        .fails_with(&format!("entry {alice} is missing"));
}

/// A hub's audit log as a compromised hub could serve it: bob's entry says "rob", and when
/// `consistent`, every hash from it on is computed afresh so the chain holds together.
fn rewritten_log(body: &[u8], consistent: bool) -> Vec<u8> {
    let mut entries: Vec<AuditEntry> = serde_json::from_slice(body).unwrap();
    let mut prev = [0u8; 32];
    for entry in &mut entries {
        if entry.detail.starts_with("bob as viewer") {
            entry.detail.replace_range(..1, "r");
        }
        if consistent {
            entry.prev_hash = hex::encode(prev);
            prev = outpost_hub::audit::entry_hash(
                &prev,
                entry.seq,
                entry.at,
                &entry.actor,
                &entry.action,
                &entry.target,
                &entry.detail,
            );
            entry.hash = hex::encode(prev);
        }
    }
    serde_json::to_vec(&entries).unwrap()
}

/// Issue 21, finding 8: `audit verify` asked the hub whether its own log was intact, so a hub
/// that is itself compromised could alter it and say yes, or rewrite the whole chain
/// consistently. Now the chain is checked on the operator's machine, and `--pin FILE` keeps the
/// head verified last outside the hub, which a rewritten log no longer holds.
#[test]
fn audit_verify_checks_the_chain_itself_and_against_a_head_pinned_outside_the_hub() {
    let hub = TestHub::start();
    for name in ["alice", "bob"] {
        hub.cli(&["admin-token", "create", "--name", name, "--role", "viewer"])
            .ok();
    }
    let pin = hub.dir().join("audit-head");
    let pin_arg = pin.to_string_lossy().into_owned();
    let first = hub.cli(&["audit", "verify", "--pin", &pin_arg]).ok();
    let entries: Vec<AuditEntry> = hub.cli_json(&["audit", "log"]);
    let head = entries.last().unwrap();
    assert_eq!(
        std::fs::read_to_string(&pin).unwrap(),
        format!("{} {}\n", head.seq, head.hash)
    );
    assert!(
        first.stdout.contains(&format!(
            "{} entries, checked here and on the hub; head entry {} pinned in",
            entries.len(),
            head.seq
        )),
        "{}",
        first.stdout
    );
    let bob = entries
        .iter()
        .find(|entry| entry.detail.starts_with("bob as viewer"))
        .unwrap()
        .seq;

    // The compromised hub alters bob's entry and vouches for its log.
    let proxy = Proxy::start(&hub.url());
    let consistent = Arc::new(AtomicBool::new(false));
    {
        let consistent = consistent.clone();
        proxy.set_hook(move |request, mut response| {
            if request.path.starts_with("/admin/v1/audit/verify") {
                response.body = br#"{"entries":3,"intact":true,"problem":null}"#.to_vec();
            } else if request.path.starts_with("/admin/v1/audit") {
                response.body = rewritten_log(&response.body, consistent.load(Ordering::SeqCst));
            }
            ProxyVerdict::Forward(response)
        });
    }
    let proxy_url = proxy.url();
    let via_proxy = |extra: &[&str]| {
        let mut args = vec!["audit", "verify", "--hub", &proxy_url];
        args.extend_from_slice(extra);
        hub.cli(&args)
    };
    via_proxy(&[]).fails_with(&format!(
        "checked here: entry {bob} was altered: its contents no longer match its hash"
    ));

    // It rewrites the chain consistently instead: no check of the chain alone can tell, but the
    // pinned head can, and stays where it was.
    consistent.store(true, Ordering::SeqCst);
    via_proxy(&[]).ok();
    via_proxy(&["--pin", &pin_arg]).fails_with(&format!("entry {} has hash ", head.seq));
    assert_eq!(
        std::fs::read_to_string(&pin).unwrap(),
        format!("{} {}\n", head.seq, head.hash)
    );

    // The real hub's log holds the pinned head, and the pin moves on to the new one.
    hub.cli(&[
        "admin-token",
        "create",
        "--name",
        "carol",
        "--role",
        "viewer",
    ])
    .ok();
    hub.cli(&["audit", "verify", "--pin", &pin_arg]).ok();
    let entries: Vec<AuditEntry> = hub.cli_json(&["audit", "log"]);
    let new_head = entries.last().unwrap();
    assert!(new_head.seq > head.seq);
    assert_eq!(
        std::fs::read_to_string(&pin).unwrap(),
        format!("{} {}\n", new_head.seq, new_head.hash)
    );
    std::fs::write(&pin, "not a head").unwrap();
    hub.cli(&["audit", "verify", "--pin", &pin_arg])
        .fails_with("does not hold an audit head (`SEQ HASH`, 64 hex digits)");
}

/// Runs `work` on the stopped hub's store (SQLite, `data/hub.db`), opened directly.
fn with_store<T>(data: &std::path::Path, work: impl AsyncFnOnce(&sqlx::SqlitePool) -> T) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let url = format!("sqlite://{}", data.join("hub.db").display());
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            let result = work(&pool).await;
            pool.close().await;
            result
        })
}

/// The audit row (its sequence and record bytes) whose record contains `needle`.
fn find_entry(data: &std::path::Path, needle: &[u8]) -> (i64, Vec<u8>) {
    let rows: Vec<(i64, Vec<u8>)> = with_store(data, async |pool| {
        sqlx::query_as("SELECT seq, record FROM audit ORDER BY seq")
            .fetch_all(pool)
            .await
            .unwrap()
    });
    rows.into_iter()
        .find(|(_, record)| find(record, needle).is_some())
        .unwrap_or_else(|| {
            panic!(
                "no audit record contains {:?}",
                String::from_utf8_lossy(needle)
            )
        })
}

/// Writes audit row `seq` with `record`, or deletes it.
fn write_audit(data: &std::path::Path, seq: i64, record: Option<Vec<u8>>) {
    with_store(data, async |pool| {
        let query = match record {
            Some(record) => sqlx::query("UPDATE audit SET record = $1 WHERE seq = $2")
                .bind(record)
                .bind(seq),
            None => sqlx::query("DELETE FROM audit WHERE seq = $1").bind(seq),
        };
        assert_eq!(query.execute(pool).await.unwrap().rows_affected(), 1);
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[test]
fn hostile_device_input_is_refused() {
    let (hub, _fleet, device) = hub_with_device();

    // Over the check-in frame cap (4 KiB), signed correctly: refused before it is decoded.
    let oversized = vec![0u8; 64 * 1024];
    let reply = device.signed_request("POST", "/device/v1/checkin", Some(&oversized));
    assert_eq!(
        reply.status,
        413,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );

    // Signed garbage: authentic, but not a check-in.
    let garbage = b"\x07this is not postcard".to_vec();
    device
        .signed_request("POST", "/device/v1/checkin", Some(&garbage))
        .refused(400, "check-in");

    // Enrollment with a token the hub never issued.
    let key = SecretKey::from_seed([9; 32]);
    SimDevice::enroll_request(&hub.url(), "not-a-real-token", &key, &[])
        .refused(401, "unknown or revoked enrollment token");

    // Garbage instead of an enrollment request.
    let reply = outpost_tests::device_sim::send(
        &format!("{}/device/v1/enroll", hub.url()),
        &[],
        Some(b"garbage"),
    );
    reply.refused(400, "enroll request");

    // The hub is still serving the real device.
    device.check_in(AgentState::Steady);
}

/// The value of the un-labelled series `name` in a Prometheus text.
fn series(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Issue 21, finding 5: `/metrics` answered anyone, and scanned every device and a day of drift
/// summaries at each scrape. Now a scrape needs an admin token (a viewer's will do) unless the
/// hub runs with `--metrics-public`, and reads gauges the engine computed at its latest tick:
/// with the engine ticking once an hour, a device enrolled after the first tick shows in the
/// counters at once but in the device gauges not at all.
#[test]
fn metrics_need_a_token_and_scrapes_do_not_read_the_store() {
    let hub = TestHub::start_ticking("1h");
    let fleet = Fleet::new(&hub);
    // The engine's first tick, at start, computed the gauges.
    wait_until(AGENT_WAIT, "the first tick's gauges", || {
        series(&hub.metrics(), "outpost_hub_fleet_gauges_timestamp_seconds")
    });

    let url = format!("{}/metrics", hub.url());
    let refused = |headers: &[(String, String)], why: &str| {
        let reply = outpost_tests::device_sim::send(&url, headers, None);
        let body = String::from_utf8_lossy(&reply.body);
        assert_eq!(reply.status, 401, "{body}");
        assert_eq!(body, format!("{{\"error\":\"{why}\"}}"));
    };
    refused(&[], "missing bearer token");
    let wrong = [(
        "Authorization".to_owned(),
        "Bearer opa_not_a_token".to_owned(),
    )];
    refused(&wrong, "unknown or revoked token");
    let viewer: CreatedToken = hub.cli_json(&[
        "admin-token",
        "create",
        "--name",
        "prometheus",
        "--role",
        "viewer",
        "--expires",
        "never",
    ]);
    let as_viewer = [(
        "Authorization".to_owned(),
        format!("Bearer {}", viewer.token),
    )];
    let reply = outpost_tests::device_sim::send(&url, &as_viewer, None);
    assert_eq!(reply.status, 200);

    let token = hub.enroll_token("site=lab", 1);
    let device = SimDevice::enroll(&hub.url(), &token, &[], &fleet.root);
    device.check_in(AgentState::Steady);
    let text = hub.metrics();
    assert_eq!(
        series(&text, "outpost_hub_enrollments_total"),
        Some(1),
        "{text}"
    );
    assert_eq!(
        series(&text, "outpost_hub_check_ins_total"),
        Some(1),
        "{text}"
    );
    assert!(
        !text.contains("outpost_hub_devices{"),
        "a scrape read the store:\n{text}"
    );

    // Served to anyone only when the operator says so.
    let public = TestHub::start_serving(&[], &["--metrics-public"]);
    let reply = outpost_tests::device_sim::send(&format!("{}/metrics", public.url()), &[], None);
    assert_eq!(reply.status, 200);
    assert!(
        public.log().contains("--metrics-public"),
        "{}",
        public.log()
    );
}

/// Issue 21, finding 11: the nonce cache starts empty, so a request signed by a device whose clock
/// runs ahead, captured before a hub restart and dated after it, was accepted again after it.
/// The hub now keeps each device's latest accepted request time, and refuses after a restart any
/// request dated no later than one it accepted before.
#[test]
fn a_request_captured_before_a_restart_is_not_replayable_after_it() {
    let (mut hub, _fleet, device) = hub_with_device();
    // The device's clock runs two minutes ahead: within the allowed skew.
    let ahead = unix_now() + 120;
    let report = outpost_protocol::encode(&outpost_protocol::device::StatusReport {
        plan_sequence: None,
        manifest: None,
        status: outpost_protocol::device::Status::Failed {
            reason: "out of memory".to_owned(),
        },
        at: ahead,
    })
    .unwrap();
    let captured = device.sign_at("POST", "/device/v1/status", Some(&report), ahead);
    assert_eq!(captured.send().status, 204);
    captured.send().refused(401, "nonce already used");

    assert!(hub.sigterm().success());
    hub.restart_at_same_address();
    captured.send().refused(
        401,
        "signed no later than a request accepted before the hub restarted",
    );
    // The device itself, signing afresh, is served: in the same second (a hub restarts
    // quickly) as in a later one.
    for at in [ahead, ahead + 1] {
        let fresh = device.sign_at("POST", "/device/v1/status", Some(&report), at);
        assert_eq!(fresh.send().status, 204);
    }
    let detail: outpost_hub::api::DeviceDetail =
        hub.cli_json(&["device", "show", &device.id.to_hex()]);
    let failures = detail
        .events
        .iter()
        .filter(|event| event.kind == "failed")
        .count();
    assert_eq!(failures, 3, "{:#?}", detail.events);
}

/// A telemetry batch's request is noted in the transaction that stores the batch (one pass
/// through the store's writer), and that transaction is durable before the acknowledgement: a
/// hub killed right after acknowledging refuses the captured request when it comes back.
#[test]
fn a_telemetry_batch_acknowledged_before_a_power_cut_is_not_replayable_after_it() {
    let (mut hub, _fleet, device) = hub_with_device();
    let ahead = unix_now() + 120;
    let batch = outpost_protocol::encode(&outpost_protocol::device::TelemetryBatch {
        sequence: 7,
        windows: Vec::new(),
        dropped_records: 3,
    })
    .unwrap();
    let captured = device.sign_at("POST", "/device/v1/telemetry", Some(&batch), ahead);
    let ack: outpost_protocol::device::TelemetryAck = captured.send().decode();
    assert!(!ack.duplicate);

    hub.kill9();
    hub.restart_at_same_address();
    captured.send().refused(
        401,
        "signed no later than a request accepted before the hub restarted",
    );
    // The batch itself was kept: signed afresh, it is a duplicate.
    let again = device.sign_at("POST", "/device/v1/telemetry", Some(&batch), ahead + 1);
    let ack: outpost_protocol::device::TelemetryAck = again.send().decode();
    assert!(ack.duplicate);
}
