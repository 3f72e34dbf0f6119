//! A real `outpost-agent run` process for end-to-end tests: its config, trust root and data
//! directory in a temp dir, enrolled with a [`TestHub`], its inference API on a free loopback
//! port, and its `status --json` as a value. The agent is the host build, or
//! ([`AgentProgram::emulated`]) another architecture's binary run under qemu-user.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outpost_hub::api::DeviceDetail;
use outpost_testkit::ports::free_port;
use serde_json::Value;

use crate::device_sim::unix_now;
use crate::hub::{Fleet, TestHub};
use crate::{bin, wait_until, Run};

/// How long an agent may take to reach a state a test waits for.
pub const AGENT_WAIT: Duration = Duration::from_secs(60);

/// The `outpost-agent` binary a [`TestAgent`] runs, and how it is started.
#[derive(Debug, Clone)]
pub struct AgentProgram {
    /// The emulator and its arguments put before the binary (`qemu-aarch64 -L SYSROOT`); empty
    /// for the host build.
    launcher: Vec<String>,
    binary: PathBuf,
    /// How long the agent may take to reach a state a test waits for: [`AGENT_WAIT`] natively,
    /// more under an emulator.
    pub wait: Duration,
}

impl AgentProgram {
    /// The host's `outpost-agent`, built by [`bin`].
    pub fn host() -> AgentProgram {
        AgentProgram {
            launcher: Vec::new(),
            binary: bin("outpost-agent"),
            wait: AGENT_WAIT,
        }
    }

    /// `binary` run as `launcher... binary ARGS`, waited for up to `wait`.
    pub fn emulated(launcher: Vec<String>, binary: PathBuf, wait: Duration) -> AgentProgram {
        AgentProgram {
            launcher,
            binary,
            wait,
        }
    }

    fn command(&self) -> Command {
        let mut command = match self.launcher.split_first() {
            Some((emulator, arguments)) => {
                let mut command = Command::new(emulator);
                command.args(arguments).arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        };
        command.env("RUST_LOG", "warn");
        command
    }

    /// Runs the agent with `args` in `dir` and waits for it.
    fn run(&self, dir: &Path, args: &[&str]) -> Run {
        let output = self
            .command()
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|error| panic!("running {self:?} {args:?}: {error}"));
        Run::from_output(output)
    }
}

#[derive(Debug)]
pub struct TestAgent {
    dir: tempfile::TempDir,
    config: PathBuf,
    program: AgentProgram,
    /// `127.0.0.1:PORT` of the inference API.
    pub listen: String,
    child: Option<Child>,
}

/// The runtime the host's test agents serve on: `OUTPOST_TEST_RUNTIME=onnxruntime` sets every
/// one to ONNX Runtime (the library `cargo xtask install` brings), and [`TestAgent::status`]
/// then fails if any model is served by tract: `cargo xtask test` runs the agent suites so, to
/// prove they hold on both runtimes. Unset, agents run with the default `auto` and no library, so
/// on tract.
pub fn suite_on_onnxruntime() -> bool {
    match std::env::var("OUTPOST_TEST_RUNTIME").as_deref() {
        Ok("onnxruntime") => true,
        Ok("tract") | Err(_) => false,
        Ok(other) => panic!("OUTPOST_TEST_RUNTIME={other:?}: give tract or onnxruntime"),
    }
}

/// `target/onnxruntime/<folder>/libonnxruntime.so`, which `cargo xtask install` extracts from
/// an `onnxruntime` wheel: `x86_64` (the host's), `old` (too old to load), `aarch64`.
pub fn onnxruntime_library(folder: &str) -> PathBuf {
    outpost_model::example::installed_onnxruntime(folder)
}

/// The `[sync]` settings every test agent gets: quick polls, flushes and retries.
const SYNC_DEFAULTS: [(&str, &str); 3] = [
    ("poll_jitter", "\"100ms\""),
    ("telemetry_flush", "\"300ms\""),
    ("max_backoff", "\"1s\""),
];

