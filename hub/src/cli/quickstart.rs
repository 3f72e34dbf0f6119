//! `outpost-hub quickstart`: the whole system on one machine, end to end, in under a minute.
//!
//! It starts a real hub on loopback with the embedded store, does the key ceremony, publishes two
//! versions of the example model with their validation sets and drift profiles, enrolls and
//! starts real agent processes, rolls version 1 out and then version 2 through staged
//! percentages while sending inference requests through each agent's local API (one agent sees
//! shifted inputs), and prints the fleet, the rollout and the drift report. Every step is the
//! command an operator would type, run as a child process; the agents are real `outpost-agent`
//! processes (see `agent_binary` for where that binary comes from). Everything stops at the end
//! unless `--keep`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use outpost_model::example::normal_rows;
use serde::de::DeserializeOwned;

use crate::api::{CreatedToken, RolloutInfo, RolloutState};

/// How long a step that waits on the fleet may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Inference requests each agent gets per round while a rollout runs.
const REQUESTS_PER_ROUND: usize = 20;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory for the hub's data, the keys, the models and the agents. Default: a new
    /// temporary directory, removed at the end unless --keep.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Agents to start.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=20))]
    pub agents: u16,
    /// Keep the hub and agents running after the tour, until interrupted (Ctrl-C).
    #[arg(long)]
    pub keep: bool,
    /// The `outpost-agent` binary to run. Default: under `cargo run` in this workspace, cargo
    /// builds it in the same profile first; otherwise the `outpost-agent` beside this binary, or
    /// the one on PATH.
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
}

/// Where the agents' binary is: `explicit` if given; under `cargo run` of this workspace, the one
/// cargo builds now beside this binary (so an edited agent is never stale); else the one beside
/// this binary (as the packages install them); else the one on PATH.
fn agent_binary(explicit: Option<PathBuf>, exe: &Path) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        anyhow::ensure!(
            path.is_file(),
            "--agent-bin {}: no such file",
            path.display()
        );
        return Ok(path);
    }
    let bin_dir = exe.parent().context("this executable has no folder")?;
    let beside = bin_dir.join("outpost-agent");
    let manifest_dir = env!("CARGO_MANIFEST_DIR");
    let under_cargo_run = std::env::var_os("CARGO_MANIFEST_DIR")
        .is_some_and(|dir| Path::new(&dir) == Path::new(manifest_dir));
    if let (true, Some(cargo)) = (under_cargo_run, std::env::var_os("CARGO")) {
        // target/<profile>/outpost-hub: the profile's folder is named after it, but for `dev`.
        let profile = match bin_dir.file_name().and_then(|name| name.to_str()) {
            Some("debug") => "dev",
            Some(name) => name,
            None => bail!("cannot tell the cargo profile of {}", exe.display()),
        };
        let target_dir = bin_dir
            .parent()
            .context("no target folder above this binary")?;
        step(&format!(
            "building outpost-agent (cargo build --profile {profile} -p outpost-agent)"
        ));
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "--profile",
                profile,
                "-p",
                "outpost-agent",
            ])
            .arg("--manifest-path")
            .arg(Path::new(manifest_dir).join("../Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir)
            .status()
            .context("running cargo to build outpost-agent")?;
        anyhow::ensure!(status.success(), "building outpost-agent failed ({status})");
        return Ok(beside);
    }
    if beside.is_file() {
        return Ok(beside);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("outpost-agent"))
                .find(|candidate| candidate.is_file())
        })
        .context(
            "no outpost-agent beside this binary or on PATH: build it \
             (cargo build --release -p outpost-agent) or pass --agent-bin",
        )
}

