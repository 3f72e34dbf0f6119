//! A real `outpost-hub serve` in a child process, and the operator's side of it.
//!
//! [`TestHub`] bootstraps a fresh data directory, starts `serve` on `127.0.0.1:0` and learns the
//! port from `--address-file`, so tests run in parallel without port clashes. The operator side is
//! the real CLI with `OUTPOST_HUB` and `OUTPOST_TOKEN` set. [`Fleet`] does the key ceremony once
//! per hub: release keys, a 2-of-2 root uploaded to the hub, and example models published with it.
//!
//! With `OUTPOST_TEST_DATABASE=postgres`, every hub keeps its store in a PostgreSQL server of its
//! own ([`crate::postgres::Postgres`]) instead of SQLite in its data directory: `cargo xtask test`
//! runs the hub suites again that way, so both engines serve the same behaviour over real
//! processes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use outpost_hub::api::{CreatedToken, DriftReport, ModelVersionInfo, RolloutInfo};
use outpost_protocol::trust::{Signed, SignedBody};
use outpost_protocol::{Message, SecretKey};
use outpost_testkit::ports::free_port;
use serde::de::DeserializeOwned;

use crate::{bin, wait_until, Run};

/// The engine tick of tests' hubs: rollouts advance within a test's patience.
const TEST_TICK: &str = "200ms";
/// `serve`'s own default tick.
const DEFAULT_TICK: &str = "5s";
/// How long `serve` may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `serve` may take to exit after SIGTERM or SIGKILL.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// A running hub with its own temporary directory, killed when dropped.
#[derive(Debug)]
pub struct TestHub {
    /// Holds the data directory, the hub's log and any files a test writes (keys, roots).
    dir: tempfile::TempDir,
    data: PathBuf,
    /// The bootstrap admin token.
    token: String,
    /// `127.0.0.1:PORT` of the running serve; changes on restart.
    address: String,
    child: Option<Child>,
    /// Serves HTTPS with a certificate from `tls generate` when set: the CA's PEM file.
    ca: Option<PathBuf>,
    /// `serve --tick`: fast for tests' rollouts.
    tick: &'static str,
    /// `serve --poll-secs` and `--rollout-poll-secs`: 1 second each unless a test asks otherwise.
    poll_secs: (u32, u32),
    /// A command `serve` runs under (`prlimit ...`), if any.
    launcher: Vec<String>,
    /// More `serve` flags.
    serve_args: Vec<String>,
    /// Environment variables `serve` gets beside the test's own (an object store's credentials).
    serve_env: Vec<(String, String)>,
    /// The PostgreSQL database holding the store (`serve --database`); SQLite in the data
    /// directory when None.
    database: Option<String>,
    /// The server of that database, when this hub started it (`OUTPOST_TEST_DATABASE=postgres`).
    _postgres: Option<crate::postgres::Postgres>,
}

/// The store of a new test hub: a PostgreSQL server of its own when `OUTPOST_TEST_DATABASE` says
/// `postgres`, SQLite in the data directory when it is unset. Any other value is a mistake, and
/// fails.
fn test_database() -> Option<(crate::postgres::Postgres, String)> {
    match std::env::var("OUTPOST_TEST_DATABASE").as_deref() {
        Err(_) | Ok("" | "sqlite") => None,
        Ok("postgres") => {
            let server =
                crate::postgres::Postgres::start().unwrap_or_else(|error| panic!("{error}"));
            let url = server
                .database("hub")
                .unwrap_or_else(|error| panic!("{error}"));
            Some((server, url))
        }
        Ok(other) => panic!("OUTPOST_TEST_DATABASE={other:?}: expected postgres or sqlite"),
    }
}

impl TestHub {
    /// Bootstraps a new data directory and starts `serve` on it, over plain HTTP.
    pub fn start() -> TestHub {
        TestHub::start_with(false, TEST_TICK, (1, 1))
    }

