//! The offline key ceremony through the real `outpost-hub` binary, checked by the real
//! `outpost-agent` binary: keys on disk with safe modes, roots, rotations, manifests and plans.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use outpost_tests::{run, Run};

fn hub(dir: &Path, args: &[&str]) -> Run {
    run("outpost-hub", dir, args)
}

fn agent(dir: &Path, args: &[&str]) -> Run {
    run("outpost-agent", dir, args)
}

/// Generates `count` keys into `dir/sub` and returns their private-key paths, sorted.
fn keys(dir: &Path, sub: &str, count: u32) -> Vec<String> {
    hub(
        dir,
        &[
            "keys",
            "generate",
            "--out",
            sub,
            "--count",
            &count.to_string(),
        ],
    )
    .ok();
    let mut paths: Vec<String> = std::fs::read_dir(dir.join(sub))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "key"))
        .map(|path| path.to_string_lossy().into_owned())
        .collect();
    paths.sort();
    paths
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn generated_keys_are_private_and_distinct() {
    let dir = tempfile::tempdir().unwrap();
    let paths = keys(dir.path(), "keys", 3);
    assert_eq!(paths.len(), 3);
    assert_eq!(mode(&dir.path().join("keys")), 0o700);
    for path in &paths {
        assert_eq!(mode(Path::new(path)), 0o600, "{path}");
        assert!(Path::new(path).with_extension("pub").exists());
    }
    let contents: std::collections::HashSet<_> =
        paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert_eq!(contents.len(), 3, "every generated key is different");

    // A second run into the same directory adds keys and never overwrites.
    assert_eq!(keys(dir.path(), "keys", 1).len(), 4);
}

#[test]
fn world_readable_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = keys(dir.path(), "keys", 1).remove(0);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    hub(
        dir.path(),
        &[
            "root",
            "init",
            "--key",
            &key,
            "--threshold",
            "1",
            "--out",
            "root.bin",
        ],
    )
    .fails_with("must not be readable by group or others");
    assert!(!dir.path().join("root.bin").exists());
}

#[test]
fn threshold_ceremony_manifest_and_plan_are_accepted_by_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k = keys(d, "keys", 3);
    let pubs: Vec<String> = k.iter().map(|p| p.replace(".key", ".pub")).collect();

    // 2-of-3 root signed on "one machine" by one key: written but not yet valid.
    let out = hub(
        d,
        &[
            "root",
            "init",
            "--key",
            &k[0],
            "--public-key",
            &format!("{},{}", pubs[1], pubs[2]),
        ]
        .into_iter()
        .chain(["--threshold", "2", "--out", "root.bin"])
        .collect::<Vec<_>>(),
    )
    .ok();
    assert!(out.stdout.contains("not yet valid"), "{}", out.stdout);
    agent(d, &["verify", "--root", "root.bin"]).fails_with("1 valid signature(s)");

    // The second holder co-signs; now the device accepts it.
    hub(d, &["sign", "--in", "root.bin", "--key", &k[1]]).ok();
    let out = agent(d, &["verify", "--root", "root.bin"]).ok();
    assert!(
        out.stdout.contains("root version 1 trusted"),
        "{}",
        out.stdout
    );

    std::fs::write(d.join("model.onnx"), b"not really onnx, hashed only").unwrap();
    let two = format!("{},{}", k[0], k[2]);
    // m1 and m2 for a year (the default), m1-brief for an hour.
    for (version, out, expires) in [
        ("1", "m1", "365d"),
        ("2", "m2", "365d"),
        ("1", "m1-brief", "1h"),
    ] {
        hub(
            d,
            &[
                "model",
                "sign",
                "--name",
                "demo",
                "--version",
                version,
                "--model",
                "model.onnx",
                "--input",
                "x:FP32:N,4",
                "--output",
                "y:FP32:N,2",
                "--expires",
                expires,
                "--key",
                &two,
                "--out",
                &format!("{out}.bin"),
            ],
        )
        .ok();
    }
    // Issue 21, finding 14: a plan that outlives its fallback's manifest would have rollbacks
    // refused by every device once the manifest expired. `plan sign` refuses it, unless the plan
    // ends first.
    let brief_plan = |expires: &str| {
        hub(
            d,
            &[
                "plan",
                "sign",
                "--sequence",
                "6",
                "--target",
                "m2.bin",
                "--fallback",
                "m1-brief.bin",
                "--expires",
                expires,
                "--key",
                &two,
                "--out",
                "brief-plan.bin",
            ],
        )
    };
    brief_plan("30d")
        .fails_with("the fallback demo@1 expires at ")
        .fails_with("so after then a rollback would fail on every device");
    assert!(!d.join("brief-plan.bin").exists());
    brief_plan("30m").ok();
    hub(
        d,
        &[
            "plan",
            "sign",
            "--sequence",
            "7",
            "--target",
            "m2.bin",
            "--fallback",
            "m1.bin",
            "--stages",
            "1,10,50,100",
            "--selector",
            "site=lab",
            "--key",
            &two,
            "--out",
            "p.bin",
        ],
    )
    .ok();

    // The plan is signed for devices labelled site=lab: a device without that label in its own
    // config refuses it, whatever the hub says its labels are.
    let offered = [
        "verify",
        "--root",
        "root.bin",
        "--plan",
        "p.bin",
        "--manifest",
    ];
    agent(
        d,
        &[&offered[..], &["m2.bin", "--labels", "site=home,tier=a"]].concat(),
    )
    .fails_with(
        "plan 7 is signed for devices labelled site=lab; this device's own labels (agent.toml \
         `labels`) are site=home,tier=a",
    );
    agent(d, &[&offered[..], &["m2.bin"]].concat())
        .fails_with("this device's own labels (agent.toml `labels`) are none");
    let out = agent(
        d,
        &[&offered[..], &["m2.bin", "--labels", "tier=a,site=lab"]].concat(),
    )
    .ok();
    assert!(out.stdout.contains("plan 7 accepted"), "{}", out.stdout);
    assert!(
        out.stdout.contains("manifest demo@2 accepted as Target"),
        "{}",
        out.stdout
    );

    // The plan's fallback is below what the device has seen, and still allowed: it is signed.
    let out = agent(
        d,
        &[
            &offered[..],
            &["m1.bin", "--highest-manifest", "2", "--labels", "site=lab"],
        ]
        .concat(),
    )
    .ok();
    assert!(
        out.stdout.contains("accepted as Fallback"),
        "{}",
        out.stdout
    );
    // Unless the device committed version 2 under an earlier plan: then the fallback would undo
    // what that plan's signers decided.
    agent(
        d,
        &[&offered[..], &["m1.bin", "--labels", "site=lab", "--committed", "2"]].concat(),
    )
    .fails_with(
        "fallback demo version 1 of plan 7 is below version 2, committed here under an earlier plan",
    );

    // The same old manifest offered without the plan is a rollback.
    agent(
        d,
        &[
            "verify",
            "--root",
            "root.bin",
            "--manifest",
            "m1.bin",
            "--highest-manifest",
            "2",
        ],
    )
    .fails_with("below version 2 already seen");
    // A replayed older plan.
    agent(
        d,
        &[
            "verify",
            "--root",
            "root.bin",
            "--plan",
            "p.bin",
            "--highest-plan",
            "8",
        ],
    )
    .fails_with("plan sequence 7 is below sequence 8");
    // One signature is below the 2-of-3 threshold.
    hub(
        d,
        &[
            "model",
            "sign",
            "--name",
            "demo",
            "--version",
            "3",
            "--model",
            "model.onnx",
            "--input",
            "x:FP32:N,4",
            "--output",
            "y:FP32:N,2",
            "--key",
            &k[0],
            "--out",
            "m3.bin",
        ],
    )
    .ok();
    agent(d, &["verify", "--root", "root.bin", "--manifest", "m3.bin"])
        .fails_with("1 valid signature(s) from distinct trusted keys, 2 required");
    // Names that could escape a directory never get signed.
    hub(
        d,
        &[
            "model",
            "sign",
            "--name",
            "../etc",
            "--version",
            "1",
            "--model",
            "model.onnx",
            "--input",
            "x:FP32:4",
            "--output",
            "y:FP32:2",
            "--key",
            &two,
            "--out",
            "bad.bin",
        ],
    )
    .fails_with("path separator");
}

