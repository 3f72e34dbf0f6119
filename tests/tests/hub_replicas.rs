//! Hubs on PostgreSQL through the faults of a deployment past one machine: replicas sharing one
//! database (and one data directory for artifacts) behind a load balancer, and the database
//! itself restarting. Real `serve` processes, a real PostgreSQL server, the real CLI, and
//! simulated devices that move to the surviving replica as a load balancer would send them.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use outpost_hub::api::{DeviceDetail, RolloutInfo, RolloutState};
use outpost_protocol::device::{AgentState, InferenceWindow, TelemetryAck};
use outpost_tests::device_sim::{Behaviour, SignedRequest, SimDevice};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::postgres::Postgres;
use outpost_tests::wait_until;

/// Bound on the rollout this file waits for.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(90);

/// What a hub logs when it takes the rollout engine's lease: "this hub (NAME) runs ...".
const TOOK_ENGINE: &str = ") runs the rollout engine";

/// Which of the two replicas runs the rollout engine, by its log (a hub says so when it takes the
/// lease), waiting until one does.
fn engine_holder(hubs: &[&TestHub; 2]) -> usize {
    wait_until(
        Duration::from_secs(30),
        "a replica to take the engine",
        || hubs.iter().position(|hub| hub.log().contains(TOOK_ENGINE)),
    )
}