    /// Like [`TestHub::start`], with the rollout engine ticking at `serve`'s default pace rather
    /// than the tests' fast one, for a bench that must not measure a busier engine than
    /// production runs.
    pub fn start_with_default_tick() -> TestHub {
        TestHub::start_with(false, DEFAULT_TICK, (1, 1))
    }

    /// Like [`TestHub::start`], with the rollout engine ticking every `tick`.
    pub fn start_ticking(tick: &'static str) -> TestHub {
        TestHub::start_with(false, tick, (1, 1))
    }

    /// Like [`TestHub::start`], telling devices to come back after `quiet` seconds outside a
    /// rollout and `in_rollout` seconds in one.
    pub fn start_polling(quiet: u32, in_rollout: u32) -> TestHub {
        TestHub::start_with(false, TEST_TICK, (quiet, in_rollout))
    }

    /// Like [`TestHub::start`], over HTTPS with a certificate `tls generate` made for `localhost`;
    /// the CLI trusts its CA, and so do simulated devices ([`crate::device_sim::trust_ca`]).
    pub fn start_tls() -> TestHub {
        TestHub::start_with(true, TEST_TICK, (1, 1))
    }

    /// Like [`TestHub::start`], with `serve` run under the command `launcher` (`prlimit ...`;
    /// none when empty) and given `serve_args` beside the tests' usual flags.
    pub fn start_serving(launcher: &[&str], serve_args: &[&str]) -> TestHub {
        let mut hub = TestHub::prepare(false, TEST_TICK, (1, 1));
        hub.launcher = launcher.iter().map(ToString::to_string).collect();
        hub.serve_args = serve_args.iter().map(ToString::to_string).collect();
        hub.spawn("127.0.0.1:0");
        hub
    }

    /// Starts `serve` on a copy of a hub data directory of release 0.1 kept as test data
    /// (`fixture/db`, its sled store, and `fixture/admin.token`, a token it holds), over plain
    /// HTTP, once `outpost-hub admin migrate` has moved the store into SQL; `before_migrating`
    /// sees the copy first.
    pub fn start_on_copy_of(fixture: &Path, before_migrating: impl FnOnce(&Path)) -> TestHub {
        let dir = tempfile::tempdir().expect("creating the hub's temporary directory");
        let data = dir.path().join("data");
        copy_tree(&fixture.join("db"), &data.join("db"));
        before_migrating(&data);
        let data_arg = data.to_string_lossy().into_owned();
        let migrated = crate::run(
            "outpost-hub",
            dir.path(),
            &["admin", "migrate", "--data", &data_arg],
        )
        .ok();
        assert!(
            migrated.stdout.contains("migrated: "),
            "{}",
            migrated.stdout
        );
        let token = std::fs::read_to_string(fixture.join("admin.token"))
            .unwrap_or_else(|error| panic!("reading the fixture's admin.token: {error}"))
            .trim()
            .to_owned();
        let mut hub = TestHub {
            dir,
            data,
            token,
            address: String::new(),
            child: None,
            ca: None,
            tick: TEST_TICK,
            poll_secs: (1, 1),
            launcher: Vec::new(),
            serve_args: Vec::new(),
            serve_env: Vec::new(),
            database: None,
            _postgres: None,
        };
        hub.spawn("127.0.0.1:0");
        hub
    }

    /// Bootstraps a new data directory with its store in the PostgreSQL database `database`, and
    /// starts `serve` on it.
    pub fn start_on_database(database: &str) -> TestHub {
        let mut hub =
            TestHub::prepare_on(false, TEST_TICK, (1, 1), Some((database.to_owned(), None)));
        hub.spawn("127.0.0.1:0");
        hub
    }

