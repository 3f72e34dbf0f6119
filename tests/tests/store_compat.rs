//! A hub store written by an earlier release, once `outpost-hub admin migrate` has moved it into
//! the SQL store, reads whole and unchanged through the admin API of this one.
//!
//! `tests/data/hub-store-0.1.0/` is the data directory the quickstart of release 0.1.0 left on
//! 2026-12-04 (two published versions of `demo`, three devices, two completed staged rollouts with
//! their decisions and gate figures, the audit chain), with what that release's CLI printed for it
//! in `expected/`. A change to a storage record that breaks old stores fails here, not in a fleet.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use outpost_tests::hub::TestHub;
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/hub-store-0.1.0")
}

fn expected(name: &str) -> Value {
    let path = fixture().join("expected").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

#[test]
fn a_store_written_by_release_0_1_0_reads_the_same() {
    let mut hub = TestHub::start_on_copy_of(&fixture(), |data| {
        // Not migrated yet: the hub refuses to start, naming the command that migrates.
        let data = data.to_string_lossy().into_owned();
        outpost_tests::run(
            "outpost-hub",
            std::path::Path::new("/"),
            &["serve", "--data", &data, "--listen", "127.0.0.1:0"],
        )
        .fails_with(&format!(
            "holds a store of Outpost 0.1 (sled, in {data}/db) and no SQL store: run \
             `outpost-hub admin migrate --data {data}` once"
        ));
    });
    let reads: [(&[&str], &str); 8] = [
        (&["rollout", "list"], "rollout-list.json"),
        (&["rollout", "status", "1"], "rollout-1.json"),
        (&["rollout", "status", "2"], "rollout-2.json"),
        (&["device", "list"], "device-list.json"),
        (&["model", "list"], "model-list.json"),
        (&["model", "show", "demo"], "model-demo.json"),
        (&["audit", "log"], "audit-log.json"),
        (&["audit", "verify"], "audit-verify.json"),
    ];
    for (args, file) in reads {
        let mut now: Value = hub.cli_json(args);
        let mut then = expected(file);
        if file == "device-list.json" {
            // A device's state in the listing is worked out at the time of asking: the fixture's
            // devices checked in last on 2026-12-04 and are silent ever since. The stored facts
            // behind it (last check-in, active version) are compared like everything else.
            for (device, state) in [(&mut now, "silent"), (&mut then, "steady")] {
                for entry in device.as_array_mut().unwrap() {
                    let shown = entry.as_object_mut().unwrap().remove("state");
                    assert_eq!(shown, Some(Value::from(state)), "{file}: {entry}");
                }
            }
        }
        if file.starts_with("rollout-") {
            // Added since 0.1.0: each stage's devices skipped for an agent too old for the target,
            // none in a store of that release.
            let rollouts = match now.as_array_mut() {
                Some(list) => list.iter_mut().collect::<Vec<_>>(),
                None => vec![&mut now],
            };
            for rollout in rollouts {
                for stage in rollout["stages"].as_array_mut().unwrap() {
                    let skipped = stage.as_object_mut().unwrap().remove("skipped");
                    assert_eq!(skipped, Some(Value::from(0)), "{file}: {stage}");
                }
            }
        }
        assert_eq!(
            now,
            then,
            "outpost-hub {} differs from what release 0.1.0 printed ({file})",
            args.join(" ")
        );
    }
    // Not while the hub runs on it, and once is all: a second migration into the filled store is
    // refused and changes nothing.
    let data = hub.data().to_string_lossy().into_owned();
    let migrate = || {
        outpost_tests::run(
            "outpost-hub",
            std::path::Path::new("/"),
            &["admin", "migrate", "--data", &data],
        )
    };
    migrate().fails_with("is another hub running on it?");
    assert!(hub.sigterm().success());
    migrate().fails_with("the SQL store already holds devices: migrate into a new, empty one");
    hub.restart();
    let devices: Value = hub.cli_json(&["device", "list"]);
    assert_eq!(devices.as_array().map(Vec::len), Some(3));
}
