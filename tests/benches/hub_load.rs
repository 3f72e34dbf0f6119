//! Load generator for the hub's device API (issue 3): how many signed check-ins and telemetry
//! batches one `outpost-hub serve` answers per second, and at what latency.
//!
//! It starts a real release-built hub on loopback with a fresh data directory, signs a 2-of-2
//! root, publishes two example model versions and starts a rollout from one to the other, so
//! every check-in answer carries a signed plan and a signed manifest as in production. It then
//! enrolls `OUTPOST_LOAD_DEVICES` simulated devices (not timed) and, for each client count in
//! `OUTPOST_LOAD_CLIENTS`, runs each scenario for `OUTPOST_LOAD_SECS` seconds after a one-second
//! warm-up: that many client threads, each with its own keep-alive HTTP connection, sign and send
//! requests back to back for the devices they own. Every request is signed with a fresh nonce and
//! every telemetry batch has a new sequence number, so the hub does its full work each time.
//!
//! Check-ins come two ways: `check-in` on `/device/v1/checkin`, whose answer carries the plan
//! and manifest in full (an older agent, or a device whose documents changed), and `held
//! check-in` on `/device/v2/checkin`, where the device names what it holds and the hub answers
//! "unchanged" — what an agent sends between rollout changes.
//!
//! The client shares the machine with the hub, so the bench also reads both processes' CPU time
//! from `/proc/<pid>/stat` and reports the hub's CPU cost per request, which does not depend on
//! how much of the machine the client took.
//! It reads the hub's `write_bytes` from `/proc/<pid>/io` too, and reports what the hub had
//! written to storage per request (its database and log, checkpoints included), which depends on
//! neither.
//!
//! ```sh
//! cargo bench -p outpost-tests --bench hub_load
//! ```
//!
//! The hub binary is `target/release/outpost-hub`, rebuilt first with `cargo build --release`,
//! unless `OUTPOST_HUB_BIN` names another one. Its store is SQLite in its data directory, or,
//! with `OUTPOST_LOAD_DATABASE=postgres`, a PostgreSQL server of its own on loopback, whose CPU
//! the "other" share of the machine then holds. This is a measurement, never a pass/fail test.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_model::example::normal_rows;
use outpost_protocol::device::{
    AgentState, CheckIn, CheckInResponse, HeldCheckIn, HeldCheckInResponse, InferenceWindow,
    TelemetryAck, TelemetryBatch, LATENCY_BUCKETS_US,
};
use outpost_protocol::drift::{DriftSummary, FeatureSource, Profile, TensorSide};
use outpost_protocol::{sha256, Message, Sha256};
use outpost_tests::bench::{
    env_number, machine_description, proc_status_field, release_hub_binary,
};
use outpost_tests::device_sim::{agent_version, unix_now, SignedRequest, SimDevice, POSTCARD};
use outpost_tests::hub::Fleet;

/// The model the bench publishes and rolls out.
const MODEL: &str = "bench-model";
/// Input features of the published model, each a numeric feature of its drift profile: the
/// project's goal is 5k drift batches/s of 100 features.
const MODEL_INPUTS: usize = 100;
/// Input tensors the [`MODEL_INPUTS`] columns come in: 4 of 25, built the way an agent summarises
/// a real model of four inputs. A tensor over `MAX_COLUMN_FEATURES` (32) columns is profiled as
/// spans, a mean and a standard deviation each (issue 20): one 100-column input gave 30 features,
/// and the bench sent 2,649-byte batches instead of 7,362-byte ones of 100 features. At 25 columns
/// a tensor every column is a feature.
const INPUT_TENSORS: usize = 4;
/// Outputs of the published model.
const MODEL_OUTPUTS: usize = 3;
/// Inference rows summarised in each telemetry batch's drift summary.
const ROWS_PER_SUMMARY: usize = 1000;
/// Check-ins signed ahead per second of a scenario, over all clients: more than the hub answers.
const PRESIGNED_PER_SECOND: usize = 45_000;
/// Drift batches signed ahead per second of a run (7.4 KB each: about 650 MB for a 10 s run).
const PRESIGNED_BATCHES_PER_SECOND: usize = 8_000;
/// Most requests one scenario may send, whatever the duration, to bound memory for latencies.
const MAX_REQUESTS_PER_SCENARIO: usize = 5_000_000;
/// How long the hub may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Threads that enroll devices before the measurement.
const ENROLL_THREADS: usize = 8;
/// Telemetry sequence numbers handed out so far.
static NEXT_SEQUENCE: AtomicU64 = AtomicU64::new(1);
/// Hours back from the current one that no earlier run's "new hour" batch has summarised.
static NEXT_HOUR_BACK: AtomicU64 = AtomicU64::new(0);
/// Linux reports process CPU time in `/proc` in units of USER_HZ, which is 100 on every
/// architecture Outpost builds for.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// Run parameters, from the environment.
#[derive(Debug)]
struct Settings {
    scenarios: Vec<Scenario>,
    n_devices: usize,
    client_counts: Vec<usize>,
    duration: Duration,
}