    /// Another `serve` on this hub's data directory and PostgreSQL database, with its own address
    /// and log: a replica, answering with the same admin token. Panics for a hub on SQLite, whose
    /// store one process owns.
    pub fn replica(&self) -> TestHub {
        let database = self
            .database
            .clone()
            .expect("replicas share a PostgreSQL database; this hub is on SQLite");
        let mut replica = TestHub {
            dir: tempfile::tempdir().expect("creating the replica's temporary directory"),
            data: self.data.clone(),
            token: self.token.clone(),
            address: String::new(),
            child: None,
            ca: None,
            tick: self.tick,
            poll_secs: self.poll_secs,
            launcher: Vec::new(),
            serve_args: self.serve_args.clone(),
            serve_env: self.serve_env.clone(),
            database: Some(database),
            _postgres: None,
        };
        replica.spawn("127.0.0.1:0");
        replica
    }

    fn start_with(tls: bool, tick: &'static str, poll_secs: (u32, u32)) -> TestHub {
        let mut hub = TestHub::prepare(tls, tick, poll_secs);
        hub.spawn("127.0.0.1:0");
        hub
    }

    /// Bootstraps a new data directory (and a certificate, with `tls`), without starting `serve`.
    fn prepare(tls: bool, tick: &'static str, poll_secs: (u32, u32)) -> TestHub {
        let database = test_database().map(|(server, url)| (url, Some(server)));
        TestHub::prepare_on(tls, tick, poll_secs, database)
    }

    /// [`TestHub::prepare`] with the store in `database` (its URL, and its server when this hub
    /// owns it), or SQLite in the data directory.
    fn prepare_on(
        tls: bool,
        tick: &'static str,
        poll_secs: (u32, u32),
        database: Option<(String, Option<crate::postgres::Postgres>)>,
    ) -> TestHub {
        let (database, postgres) = match database {
            Some((url, server)) => (Some(url), server),
            None => (None, None),
        };
        let dir = tempfile::tempdir().expect("creating the hub's temporary directory");
        let data = dir.path().join("data");
        let data_arg = data.to_string_lossy().into_owned();
        let mut bootstrap = vec!["admin", "bootstrap", "--data", &data_arg];
        if let Some(url) = &database {
            bootstrap.extend(["--database", url]);
        }
        let token = crate::run("outpost-hub", dir.path(), &bootstrap)
            .ok()
            .stdout
            .trim()
            .to_owned();
        assert!(!token.is_empty(), "admin bootstrap printed no token");
        if database.is_some() {
            assert!(
                !data.join("hub.db").exists(),
                "a hub told to keep its store in PostgreSQL made an SQLite one"
            );
        }
        let ca = tls.then(|| {
            let certs = dir.path().join("certs");
            let certs_arg = certs.to_string_lossy().into_owned();
            crate::run(
                "outpost-hub",
                dir.path(),
                &["tls", "generate", "--out", &certs_arg],
            )
            .ok();
            let ca = certs.join("ca.pem");
            crate::device_sim::trust_ca(
                &std::fs::read(&ca).expect("reading the generated CA certificate"),
            );
            ca
        });
        TestHub {
            dir,
            data,
            token,
            address: String::new(),
            child: None,
            ca,
            tick,
            poll_secs,
            launcher: Vec::new(),
            serve_args: Vec::new(),
            serve_env: Vec::new(),
            database,
            _postgres: postgres,
        }
    }

    fn address_file(&self) -> PathBuf {
        self.dir.path().join("address")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("hub.log")
    }

    /// Starts `serve` listening on `listen` and waits until it wrote the address it bound.
    ///
    /// A hub's first start on `127.0.0.1:0` gets a port of [`free_port`] instead, below the
    /// kernel's ephemeral range: a port the kernel handed out could be taken, while the hub is
    /// down, by any outgoing connection's local port (the agents' retries, for one), and
    /// [`TestHub::restart_at_same_address`] would then fail or, worse, reach another server. If
    /// another process took that port first, the start is tried again on the next one.
    fn spawn(&mut self, listen: &str) {
        if listen != "127.0.0.1:0" || !self.address.is_empty() {
            if let Err(log) = self.spawn_once(listen) {
                panic!("outpost-hub serve exited before listening; its log:\n{log}");
            }
            return;
        }
        let mut attempts = 0;
        loop {
            let port = free_port().unwrap_or_else(|error| panic!("{error}"));
            match self.spawn_once(&format!("127.0.0.1:{port}")) {
                Ok(()) => return,
                Err(log) if attempts < 3 && log.contains("Address already in use") => {
                    attempts += 1;
                }
                Err(log) => panic!("outpost-hub serve exited before listening; its log:\n{log}"),
            }
        }
    }

