//! Issue 26, alert rules and webhooks, over real processes: a real hub, simulated devices sending
//! drifting and then ordinary telemetry, and a real HTTP receiver on loopback that checks the
//! HMAC of every delivery with its endpoint's secret (computed here from SHA-256 alone, not with
//! the hub's code). Every wait is on an event (a delivery reaching the receiver, a listing at the
//! hub); timeouts only turn a hang into a failure.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_hub::alerts::payload::{AlertmanagerPayload, OutpostPayload};
use outpost_hub::api::{
    AlertInfo, AlertRuleInfo, AuditEntry, CreatedWebhook, DeliveryInfo, WebhookInfo,
};
use outpost_protocol::device::{InferenceWindow, TelemetryAck};
use outpost_protocol::drift::Profile;
use outpost_protocol::{sha256, Sha256};
use outpost_tests::device_sim::{drift_window, unix_now, SimDevice};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::{wait_until, RefusedPort};

/// Long enough for any delivery on a loaded machine, a restart included; only a hang reaches it.
const PATIENCE: Duration = Duration::from_secs(120);
/// Inputs x1 and x3 shifted by three standard deviations: every drift metric alerts.
const DRIFT: &[(usize, f32)] = &[(1, 3.0), (3, 3.0)];
/// Rows of the drifting window, and of the ordinary one that outweighs it.
const DRIFT_ROWS: usize = 400;
const ORDINARY_ROWS: usize = 60_000;

/// HMAC-SHA256 (RFC 2104) over SHA-256 alone, independent of the hub's `ring`.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&sha256(key).0);
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let inner: Vec<u8> = block
        .iter()
        .map(|b| b ^ 0x36)
        .chain(message.iter().copied())
        .collect();
    let outer: Vec<u8> = block
        .iter()
        .map(|b| b ^ 0x5c)
        .chain(sha256(&inner).0)
        .collect();
    sha256(&outer).0
}