impl Settings {
    fn from_env() -> Settings {
        let client_counts = std::env::var("OUTPOST_LOAD_CLIENTS")
            .unwrap_or_else(|_| "16".to_owned())
            .split(',')
            .map(|text| {
                text.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("OUTPOST_LOAD_CLIENTS: {text:?} is not a number"))
            })
            .collect::<Vec<usize>>();
        let n_devices = usize::try_from(env_number("OUTPOST_LOAD_DEVICES", 1000))
            .expect("OUTPOST_LOAD_DEVICES fits in usize");
        assert!(
            client_counts
                .iter()
                .all(|&clients| clients > 0 && clients <= n_devices.min(1024)),
            "every client count must be between 1 and min(devices, 1024)"
        );
        let scenarios = match std::env::var("OUTPOST_LOAD_SCENARIOS").as_deref() {
            Err(_) | Ok("all") => vec![
                Scenario::CheckIn,
                Scenario::HeldCheckIn,
                Scenario::Telemetry,
                Scenario::TelemetryMerge,
            ],
            Ok("check-in") => vec![Scenario::CheckIn, Scenario::HeldCheckIn],
            Ok("drift") => vec![Scenario::Telemetry],
            Ok("drift-merge") => vec![Scenario::TelemetryMerge],
            Ok(other) => {
                panic!("OUTPOST_LOAD_SCENARIOS={other:?}: say all, check-in (both kinds), drift or drift-merge")
            }
        };
        Settings {
            scenarios,
            n_devices,
            client_counts,
            duration: Duration::from_secs(env_number("OUTPOST_LOAD_SECS", 10).clamp(1, 600)),
        }
    }
}

/// A `serve` process on loopback with its own temporary directory, killed when dropped.
///
/// The tests' `TestHub` runs the build profile of the test executable and a fast engine tick for
/// quick rollouts; the bench needs the release binary and the default tick, so it has its own.
#[derive(Debug)]
struct BenchHub {
    binary: PathBuf,
    dir: tempfile::TempDir,
    token: String,
    address: String,
    child: Child,
    /// The PostgreSQL server the store is in, with `OUTPOST_LOAD_DATABASE=postgres`; SQLite in
    /// the data directory otherwise.
    _postgres: Option<outpost_tests::postgres::Postgres>,
}

