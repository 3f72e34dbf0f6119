//! How long each dashboard page takes to render against a hub holding a large fleet (issue 8:
//! "each page under 200 ms with 10,000 devices").
//!
//! It starts a real release-built `outpost-hub serve` (through the tests' `TestHub`, with `serve`'s
//! default 5 s engine tick, which re-evaluates the live rollout over every device beside the page
//! requests), and seeds it through the real APIs:
//! `OUTPOST_DASH_DEVICES` simulated devices (10,000 by default) enrolled through the device API,
//! `demo@1` with a drift profile rolled out and committed by 200 of them, a rollout of `demo@2` on
//! which those 200 fail, and `OUTPOST_DASH_DRIFT_HOURS` (24) hourly drift summaries of `demo@1` from
//! each of `OUTPOST_DASH_DRIFT_DEVICES` (1,000) devices, one of whose features drifts on half of
//! them. Seeding is not timed.
//!
//! Then it signs in as a viewer and fetches each page `OUTPOST_DASH_ROUNDS` (50) times over one
//! keep-alive connection, one request at a time, and prints min, p50, p99 and max per page, as
//! the browser would wait for them (request sent to last byte read).
//!
//! ```sh
//! cargo bench -p outpost-tests --bench dashboard
//! ```
//!
//! The hub binary is `target/release/outpost-hub`, rebuilt first with `cargo build --release`,
//! unless `OUTPOST_HUB_BIN` names another one. This is a measurement, never a pass/fail test.

use std::time::{Duration, Instant};

use outpost_protocol::drift::Profile;
use outpost_protocol::sha256;
use outpost_tests::bench::{env_number, machine_description, release_hub_binary};
use outpost_tests::device_sim::{drift_window, unix_now, Behaviour, SimDevice};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::use_binaries_from;

/// Threads that enroll devices and send telemetry while seeding.
const SEED_THREADS: usize = 8;
/// Devices that take part in the rollouts (download, commit, fail).
const ACTIVE_DEVICES: usize = 200;

/// Runs `work` on each item of `items` from [`SEED_THREADS`] threads.
fn in_parallel<T: Send, R: Send>(items: Vec<T>, work: impl Fn(T) -> R + Sync) -> Vec<R> {
    let chunk = items.len().div_ceil(SEED_THREADS).max(1);
    let mut items = items;
    let mut chunks = Vec::new();
    while !items.is_empty() {
        let rest = items.split_off(chunk.min(items.len()));
        chunks.push(std::mem::replace(&mut items, rest));
    }
    std::thread::scope(|scope| {
        let work = &work;
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| scope.spawn(move || chunk.into_iter().map(work).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| handle.join().expect("a seeding thread panicked"))
            .collect()
    })
}

fn percentile(sorted: &[Duration], share: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * share).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