/// Splits a test's extra config into the lines of the `[sync]` table, with [`SYNC_DEFAULTS`] for
/// the keys it does not set, and everything else. TOML allows a table only once, so a test's own
/// `[sync]` keys must join the defaults rather than follow them in a second table.
fn split_sync(extra: &str) -> (String, String) {
    let (mut sync, mut rest) = (String::new(), String::new());
    let mut in_sync = false;
    for line in extra.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            in_sync = trimmed == "[sync]";
            if in_sync {
                continue;
            }
        }
        let out = if in_sync { &mut sync } else { &mut rest };
        out.push_str(line);
        out.push('\n');
    }
    let set = |key: &str| {
        sync.lines()
            .any(|line| line.split('=').next().map(str::trim) == Some(key))
    };
    let defaults: String = SYNC_DEFAULTS
        .iter()
        .filter(|(key, _)| !set(key))
        .map(|(key, value)| format!("{key} = {value}\n"))
        .collect();
    (defaults + &sync, rest)
}

impl TestAgent {
    /// Writes a config pointing at `hub` (with `extra` TOML appended to its sections; keys of its
    /// own `[sync]` table replace the test defaults) and the fleet's root, with `labels`
    /// (`k=v,k=v`) as the device's own, then enrolls with a fresh token carrying them too.
    pub fn enroll(hub: &TestHub, fleet: &Fleet, labels: &str, extra: &str) -> TestAgent {
        TestAgent::enroll_at(&hub.url(), hub, fleet, labels, extra)
    }

    /// [`TestAgent::enroll`], reaching the hub at `url` (a [`crate::proxy::Proxy`] in front of it).
    pub fn enroll_at(
        url: &str,
        hub: &TestHub,
        fleet: &Fleet,
        labels: &str,
        extra: &str,
    ) -> TestAgent {
        TestAgent::enroll_program(AgentProgram::host(), url, hub, fleet, labels, extra)
    }

    /// [`TestAgent::enroll`], knowing the hub at every one of `urls` (replicas of one hub):
    /// `hub_urls` in the config, and enrolled through them (`--hub` for each), tried in turn.
    /// `hub` makes the token.
    pub fn enroll_at_all(
        urls: &[&str],
        hub: &TestHub,
        fleet: &Fleet,
        labels: &str,
        extra: &str,
    ) -> TestAgent {
        TestAgent::enroll_program_at(AgentProgram::host(), urls, hub, fleet, labels, extra)
    }

    /// [`TestAgent::enroll_at`] with `program` as the agent, for this enrollment and every later
    /// run.
    pub fn enroll_program(
        program: AgentProgram,
        url: &str,
        hub: &TestHub,
        fleet: &Fleet,
        labels: &str,
        extra: &str,
    ) -> TestAgent {
        TestAgent::enroll_program_at(program, &[url], hub, fleet, labels, extra)
    }

    /// [`TestAgent::enroll_program`] reaching the hub at `urls`: one is written as `hub_url`
    /// (which every agent release reads), several as `hub_urls`.
    fn enroll_program_at(
        program: AgentProgram,
        urls: &[&str],
        hub: &TestHub,
        fleet: &Fleet,
        labels: &str,
        extra: &str,
    ) -> TestAgent {
        let hub_urls = match urls {
            [url] => format!("hub_url = {url:?}"),
            urls => format!("hub_urls = {urls:?}"),
        };
        let dir = tempfile::tempdir().expect("creating the agent's temporary directory");
        std::fs::write(dir.path().join("root.bin"), &fleet.root).expect("writing the trust root");
        let listen = format!(
            "127.0.0.1:{}",
            free_port().unwrap_or_else(|error| panic!("{error}"))
        );
        let config = dir.path().join("agent.toml");
        let (sync, extra) = split_sync(extra);
        // The device holds its labels in its own config, as plans are checked against them, and
        // its enrollment token carries the same.
        let own_labels: Vec<String> = labels
            .split(',')
            .filter(|label| !label.is_empty())
            .map(|label| format!("{label:?}"))
            .collect();
        let runtime = if program.launcher.is_empty() && suite_on_onnxruntime() {
            format!(
                "runtime = \"onnxruntime\"\n[inference.onnxruntime]\nlibrary = \"{}\"\n",
                onnxruntime_library("x86_64").display()
            )
        } else {
            String::new()
        };
        let text = format!(
            "{hub_urls}\ntrust_root = \"{root}\"\ndata_dir = \"{data}\"\n\
             labels = [{own_labels}]\n\
             {extra}\n\
             [sync]\n{sync}\
             [inference]\nlisten = \"{listen}\"\n{runtime}",
            root = dir.path().join("root.bin").display(),
            data = dir.path().join("data").display(),
            own_labels = own_labels.join(", "),
        );
        std::fs::write(&config, text).expect("writing the agent config");
        let token = hub.enroll_token(labels, 1);
        let config_arg = config.to_string_lossy().into_owned();
        let mut args = vec!["enroll"];
        for url in urls {
            args.extend(["--hub", url]);
        }
        args.extend(["--token", &token, "--config", &config_arg]);
        program.run(dir.path(), &args).ok();
        TestAgent {
            dir,
            config,
            program,
            listen,
            child: None,
        }
    }

