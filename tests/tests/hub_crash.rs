//! The hub's durability across process death: SIGKILL mid-rollout loses nothing it acknowledged,
//! SIGTERM shuts it down cleanly, and a copy of a stopped hub's data directory restores it as it
//! was (the backup of `docs/operations.md`).

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use outpost_hub::api::{RolloutInfo, RolloutState};
use outpost_hub::rollout::{bucket, stage_of};
use outpost_protocol::device::AgentState;
use outpost_protocol::trust::Slot;
use outpost_tests::device_sim::{Behaviour, SimDevice};
use outpost_tests::hub::{Fleet, TestHub};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Everything an operator can see that must survive a crash, as JSON.
fn snapshot(hub: &TestHub, sequence: u64) -> Vec<(&'static str, Value)> {
    let sequence = sequence.to_string();
    let mut devices: Value = hub.cli_json(&["device", "list"]);
    // `state` turns to "silent" as the clock runs on; it is derived from time, not stored.
    for device in devices.as_array_mut().unwrap() {
        device.as_object_mut().unwrap().remove("state");
    }
    vec![
        (
            "rollout status",
            hub.cli_json(&["rollout", "status", &sequence]),
        ),
        ("rollout list", hub.cli_json(&["rollout", "list"])),
        ("device list", devices),
        ("model list", hub.cli_json(&["model", "list"])),
        ("audit log", hub.cli_json(&["audit", "log"])),
        ("audit verify", hub.cli_json(&["audit", "verify"])),
    ]
}