fn main() {
    let count = |name: &str, default: u64| {
        usize::try_from(env_number(name, default))
            .unwrap_or_else(|_| panic!("{name} is too large for this machine"))
    };
    let n_devices = count("OUTPOST_DASH_DEVICES", 10_000).max(ACTIVE_DEVICES);
    let drift_devices = count("OUTPOST_DASH_DRIFT_DEVICES", 1_000).min(n_devices);
    let drift_hours = env_number("OUTPOST_DASH_DRIFT_HOURS", 24).clamp(1, 168);
    let rounds = count("OUTPOST_DASH_ROUNDS", 50).max(1);
    let binary = release_hub_binary();
    let release_dir = binary
        .parent()
        .expect("the hub binary is in a directory")
        .to_path_buf();
    use_binaries_from(release_dir);
    println!("dashboard: {}", machine_description());
    println!(
        "hub binary {}; {n_devices} devices; drift: {drift_devices} devices x {drift_hours} hourly \
         windows; {rounds} requests per page",
        binary.display()
    );

    let seeding = Instant::now();
    let hub = TestHub::start_with_default_tick();
    let fleet = Fleet::new(&hub);
    let model_dir = fleet.publish_example_with_profile(&hub, "demo", 1, 1);
    fleet.publish_example(&hub, "demo", 2, 2);
    let viewer = hub.admin_token("bench-viewer", "viewer");
    let canary = hub.enroll_token(
        "ring=canary,kind=sim",
        u32::try_from(n_devices / 2 + 1).unwrap_or(u32::MAX),
    );
    let main = hub.enroll_token(
        "ring=main,kind=sim",
        u32::try_from(n_devices / 2 + 1).unwrap_or(u32::MAX),
    );
    let url = hub.url();
    let mut devices = in_parallel((0..n_devices).collect(), |index| {
        let token = if index % 2 == 0 { &canary } else { &main };
        SimDevice::enroll(&url, token, &["kind=sim"], &fleet.root)
    });
    println!(
        "enrolled {} devices in {:.1} s",
        devices.len(),
        seeding.elapsed().as_secs_f64()
    );

    fleet.first_rollout(&hub, "demo", 1);
    for _ in 0..3 {
        for device in devices.iter_mut().take(ACTIVE_DEVICES) {
            device.step(Behaviour::Commit);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let second = fleet.create_rollout(
        &hub,
        "demo",
        2,
        1,
        &[
            "--stages",
            "10,50,100",
            "--bake",
            "1m",
            "--device-timeout",
            "1h",
        ],
    );
    for _ in 0..2 {
        for device in devices.iter_mut().take(ACTIVE_DEVICES) {
            device.step(Behaviour::FailTarget);
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    let profile_bytes = std::fs::read(model_dir.join("profile.bin")).expect("reading the profile");
    let profile: Profile =
        outpost_protocol::decode(&profile_bytes).expect("decoding the example profile");
    let profile_sha256 = sha256(&profile_bytes);
    let this_hour = unix_now() / 3600 * 3600;
    let drifting: Vec<(usize, &SimDevice)> =
        devices.iter().take(drift_devices).enumerate().collect();
    in_parallel(drifting, |(index, device)| {
        let shift: &[(usize, f32)] = if index % 2 == 0 { &[(2, 1.0)] } else { &[] };
        let windows = (1..=drift_hours)
            .map(|hours_ago| {
                drift_window(
                    "demo",
                    1,
                    (&profile, profile_sha256),
                    this_hour - hours_ago * 3600,
                    200,
                    index as u64 * 1000 + hours_ago,
                    shift,
                )
            })
            .collect();
        device.telemetry(1, windows);
    });
    println!(
        "seeded (rollout {} live, drift sent) in {:.1} s",
        second.sequence,
        seeding.elapsed().as_secs_f64()
    );

    let http = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .new_agent();
    let cookie = format!("outpost_token={}", viewer.token);
    let device_id = devices[0].id.to_hex();
    let last_page = n_devices.div_ceil(50);
    let pages = [
        ("fleet, page 1".to_owned(), "/dashboard/fleet".to_owned()),
        (
            format!("fleet, page {last_page}"),
            format!("/dashboard/fleet?page={last_page}"),
        ),
        (
            "fleet, filtered (state, model, label, id)".to_owned(),
            "/dashboard/fleet?state=steady&model=demo%401&label=ring%3Dcanary&q=a".to_owned(),
        ),
        (
            "device".to_owned(),
            format!("/dashboard/devices/{device_id}"),
        ),
        ("rollouts".to_owned(), "/dashboard/rollouts".to_owned()),
        (
            "drift, 6 h (the page's default)".to_owned(),
            "/dashboard/drift?model=demo&version=1".to_owned(),
        ),
        (
            format!("drift, {drift_hours} h"),
            format!("/dashboard/drift?model=demo&version=1&hours={drift_hours}"),
        ),
    ];
    println!();
    println!("| Page | Bytes | min | p50 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, path) in &pages {
        let mut times = Vec::with_capacity(rounds);
        let mut bytes = 0;
        for _ in 0..rounds {
            let started = Instant::now();
            let mut response = http
                .get(format!("{url}{path}"))
                .header("cookie", &cookie)
                .call()
                .unwrap_or_else(|error| panic!("GET {path}: {error}"));
            let body = response
                .body_mut()
                .with_config()
                .limit(64 * 1024 * 1024)
                .read_to_string()
                .unwrap_or_else(|error| panic!("reading {path}: {error}"));
            times.push(started.elapsed());
            assert_eq!(
                response.status().as_u16(),
                200,
                "GET {path} answered {}: {body}",
                response.status()
            );
            bytes = body.len();
        }
        times.sort();
        println!(
            "| {name} | {bytes} | {} | {} | {} | {} |",
            ms(times[0]),
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.99)),
            ms(times[times.len() - 1])
        );
    }
}