    /// One start of `serve` on `listen`: `Err` with the hub's log if it exited before listening.
    fn spawn_once(&mut self, listen: &str) -> Result<(), String> {
        assert!(self.child.is_none(), "the hub is already running");
        let address_file = self.address_file();
        match std::fs::remove_file(&address_file) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => panic!("removing {}: {error}", address_file.display()),
        }
        // Appending keeps the log of every run of this hub, for the failure report.
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_file())
            .expect("opening the hub's log file");
        let mut command = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(bin("outpost-hub"));
                command
            }
            None => Command::new(bin("outpost-hub")),
        };
        command
            .args(["serve", "--data"])
            .arg(&self.data)
            .args(["--listen", listen, "--address-file"])
            .arg(&address_file)
            .args(["--tick", self.tick])
            .arg("--poll-secs")
            .arg(self.poll_secs.0.to_string())
            .arg("--rollout-poll-secs")
            .arg(self.poll_secs.1.to_string());
        command.args(&self.serve_args);
        command.envs(self.serve_env.iter().map(|(name, value)| (name, value)));
        if let Some(url) = &self.database {
            command.args(["--database", url]);
        }
        if self.ca.is_some() {
            let certs = self.dir.path().join("certs");
            command
                .arg("--tls-cert")
                .arg(certs.join("hub.pem"))
                .arg("--tls-key")
                .arg(certs.join("hub.key"));
        }
        let child = command
            .current_dir(self.dir.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting outpost-hub serve");
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&address_file) {
                if !text.trim().is_empty() {
                    self.address = text.trim().to_owned();
                    return Ok(());
                }
            }
            if let Some(status) = self
                .child_mut()
                .try_wait()
                .expect("polling the hub process")
            {
                self.child = None;
                return Err(format!("(exited with {status})\n{}", self.log()));
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "outpost-hub serve did not write its address within {START_TIMEOUT:?}; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("the hub is not running")
    }

    /// Everything the hub has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// `http://127.0.0.1:PORT`, the base URL of both APIs; `https://localhost:PORT` (the name
    /// the certificate holds) over TLS.
    pub fn url(&self) -> String {
        match (&self.ca, self.address.rsplit_once(':')) {
            (Some(_), Some((_, port))) => format!("https://localhost:{port}"),
            _ => format!("http://{}", self.address),
        }
    }

    /// `GET /metrics` with the bootstrap admin token: the counters as they are now, and the
    /// gauges the engine computed at its latest tick.
    pub fn metrics(&self) -> String {
        let mut response = crate::device_sim::http_agent()
            .get(&format!("{}/metrics", self.url()))
            .header("Authorization", &format!("Bearer {}", self.token))
            .call()
            .expect("GET /metrics");
        response
            .body_mut()
            .read_to_string()
            .expect("reading /metrics")
    }

    /// `GET /metrics` once its gauges were computed after this call began (in a later whole
    /// second, as `outpost_hub_fleet_gauges_timestamp_seconds` counts): they show at least what
    /// the store held when it was called.
    pub fn fresh_metrics(&self) -> String {
        let since = crate::device_sim::unix_now();
        wait_until(
            Duration::from_secs(30),
            "/metrics gauges computed after now",
            || {
                let text = self.metrics();
                let computed: u64 = text
                    .lines()
                    .find_map(|line| {
                        line.strip_prefix("outpost_hub_fleet_gauges_timestamp_seconds ")?
                            .parse()
                            .ok()
                    })
                    .unwrap_or(0);
                (computed > since).then_some(text)
            },
        )
    }

    /// The bootstrap admin token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The temporary directory the CLI runs in; tests put their files here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data(&self) -> &Path {
        &self.data
    }

    /// Runs the CLI against this hub as the bootstrap admin.
    pub fn cli(&self, args: &[&str]) -> Run {
        self.cli_as(&self.token, args)
    }

    /// Runs the CLI against this hub with another admin token.
    pub fn cli_as(&self, token: &str, args: &[&str]) -> Run {
        let output = self
            .cli_command_as(token, args)
            .output()
            .unwrap_or_else(|error| panic!("running outpost-hub {args:?}: {error}"));
        Run::from_output(output)
    }

    /// The CLI command [`TestHub::cli`] runs, for a test that starts it in the background (to
    /// kill the hub while the command is under way).
    pub fn cli_command(&self, args: &[&str]) -> Command {
        self.cli_command_as(&self.token, args)
    }

    fn cli_command_as(&self, token: &str, args: &[&str]) -> Command {
        let mut command = Command::new(bin("outpost-hub"));
        command
            .args(args)
            .current_dir(self.dir.path())
            .env("OUTPOST_HUB", self.url())
            .env("OUTPOST_TOKEN", token)
            .env("RUST_LOG", "warn")
            .env_remove("OUTPOST_CA")
            .env_remove("OUTPOST_CLI_CONFIG");
        if let Some(ca) = &self.ca {
            command.env("OUTPOST_CA", ca);
        }
        command
    }

    /// Runs the CLI with `--json` added, requires success, and parses what it printed.
    pub fn cli_json<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut args = args.to_vec();
        args.push("--json");
        let run = self.cli(&args).ok();
        serde_json::from_str(&run.stdout).unwrap_or_else(|error| {
            panic!(
                "outpost-hub {args:?} printed no JSON ({error}):\n{}",
                run.stdout
            )
        })
    }

    /// [`TestHub::cli_json`] with `token` instead of the bootstrap admin token.
    pub fn cli_as_json<T: DeserializeOwned>(&self, token: &str, args: &[&str]) -> T {
        let mut args = args.to_vec();
        args.push("--json");
        let run = self.cli_as(token, &args).ok();
        serde_json::from_str(&run.stdout).unwrap_or_else(|error| {
            panic!(
                "outpost-hub {args:?} printed no JSON ({error}):\n{}",
                run.stdout
            )
        })
    }

    /// An enrollment token for `uses` devices, with the given `key=value` labels (comma-separated).
    pub fn enroll_token(&self, labels: &str, uses: u32) -> String {
        let uses = uses.to_string();
        let mut args = vec!["token", "create", "--expires", "1d", "--uses", &uses];
        if !labels.is_empty() {
            args.extend(["--labels", labels]);
        }
        self.cli_json::<CreatedToken>(&args).token
    }

    /// A new admin token named `name` with `role` (`viewer`, `operator`, ...).
    pub fn admin_token(&self, name: &str, role: &str) -> CreatedToken {
        self.cli_json(&["admin-token", "create", "--name", name, "--role", role])
    }

    /// `rollout status SEQUENCE --json`.
    pub fn rollout(&self, sequence: u64) -> RolloutInfo {
        self.cli_json(&["rollout", "status", &sequence.to_string()])
    }

    /// Waits until `drift report --model MODEL ARGS --json` counts `n` values of feature `x0`, and
    /// returns that report; panics if it ever counts more. Agents' telemetry reaches the hub on
    /// their own clock, so a test waits for the rows it served.
    pub fn drift_report_of(&self, model: &str, args: &[&str], n: u64) -> DriftReport {
        wait_until(
            crate::agent::AGENT_WAIT,
            &format!("a drift report of {model} {args:?} over {n} rows"),
            || {
                let mut all = vec!["drift", "report", "--model", model];
                all.extend_from_slice(args);
                let report: DriftReport = self.cli_json(&all);
                let counted = report
                    .features
                    .iter()
                    .find(|feature| feature.name == "x0")
                    .map_or(0, |feature| feature.n);
                assert!(counted <= n, "more rows counted than sent: {report:#?}");
                (counted == n).then_some(report)
            },
        )
    }

    /// The hub's process id; panics when it is not running.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the hub is not running").id()
    }

    /// Kills the hub with SIGKILL, as a power cut would, and reaps it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("the hub is not running");
        child.kill().expect("sending SIGKILL to the hub");
        child.wait().expect("reaping the killed hub");
    }

    /// Sends SIGTERM and waits (bounded) for the hub to exit; returns how it exited.
    pub fn sigterm(&mut self) -> ExitStatus {
        let pid = self.pid().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("running kill -TERM");
        assert!(status.success(), "kill -TERM {pid} failed");
        let mut child = self.child.take().expect("the hub is not running");
        wait_until(EXIT_TIMEOUT, "the hub to exit after SIGTERM", || {
            child.try_wait().expect("polling the hub process")
        })
    }

    /// Starts `serve` again on the same data directory (after [`TestHub::kill9`] or
    /// [`TestHub::sigterm`]). The port changes.
    pub fn restart(&mut self) {
        self.spawn("127.0.0.1:0");
    }

    /// Gives `serve` the environment variables `vars` from its next start on (replicas made
    /// after that get them too).
    pub fn set_serve_env(&mut self, vars: &[(&str, &str)]) {
        self.serve_env = vars
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
    }

    /// [`TestHub::restart`] with `serve_args` instead of those it was started with.
    pub fn restart_serving(&mut self, serve_args: &[&str]) {
        self.serve_args = serve_args.iter().map(ToString::to_string).collect();
        self.spawn("127.0.0.1:0");
    }

    /// Starts `serve` again on the same data directory and the same address, so running agents
    /// find it again without a change of config. The port was freed by the kill, and the hub
    /// binds with `SO_REUSEADDR`, so connections left in `TIME_WAIT` do not hold it; it is below
    /// the ephemeral range (see `TestHub::spawn`), so no outgoing connection takes it meanwhile.
    pub fn restart_at_same_address(&mut self) {
        let address = self.address.clone();
        self.spawn(&address);
        assert_eq!(
            self.address, address,
            "the hub came back on another address"
        );
    }
}