#[test]
fn sigkill_mid_rollout_restarts_with_identical_state() {
    let mut hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    fleet.publish_example(&hub, "demo", 2, 2);
    let token = hub.enroll_token("site=lab", 100);
    // A long device timeout: a device that never reports stays pending, so the rollout holds
    // still in its second stage while the hub is killed.
    let created = fleet.create_rollout(
        &hub,
        "demo",
        2,
        1,
        &[
            "--stages",
            "50,100",
            "--bake",
            "1s",
            "--device-timeout",
            "1h",
        ],
    );
    let sequence = created.sequence;
    let in_second_stage =
        |device: &SimDevice| stage_of(bucket(&device.id, sequence), &[50, 100]) == 1;
    let mut devices: Vec<SimDevice> = (0..10)
        .map(|_| SimDevice::enroll(&hub.url(), &token, &[], &fleet.root))
        .collect();
    while !devices.iter().any(in_second_stage) {
        assert!(devices.len() < 40, "40 devices all fell in the first stage");
        devices.push(SimDevice::enroll(&hub.url(), &token, &[], &fleet.root));
    }
    let holdout = devices.iter().position(in_second_stage).unwrap();

    // Everyone but the holdout commits what they are given, until the rollout has advanced and
    // every other device runs the target.
    let started = Instant::now();
    loop {
        for (index, device) in devices.iter_mut().enumerate() {
            let behaviour = if index == holdout {
                Behaviour::Mute
            } else {
                Behaviour::Commit
            };
            device.step(behaviour);
        }
        let status: RolloutInfo = hub.rollout(sequence);
        assert_eq!(status.state, RolloutState::Active, "{status:#?}");
        let others_on_target = devices
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != holdout)
            .all(|(_, device)| device.active.as_ref().is_some_and(|a| a.version == 2));
        if status.stage_index == 1 && others_on_target {
            assert_eq!(status.decisions.len(), 1);
            assert_eq!(status.decisions[0].action, "advance");
            assert_eq!(status.stages[1].pending, 1, "only the holdout is pending");
            break;
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "the rollout did not reach its second stage: {status:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The store flushes check-in bookkeeping on a timer and before it acknowledges any write, not
    // per check-in. An acknowledged write now (a token no device uses) makes every check-in above
    // durable, so the snapshot compares stored state only, however late the timer runs.
    hub.enroll_token("site=lab", 1);
    let before = snapshot(&hub, sequence);

    hub.kill9();
    hub.restart();
    let after = snapshot(&hub, sequence);
    for ((name, before), (_, after)) in before.iter().zip(&after) {
        assert_eq!(
            before, after,
            "{name} changed across SIGKILL and restart:\nbefore: {before:#}\nafter: {after:#}"
        );
    }
    let verdict = &after
        .iter()
        .find(|(name, _)| *name == "audit verify")
        .unwrap()
        .1;
    assert_eq!(verdict["intact"], Value::Bool(true), "{verdict}");

    // The restarted hub carries on: the holdout is given the target, commits, and the engine
    // completes the rollout.
    let holdout = &mut devices[holdout];
    holdout.set_hub_url(&hub.url());
    let offer = holdout.step(Behaviour::Commit).unwrap();
    assert_eq!(offer.slot, Slot::Target);
    let started = Instant::now();
    loop {
        let status = hub.rollout(sequence);
        if status.state == RolloutState::Completed {
            let actions: Vec<&str> = status.decisions.iter().map(|d| d.action.as_str()).collect();
            assert_eq!(actions, ["advance", "complete"]);
            break;
        }
        assert_eq!(status.state, RolloutState::Active, "{status:#?}");
        assert!(
            started.elapsed() < TIMEOUT,
            "the restarted hub did not complete the rollout: {status:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn sigterm_stops_serve_cleanly() {
    let mut hub = TestHub::start();
    let created: outpost_hub::api::CreatedToken = hub.cli_json(&[
        "admin-token",
        "create",
        "--name",
        "ops",
        "--role",
        "operator",
    ]);
    let status = hub.sigterm();
    assert_eq!(status.code(), Some(0), "serve exited with {status}");

    // Nothing acknowledged before the signal is lost.
    hub.restart();
    let whoami: outpost_hub::api::WhoAmI = {
        let run = hub.cli_as(&created.token, &["whoami", "--json"]).ok();
        serde_json::from_str(&run.stdout).unwrap()
    };
    assert_eq!(whoami.name, "ops");
    let verdict: outpost_hub::api::AuditVerdict = hub.cli_json(&["audit", "verify"]);
    assert!(verdict.intact, "{verdict:?}");
    assert_eq!(hub.sigterm().code(), Some(0));
}

/// Copies the directory tree at `from` to `to`, which must not exist yet.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn a_copy_of_the_stopped_hub_restores_it_as_it_was() {
    let mut hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    fleet.first_rollout(&hub, "demo", 1);
    let token = hub.enroll_token("site=lab", 10);
    let mut device = SimDevice::enroll(&hub.url(), &token, &[], &fleet.root);
    let started = Instant::now();
    while hub.rollout(1).state != RolloutState::Completed {
        device.step(Behaviour::Commit);
        assert!(started.elapsed() < TIMEOUT, "{:#?}", hub.rollout(1));
        std::thread::sleep(Duration::from_millis(200));
    }

    // The backup: stop, copy the data directory, start again.
    assert!(hub.sigterm().success());
    let backup = hub.dir().join("backup");
    copy_tree(hub.data(), &backup);
    hub.restart();
    device.set_hub_url(&hub.url());
    let backed_up = snapshot(&hub, 1);

    // Life goes on: another version rolls out, and another device enrolls.
    fleet.publish_example(&hub, "demo", 2, 2);
    fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);
    let late = SimDevice::enroll(&hub.url(), &token, &[], &fleet.root);
    assert_ne!(
        snapshot(&hub, 1),
        backed_up,
        "nothing changed after the backup"
    );

    // The restore: stop, put the copy in place, start.
    assert!(hub.sigterm().success());
    std::fs::remove_dir_all(hub.data()).unwrap();
    copy_tree(&backup, hub.data());
    hub.restart();
    let restored = snapshot(&hub, 1);
    for ((name, backed_up), (_, restored)) in backed_up.iter().zip(&restored) {
        assert_eq!(
            backed_up, restored,
            "{name} differs from the backup:\nbackup: {backed_up:#}\nrestored: {restored:#}"
        );
    }

    // The restored hub serves its fleet as of the backup: the first device is handed demo@1
    // again, and the device enrolled after the backup is unknown to it.
    device.set_hub_url(&hub.url());
    let offer = device.step(Behaviour::Commit).unwrap();
    assert_eq!(
        (offer.slot, offer.manifest.body().version),
        (Slot::Target, 1)
    );
    let mut late = late;
    late.set_hub_url(&hub.url());
    let body = late.check_in_body(AgentState::Steady);
    late.sign("POST", "/device/v1/checkin", Some(&body))
        .send()
        .refused(401, "unknown device");
}

/// A second hub on a data directory in use refuses to start, says why, and never writes the
/// address a caller waits on: `--address-file` appears only once the store is open.
#[test]
fn a_second_hub_on_the_same_data_refuses_and_writes_no_address() {
    let hub = TestHub::start();
    let address_file = hub.dir().join("second.address");
    let output = std::process::Command::new(outpost_tests::bin("outpost-hub"))
        .args(["serve", "--data"])
        .arg(hub.data())
        .args(["--listen", "127.0.0.1:0", "--address-file"])
        .arg(&address_file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is another hub running on it?"), "{stderr}");
    assert!(
        !address_file.exists(),
        "the refused hub wrote {}",
        address_file.display()
    );
    // The first hub is untouched.
    hub.cli(&["device", "list"]).ok();
}

/// A hub restarted at its address (as `crash_e2e` does under agents that keep connecting) finds
/// the port free: the tests' hubs listen below the kernel's ephemeral range, where no outgoing
/// connection's local port is taken from. Here a hundred outgoing connections are open while the
/// hub is down.
#[test]
fn a_hub_restarted_at_its_address_finds_its_port_free() {
    let mut hub = TestHub::start();
    let port: u16 = hub.url().rsplit_once(':').unwrap().1.parse().unwrap();
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let ephemeral: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    assert!(port < ephemeral, "port {port}, ephemeral from {ephemeral}");

    assert!(hub.sigterm().success());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let clients: Vec<std::net::TcpStream> = (0..100)
        .map(|_| std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap())
        .collect();
    assert!(clients
        .iter()
        .all(|client| client.local_addr().unwrap().port() != port));
    hub.restart_at_same_address();
    let models: Value = hub.cli_json(&["model", "list"]);
    assert_eq!(models, serde_json::json!([]));
}