    /// The hub's view of this device (`device show --json`): its events, running model and
    /// telemetry counts.
    pub fn hub_detail(&self, hub: &TestHub) -> DeviceDetail {
        let id = self.status()["device_id"]
            .as_str()
            .expect("the agent's status names its device id")
            .to_owned();
        hub.cli_json(&["device", "show", &id])
    }

    /// The running agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent is not running").id()
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// Sets `key = value` (`value` in TOML syntax) in the config's `[section]`, adding the section
    /// if it is missing; it takes effect at the next start.
    pub fn set_option(&self, section: &str, key: &str, value: &str) {
        let config = std::fs::read_to_string(&self.config).expect("reading the agent config");
        let header = format!("[{section}]");
        let setting = format!("{key} = {value}");
        let mut lines: Vec<String> = config.lines().map(str::to_owned).collect();
        match lines.iter().position(|line| *line == header) {
            Some(at) => lines.insert(at + 1, setting),
            None => lines.extend([header, setting]),
        }
        std::fs::write(&self.config, lines.join("\n") + "\n").expect("rewriting the agent config");
    }

    /// Rewrites the config's hub URL (after the hub restarted on another port): its `hub_url`, or
    /// its `hub_urls` replaced by this one.
    pub fn point_at(&self, url: &str) {
        let text = std::fs::read_to_string(&self.config).expect("reading the agent config");
        let rewritten: Vec<String> = text
            .lines()
            .map(|line| {
                if line.starts_with("hub_url") {
                    format!("hub_url = \"{url}\"")
                } else {
                    line.to_owned()
                }
            })
            .collect();
        std::fs::write(&self.config, rewritten.join("\n")).expect("rewriting the agent config");
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "the agent is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file())
            .expect("opening the agent log");
        let child = self
            .program
            .command()
            .args(["run", "--config", &self.config.to_string_lossy()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting outpost-agent run");
        self.child = Some(child);
        let address = self.listen.clone();
        wait_until(
            self.program.wait,
            "the agent's inference API to listen",
            || {
                // An agent that dies at start fails here at once, with its log, not at the timeout.
                if let Some(status) = self.exited() {
                    panic!("the agent exited with {status} before listening");
                }
                // The socket accepts connections as soon as it is bound, before the agent has
                // loaded its state; the API answers only after, so wait for an answer.
                http()
                    .get(format!("http://{address}/v2/health/live"))
                    .call()
                    .ok()
                    .filter(|response| response.status() == 200)
            },
        );
    }

    /// How the agent process ended, or None while it runs. Panics when it was never started.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self
            .child
            .as_mut()
            .expect("the agent is not running")
            .try_wait()
            .expect("polling the agent");
        if status.is_some() {
            self.child = None;
        }
        status
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("the agent is not running");
        child.kill().expect("sending SIGKILL to the agent");
        child.wait().expect("reaping the agent");
    }

    /// SIGTERM, and the exit status once it stopped.
    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the agent is not running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("running kill -TERM");
        assert!(status.success());
        wait_until(self.program.wait, "the agent to exit after SIGTERM", || {
            child.try_wait().expect("polling the agent")
        })
    }