impl BenchHub {
    fn start(binary: PathBuf) -> BenchHub {
        let dir = tempfile::tempdir().expect("creating the hub's temporary directory");
        let data = dir.path().join("data");
        let (postgres, database) = match std::env::var("OUTPOST_LOAD_DATABASE").as_deref() {
            Err(_) | Ok("sqlite") => (None, Vec::new()),
            Ok("postgres") => {
                let server = outpost_tests::postgres::Postgres::start()
                    .unwrap_or_else(|error| panic!("{error}"));
                let url = server
                    .database("hub")
                    .unwrap_or_else(|error| panic!("{error}"));
                (Some(server), vec!["--database".to_owned(), url])
            }
            Ok(other) => panic!("OUTPOST_LOAD_DATABASE={other:?}: say sqlite or postgres"),
        };
        let bootstrap = Command::new(&binary)
            .args(["admin", "bootstrap", "--data"])
            .arg(&data)
            .args(&database)
            .env("RUST_LOG", "warn")
            .output()
            .expect("running outpost-hub admin bootstrap");
        assert!(
            bootstrap.status.success(),
            "admin bootstrap failed: {}",
            String::from_utf8_lossy(&bootstrap.stderr)
        );
        let token = String::from_utf8_lossy(&bootstrap.stdout).trim().to_owned();
        let address_file = dir.path().join("address");
        let log = File::create(dir.path().join("hub.log")).expect("creating the hub's log");
        let child = Command::new(&binary)
            .args(["serve", "--data"])
            .arg(&data)
            .args(&database)
            .args(["--listen", "127.0.0.1:0", "--address-file"])
            .arg(&address_file)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting outpost-hub serve");
        let started = Instant::now();
        let address = loop {
            if let Ok(text) = std::fs::read_to_string(&address_file) {
                if !text.trim().is_empty() {
                    break text.trim().to_owned();
                }
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "outpost-hub serve did not start listening within {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        BenchHub {
            binary,
            dir,
            token,
            address,
            child,
            _postgres: postgres,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    /// Runs the operator CLI against this hub and returns what it printed; panics on failure.
    fn cli(&self, args: &[&str]) -> String {
        let output = Command::new(&self.binary)
            .args(args)
            .current_dir(self.dir.path())
            .env("OUTPOST_HUB", self.url())
            .env("OUTPOST_TOKEN", &self.token)
            .env("RUST_LOG", "warn")
            .env_remove("OUTPOST_CA")
            .env_remove("OUTPOST_CLI_CONFIG")
            .output()
            .unwrap_or_else(|error| panic!("running outpost-hub {args:?}: {error}"));
        assert!(
            output.status.success(),
            "outpost-hub {args:?} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Release keys, a 2-of-2 root, versions 1 and 2 of [`MODEL`], and a rollout from 1 to 2.
    /// Returns the root's bytes, which devices trust.
    fn prepare_fleet(&self) -> Vec<u8> {
        let fleet = Fleet::ceremony(self.dir.path(), |args| {
            self.cli(args);
        });
        let keys = &fleet.keys;
        let root = fleet.root_path.to_string_lossy().into_owned();
        for version in [1u64, 2] {
            let out = self.path(&format!("model-{version}"));
            self.cli(&[
                "example-model",
                "--out",
                &out,
                "--seed",
                &version.to_string(),
                "--inputs",
                &MODEL_INPUTS.to_string(),
                "--input-tensors",
                &INPUT_TENSORS.to_string(),
                "--outputs",
                &MODEL_OUTPUTS.to_string(),
            ]);
            self.cli(&[
                "model",
                "publish",
                &format!("{out}/model.onnx"),
                "--name",
                MODEL,
                "--version",
                &version.to_string(),
                "--validation",
                &format!("{out}/validation.bin"),
                "--profile",
                &format!("{out}/profile.bin"),
                "--key",
                keys,
            ]);
        }
        self.cli(&[
            "rollout",
            "create",
            "--model",
            MODEL,
            "--version",
            "2",
            "--fallback",
            "1",
            "--root",
            &root,
            "--key",
            keys,
        ]);
        fleet.root
    }

    /// The drift profile version 1 was published with, and its hash.
    fn profile(&self) -> (Profile, outpost_protocol::Sha256) {
        let bytes = std::fs::read(self.path("model-1/profile.bin")).expect("reading profile.bin");
        let profile = outpost_protocol::decode(&bytes).expect("decoding profile.bin");
        (profile, sha256(&bytes))
    }

    fn enroll_token(&self, uses: usize) -> String {
        let output = self.cli(&[
            "token",
            "create",
            "--expires",
            "1d",
            "--uses",
            &uses.to_string(),
            "--json",
        ]);
        let created: outpost_hub::api::CreatedToken =
            serde_json::from_str(&output).expect("token create printed its JSON");
        created.token
    }
}

impl Drop for BenchHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User plus system CPU time of a process so far, in seconds.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|error| panic!("reading /proc/{pid}/stat: {error}"));
    // The command name in parentheses may contain spaces; fields are counted after it.
    let after_name = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().expect("utime is a number")
        + fields[12].parse::<u64>().expect("stime is a number");
    ticks as f64 / CLOCK_TICKS_PER_SEC
}

/// Bytes a process has had written to storage so far (`write_bytes` of `/proc/<pid>/io`: counted
/// when it dirties the page cache, so it includes what the kernel writes back later, and not
/// what it sends on sockets).
fn written_bytes(pid: &str) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_else(|error| panic!("reading /proc/{pid}/io: {error}"));
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or_else(|| panic!("/proc/{pid}/io has no write_bytes"))
}

/// The hub's signature-verifier counters from `/metrics`, read with the admin `token`:
/// (batches, signatures). None from a hub that checks each signature alone (before batches), so
/// the column reads "-".
fn signature_counters(host: &str, token: &str) -> Option<(u64, u64)> {
    let mut stream = TcpStream::connect(host).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let value = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    };
    Some((
        value("outpost_hub_signature_batches_total")?,
        value("outpost_hub_signatures_checked_total")?,
    ))
}

/// Busy and total CPU time of the whole machine so far, in seconds, from `/proc/stat`.
fn machine_cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("reading /proc/stat");
    let line = stat.lines().next().expect("/proc/stat has a cpu line");
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().expect("cpu times are numbers"))
        .collect();
    let total: u64 = ticks.iter().sum();
    // idle and iowait.
    let idle = ticks[3] + ticks.get(4).copied().unwrap_or(0);
    (
        (total - idle) as f64 / CLOCK_TICKS_PER_SEC,
        total as f64 / CLOCK_TICKS_PER_SEC,
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    CheckIn,
    /// A check-in naming the documents the device holds, answered "unchanged".
    HeldCheckIn,
    /// Each batch carries its device's summary of another hour, as agents upload closed hourly
    /// windows (or, after time offline, their backlog of them): every summary is a new record.
    Telemetry,
    /// Each batch carries its device's summary of the same hour again: every summary is merged
    /// into the one stored (decoded, added, encoded again), the costliest way to take one.
    TelemetryMerge,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::CheckIn => "check-in",
            Scenario::HeldCheckIn => "held check-in",
            Scenario::Telemetry => "drift summary batch, new hour",
            Scenario::TelemetryMerge => "drift summary batch, same hour",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Scenario::CheckIn => "/device/v1/checkin",
            Scenario::HeldCheckIn => "/device/v2/checkin",
            Scenario::Telemetry | Scenario::TelemetryMerge => "/device/v1/telemetry",
        }
    }
}