#[test]
fn the_independent_hmac_matches_openssl() {
    // printf '%s' 'The quick brown fox jumps over the lazy dog' | openssl dgst -sha256 -hmac key
    assert_eq!(
        hex::encode(hmac_sha256(
            b"key",
            b"The quick brown fox jumps over the lazy dog"
        )),
        "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    );
}

/// One request the receiver took, and what it answered.
#[derive(Debug, Clone)]
struct Delivery {
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
    /// Whether the signature header is the HMAC of the body under the path's secret.
    signed: bool,
    answered: u16,
}

impl Delivery {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }

    fn outpost(&self) -> OutpostPayload {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn alertmanager(&self) -> AlertmanagerPayload {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A webhook receiver on 127.0.0.1: per path the secret it checks signatures with, and the
/// statuses to answer, in turn, before answering 200 to everything (401 to a bad signature).
struct TestReceiver {
    port: u16,
    secrets: Arc<Mutex<BTreeMap<String, String>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
    deliveries: Receiver<Delivery>,
}

impl TestReceiver {
    fn start() -> TestReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let secrets: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
        let script: Arc<Mutex<VecDeque<u16>>> = Arc::default();
        let (sender, deliveries) = std::sync::mpsc::channel();
        let (thread_secrets, thread_script) = (secrets.clone(), script.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if let Some(delivery) = serve(stream, &thread_secrets, &thread_script) {
                    if sender.send(delivery).is_err() {
                        return;
                    }
                }
            }
        });
        TestReceiver {
            port,
            secrets,
            script,
            deliveries,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn trust(&self, path: &str, secret: &str) {
        self.secrets
            .lock()
            .unwrap()
            .insert(path.to_owned(), secret.to_owned());
    }

    fn answer_next(&self, status: u16) {
        self.script.lock().unwrap().push_back(status);
    }

    /// The next delivery, waiting at most [`PATIENCE`].
    fn next(&self, what: &str) -> Delivery {
        match self.deliveries.recv_timeout(PATIENCE) {
            Ok(delivery) => delivery,
            Err(RecvTimeoutError::Timeout) => panic!("no delivery within {PATIENCE:?}: {what}"),
            Err(RecvTimeoutError::Disconnected) => panic!("the receiver stopped: {what}"),
        }
    }

    /// Every delivery received and not yet taken.
    fn rest(&self) -> Vec<Delivery> {
        self.deliveries.try_iter().collect()
    }
}

/// Reads one HTTP/1.1 request, checks its signature and answers it.
fn serve(
    mut stream: TcpStream,
    secrets: &Mutex<BTreeMap<String, String>>,
    script: &Mutex<VecDeque<u16>>,
) -> Option<Delivery> {
    stream.set_read_timeout(Some(PATIENCE)).ok()?;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let (path, headers, body_start) = loop {
        let read = stream.read(&mut chunk).ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
        let mut parsed = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut parsed);
        if let httparse::Status::Complete(length) = request.parse(&buffer).ok()? {
            let headers: BTreeMap<String, String> = request
                .headers
                .iter()
                .map(|header| {
                    (
                        header.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(header.value).into_owned(),
                    )
                })
                .collect();
            break (request.path?.to_owned(), headers, length);
        }
    };
    let length: usize = headers.get("content-length")?.parse().ok()?;
    while buffer.len() < body_start + length {
        let read = stream.read(&mut chunk).ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
    let body = buffer[body_start..body_start + length].to_vec();
    let signed = secrets.lock().unwrap().get(&path).is_some_and(|secret| {
        let expected = format!(
            "sha256={}",
            hex::encode(hmac_sha256(secret.as_bytes(), &body))
        );
        headers.get("x-outpost-signature-256") == Some(&expected)
    });
    let answered = if signed {
        script.lock().unwrap().pop_front().unwrap_or(200)
    } else {
        401
    };
    let reply = format!("answer {answered}");
    let _ = write!(
        stream,
        "HTTP/1.1 {answered} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
        reply.len()
    );
    Some(Delivery {
        path,
        headers,
        body,
        signed,
        answered,
    })
}

/// A hub with demo@1 (with its drift profile) published by its fleet, one device labelled
/// `site=lab`, and the profile to make its summaries with.
struct Setup {
    hub: TestHub,
    fleet: Fleet,
    device: SimDevice,
    profile: (Profile, Sha256),
    sequence: u64,
}

impl Setup {
    fn new(hub: TestHub) -> Setup {
        let fleet = Fleet::new(&hub);
        let dir = fleet.publish_example_with_profile(&hub, "demo", 1, 1);
        let bytes = std::fs::read(dir.join("profile.bin")).unwrap();
        let profile = (outpost_protocol::decode(&bytes).unwrap(), sha256(&bytes));
        let token = hub.enroll_token("site=lab", 1);
        let device = SimDevice::enroll(&hub.url(), &token, &[], &fleet.root);
        Setup {
            hub,
            fleet,
            device,
            profile,
            sequence: 0,
        }
    }

    fn window(&self, rows: usize, seed: u64, shift: &[(usize, f32)]) -> InferenceWindow {
        let start = unix_now() / 3600 * 3600;
        let profile = (&self.profile.0, self.profile.1);
        drift_window("demo", 1, profile, start, rows, seed, shift)
    }

    /// Sends a batch of one window; returns once the hub acknowledged it.
    fn send(&mut self, window: InferenceWindow) {
        self.sequence += 1;
        let ack: TelemetryAck = self
            .device
            .send_telemetry(self.sequence, vec![window])
            .decode();
        assert!(!ack.duplicate);
    }

    fn drift(&mut self) {
        let window = self.window(DRIFT_ROWS, 7, DRIFT);
        self.send(window);
    }

    fn ordinary(&mut self) {
        let window = self.window(ORDINARY_ROWS, 8, &[]);
        self.send(window);
    }

    fn webhook(&self, receiver: &TestReceiver, name: &str, path: &str, format: &str) {
        let created: CreatedWebhook = self.hub.cli_json(&[
            "webhook",
            "create",
            name,
            "--url",
            &receiver.url(path),
            "--format",
            format,
        ]);
        assert_eq!(created.secret.len(), 64);
        receiver.trust(path, &created.secret);
    }

    fn deliveries(&self, state: &str) -> Vec<DeliveryInfo> {
        self.hub
            .cli_json(&["webhook", "deliveries", "--state", state])
    }
}

/// `alert create NAME --model MODEL --when WHEN` and `extra`, as the CLI takes them.
fn rule_args(name: &str, model: &str, when: &str, extra: &[&str]) -> Vec<String> {
    ["alert", "create", name, "--model", model, "--when", when]
        .iter()
        .chain(extra)
        .map(ToString::to_string)
        .collect()
}

/// Arguments as the owned strings a case list keeps.
fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(ToString::to_string).collect()
}

/// The CLI's arguments as `&str`s.
fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The receiver's deliveries until one of each path in `paths` (in any order).
fn one_each(receiver: &TestReceiver, paths: &[&str], what: &str) -> BTreeMap<String, Delivery> {
    let mut got = BTreeMap::new();
    while got.len() < paths.len() {
        let delivery = receiver.next(what);
        assert!(paths.contains(&delivery.path.as_str()), "{delivery:?}");
        assert!(
            got.insert(delivery.path.clone(), delivery).is_none(),
            "two deliveries to one path: {what}"
        );
    }
    got
}

#[test]
fn drift_fires_on_the_telemetry_that_shows_it_and_resolves_on_the_telemetry_that_ends_it() {
    // The engine ticks once an hour: only the telemetry batch can make these alerts move.
    let mut setup = Setup::new(TestHub::start_ticking("1h"));
    let receiver = TestReceiver::start();
    setup.webhook(&receiver, "pipeline", "/outpost", "outpost");
    setup.webhook(&receiver, "pager", "/am", "alertmanager");
    let rule: AlertRuleInfo = setup.hub.cli_json(&strs(&rule_args(
        "demo-drift",
        "demo",
        "drift>=alert",
        &["--selector", "site=lab", "--webhook", "pipeline,pager"],
    )));
    // Alert rather than warn: values out of the reference's range keep a feature at warn (a
    // quality issue) for as long as the drifted rows are in the window, however diluted.
    assert_eq!(rule.condition, "drift>=alert");
    // A test message first: the receiver's answer comes back to the operator.
    let test = setup.hub.cli(&["webhook", "test", "pipeline"]).ok();
    assert!(
        test.stdout.contains("answered 200: answer 200"),
        "{}",
        test.stdout
    );
    let message = receiver.next("the test message");
    assert!(message.signed);
    assert_eq!(message.header("x-outpost-event"), "test");
    assert_eq!(message.outpost().kind, "test");

    setup.drift();
    let firing = one_each(&receiver, &["/outpost", "/am"], "the firing notifications");
    let outpost = &firing["/outpost"];
    assert!(outpost.signed && outpost.answered == 200, "{outpost:?}");
    let payload = outpost.outpost();
    assert_eq!(payload.kind, "firing");
    assert_eq!(payload.version, 1);
    assert_eq!(payload.model, "demo");
    assert_eq!(payload.model_version, Some(1));
    assert_eq!(payload.label_group, vec!["site=lab".to_owned()]);
    assert_eq!(payload.rule.name, "demo-drift");
    assert_eq!(payload.idempotency_key, outpost.header("idempotency-key"));
    assert_eq!(outpost.header("x-outpost-event"), "firing");
    let involved: Vec<&str> = payload.features.iter().map(|f| f.name.as_str()).collect();
    assert!(
        involved.contains(&"x1") && involved.contains(&"x3"),
        "{involved:?}"
    );
    assert!(!involved.contains(&"x0"), "{involved:?}");
    let report = payload.drift_report.as_ref().unwrap();
    assert_eq!(report.selector, vec!["site=lab".to_owned()]);
    assert!(report
        .features
        .iter()
        .any(|f| f.name == "x1" && f.status == "alert"));
    assert!(payload.time_range.since < payload.time_range.until);
    // Issue 26: where the captured samples of the drifting version are, for a pipeline to fetch.
    assert_eq!(
        payload.samples.as_deref(),
        Some(
            format!(
                "/admin/v1/captures?model={}&version={}&since={}",
                payload.model,
                payload.model_version.unwrap(),
                payload.time_range.since
            )
            .as_str()
        )
    );
    assert!(payload.ends_at.is_none());

    let pager = &firing["/am"];
    assert!(pager.signed && pager.answered == 200, "{pager:?}");
    let am = pager.alertmanager();
    assert_eq!((am.version.as_str(), am.status.as_str()), ("4", "firing"));
    assert_eq!(am.receiver, "pager");
    assert_eq!(am.alerts[0].labels["alertname"], "demo-drift");
    assert_eq!(am.alerts[0].labels["site"], "lab");
    assert_eq!(am.alerts[0].labels["severity"], "critical");
    assert_eq!(am.alerts[0].ends_at, "0001-01-01T00:00:00Z");
    assert_eq!(pager.header("idempotency-key"), payload.idempotency_key);

    let alerts: Vec<AlertInfo> = setup.hub.cli_json(&["alert", "status"]);
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(
        (alerts[0].key.as_str(), alerts[0].state.as_str()),
        ("demo@1", "firing")
    );
    // The dashboard lists the rule and the firing alert.
    let page = ureq::get(format!("{}/dashboard/alerts", setup.hub.url()))
        .header("Cookie", format!("outpost_token={}", setup.hub.token()))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    assert!(
        page.contains("demo-drift") && page.contains("demo@1"),
        "{page}"
    );

    // Ordinary data outweighs the drifted rows: the alert resolves, once, on that batch.
    setup.ordinary();
    let resolved = one_each(
        &receiver,
        &["/outpost", "/am"],
        "the resolved notifications",
    );
    let payload_resolved = resolved["/outpost"].outpost();
    assert!(resolved["/outpost"].signed);
    assert_eq!(payload_resolved.kind, "resolved");
    assert_eq!(payload_resolved.starts_at, payload.starts_at);
    assert!(payload_resolved.ends_at.is_some());
    assert_ne!(payload_resolved.idempotency_key, payload.idempotency_key);
    let am_resolved = resolved["/am"].alertmanager();
    assert_eq!(am_resolved.status, "resolved");
    assert_ne!(am_resolved.alerts[0].ends_at, "0001-01-01T00:00:00Z");
    assert_eq!(am_resolved.alerts[0].fingerprint, am.alerts[0].fingerprint);
    let alerts: Vec<AlertInfo> = setup.hub.cli_json(&["alert", "status"]);
    assert!(alerts.is_empty(), "{alerts:?}");
    // Nothing else is on its way: all four notifications are delivered, none pending.
    assert!(setup.deliveries("pending").is_empty());
    assert_eq!(setup.deliveries("delivered").len(), 4);
    assert!(receiver.rest().is_empty());
}

#[test]
fn a_hub_killed_before_a_delivery_succeeded_sends_each_message_once_after_its_restart() {
    let hub = TestHub::start_serving(&[], &["--webhook-retry", "200ms"]);
    let mut setup = Setup::new(hub);
    let receiver = TestReceiver::start();
    setup.webhook(&receiver, "pipeline", "/outpost", "outpost");
    setup
        .hub
        .cli(&strs(&rule_args(
            "demo-drift",
            "demo",
            "drift>=alert",
            &["--webhook", "pipeline"],
        )))
        .ok();
    // The receiver is down (503) for the first attempt; the hub dies right after it.
    receiver.answer_next(503);
    setup.drift();
    let refused = receiver.next("the first attempt at the firing notification");
    assert_eq!((refused.answered, refused.signed), (503, true));
    setup.hub.kill9();
    setup.hub.restart();
    setup.device.set_hub_url(&setup.hub.url());

    let firing = receiver.next("the firing notification after the restart");
    assert_eq!(firing.answered, 200);
    assert!(firing.signed);
    // The same message: its idempotency key and its bytes, signature and all.
    assert_eq!(
        firing.header("idempotency-key"),
        refused.header("idempotency-key")
    );
    assert_eq!(firing.body, refused.body);
    assert_eq!(firing.outpost().kind, "firing");

    setup.ordinary();
    let resolved = receiver.next("the resolved notification");
    assert_eq!(
        (resolved.answered, resolved.outpost().kind.as_str()),
        (200, "resolved")
    );
    // Both are marked delivered and nothing is pending, so nothing more will come: the receiver
    // took each message exactly once.
    assert!(setup.deliveries("pending").is_empty());
    let delivered = setup.deliveries("delivered");
    assert_eq!(delivered.len(), 2, "{delivered:?}");
    // One attempt or two, as the kill fell before or after the hub recorded the 503.
    assert_eq!(delivered.iter().filter(|d| d.kind == "firing").count(), 1);
    assert!(receiver.rest().is_empty());
}

#[test]
fn bad_rules_and_webhooks_are_refused_by_name_and_change_nothing() {
    let hub = TestHub::start_serving(
        &[],
        &["--webhook-retry", "100ms", "--webhook-attempts", "2"],
    );
    let mut setup = Setup::new(hub);
    // A model published without a drift profile: drift and quality rules cannot watch it.
    setup.fleet.publish_example(&setup.hub, "plain", 1, 2);
    let receiver = TestReceiver::start();
    setup.webhook(&receiver, "pipeline", "/outpost", "outpost");
    // A receiver that is not there.
    let unreachable = RefusedPort::bind();
    let gone = format!("{}/hook", unreachable.url());
    setup
        .hub
        .cli(&["webhook", "create", "gone", "--url", &gone])
        .ok();
    setup
        .hub
        .cli(&strs(&rule_args(
            "kept",
            "demo",
            "quality=nan",
            &["--webhook", "pipeline"],
        )))
        .ok();

    let snapshot = |setup: &Setup| {
        let rules: Vec<AlertRuleInfo> = setup.hub.cli_json(&["alert", "list"]);
        let webhooks: Vec<WebhookInfo> = setup.hub.cli_json(&["webhook", "list"]);
        let audit: Vec<AuditEntry> = setup.hub.cli_json(&["audit", "log"]);
        (rules, webhooks, audit.len())
    };
    let before = snapshot(&setup);
    let cases: Vec<(Vec<String>, &str)> =
        vec![
        (
            owned(&["webhook", "create", "x", "--url", "http://ci.example/hook"]),
            "webhook URL \"http://ci.example/hook\" is plain http to a host that is not loopback",
        ),
        (
            owned(&["webhook", "create", "x", "--url", "http://10.1.2.3/hook"]),
            "\"http://10.1.2.3/hook\" is plain http",
        ),
        (
            owned(&["webhook", "create", "x", "--url", "ftp://ci.example/hook"]),
            "neither https:// nor http://",
        ),
        (
            owned(&[
                "webhook",
                "create",
                "x",
                "--url",
                "http://127.0.0.1:9/x",
                "--format",
                "splunk",
            ]),
            "webhook format \"splunk\" is not outpost or alertmanager",
        ),
        (
            owned(&[
                "webhook",
                "create",
                "pipeline",
                "--url",
                "http://127.0.0.1:9/x",
            ]),
            "a webhook named \"pipeline\" exists",
        ),
        (
            owned(&["webhook", "delete", "pipeline"]),
            "is notified by alert rule(s) kept",
        ),
        (
            rule_args("r", "nosuch", "drift>=warn", &["--webhook", "pipeline"]),
            "no model named \"nosuch\" is published",
        ),
        (
            rule_args("r", "demo", "cpu>0.5", &["--webhook", "pipeline"]),
            "names unknown metric \"cpu\"",
        ),
        (
            rule_args("r", "demo", "drift>=warn", &["--for", "-5m", "--webhook", "pipeline"]),
            "is negative (-300 s)",
        ),
        (
            rule_args("r", "demo", "error-rate>1.5", &["--webhook", "pipeline"]),
            "error rate 1.5 is out of range",
        ),
        (
            rule_args("r", "demo", "drift>=warn", &["--window", "10m", "--webhook", "pipeline"]),
            "window of 600 s is out of range",
        ),
        (
            rule_args("r", "demo", "drift>=warn", &["--webhook", "nosuch"]),
            "no webhook named \"nosuch\"",
        ),
        (
            rule_args("kept", "demo", "drift>=warn", &["--webhook", "pipeline"]),
            "an alert rule named \"kept\" exists",
        ),
        (
            rule_args("r", "plain", "drift>=warn", &["--webhook", "pipeline"]),
            "no version of plain has a drift profile",
        ),
        (
            owned(&["alert", "delete", "nosuch"]),
            "no alert rule named \"nosuch\"",
        ),
        (
            owned(&["webhook", "test", "nosuch"]),
            "no webhook named \"nosuch\"",
        ),
    ];
    for (args, needle) in &cases {
        setup.hub.cli(&strs(args)).fails_with(needle);
        assert_eq!(snapshot(&setup), before, "after {args:?}");
    }

    // An unreachable receiver: `webhook test` says so, and a notification is tried twice, then
    // kept as a dead letter with the error.
    let run = setup
        .hub
        .cli(&["webhook", "test", "gone"])
        .fails_with("webhook gone could not be reached");
    assert!(run.stdout.contains("127.0.0.1"), "{}", run.stdout);
    setup
        .hub
        .cli(&strs(&rule_args(
            "lost",
            "demo",
            "drift>=warn",
            &["--webhook", "gone"],
        )))
        .ok();
    setup.drift();
    let dead = wait_until(PATIENCE, "a dead letter", || {
        let dead = setup.deliveries("dead");
        (!dead.is_empty()).then_some(dead)
    });
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        (dead[0].webhook.as_str(), dead[0].kind.as_str()),
        ("gone", "firing")
    );
    assert_eq!(dead[0].attempts, 2);
    assert_eq!(dead[0].last_status, None);
    assert!(
        dead[0].last_error.contains("127.0.0.1"),
        "{}",
        dead[0].last_error
    );
    let listed = setup.hub.cli(&["webhook", "dead-letters"]).ok();
    assert!(listed.stdout.contains("lost demo@1"), "{}", listed.stdout);
    // The other receiver got nothing: `kept` watches NaN, which this data has none of.
    assert!(receiver.rest().is_empty());
}

