//! `cargo bench -p outpost-bench`: the side-by-side inference harness (see the crate's docs and
//! docs/BENCHMARKS.md). With `OUTPOST_BENCH_RSS` set, the process is instead one footprint
//! probe: it loads one model into one runtime, runs it and prints its memory (see `footprint`).

fn main() -> anyhow::Result<()> {
    if let Some(probe) = outpost_bench::footprint::probe_from_env() {
        return outpost_bench::footprint::run_probe(&probe);
    }
    let settings = outpost_bench::Settings::from_env()?;
    outpost_bench::run(&settings)
}