/// The check-in a steady device running version 1 sends.
fn check_in_body(plan_sequence: Option<u64>) -> Vec<u8> {
    outpost_protocol::encode(&CheckIn {
        state: AgentState::Steady,
        active: None,
        root_version: 1,
        plan_sequence,
        agent_version: agent_version(),
        dropped_records: 0,
        queue_bytes: 0,
    })
    .expect("encoding a check-in")
}

/// The window an agent serving version 1 sends: [`ROWS_PER_SUMMARY`] inference rows of standard
/// normal inputs summarised over every feature of the profile (inputs observed, numeric outputs
/// filled with the same kind of values, class outputs answered in turn), in the current hour,
/// with its latency histogram.
fn drift_window(profile: &Profile, profile_sha256: outpost_protocol::Sha256) -> InferenceWindow {
    let start = unix_now() / 3600 * 3600;
    let mut summary = DriftSummary::new(MODEL, 1, profile_sha256, profile, start, start + 3600);
    let columns = row_columns(profile);
    let width = columns
        .iter()
        .map(|column| column + 1)
        .max()
        .unwrap_or(0)
        .max(profile.features.len());
    let rows = normal_rows(width, ROWS_PER_SUMMARY, 7, 0.0);
    for (index, row) in rows.chunks(width).enumerate() {
        for ((feature, counts), &column) in profile
            .features
            .iter()
            .zip(summary.features.iter_mut())
            .zip(&columns)
        {
            counts.observe(f64::from(row[column]), &feature.edges);
        }
        // Every class output answers each row too: its classes in turn, a confidence from the
        // row's first value, so the counts and the confidence histogram fill as an agent's do.
        for (class, counts) in profile.classes.iter().zip(summary.classes.iter_mut()) {
            let Some(answer) = class.classes.get(index % class.classes.len().max(1)) else {
                continue;
            };
            let confidence = 0.5 + 0.5 * (row[0].abs() / 4.0).min(1.0);
            counts.observe(*answer, Some(confidence), &class.classes);
        }
    }
    let count = ROWS_PER_SUMMARY as u64;
    let mut latency_buckets = vec![0; LATENCY_BUCKETS_US.len() + 1];
    latency_buckets[3] = count;
    InferenceWindow {
        model: MODEL.to_owned(),
        version: 1,
        start,
        end: start + 3600,
        count,
        errors: 0,
        latency_buckets,
        drift: Some(summary),
        shadow: None,
    }
}

/// The column of a [`drift_window`] row each feature of `profile` reads: an input column feature
/// reads its column of the model's inputs side by side (the input tensors in the order the
/// profile first names them, each as wide as its highest column), as the model's `Concat` joins
/// them; any other feature reads the column at its own index.
fn row_columns(profile: &Profile) -> Vec<usize> {
    let mut widths: Vec<(&str, usize)> = Vec::new();
    for feature in &profile.features {
        if let (TensorSide::Input, FeatureSource::Column { tensor, index }) =
            (feature.side, &feature.source)
        {
            let width = *index as usize + 1;
            match widths.iter_mut().find(|(name, _)| name == tensor) {
                Some((_, known)) => *known = (*known).max(width),
                None => widths.push((tensor, width)),
            }
        }
    }
    let first_column = |tensor: &str| -> usize {
        widths
            .iter()
            .take_while(|(name, _)| *name != tensor)
            .map(|(_, width)| width)
            .sum()
    };
    let mut columns = Vec::with_capacity(profile.features.len());
    for (position, feature) in profile.features.iter().enumerate() {
        columns.push(match (feature.side, &feature.source) {
            (TensorSide::Input, FeatureSource::Column { tensor, index }) => {
                first_column(tensor) + *index as usize
            }
            _ => position,
        });
    }
    columns
}

/// One HTTP/1.1 request as it goes on the wire.
fn http_request(host: &str, signed: &SignedRequest, body: &[u8]) -> Vec<u8> {
    let path = signed
        .url
        .find("/device/")
        .map_or("/", |at| &signed.url[at..]);
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: {POSTCARD}\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in &signed.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// What a client sends, and what it needs to lay out more of it.
#[derive(Clone, Copy)]
struct Work<'a> {
    scenario: Scenario,
    /// The window the drift scenarios send, before it is moved to its hour.
    window: &'a InferenceWindow,
    /// "New hour": the hours before the current one that this run starts from.
    first_hour_back: u64,
    /// What each device holds, by device id, for held check-ins.
    held: &'a HashMap<[u8; 16], Sha256>,
}