/// Copies the directory tree `from` to `to` (which must not exist yet), files and folders only.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to)
        .unwrap_or_else(|error| panic!("creating {}: {error}", to.display()));
    let entries = std::fs::read_dir(from)
        .unwrap_or_else(|error| panic!("reading {}: {error}", from.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|error| panic!("reading {}: {error}", from.display()));
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap_or_else(|error| {
                panic!(
                    "copying {} to {}: {error}",
                    entry.path().display(),
                    target.display()
                )
            });
        }
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- outpost-hub serve log ({}) ----\n{}",
                self.log_file().display(),
                self.log()
            );
        }
    }
}

/// The release keys and root of a hub's fleet, and the models published with them.
#[derive(Debug)]
pub struct Fleet {
    /// Both private keys, comma-separated, as `--key` takes them.
    pub keys: String,
    /// The signed root file, as `--root` takes it.
    pub root_path: PathBuf,
    /// The root's bytes: what a device is given out of band and trusts.
    pub root: Vec<u8>,
}

impl Fleet {
    /// Generates two release keys, signs a 2-of-2 root with them and uploads it.
    pub fn new(hub: &TestHub) -> Fleet {
        Fleet::ceremony(hub.dir(), |args| {
            hub.cli(args).ok();
        })
    }

    /// The same ceremony against any hub: `cli` runs the operator CLI against it (and panics if
    /// the command fails); the keys and the signed root are written under `dir`. The load bench
    /// runs it against its own release-built hub.
    pub fn ceremony(dir: &Path, cli: impl Fn(&[&str])) -> Fleet {
        let keys_dir = dir.join("keys");
        let keys_arg = keys_dir.to_string_lossy().into_owned();
        cli(&["keys", "generate", "--out", &keys_arg, "--count", "2"]);
        let mut keys: Vec<String> = std::fs::read_dir(&keys_dir)
            .expect("listing generated keys")
            .map(|entry| entry.expect("reading a key entry").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "key"))
            .map(|path| path.to_string_lossy().into_owned())
            .collect();
        keys.sort();
        assert_eq!(keys.len(), 2, "keys generate wrote {keys:?}");
        let keys = keys.join(",");
        let root_path = dir.join("root.bin");
        let root_arg = root_path.to_string_lossy().into_owned();
        cli(&[
            "root",
            "init",
            "--key",
            &keys,
            "--threshold",
            "2",
            "--out",
            &root_arg,
        ]);
        cli(&["root", "upload", &root_arg]);
        let root = std::fs::read(&root_path).expect("reading the signed root");
        Fleet {
            keys,
            root_path,
            root,
        }
    }

    /// The release keys' private halves, read from their files as the signing commands read
    /// them, for a test that signs a document no command would (a backdated manifest, say).
    pub fn release_keys(&self) -> Vec<SecretKey> {
        self.keys
            .split(',')
            .map(|path| {
                outpost_hub::keyfile::load_private(Path::new(path))
                    .unwrap_or_else(|error| panic!("loading release key {path}: {error:#}"))
            })
            .collect()
    }

    /// `body` signed by both release keys, as the signed document's bytes.
    pub fn sign<B: SignedBody>(&self, body: &B) -> Vec<u8>
    where
        Signed<B>: Message,
    {
        outpost_hub::cli::sign_document(body, &self.release_keys())
            .expect("signing a test document with the release keys")
    }

    /// Publishes an example model (deterministic from `seed`) as `name` `version`.
    pub fn publish_example(&self, hub: &TestHub, name: &str, version: u64, seed: u64) {
        self.publish_example_with(hub, name, version, seed, false, &[]);
    }

    /// Publishes an example model like [`Fleet::publish_example`], with the drift profile
    /// `example-model` writes (features `x0..x3`, class output `y`, from standard normal
    /// reference data). Returns the directory holding `profile.bin` and the other files.
    pub fn publish_example_with_profile(
        &self,
        hub: &TestHub,
        name: &str,
        version: u64,
        seed: u64,
    ) -> PathBuf {
        self.publish_example_with(hub, name, version, seed, true, &[])
    }

    /// Writes an example model with `example_args` added to `example-model` (`--hidden 4096`,
    /// say) into `model-NAME-VERSION/` and publishes it, with its profile if `with_profile`.
    /// Returns that directory.
    pub fn publish_example_with(
        &self,
        hub: &TestHub,
        name: &str,
        version: u64,
        seed: u64,
        with_profile: bool,
        example_args: &[&str],
    ) -> PathBuf {
        let out = hub.dir().join(format!("model-{name}-{version}"));
        let out_arg = out.to_string_lossy().into_owned();
        let seed = seed.to_string();
        let mut example = vec!["example-model", "--out", &out_arg, "--seed", &seed];
        example.extend_from_slice(example_args);
        hub.cli(&example).ok();
        let mut args = self.publish_args(&out, name, version);
        if with_profile {
            args.push("--profile".into());
            args.push(out.join("profile.bin").to_string_lossy().into_owned());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        hub.cli(&args).ok();
        out
    }

    /// Publishes `name` `version` with a validation set that expects another model's outputs,
    /// bypassing the CLI's own validation gate (as a publisher with a modified tool could): the
    /// manifest is validly signed, so only a device's own validation can refuse to commit it.
    pub fn publish_unvalidated(&self, hub: &TestHub, name: &str, version: u64) {
        let dir = hub.dir().join(format!("unvalidated-{name}-{version}"));
        let dir_arg = dir.to_string_lossy().into_owned();
        hub.cli(&[
            "example-model",
            "--out",
            &dir_arg,
            "--seed",
            "7",
            "--validation-seed",
            "8",
        ])
        .ok();
        let model = dir.join("model.onnx");
        let validation = dir.join("validation.bin");
        let manifest = dir.join("manifest.bin");
        hub.cli(&[
            "model",
            "sign",
            "--name",
            name,
            "--version",
            &version.to_string(),
            "--model",
            &model.to_string_lossy(),
            "--validation",
            &validation.to_string_lossy(),
            "--input",
            "x:FP32:N,4",
            "--output",
            "y:FP32:N,3",
            "--key",
            &self.keys,
            "--out",
            &manifest.to_string_lossy(),
        ])
        .ok();
        let client = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent();
        let auth = format!("Bearer {}", hub.token());
        for file in [&model, &validation] {
            let bytes = std::fs::read(file).expect("read an unvalidated artifact");
            let digest = outpost_protocol::sha256(&bytes).to_hex();
            let response = client
                .put(format!("{}/admin/v1/artifacts/{digest}", hub.url()))
                .header("Authorization", &auth)
                .send(&bytes[..])
                .expect("upload an unvalidated artifact");
            assert!(
                response.status().is_success(),
                "artifact upload: {}",
                response.status()
            );
        }
        let response = client
            .post(format!("{}/admin/v1/models", hub.url()))
            .header("Authorization", &auth)
            .send(&std::fs::read(&manifest).expect("read the manifest")[..])
            .expect("upload the manifest");
        assert_eq!(response.status().as_u16(), 201, "manifest upload");
    }

    /// The `model publish` arguments for the model and validation set `example-model` wrote into
    /// `dir`, as `name` `version`, for a test that runs the command its own way.
    pub fn publish_args(&self, dir: &Path, name: &str, version: u64) -> Vec<String> {
        let path = |file: &str| dir.join(file).to_string_lossy().into_owned();
        vec![
            "model".into(),
            "publish".into(),
            path("model.onnx"),
            "--name".into(),
            name.into(),
            "--version".into(),
            version.to_string(),
            "--validation".into(),
            path("validation.bin"),
            "--key".into(),
            self.keys.clone(),
        ]
    }

    /// Publishes the files `example-model` wrote into `dir` as `name` `version`; returns what
    /// the hub stored (or already held: publishing is idempotent).
    pub fn publish_dir(
        &self,
        hub: &TestHub,
        dir: &Path,
        name: &str,
        version: u64,
    ) -> ModelVersionInfo {
        let args = self.publish_args(dir, name, version);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        hub.cli_json(&args)
    }

    /// Signs and creates a first rollout of `model` `version` to every device in one stage, with
    /// no fallback (nothing ran before it).
    pub fn first_rollout(&self, hub: &TestHub, model: &str, version: u64) {
        self.first_rollout_with(hub, model, version, &[]);
    }

    /// [`Fleet::first_rollout`] with `extra` flags for `rollout create` (`--expires`, ...).
    pub fn first_rollout_with(&self, hub: &TestHub, model: &str, version: u64, extra: &[&str]) {
        let version = version.to_string();
        let root = self.root_path.to_string_lossy().into_owned();
        let mut args = vec![
            "rollout",
            "create",
            "--model",
            model,
            "--version",
            &version,
            "--root",
            &root,
            "--stages",
            "100",
            "--bake",
            "1s",
            "--key",
            &self.keys,
        ];
        args.extend_from_slice(extra);
        hub.cli(&args).ok();
    }

    /// Signs and creates a rollout of `model` from `fallback` to `version`; `extra` adds gate
    /// flags (`--stages`, `--bake`, ...).
    pub fn create_rollout(
        &self,
        hub: &TestHub,
        model: &str,
        version: u64,
        fallback: u64,
        extra: &[&str],
    ) -> RolloutInfo {
        let version = version.to_string();
        let fallback = fallback.to_string();
        let root = self.root_path.to_string_lossy().into_owned();
        let mut args = vec![
            "rollout",
            "create",
            "--model",
            model,
            "--version",
            &version,
            "--fallback",
            &fallback,
            "--root",
            &root,
            "--key",
            &self.keys,
        ];
        args.extend_from_slice(extra);
        hub.cli_json(&args)
    }
}