/// SIGINT (Ctrl-C), SIGTERM (`kill`, a service manager) and SIGHUP (the terminal closed), caught
/// from [`StopSignals::listen`] on. Returning from the tour drops its children, which stops them:
/// without this only Ctrl-C (sent to the whole process group) stopped the hub and agents, and any
/// other signal left them running, orphaned.
struct StopSignals {
    runtime: tokio::runtime::Runtime,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn listen() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime to wait for signals")?;
        // Signal streams register with the runtime they are made in.
        let (terminate, hangup, interrupt) = {
            let _context = runtime.enter();
            (
                signal(SignalKind::terminate()).context("listening for SIGTERM")?,
                signal(SignalKind::hangup()).context("listening for SIGHUP")?,
                signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            )
        };
        Ok(StopSignals {
            runtime,
            terminate,
            hangup,
            interrupt,
        })
    }

    /// Waits for one of the signals and names it.
    fn wait(mut self) -> &'static str {
        self.runtime.block_on(async {
            tokio::select! {
                _ = self.terminate.recv() => "SIGTERM",
                _ = self.hangup.recv() => "SIGHUP",
                _ = self.interrupt.recv() => "SIGINT",
            }
        })
    }
}

/// Child processes, stopped with SIGTERM (then SIGKILL) when dropped, so a failed step leaves
/// nothing running.
#[derive(Debug, Default)]
struct Children(Vec<(String, Child)>);