impl Work<'_> {
    /// The device's `nth` request of this run (`turn` over the client's devices), signed by it and
    /// laid out as the bytes of its HTTP request, with the hours back its window summarises.
    fn request(&self, host: &str, devices: &[&SimDevice], turn: usize) -> (Vec<u8>, u64) {
        let device = devices[turn % devices.len()];
        let path = self.scenario.path();
        let (body, hours_back) = match self.scenario {
            Scenario::CheckIn => (check_in_body(None), 0),
            Scenario::HeldCheckIn => {
                let held = self.held.get(&device.id.0).copied();
                assert!(
                    held.is_some(),
                    "the device's documents were not fetched first"
                );
                let body = outpost_protocol::encode(&HeldCheckIn {
                    check_in: outpost_protocol::decode(&check_in_body(None))
                        .expect("decoding the check-in just encoded"),
                    held,
                })
                .expect("encoding a held check-in");
                (body, 0)
            }
            Scenario::Telemetry | Scenario::TelemetryMerge => {
                let mut window = self.window.clone();
                let mut hours_back = 0;
                if self.scenario == Scenario::Telemetry {
                    // The device's n-th batch of this run summarises the hour n hours before the
                    // first this run may use.
                    hours_back = self.first_hour_back + (turn / devices.len()) as u64;
                    let back = hours_back * 3600;
                    window.start -= back;
                    window.end -= back;
                    if let Some(summary) = &mut window.drift {
                        summary.window_start -= back;
                        summary.window_end -= back;
                    }
                }
                // One counter for the whole run keeps `(device, sequence)` unique across
                // scenarios, so no batch is taken for a resend; a device's batches are laid out
                // in its turn order, so its sequences increase as it sends them.
                let batch = TelemetryBatch {
                    sequence: NEXT_SEQUENCE.fetch_add(1, Ordering::Relaxed),
                    windows: vec![window],
                    dropped_records: 0,
                };
                let body = outpost_protocol::encode(&batch).expect("encoding a telemetry batch");
                (body, hours_back)
            }
        };
        let request = http_request(host, &device.sign("POST", path, Some(&body)), &body);
        (request, hours_back)
    }

    /// The first `count` requests of a client, signed ahead, as a fleet of devices would sign on
    /// their own CPUs.
    fn presign(&self, host: &str, devices: &[&SimDevice], count: usize) -> Vec<Vec<u8>> {
        (0..count)
            .map(|turn| self.request(host, devices, turn).0)
            .collect()
    }
}

/// A keep-alive HTTP/1.1 connection that sends requests already laid out as bytes and reads the
/// answers, so that what the bench measures is the hub rather than an HTTP client library (a
/// ureq client took as much CPU per request as the hub).
struct Connection {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Connection {
    fn open(address: &str) -> std::io::Result<Connection> {
        let stream = TcpStream::connect(address)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Connection {
            stream,
            buffer: Vec::with_capacity(16 * 1024),
        })
    }

    /// Sends one request and returns the answer's status and body.
    fn round_trip(&mut self, request: &[u8]) -> Result<(u16, Vec<u8>), String> {
        self.stream
            .write_all(request)
            .map_err(|error| format!("sending: {error}"))?;
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut response = httparse::Response::new(&mut headers);
            let parsed = response
                .parse(&self.buffer)
                .map_err(|error| format!("answer is not HTTP/1.1: {error}"))?;
            if let httparse::Status::Complete(head_len) = parsed {
                let status = response.code.unwrap_or(0);
                let length = response
                    .headers
                    .iter()
                    .find(|header| header.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|header| {
                        std::str::from_utf8(header.value)
                            .ok()?
                            .parse::<usize>()
                            .ok()
                    })
                    .ok_or("answer has no content-length")?;
                let end = head_len + length;
                if self.buffer.len() >= end {
                    let body = self.buffer[head_len..end].to_vec();
                    self.buffer.drain(..end);
                    return Ok((status, body));
                }
            }
            let filled = self.buffer.len();
            self.buffer.resize(filled + 16 * 1024, 0);
            let read = self.stream.read(&mut self.buffer[filled..]);
            self.buffer.truncate(filled + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) => return Err("the hub closed the connection".to_owned()),
                Ok(_) => {}
                Err(error) => return Err(format!("reading: {error}")),
            }
        }
    }
}

/// What one client thread saw.
#[derive(Debug, Default)]
struct ClientResult {
    /// Latency of each successful request in the measured window, in microseconds.
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
    request_bytes: usize,
    response_bytes: usize,
    /// Check-ins signed inside the measured loop because those signed ahead ran out.
    signed_late: u64,
    /// Hours back from the current one that this client's batches reached ("new hour" only).
    hours_back: u64,
}

