//! Which runtimes serve this device's models, set up once at start from `[inference] runtime`.
//!
//! ONNX Runtime is a C++ library the device brings. A library that does not load, is too old,
//! lacks an asked-for execution provider or answers wrongly is refused with a reason by
//! `outpost_model::inference::Runtimes`. One that crashes the process as it loads cannot be
//! refused from inside: so before the agent loads the library itself, a child process
//! (`outpost-agent probe-runtime`, this binary) loads it, opens a session of a small built-in
//! model with the configured providers and checks its answer against tract's. Only when the child
//! says so does the agent load the library; a child that crashes, fails or hangs leaves every
//! model on tract, with the reason reported beside each. With no library on the device nothing is
//! spawned, so `auto` costs a few file checks at start.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use outpost_model::inference::{RuntimeChoice, Runtimes};

use crate::config::Config;

/// How long the probe may take before it counts as hung: loading a large library from slow
/// storage and opening a session take well under this.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// The runtimes the agent serves with (see the module docs).
pub fn start(config: &Config) -> Runtimes {
    let started = Instant::now();
    let runtimes = match config.runtime {
        RuntimeChoice::Tract => Runtimes::new(RuntimeChoice::Tract, &config.onnxruntime),
        choice => match config.onnxruntime.library_path() {
            // No library: `Runtimes::new` says so (quietly for `auto` without a configured one).
            Err(_) => Runtimes::new(choice, &config.onnxruntime),
            Ok(library) => match probe_in_child(config) {
                Ok(()) => Runtimes::new(choice, &config.onnxruntime),
                Err(reason) => {
                    let reason = format!("{} was not loaded: {reason}", library.display());
                    Runtimes::unavailable(choice, reason)
                }
            },
        },
    };
    let took = started.elapsed();
    match runtimes.onnxruntime_problem() {
        _ if runtimes.onnxruntime_ready() => log::info!(
            "ONNX Runtime is ready (set up in {took:?}); each model uses it if it passes its \
             validation set there"
        ),
        // `auto` with no library on the device: tract is what such a device expects.
        Some(problem)
            if config.runtime == RuntimeChoice::Auto && config.onnxruntime.library.is_none() =>
        {
            log::info!("runtime auto: models run on tract (decided in {took:?}): {problem}")
        }
        Some(problem) => log::warn!(
            "runtime {}: ONNX Runtime is not used, models run on tract (decided in {took:?}): \
             {problem}",
            config.runtime
        ),
        None => log::info!(
            "runtime {}: models run on tract (decided in {took:?})",
            config.runtime
        ),
    }
    runtimes
}

/// Runs `outpost-agent probe-runtime --config <path>` and reads its verdict.
fn probe_in_child(config: &Config) -> Result<(), String> {
    let exe = std::env::current_exe()
        .map_err(|error| format!("cannot find this agent's binary to probe it: {error}"))?;
    let mut child = Command::new(exe)
        .arg("probe-runtime")
        .arg("--config")
        .arg(&config.path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|error| format!("cannot start the probe process: {error}"))?;
    let mut stdout = child.stdout.take();
    let (done, outcome) = mpsc::channel();
    std::thread::spawn(move || {
        let mut said = String::new();
        if let Some(stdout) = stdout.as_mut() {
            // At most a few lines; a child that writes more is cut off here.
            let _ = stdout.take(4096).read_to_string(&mut said);
        }
        let _ = done.send(said);
    });
    let said = match outcome.recv_timeout(PROBE_TIMEOUT) {
        Ok(said) => said,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "loading it did not finish within {PROBE_TIMEOUT:?} in a probe process"
            ));
        }
    };
    let status = child
        .wait()
        .map_err(|error| format!("waiting for the probe process: {error}"))?;
    let said = said.trim();
    if status.success() {
        log::info!("ONNX Runtime probe: {said}");
        return Ok(());
    }
    use std::os::unix::process::ExitStatusExt;
    Err(match status.signal() {
        Some(signal) => format!("it crashed a probe process loading it (signal {signal})"),
        None if said.is_empty() => format!("a probe process loading it failed ({status})"),
        None => said.to_owned(),
    })
}

/// `outpost-agent probe-runtime`: what the child does. Prints the runtime that would serve, or
/// why ONNX Runtime cannot, and exits 0 only when it can.
pub fn probe(config: &Config) -> anyhow::Result<()> {
    let choice = match config.runtime {
        RuntimeChoice::Tract => RuntimeChoice::OnnxRuntime,
        choice => choice,
    };
    let runtimes = Runtimes::new(choice, &config.onnxruntime);
    match runtimes.probe() {
        Ok(info) => {
            println!("{info}");
            Ok(())
        }
        Err(reason) => {
            println!("{reason}");
            anyhow::bail!("ONNX Runtime cannot serve: {reason}")
        }
    }
}