    /// `outpost-agent status --json`, or Null before the first status file.
    pub fn status(&self) -> Value {
        let out = self.program.run(
            self.dir.path(),
            &[
                "status",
                "--json",
                "--config",
                &self.config.to_string_lossy(),
            ],
        );
        if !out.success {
            return Value::Null;
        }
        let status: Value = serde_json::from_str(&out.stdout).expect("status --json prints JSON");
        if self.program.launcher.is_empty() && suite_on_onnxruntime() {
            for model in status["models"].as_array().into_iter().flatten() {
                if let Some(runtime) = model["runtime"].as_str() {
                    assert!(
                        runtime.starts_with("onnxruntime "),
                        "OUTPOST_TEST_RUNTIME=onnxruntime, but {} runs on {runtime}: {}",
                        model["name"],
                        model["runtime_fallback"]
                    );
                }
            }
        }
        status
    }

    /// `outpost-agent status` as a person reads it.
    pub fn status_text(&self) -> String {
        let out = self.program.run(
            self.dir.path(),
            &["status", "--config", &self.config.to_string_lossy()],
        );
        assert!(out.success, "outpost-agent status failed: {}", out.stderr);
        out.stdout
    }

    /// Waits until `field` of the status equals `want`.
    pub fn wait_status(&self, field: &str, want: Value) -> Value {
        wait_until(
            self.program.wait,
            &format!("agent status {field} = {want}"),
            || {
                let status = self.status();
                (status[field] == want).then_some(status)
            },
        )
    }

    /// The first status the agent writes after this call: at the end of a cycle that finished
    /// after it (or at a start or a stop). The agent writes its status file once a cycle is over,
    /// after that cycle's reports and telemetry reached the hub, so a test that has just seen such
    /// an event at the hub may still read the previous cycle's file with [`TestAgent::status`].
    /// This one shows at least the state of the cycle the event came from.
    pub fn next_status(&self) -> Value {
        self.wait_next_status("a status written after now", |_| true)
    }

    /// Waits until a status written after this call has `field` equal to `want`: unlike
    /// [`TestAgent::wait_status`], never satisfied by a file written before an event the test
    /// has just seen elsewhere.
    pub fn wait_fresh_status(&self, field: &str, want: Value) -> Value {
        let what = format!("a status written after now with {field} = {want}");
        self.wait_next_status(&what, |status| status[field] == want)
    }

    /// Waits for a status whose `updated_at` (whole Unix seconds) is past the second this call
    /// began in, so it was written after the call, and that `accept` takes.
    fn wait_next_status(&self, what: &str, accept: impl Fn(&Value) -> bool) -> Value {
        let since = unix_now();
        wait_until(self.program.wait, what, || {
            let status = self.status();
            let fresh = status["updated_at"].as_u64().is_some_and(|at| at > since);
            (fresh && accept(&status)).then_some(status)
        })
    }

    /// Sends one inference request to the example MLP `demo`; returns (status code, body).
    pub fn infer(&self, http: &ureq::Agent, x: [f32; 4]) -> (u16, Value) {
        self.infer_row(http, "demo", &x)
    }

    /// Sends one row `x` to the example MLP `model` (of `x.len()` inputs); returns (status code,
    /// body).
    pub fn infer_row(&self, http: &ureq::Agent, model: &str, x: &[f32]) -> (u16, Value) {
        let body = serde_json::json!({
            "inputs": [{"name": "x", "shape": [1, x.len()], "datatype": "FP32", "data": x}]
        });
        match http
            .post(format!("http://{}/v2/models/{model}/infer", self.listen))
            .header("Content-Type", "application/json")
            .send(body.to_string())
        {
            Ok(mut response) => {
                let status = response.status().as_u16();
                let text = response.body_mut().read_to_string().unwrap_or_default();
                (
                    status,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                )
            }
            Err(error) => (0, Value::String(error.to_string())),
        }
    }
}

/// A plain HTTP client for the agent's inference API that reports status codes as values.
pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent()
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- outpost-agent log ----\n{}", self.log());
        }
    }
}