/// One client thread: a keep-alive connection, sending requests for `devices` in turn: those
/// signed ahead, then (if the run outlasts them) requests signed as it goes.
fn client(
    work: Work<'_>,
    mut presigned: std::vec::IntoIter<Vec<u8>>,
    host: &str,
    devices: &[&SimDevice],
    warm_up_until: Instant,
    stop_at: Instant,
    budget: &AtomicU64,
) -> ClientResult {
    let scenario = work.scenario;
    let mut result = ClientResult::default();
    let mut connection = None;
    let mut turn = 0usize;
    loop {
        let now = Instant::now();
        if now >= stop_at {
            break;
        }
        let measured = now >= warm_up_until;
        if measured && budget.fetch_sub(1, Ordering::Relaxed) == 0 {
            break;
        }
        let request = presigned.next().unwrap_or_else(|| {
            // Ran past what was signed ahead: sign here, and say so in the results.
            result.signed_late += 1;
            work.request(host, devices, turn).0
        });
        if scenario == Scenario::Telemetry {
            result.hours_back = result
                .hours_back
                .max(work.first_hour_back + (turn / devices.len()) as u64 + 1);
        }
        turn += 1;
        let started = Instant::now();
        let outcome = match &mut connection {
            Some(connection) => Ok(connection),
            None => Connection::open(host)
                .map(|opened| connection.insert(opened))
                .map_err(|error| format!("connecting: {error}")),
        }
        .and_then(|connection| connection.round_trip(&request))
        .and_then(|(status, bytes)| {
            if status != 200 {
                return Err(format!(
                    "status {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ));
            }
            check_response(scenario, &bytes)?;
            Ok(bytes.len())
        });
        let elapsed = started.elapsed();
        match outcome {
            Ok(response_len) => {
                result.request_bytes = request.len();
                result.response_bytes = response_len;
                if measured {
                    result
                        .latencies_us
                        .push(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX));
                }
            }
            Err(error) => {
                // A broken connection is not reused.
                connection = None;
                result.errors += 1;
                result.first_error.get_or_insert(error);
            }
        }
    }
    result
}

/// Decodes the hub's answer and checks it is the full one: a plan and a manifest for a check-in,
/// a fresh (not duplicate) acknowledgement for a batch.
fn check_response(scenario: Scenario, bytes: &[u8]) -> Result<(), String> {
    fn decode<M: Message>(bytes: &[u8]) -> Result<M, String> {
        outpost_protocol::decode(bytes).map_err(|error| error.to_string())
    }
    match scenario {
        Scenario::CheckIn => {
            let response: CheckInResponse = decode(bytes)?;
            if response.plan.is_none() || response.manifest.is_none() {
                return Err("check-in answer carries no plan or manifest".to_owned());
            }
        }
        Scenario::HeldCheckIn => {
            let response: HeldCheckInResponse = decode(bytes)?;
            if !matches!(response, HeldCheckInResponse::Unchanged { .. }) {
                return Err("held check-in answered with documents, not \"unchanged\"".to_owned());
            }
        }
        Scenario::Telemetry | Scenario::TelemetryMerge => {
            let ack: TelemetryAck = decode(bytes)?;
            if ack.duplicate {
                return Err(format!("batch {} was taken for a duplicate", ack.sequence));
            }
        }
    }
    Ok(())
}

/// One row of the results table.
#[derive(Debug)]
struct Measurement {
    scenario: Scenario,
    clients: usize,
    requests: usize,
    errors: u64,
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    request_bytes: usize,
    response_bytes: usize,
    /// Hub CPU time per request, in microseconds.
    hub_cpu_us: f64,
    /// Bytes the hub had written to storage per request (its database and log), in kB.
    hub_written_kb: f64,
    /// Signatures the hub checked per batch over the window, when it reports them.
    signatures_per_batch: Option<f64>,
    /// Shares of the machine's CPU time over the measured window.
    hub_share: f64,
    client_share: f64,
    other_share: f64,
    /// The hub's resident memory at the end of the window, and its peak since it started (over
    /// every scenario run before this one too), in MiB.
    hub_rss_mib: (f64, f64),
}

fn percentile_ms(sorted_us: &[u32], quantile: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted_us.len() as f64 * quantile).ceil() as usize).clamp(1, sorted_us.len());
    f64::from(sorted_us[index - 1]) / 1000.0
}