impl Children {
    fn stop_all(&mut self) {
        for (_, child) in &self.0 {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for (name, child) in &mut self.0 {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        eprintln!("{name} did not stop after SIGTERM; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        self.0.clear();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop_all();
    }
}

struct Tour {
    dir: PathBuf,
    /// This binary, `outpost-hub`.
    exe: PathBuf,
    /// The agents' binary, `outpost-agent`.
    agent: PathBuf,
    hub_url: String,
    token: String,
    /// The release keys' private-key files, comma-separated, as `--key` takes them.
    keys: String,
    children: Children,
}

impl Args {
    pub fn run(self) -> anyhow::Result<()> {
        let (dir, temporary) = match &self.dir {
            Some(dir) => (dir.clone(), false),
            None => {
                let dir = std::env::temp_dir().join(format!(
                    "outpost-quickstart-{}-{}",
                    std::process::id(),
                    crate::unix_now()
                ));
                (dir, true)
            }
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        let exe = std::env::current_exe().context("locating this executable")?;
        let agent = agent_binary(self.agent_bin.clone(), &exe)?;
        let mut tour = Tour {
            dir: dir.clone(),
            exe,
            agent,
            hub_url: String::new(),
            token: String::new(),
            keys: String::new(),
            children: Children::default(),
        };
        let outcome = tour.run(usize::from(self.agents), self.keep);
        tour.children.stop_all();
        match &outcome {
            Ok(()) if temporary && !self.keep => {
                let _ = std::fs::remove_dir_all(&dir);
                println!("\nstopped the hub and agents and removed {}", dir.display());
            }
            Ok(()) => println!(
                "\nstopped the hub and agents; everything is in {}",
                dir.display()
            ),
            Err(_) => eprintln!("logs and data are kept in {}", dir.display()),
        }
        outcome
    }
}

impl Tour {
    fn run(&mut self, agents: usize, keep: bool) -> anyhow::Result<()> {
        self.start_hub()?;
        self.ceremony()?;
        let listens = self.start_agents(agents)?;
        let http = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .new_agent();

        step("rolling demo@1 out to every agent");
        self.cli(&[
            "rollout",
            "create",
            "--model",
            "demo",
            "--version",
            "1",
            "--root",
            "root.bin",
            "--stages",
            "100",
            "--bake",
            "1s",
            "--key",
            &self.keys.clone(),
        ])?;
        for index in 0..agents {
            self.wait_active(index, "demo@1")?;
        }
        println!("   every agent serves demo@1");

        step("rolling demo@2 out in stages of 34%, 67% and 100% while the agents serve requests");
        println!("   (agent 1 is fed inputs with x1 and x3 shifted by 1.5 standard deviations)");
        let created: RolloutInfo = self.cli_json(&[
            "rollout",
            "create",
            "--model",
            "demo",
            "--version",
            "2",
            "--fallback",
            "1",
            "--root",
            "root.bin",
            "--stages",
            "34,67,100",
            "--bake",
            "2s",
            "--device-timeout",
            "30s",
            // A few dozen requests per stage put p95 in coarse histogram buckets; on a busy
            // machine one bucket's step would read as a 100% regression and pause the tour.
            "--max-p95-regression-pct",
            "400",
            "--key",
            &self.keys.clone(),
        ])?;
        let started = Instant::now();
        let mut seed = 1000;
        let mut shown_stage = usize::MAX;
        let done = loop {
            for (index, listen) in listens.iter().enumerate() {
                let shift = if index == 1 { 1.5 } else { 0.0 };
                send_requests(&http, listen, seed, shift)?;
                seed += 1;
            }
            let status: RolloutInfo =
                self.cli_json(&["rollout", "status", &created.sequence.to_string()])?;
            if status.stage_index != shown_stage && status.state == RolloutState::Active {
                shown_stage = status.stage_index;
                let percent = status
                    .stages
                    .get(shown_stage)
                    .map_or(0, |stage| stage.percent);
                println!(
                    "   stage {} of {}: {percent}% of the fleet on demo@2",
                    shown_stage + 1,
                    status.stages.len()
                );
            }
            if status.state != RolloutState::Active {
                break status;
            }
            if started.elapsed() > STEP_TIMEOUT {
                bail!(
                    "rollout {} did not finish within {STEP_TIMEOUT:?}",
                    created.sequence
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        println!(
            "   rollout {} {} after {:.1}s",
            done.sequence,
            done.state.as_str(),
            started.elapsed().as_secs_f64()
        );
        for (index, listen) in listens.iter().enumerate() {
            let shift = if index == 1 { 1.5 } else { 0.0 };
            send_requests(&http, listen, seed, shift)?;
            seed += 1;
        }

        step("the fleet");
        self.show(&["device", "list"])?;
        step("the rollout, with every decision and the figures behind it");
        self.show(&["rollout", "status", &done.sequence.to_string()])?;
        step("drift of demo@2 on agent 1, against its reference profile");
        // Telemetry reaches the hub on the agents' next flush.
        std::thread::sleep(Duration::from_secs(2));
        let agent1 = self.device_id(1.min(agents - 1))?;
        self.show(&[
            "drift",
            "report",
            "--model",
            "demo",
            "--version",
            "2",
            "--device",
            &agent1,
        ])?;
        step("drift of demo@2 on the whole fleet");
        self.show(&["drift", "report", "--model", "demo", "--version", "2"])?;

        if keep {
            // Listening before saying so: a signal sent as soon as the addresses are printed
            // must find the handlers in place, not the default action that orphans the children.
            let stop = StopSignals::listen()?;
            step("still running; Ctrl-C stops everything");
            println!(
                "   hub:    {}  (admin token in {})",
                self.hub_url,
                self.dir.join("admin.token").display()
            );
            println!(
                "   CLI:    export OUTPOST_HUB={} OUTPOST_TOKEN=$(cat {})",
                self.hub_url,
                self.dir.join("admin.token").display()
            );
            println!(
                "   web:    {}/dashboard  (sign in with the admin token)",
                self.hub_url
            );
            for (index, listen) in listens.iter().enumerate() {
                println!("   agent {index}: http://{listen}/v2/models/demo/infer");
            }
            let signal = stop.wait();
            step(&format!("{signal}: stopping the hub and agents"));
        }
        Ok(())
    }

    fn start_hub(&mut self) -> anyhow::Result<()> {
        step(&format!(
            "starting a hub on loopback, data in {}",
            self.dir.display()
        ));
        let data = self.dir.join("hub");
        let token = self.cli(&["admin", "bootstrap", "--data", &path(&data)])?;
        self.token = token.trim().to_owned();
        outpost_model::fsutil::write_atomic(
            &self.dir.join("admin.token"),
            self.token.as_bytes(),
            0o600,
        )?;
        let address_file = self.dir.join("hub.address");
        let _ = std::fs::remove_file(&address_file);
        let log = File::create(self.dir.join("hub.log")).context("creating hub.log")?;
        let child = Command::new(&self.exe)
            .args(["serve", "--data", &path(&data), "--listen", "127.0.0.1:0"])
            .args(["--address-file", &path(&address_file)])
            .args(["--tick", "200ms", "--poll-secs", "1"])
            .current_dir(&self.dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the hub")?;
        self.children.0.push(("the hub".to_owned(), child));
        let address = wait_for(STEP_TIMEOUT, "the hub to listen", || {
            std::fs::read_to_string(&address_file)
                .ok()
                .filter(|text| !text.trim().is_empty())
        })?;
        self.hub_url = format!("http://{}", address.trim());
        println!("   hub listening on {}", self.hub_url);
        Ok(())
    }

    fn ceremony(&mut self) -> anyhow::Result<()> {
        step("release keys, a 2-of-2 trust root, and two versions of the example model");
        self.cli(&["keys", "generate", "--out", "keys", "--count", "2"])?;
        let keys = self.key_list()?;
        self.keys = keys.clone();
        self.cli(&[
            "root",
            "init",
            "--key",
            &keys,
            "--threshold",
            "2",
            "--out",
            "root.bin",
        ])?;
        self.cli(&["root", "upload", "root.bin"])?;
        for version in ["1", "2"] {
            let out = format!("model-{version}");
            self.cli(&["example-model", "--out", &out, "--seed", version])?;
            self.cli(&[
                "model",
                "publish",
                &format!("{out}/model.onnx"),
                "--name",
                "demo",
                "--version",
                version,
                "--validation",
                &format!("{out}/validation.bin"),
                "--profile",
                &format!("{out}/profile.bin"),
                "--key",
                &keys,
            ])?;
        }
        println!("   published demo@1 and demo@2, each validated, signed and with a drift profile");
        Ok(())
    }

    /// Enrolls and starts `count` agents; returns their inference API addresses.
    fn start_agents(&mut self, count: usize) -> anyhow::Result<Vec<String>> {
        step(&format!("enrolling and starting {count} agents"));
        let mut listens = Vec::new();
        for index in 0..count {
            // A device gets its token's labels, so each agent has a token of its own; its
            // config holds the same labels, which plans' selectors are checked against.
            let labels = format!("agent={index},site=quickstart");
            let created: CreatedToken = self.cli_json(&[
                "token",
                "create",
                "--labels",
                &labels,
                "--expires",
                "1h",
                "--uses",
                "1",
            ])?;
            let dir = self.dir.join(format!("agent-{index}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::copy(self.dir.join("root.bin"), dir.join("root.bin"))
                .context("giving the agent the trust root")?;
            let listen = free_loopback_address()?;
            let config = dir.join("agent.toml");
            let text = format!(
                "hub_url = \"{hub}\"\ntrust_root = \"{root}\"\ndata_dir = \"{data}\"\n\
                 labels = [\"agent={index}\", \"site=quickstart\"]\n\n\
                 [sync]\npoll_jitter = \"100ms\"\ntelemetry_flush = \"1s\"\nmax_backoff = \"2s\"\n\n\
                 [inference]\nlisten = \"{listen}\"\n",
                hub = self.hub_url,
                root = dir.join("root.bin").display(),
                data = dir.join("data").display(),
            );
            outpost_model::fsutil::write_atomic(&config, text.as_bytes(), 0o644)?;
            self.run_checked(
                &self.agent,
                &[
                    "enroll",
                    "--hub",
                    &self.hub_url.clone(),
                    "--token",
                    &created.token,
                    "--config",
                    &path(&config),
                ],
                &format!("enrolling agent {index}"),
            )?;
            let log = File::create(dir.join("agent.log")).context("creating agent.log")?;
            let child = Command::new(&self.agent)
                .args(["run", "--config", &path(&config)])
                .current_dir(&dir)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting agent {index}"))?;
            self.children.0.push((format!("agent {index}"), child));
            println!(
                "   agent {index}: inference API on http://{listen}, log in {}",
                dir.join("agent.log").display()
            );
            listens.push(listen);
        }
        Ok(listens)
    }

    fn agent_status(&self, index: usize) -> anyhow::Result<serde_json::Value> {
        let config = self.dir.join(format!("agent-{index}")).join("agent.toml");
        let text = self.run_checked(
            &self.agent,
            &["status", "--json", "--config", &path(&config)],
            &format!("agent {index} status"),
        )?;
        serde_json::from_str(&text).context("reading agent status --json")
    }

    fn wait_active(&self, index: usize, want: &str) -> anyhow::Result<()> {
        wait_for(
            STEP_TIMEOUT,
            &format!("agent {index} to serve {want}"),
            || {
                self.agent_status(index)
                    .ok()
                    .filter(|status| status["active"] == want)
            },
        )
        .map(|_| ())
    }

    fn device_id(&self, index: usize) -> anyhow::Result<String> {
        let status = self.agent_status(index)?;
        status["device_id"]
            .as_str()
            .map(str::to_owned)
            .context("agent status has no device_id")
    }

    /// The generated private keys, comma-separated, as `--key` takes them.
    fn key_list(&self) -> anyhow::Result<String> {
        let mut keys: Vec<String> = std::fs::read_dir(self.dir.join("keys"))
            .context("listing the keys")?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "key"))
            .map(|path| path.to_string_lossy().into_owned())
            .collect();
        keys.sort();
        Ok(keys.join(","))
    }

    fn command(&self, program: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(program);
        command
            .args(args)
            .current_dir(&self.dir)
            .env("OUTPOST_HUB", &self.hub_url)
            .env("OUTPOST_TOKEN", &self.token)
            .env_remove("OUTPOST_CA")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        command
    }

    fn run_checked(&self, program: &Path, args: &[&str], what: &str) -> anyhow::Result<String> {
        let output = self
            .command(program, args)
            .output()
            .with_context(|| format!("{what}: running {}", program.display()))?;
        if !output.status.success() {
            bail!(
                "{what} failed: {} {}\n{}",
                program.display(),
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        self.run_checked(
            &self.exe,
            args,
            args.first().copied().unwrap_or("a command"),
        )
    }

    fn cli_json<T: DeserializeOwned>(&self, args: &[&str]) -> anyhow::Result<T> {
        let mut with_json = args.to_vec();
        with_json.push("--json");
        let text = self.cli(&with_json)?;
        serde_json::from_str(&text).with_context(|| format!("reading {} --json", args.join(" ")))
    }

    /// Runs a listing and prints what it printed, indented.
    fn show(&self, args: &[&str]) -> anyhow::Result<()> {
        let text = self.cli(args)?;
        for line in text.lines() {
            println!("   {line}");
        }
        Ok(())
    }
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn path(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn free_loopback_address() -> anyhow::Result<String> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?.to_string())
}

fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends [`REQUESTS_PER_ROUND`] single-row requests of standard normal inputs (x1 and x3 shifted
/// by `shift`) to the agent's KServe v2 API.
fn send_requests(http: &ureq::Agent, listen: &str, seed: u64, shift: f32) -> anyhow::Result<()> {
    let url = format!("http://{listen}/v2/models/demo/infer");
    let rows = normal_rows(4, REQUESTS_PER_ROUND, seed, 0.0);
    for row in rows.chunks(4) {
        let x = [row[0], row[1] + shift, row[2], row[3] + shift];
        let body = serde_json::json!({
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x}]
        });
        http.post(&url)
            .header("content-type", "application/json")
            .send(body.to_string())
            .with_context(|| format!("inference request to {url}"))?;
    }
    Ok(())
}