/// Steps every device once against the hub it is pointed at, until `done` accepts the rollout
/// as `hub` shows it.
fn drive(
    hub: &TestHub,
    devices: &mut [SimDevice],
    sequence: u64,
    what: &str,
    done: impl Fn(&RolloutInfo) -> bool,
) -> RolloutInfo {
    let started = Instant::now();
    loop {
        let status = hub.rollout(sequence);
        if done(&status) {
            return status;
        }
        for device in devices.iter_mut() {
            device.step(Behaviour::Commit);
        }
        assert!(
            started.elapsed() < ROLLOUT_TIMEOUT,
            "timed out after {ROLLOUT_TIMEOUT:?} waiting for {what}; last status: {status:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The first fault: one of two replicas is SIGKILLed mid-rollout. Devices move to the
/// other, the engine's lease moves with them, and the rollout completes with every decision
/// taken exactly once. A request one replica accepted is refused as a replay by the other.
#[test]
fn a_replica_killed_mid_rollout_hands_the_engine_over_and_no_decision_is_lost_or_repeated() {
    let postgres = Postgres::start().unwrap_or_else(|error| panic!("{error}"));
    let database = postgres.database("fleet").unwrap();
    let first = TestHub::start_on_database(&database);
    let second = first.replica();
    let mut hubs = [first, second];

    // Operators use either replica: the root and models through one, the rollout through the
    // other; devices enroll through both.
    let fleet = Fleet::new(&hubs[0]);
    fleet.publish_example(&hubs[0], "demo", 1, 1);
    fleet.publish_example(&hubs[0], "demo", 2, 2);
    let token = hubs[1].enroll_token("site=lab", 100);
    let mut devices: Vec<SimDevice> = (0..20)
        .map(|n| SimDevice::enroll(&hubs[n % 2].url(), &token, &["kind=sim"], &fleet.root))
        .collect();
    assert_eq!(
        hubs[0]
            .cli_json::<Vec<serde_json::Value>>(&["device", "list"])
            .len(),
        20
    );

    // A signed request one replica accepted is refused by the other: they share their nonces.
    let other = if devices[0].hub_url() == hubs[0].url() {
        1
    } else {
        0
    };
    let body = devices[0].check_in_body(AgentState::Steady);
    let captured = devices[0].sign("POST", "/device/v1/checkin", Some(&body));
    assert_eq!(captured.send().status, 200);
    let replayed = SignedRequest {
        url: format!("{}/device/v1/checkin", hubs[other].url()),
        ..captured
    };
    replayed.send().refused(401, "nonce already used");

    let created = fleet.create_rollout(
        &hubs[1],
        "demo",
        2,
        1,
        &[
            "--stages",
            "10,50,100",
            "--bake",
            "1s",
            "--device-timeout",
            "1h",
        ],
    );
    let sequence = created.sequence;
    let holder = engine_holder(&[&hubs[0], &hubs[1]]);
    let survivor = 1 - holder;

    // Mid-rollout: past its first stage, not yet complete.
    let mid = drive(
        &hubs[survivor],
        &mut devices,
        sequence,
        "the rollout to pass its first stage",
        |rollout| rollout.stage_index >= 1 || rollout.state != RolloutState::Active,
    );
    assert_eq!(mid.state, RolloutState::Active, "{mid:#?}");

    // One engine at a time: the other replica never took the lease while the holder lived.
    assert!(
        !hubs[survivor].log().contains(TOOK_ENGINE),
        "both replicas ran the engine"
    );
    hubs[holder].kill9();
    for device in &mut devices {
        device.set_hub_url(&hubs[survivor].url());
    }
    let done = drive(
        &hubs[survivor],
        &mut devices,
        sequence,
        "the rollout to complete on the surviving replica",
        |rollout| rollout.state != RolloutState::Active,
    );
    assert_eq!(done.state, RolloutState::Completed, "{done:#?}");
    // Each stage was decided once, whichever replica decided it.
    let decided: Vec<(&str, usize)> = done
        .decisions
        .iter()
        .map(|decision| (decision.action.as_str(), decision.stage_index))
        .collect();
    assert_eq!(
        decided,
        [("advance", 0), ("advance", 1), ("complete", 2)],
        "{:#?}",
        done.decisions
    );
    assert!(
        hubs[survivor].log().contains(TOOK_ENGINE),
        "the surviving replica never took the engine; its log:\n{}",
        hubs[survivor].log()
    );
    let lease = postgres
        .psql("fleet", "SELECT holder FROM leases WHERE name = 'engine'")
        .unwrap();
    assert!(
        lease.contains(&format!("/{}/", hubs[survivor].pid())),
        "the engine's lease names {lease:?}, not the survivor (pid {})",
        hubs[survivor].pid()
    );
    for device in &devices {
        let active = device.active.as_ref().unwrap();
        assert_eq!((active.name.as_str(), active.version), ("demo", 2));
    }
    // The audit chain the two replicas wrote into is one chain.
    hubs[survivor].cli(&["audit", "verify"]).ok();
}

/// One device's telemetry, as an agent sends it: batch after batch, each of one window of one
/// inference, sent again until the hub acknowledges it. Returns how many batches were sent in
/// all (resends included) once `batches` were acknowledged, and calls `acked` after each.
fn send_batches(device: &SimDevice, batches: u64, acked: &dyn Fn()) -> u64 {
    let start = outpost_tests::device_sim::unix_now() / 3600 * 3600;
    let mut sent = 0;
    for sequence in 1..=batches {
        loop {
            let mut latency_buckets =
                vec![0; outpost_protocol::device::LATENCY_BUCKETS_US.len() + 1];
            latency_buckets[0] = 1;
            let window = InferenceWindow {
                model: "demo".to_owned(),
                version: 1,
                start,
                end: start + 3600,
                count: 1,
                errors: 0,
                latency_buckets,
                drift: None,
                shadow: None,
            };
            sent += 1;
            let reply = device.send_telemetry(sequence, vec![window]);
            if reply.status == 200 {
                let ack: TelemetryAck = reply.decode();
                assert_eq!(ack.sequence, sequence);
                acked();
                break;
            }
            // The hub could not store it (its database is down): the agent sends it again.
            assert!(
                reply.status >= 500,
                "batch {sequence}: {} {}",
                reply.status,
                reply.error_message()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    sent
}

/// The second fault: PostgreSQL is killed (immediate shutdown, as a crash) and restarted
/// while devices send telemetry. The hub reconnects by itself, and every acknowledged batch is
/// counted exactly once: no acknowledged batch lost, no resend counted twice.
#[test]
fn postgres_restarted_mid_ingest_loses_and_doubles_no_acknowledged_batch() {
    let mut postgres = Postgres::start().unwrap_or_else(|error| panic!("{error}"));
    let database = postgres.database("fleet").unwrap();
    let hub = TestHub::start_on_database(&database);
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    let token = hub.enroll_token("site=lab", 10);
    let devices: Vec<SimDevice> = (0..4)
        .map(|_| SimDevice::enroll(&hub.url(), &token, &["kind=sim"], &fleet.root))
        .collect();
    let batches = 60;
    let acked = std::sync::atomic::AtomicU64::new(0);
    let sent = std::thread::scope(|scope| {
        let senders: Vec<_> = devices
            .iter()
            .map(|device| {
                let acked = &acked;
                scope.spawn(move || {
                    send_batches(device, batches, &|| {
                        acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    })
                })
            })
            .collect();
        // Mid-ingest: some batches acknowledged, most still to come.
        wait_until(Duration::from_secs(60), "20 acknowledged batches", || {
            (acked.load(std::sync::atomic::Ordering::SeqCst) >= 20).then_some(())
        });
        postgres.crash().unwrap();
        postgres.restart().unwrap();
        senders
            .into_iter()
            .map(|sender| sender.join().unwrap())
            .sum::<u64>()
    });
    assert_eq!(acked.into_inner(), 4 * batches);
    for device in &devices {
        let detail: DeviceDetail = hub.cli_json(&["device", "show", &device.id.to_hex()]);
        let counts: Vec<(String, u64, u64)> = detail
            .inferences
            .iter()
            .map(|i| (i.model.name.clone(), i.model.version, i.count))
            .collect();
        assert_eq!(counts, [("demo".to_owned(), 1, batches)], "{detail:#?}");
    }
    // What the restart cost in resends, each counted once above.
    eprintln!("{sent} batches sent for {} acknowledged", 4 * batches);
}

/// The per-device rate limit (1,000 signed requests whose timestamps share a 10-second bucket)
/// holds across replicas: a device alternating between two hubs gets no more accepted than it
/// would from one, though neither hub alone saw as many.
#[test]
fn a_device_spreading_its_requests_over_replicas_is_held_to_one_rate_limit() {
    let postgres = Postgres::start().unwrap_or_else(|error| panic!("{error}"));
    let database = postgres.database("fleet").unwrap();
    let first = TestHub::start_on_database(&database);
    let second = first.replica();
    let fleet = Fleet::new(&first);
    let token = first.enroll_token("site=lab", 1);
    let mut device = SimDevice::enroll(&first.url(), &token, &["kind=sim"], &fleet.root);
    let body = device.check_in_body(AgentState::Steady);
    // One signed time for every request: they all fall in one bucket, however long they take.
    let at = outpost_tests::device_sim::unix_now();
    let (mut accepted, mut limited) = (0, 0);
    for n in 0..1200 {
        let hub = if n % 2 == 0 { &first } else { &second };
        device.set_hub_url(&hub.url());
        let reply = device
            .sign_at("POST", "/device/v1/checkin", Some(&body), at)
            .send();
        match reply.status {
            200 => accepted += 1,
            429 => limited += 1,
            other => panic!(
                "request {n}: {other}: {}",
                String::from_utf8_lossy(&reply.body)
            ),
        }
    }
    assert_eq!((accepted, limited), (1000, 200));
}