fn measure(
    scenario: Scenario,
    hub: &BenchHub,
    devices: &[SimDevice],
    window: &InferenceWindow,
    held: &HashMap<[u8; 16], Sha256>,
    clients: usize,
    duration: Duration,
) -> Measurement {
    let host: &str = &hub.address;
    let hub_pid = hub.child.id().to_string();
    let budget = Arc::new(AtomicU64::new(MAX_REQUESTS_PER_SCENARIO as u64));
    let owned: Vec<Vec<&SimDevice>> = (0..clients)
        .map(|thread| devices.iter().skip(thread).step_by(clients).collect())
        .collect();
    // Signing ahead takes a few seconds of both cores; it is done before the clock starts.
    let per_second = match scenario {
        Scenario::CheckIn | Scenario::HeldCheckIn => PRESIGNED_PER_SECOND,
        Scenario::Telemetry | Scenario::TelemetryMerge => PRESIGNED_BATCHES_PER_SECOND,
    };
    let per_client = per_second * (duration.as_secs() as usize + 1) / clients + 1;
    let work = Work {
        scenario,
        window,
        first_hour_back: NEXT_HOUR_BACK.load(Ordering::Relaxed),
        held,
    };
    let mut presigned: Vec<std::vec::IntoIter<Vec<u8>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = owned
            .iter()
            .map(|devices| scope.spawn(move || work.presign(host, devices, per_client).into_iter()))
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("a signing thread panicked"))
            .collect()
    });
    let warm_up_until = Instant::now() + Duration::from_secs(1);
    let stop_at = warm_up_until + duration;
    let (results, before, after) = std::thread::scope(|scope| {
        let handles: Vec<_> = owned
            .iter()
            .zip(presigned.drain(..))
            .map(|(devices, presigned)| {
                let budget = &budget;
                scope.spawn(move || {
                    client(
                        work,
                        presigned,
                        host,
                        devices,
                        warm_up_until,
                        stop_at,
                        budget,
                    )
                })
            })
            .collect();
        // Sample CPU counters at the edges of the measured window, not of the warm-up.
        std::thread::sleep(warm_up_until.saturating_duration_since(Instant::now()));
        // The scrapes stay outside the CPU samples, so their work is not counted.
        let signed = signature_counters(host, &hub.token);
        let before = (
            cpu_seconds(&hub_pid),
            cpu_seconds("self"),
            machine_cpu_seconds(),
            signed,
            written_bytes(&hub_pid),
        );
        std::thread::sleep(stop_at.saturating_duration_since(Instant::now()));
        let after = (
            cpu_seconds(&hub_pid),
            cpu_seconds("self"),
            machine_cpu_seconds(),
            signature_counters(host, &hub.token),
            written_bytes(&hub_pid),
        );
        let results: Vec<ClientResult> = handles
            .into_iter()
            .map(|handle| handle.join().expect("a client thread panicked"))
            .collect();
        (results, before, after)
    });
    let (
        (hub0, client0, (busy0, total0), signed0, written0),
        (hub1, client1, (busy1, total1), signed1, written1),
    ) = (before, after);
    let signatures_per_batch = signed0.zip(signed1).map(|((b0, s0), (b1, s1))| {
        (s1.saturating_sub(s0)) as f64 / (b1.saturating_sub(b0)).max(1) as f64
    });
    let mut latencies: Vec<u32> = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    let (mut request_bytes, mut response_bytes, mut signed_late) = (0, 0, 0);
    for result in results {
        NEXT_HOUR_BACK.fetch_max(result.hours_back, Ordering::Relaxed);
        signed_late += result.signed_late;
        latencies.extend(result.latencies_us);
        errors += result.errors;
        first_error = first_error.or(result.first_error);
        request_bytes = request_bytes.max(result.request_bytes);
        response_bytes = response_bytes.max(result.response_bytes);
    }
    if let Some(error) = first_error {
        eprintln!(
            "{} with {clients} clients: {errors} failed requests; first: {error}",
            scenario.name()
        );
    }
    if signed_late > 0 {
        eprintln!(
            "{} with {clients} clients: {signed_late} check-ins were signed in the loop",
            scenario.name()
        );
    }
    latencies.sort_unstable();
    let requests = latencies.len();
    let seconds = duration.as_secs_f64();
    let (hub_cpu, client_cpu) = (hub1 - hub0, client1 - client0);
    let total = (total1 - total0).max(f64::EPSILON);
    Measurement {
        scenario,
        clients,
        requests,
        errors,
        per_second: requests as f64 / seconds,
        p50_ms: percentile_ms(&latencies, 0.50),
        p99_ms: percentile_ms(&latencies, 0.99),
        max_ms: percentile_ms(&latencies, 1.0),
        request_bytes,
        response_bytes,
        hub_cpu_us: hub_cpu * 1e6 / (requests.max(1) as f64),
        hub_written_kb: written1.saturating_sub(written0) as f64
            / 1000.0
            / (requests.max(1) as f64),
        signatures_per_batch,
        hub_share: hub_cpu / total,
        client_share: client_cpu / total,
        other_share: ((busy1 - busy0) - hub_cpu - client_cpu).max(0.0) / total,
        hub_rss_mib: (
            proc_status_field(&hub_pid, "VmRSS:") as f64 / 1024.0,
            proc_status_field(&hub_pid, "VmHWM:") as f64 / 1024.0,
        ),
    }
}