/// The metric names `text` declares with `# TYPE`, with the series names a histogram adds.
fn declared(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        names.insert(name.to_owned());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

/// Every `outpost_<prefix>_...` name in `text`.
fn named(text: &str, prefix: &str) -> std::collections::BTreeSet<String> {
    let start = format!("outpost_{prefix}_");
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(&start) {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_prometheus_rules_name_only_metrics_the_hub_and_agent_export() {
    let root = outpost_tests::workspace_root();
    let rules = std::fs::read_to_string(root.join("dist/prometheus/outpost-alerts.yml")).unwrap();
    // Without a YAML parser in the tree: every rule has its expression, and names a severity.
    let alerts = rules.matches("- alert: ").count();
    assert!(alerts >= 5, "{alerts} rules");
    assert_eq!(rules.matches("expr: ").count(), alerts);
    assert_eq!(rules.matches("severity: ").count(), alerts);
    assert!(!rules.contains('\t'), "YAML is indented with spaces");

    // The hub's names against what a real hub serves on /metrics.
    let hub = TestHub::start();
    let served = declared(&hub.fresh_metrics());
    let hub_names = named(&rules, "hub");
    assert!(hub_names.len() >= 5, "{hub_names:?}");
    for name in &hub_names {
        assert!(
            served.contains(name),
            "{name} is not on the hub's /metrics: {served:?}"
        );
    }
    // The agent's against the metrics its /metrics writer declares.
    let agent_source = std::fs::read_to_string(root.join("agent/src/api/metrics.rs")).unwrap();
    let exported: std::collections::BTreeSet<String> = named(&agent_source, "agent")
        .into_iter()
        .flat_map(|name| ["", "_bucket", "_sum", "_count"].map(|suffix| format!("{name}{suffix}")))
        .collect();
    let agent_names = named(&rules, "agent");
    assert!(agent_names.len() >= 3, "{agent_names:?}");
    for name in &agent_names {
        assert!(
            exported.contains(name),
            "{name} is not a metric the agent exports"
        );
    }
}