#[test]
fn rotation_needs_old_and_new_thresholds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let old = keys(d, "old", 2);
    let new = keys(d, "new", 2);
    let old_both = old.join(",");
    let new_both = new.join(",");
    // `--keys` and `--old-keys` (the spellings of the design notes) are aliases of `--key` and
    // `--old-key`; this test uses both forms.
    hub(
        d,
        &[
            "root",
            "init",
            "--keys",
            &old_both,
            "--threshold",
            "2",
            "--out",
            "root1.bin",
        ],
    )
    .ok();

    // Only one of the two old keys signs: the device must refuse the rotation.
    hub(
        d,
        &[
            "root",
            "rotate",
            "--root",
            "root1.bin",
            "--old-key",
            &old[0],
            "--key",
            &new_both,
            "--threshold",
            "2",
            "--out",
            "weak.bin",
        ],
    )
    .ok();
    agent(
        d,
        &["verify", "--root", "root1.bin", "--rotation", "weak.bin"],
    )
    .fails_with("root has 1 valid signature(s)");

    // Both old keys and both new keys sign: accepted, and the old keys alone no longer suffice.
    hub(
        d,
        &[
            "root",
            "rotate",
            "--root",
            "root1.bin",
            "--old-keys",
            &old_both,
            "--keys",
            &new_both,
            "--threshold",
            "2",
            "--out",
            "root2.bin",
        ],
    )
    .ok();
    let out = agent(
        d,
        &["verify", "--root", "root1.bin", "--rotation", "root2.bin"],
    )
    .ok();
    assert!(
        out.stdout.contains("root version 2 trusted"),
        "{}",
        out.stdout
    );

    std::fs::write(d.join("model.onnx"), b"weights").unwrap();
    hub(
        d,
        &[
            "model",
            "sign",
            "--name",
            "demo",
            "--version",
            "1",
            "--model",
            "model.onnx",
            "--input",
            "x:FP32:4",
            "--output",
            "y:FP32:2",
            "--key",
            &old_both,
            "--out",
            "m.bin",
        ],
    )
    .ok();
    agent(
        d,
        &[
            "verify",
            "--root",
            "root1.bin",
            "--rotation",
            "root2.bin",
            "--manifest",
            "m.bin",
        ],
    )
    .fails_with("0 valid signature(s)");
}