/// Enrolls `n_devices` devices in parallel (not timed).
fn enroll(hub: &BenchHub, n_devices: usize, root: &[u8]) -> Vec<SimDevice> {
    let token = hub.enroll_token(n_devices);
    let url = hub.url();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..ENROLL_THREADS)
            .map(|thread| {
                let count =
                    n_devices / ENROLL_THREADS + usize::from(thread < n_devices % ENROLL_THREADS);
                let (url, token) = (&url, &token);
                scope.spawn(move || {
                    (0..count)
                        .map(|_| SimDevice::enroll(url, token, &[], root))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| handle.join().expect("an enrolling thread panicked"))
            .collect()
    })
}

fn print_table(measurements: &[Measurement]) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "| Scenario | Clients | Requests | Errors | Per second | p50 | p99 | max | Request / response bytes | Hub CPU per request | Hub disk writes per request | Signatures per batch | CPU share hub / client / other | Hub RSS (peak so far) |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for row in measurements {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.0} | {:.2} ms | {:.2} ms | {:.1} ms | {} / {} | {:.0} µs | {:.1} kB | {} | {:.0}% / {:.0}% / {:.0}% | {:.0} MiB ({:.0}) |",
            row.scenario.name(),
            row.clients,
            row.requests,
            row.errors,
            row.per_second,
            row.p50_ms,
            row.p99_ms,
            row.max_ms,
            row.request_bytes,
            row.response_bytes,
            row.hub_cpu_us,
            row.hub_written_kb,
            row.signatures_per_batch
                .map_or("-".to_owned(), |ratio| format!("{ratio:.1}")),
            row.hub_share * 100.0,
            row.client_share * 100.0,
            row.other_share * 100.0,
            row.hub_rss_mib.0,
            row.hub_rss_mib.1,
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter or other flags mean nothing here.
    let settings = Settings::from_env();
    let binary = release_hub_binary();
    println!("hub_load: {}", machine_description());
    println!(
        "hub binary {}; {} devices; clients {:?}; {:?} per scenario after a 1 s warm-up",
        binary.display(),
        settings.n_devices,
        settings.client_counts,
        settings.duration
    );
    let hub = BenchHub::start(binary);
    let root = hub.prepare_fleet();
    let started = Instant::now();
    let devices = enroll(&hub, settings.n_devices, &root);
    println!(
        "enrolled {} devices in {:.1} s",
        devices.len(),
        started.elapsed().as_secs_f64()
    );
    // Prove the answers the bench counts are the real thing: the plan and manifest verify under
    // the fleet's root, as a device would check them.
    let offer = devices[0].verify_offer(&devices[0].check_in(AgentState::Steady));
    assert!(offer.is_some(), "check-ins carry no rollout");
    // What each device holds once it has applied its answer, for the held check-ins.
    let held: HashMap<[u8; 16], Sha256> = devices
        .iter()
        .map(|device| {
            let answer = device.check_in(AgentState::Steady);
            let digest = answer.held_digest().expect("check-ins carry a plan");
            (device.id.0, digest)
        })
        .collect();

    let (profile, profile_sha256) = hub.profile();
    // The goal is stated for 100-feature batches: a profile that summarises the inputs otherwise
    // (spans of a wide tensor) would measure something else.
    assert_eq!(
        profile.features.len(),
        MODEL_INPUTS,
        "the profile should have a numeric feature per input column"
    );
    let window = drift_window(&profile, profile_sha256);
    println!(
        "drift summary: {} numeric features, {} class outputs, {} rows",
        profile.features.len(),
        profile.classes.len(),
        ROWS_PER_SUMMARY
    );
    let mut measurements = Vec::new();
    for &clients in &settings.client_counts {
        for scenario in settings.scenarios.iter().copied() {
            let row = measure(
                scenario,
                &hub,
                &devices,
                &window,
                &held,
                clients,
                settings.duration,
            );
            eprintln!(
                "{} with {clients} clients: {:.0}/s",
                scenario.name(),
                row.per_second
            );
            measurements.push(row);
        }
    }
    println!();
    print_table(&measurements);
    println!();
    // Ratios within one client count, to the check-in measured next to them.
    let per_count = settings.scenarios.len();
    for group in measurements.chunks(per_count) {
        let Some(check_in) = group.iter().find(|row| row.scenario == Scenario::CheckIn) else {
            continue;
        };
        let batches = group
            .iter()
            .filter(|row| matches!(row.scenario, Scenario::Telemetry | Scenario::TelemetryMerge));
        for row in batches {
            println!(
                "{} clients, {}: batches/s ÷ check-ins/s = {:.2}; hub CPU per batch ÷ per check-in = {:.2}",
                check_in.clients,
                row.scenario.name(),
                row.per_second / check_in.per_second,
                row.hub_cpu_us / check_in.hub_cpu_us,
            );
        }
    }
}
