//! Resident memory per runtime and model, each measured in a fresh process: the harness runs
//! itself with `OUTPOST_BENCH_RSS=RUNTIME:MODEL`, which loads that one model into that one
//! runtime at one thread, runs the request 20 times and prints `VmRSS` and `VmHWM` from
//! `/proc/self/status`.

use std::process::Command;

use anyhow::Context;
use outpost_agent::telemetry::Recorder;
use outpost_model::inference::LoadedModel;

use crate::cache::Cache;
use crate::models::BenchModel;
use crate::runtimes::{init_onnxruntime, BareTract, OnnxRuntime};
use crate::Settings;

const RUNS: usize = 20;

/// What one probe process loads: `none` (the harness alone), `tract`, `agent` or `ort`.
#[derive(Debug)]
pub struct Probe {
    runtime: String,
    model: String,
}

pub fn probe_from_env() -> Option<Probe> {
    let text = std::env::var("OUTPOST_BENCH_RSS").ok()?;
    let (runtime, model) = text.split_once(':').unwrap_or((text.as_str(), ""));
    Some(Probe {
        runtime: runtime.to_owned(),
        model: model.to_owned(),
    })
}

/// `VmRSS` and `VmHWM` of this process, in KiB.
fn memory() -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .with_context(|| format!("no {name} in /proc/self/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

pub fn run_probe(probe: &Probe) -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let cache = Cache::prepare(&settings.cache_dir)?;
    let model = || BenchModel::load(&probe.model, &cache, &mut Vec::new());
    match probe.runtime.as_str() {
        "none" => {}
        "tract" => {
            let bare = BareTract::load(&model()?, 1)?;
            for _ in 0..RUNS {
                bare.run()?;
            }
        }
        "agent" => {
            let model = model()?;
            let loaded = LoadedModel::load(&model.onnx, &model.inputs, &model.outputs, 1)?;
            let recorder = Recorder::new();
            for _ in 0..RUNS {
                let started = std::time::Instant::now();
                loaded.run(&model.request)?;
                recorder.record(model.name, 1, started.elapsed(), true, 0);
            }
        }
        "ort" => {
            init_onnxruntime(&cache.onnxruntime_library()?)?;
            let session = OnnxRuntime::load(&model()?, 1)?;
            for _ in 0..RUNS {
                session.run()?;
            }
        }
        other => anyhow::bail!("OUTPOST_BENCH_RSS: unknown runtime {other:?}"),
    }
    let (rss, hwm) = memory()?;
    println!("{rss} {hwm}");
    Ok(())
}

fn spawn_probe(runtime: &str, model: &str) -> anyhow::Result<(u64, u64)> {
    let exe = std::env::current_exe()?;
    let output = Command::new(&exe)
        .env("OUTPOST_BENCH_RSS", format!("{runtime}:{model}"))
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "the {runtime} probe of {model} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let last = text.lines().last().unwrap_or_default();
    let mut numbers = last.split_whitespace().map(str::parse::<u64>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(rss)), Some(Ok(hwm))) => Ok((rss, hwm)),
        _ => anyhow::bail!("the {runtime} probe of {model} printed {last:?}"),
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Prints the memory table for `models`.
pub fn report(models: &[BenchModel]) -> anyhow::Result<()> {
    let (base_rss, base_hwm) = spawn_probe("none", "")?;
    println!("\n### Resident memory, one process per runtime and model, {RUNS} runs, 1 thread\n");
    println!(
        "The harness process with nothing loaded: VmRSS {}, VmHWM {}.\n",
        mib(base_rss),
        mib(base_hwm)
    );
    println!("| Model | bare tract RSS (peak) | agent path RSS (peak) | ONNX Runtime RSS (peak) | agent − bare tract |");
    println!("|---|---:|---:|---:|---:|");
    for model in models {
        let (tract_rss, tract_hwm) = spawn_probe("tract", model.name)?;
        let (agent_rss, agent_hwm) = spawn_probe("agent", model.name)?;
        let (ort_rss, ort_hwm) = spawn_probe("ort", model.name)?;
        println!(
            "| {} | {} ({}) | {} ({}) | {} ({}) | {:+.1} MiB |",
            model.name,
            mib(tract_rss),
            mib(tract_hwm),
            mib(agent_rss),
            mib(agent_hwm),
            mib(ort_rss),
            mib(ort_hwm),
            (agent_rss as f64 - tract_rss as f64) / 1024.0
        );
    }
    Ok(())
}
