//! `outpost-hub profile` through the real binary: a drift profile made from reference data, the
//! errors a bad dataset gets, and `model sign` refusing a profile that does not fit its model.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use outpost_protocol::drift::{ClassSource, FeatureSource, NumericProfile, Profile, TensorSide};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::{run, Run};

fn hub(dir: &Path, args: &[&str]) -> Run {
    run("outpost-hub", dir, args)
}

/// `example-model` into `dir/name` with `inputs` input columns.
fn example(dir: &Path, name: &str, inputs: usize) {
    example_split(dir, name, inputs, 1);
}

/// `example-model` into `dir/name` with `inputs` input columns in `tensors` input tensors.
fn example_split(dir: &Path, name: &str, inputs: usize, tensors: usize) {
    hub(
        dir,
        &[
            "example-model",
            "--out",
            name,
            "--inputs",
            &inputs.to_string(),
            "--input-tensors",
            &tensors.to_string(),
            "--reference-rows",
            "500",
        ],
    )
    .ok();
}

fn profile_of(path: &Path) -> Profile {
    outpost_protocol::decode(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn a_profile_summarises_every_column_and_the_class_output() {
    let dir = tempfile::tempdir().unwrap();
    example(dir.path(), "ex", 4);
    let made = hub(
        dir.path(),
        &[
            "profile",
            "--model",
            "ex/model.onnx",
            "--data",
            "ex/reference.csv",
            "--classes",
            "y",
            "--psi-warn",
            "0.15",
            "--out",
            "profile.bin",
        ],
    )
    .ok();
    assert!(
        made.stderr
            .contains("4 numeric feature(s), 1 class output(s), from 500 reference rows"),
        "{}",
        made.stderr
    );
    assert!(!made.stderr.contains("warning"), "{}", made.stderr);
    let profile = profile_of(&dir.path().join("profile.bin"));
    let names: Vec<&str> = profile.features.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        ["x0", "x1", "x2", "x3"],
        "names come from the CSV header"
    );
    for (index, feature) in profile.features.iter().enumerate() {
        assert_eq!(feature.side, TensorSide::Input);
        assert_eq!(
            feature.source,
            FeatureSource::Column {
                tensor: "x".to_owned(),
                index: index as u32
            }
        );
        assert_eq!(feature.edges.len(), 20, "{}", feature.name);
        assert!(feature.edges.windows(2).all(|pair| pair[0] < pair[1]));
        // Every reference row is in the bins: edges run from the minimum to the maximum.
        assert_eq!(feature.reference.n, 500);
        assert_eq!(feature.reference.bins.iter().sum::<u64>(), 500);
        assert_eq!((feature.reference.below, feature.reference.above), (0, 0));
        // Standard normal reference data.
        assert!(
            feature.reference.mean.abs() < 0.2,
            "{}",
            feature.reference.mean
        );
    }
    let [class] = profile.classes.as_slice() else {
        panic!("one class output: {:?}", profile.classes);
    };
    assert_eq!(
        class.source,
        ClassSource::Argmax {
            tensor: "y".to_owned()
        }
    );
    assert_eq!(class.classes, [0, 1, 2]);
    assert_eq!(class.reference.counts.iter().sum::<u64>(), 500);
    assert_eq!(profile.thresholds.psi_warn, 0.15);

    // The example's own profile is made by the same code from the same data.
    let again = hub(
        dir.path(),
        &[
            "profile",
            "--model",
            "ex/model.onnx",
            "--data",
            "x=ex/reference.csv",
            "--classes",
            "y",
            "--out",
            "again.bin",
        ],
    );
    again.ok();
    assert_eq!(
        std::fs::read(dir.path().join("again.bin")).unwrap(),
        std::fs::read(dir.path().join("ex/profile.bin")).unwrap()
    );
}

/// A reference of 100 rows cannot tell a shift of PSI 0.1 from chance (the flag rule's test of
/// homogeneity counts the reference's sampling): `profile` writes the profile and warns, naming
/// the PSI a shift must reach.
#[test]
fn a_profile_of_few_rows_warns_what_drift_it_cannot_see() {
    let dir = tempfile::tempdir().unwrap();
    hub(
        dir.path(),
        &[
            "example-model",
            "--out",
            "small",
            "--inputs",
            "4",
            "--reference-rows",
            "100",
        ],
    )
    .ok();
    let made = hub(
        dir.path(),
        &[
            "profile",
            "--model",
            "small/model.onnx",
            "--data",
            "small/reference.csv",
            "--out",
            "profile.bin",
        ],
    )
    .ok();
    // chi-square's 95% quantile at 18 degrees of freedom is 28.87: about 0.29 over 100 values.
    assert!(
        made.stderr.contains(
            "warning: with 100 reference values a feature's shift differs from the reference \
             beyond chance only from a PSI of about 0.29, above --psi-warn 0.1"
        ),
        "{}",
        made.stderr
    );
    // Written all the same: the four inputs and, without `--classes`, the output's 3 columns.
    assert_eq!(
        profile_of(&dir.path().join("profile.bin")).features.len(),
        7
    );
}

/// `example-model --input-tensors`: the same columns in several inputs, each with its reference
/// data and a feature per column, named after its tensor; the same model and data otherwise, so
/// the same reference distributions as the example with one input.
#[test]
fn an_example_of_split_inputs_profiles_every_column_of_every_tensor() {
    let dir = tempfile::tempdir().unwrap();
    example_split(dir.path(), "split", 10, 3);
    example(dir.path(), "whole", 10);
    assert!(!dir.path().join("split/reference.csv").exists());
    let header = |tensor: &str| {
        let csv = std::fs::read_to_string(dir.path().join(format!("split/reference-{tensor}.csv")))
            .unwrap();
        assert_eq!(csv.lines().count(), 501, "{tensor}: a header and 500 rows");
        csv.lines().next().unwrap().to_owned()
    };
    assert_eq!(header("x0"), "x0[0],x0[1],x0[2],x0[3]");
    assert_eq!(header("x1"), "x1[0],x1[1],x1[2]");
    assert_eq!(header("x2"), "x2[0],x2[1],x2[2]");

    let split = profile_of(&dir.path().join("split/profile.bin"));
    let whole = profile_of(&dir.path().join("whole/profile.bin"));
    let sources: Vec<(&str, FeatureSource)> = split
        .features
        .iter()
        .map(|feature| (feature.name.as_str(), feature.source.clone()))
        .collect();
    let column = |tensor: &str, index| FeatureSource::Column {
        tensor: tensor.to_owned(),
        index,
    };
    assert_eq!(
        sources,
        [
            ("x0[0]", column("x0", 0)),
            ("x0[1]", column("x0", 1)),
            ("x0[2]", column("x0", 2)),
            ("x0[3]", column("x0", 3)),
            ("x1[0]", column("x1", 0)),
            ("x1[1]", column("x1", 1)),
            ("x1[2]", column("x1", 2)),
            ("x2[0]", column("x2", 0)),
            ("x2[1]", column("x2", 1)),
            ("x2[2]", column("x2", 2)),
        ]
    );
    assert_eq!(split.features.len(), whole.features.len());
    for (part, row) in split.features.iter().zip(&whole.features) {
        assert_eq!(part.side, TensorSide::Input);
        let bins = |feature: &NumericProfile| (feature.edges.clone(), feature.reference.clone());
        assert_eq!(bins(part), bins(row), "{} and {}", part.name, row.name);
    }
    assert_eq!(split.classes, whole.classes, "the class output is still y");

    // `outpost-hub profile` makes the same profile from the files, one per input.
    hub(
        dir.path(),
        &[
            "profile",
            "--model",
            "split/model.onnx",
            "--data",
            "x0=split/reference-x0.csv",
            "--data",
            "x1=split/reference-x1.csv",
            "--data",
            "x2=split/reference-x2.csv",
            "--classes",
            "y",
            "--out",
            "again.bin",
        ],
    )
    .ok();
    assert_eq!(
        std::fs::read(dir.path().join("again.bin")).unwrap(),
        std::fs::read(dir.path().join("split/profile.bin")).unwrap()
    );

    let refused = |tensors: &str| {
        hub(
            dir.path(),
            &[
                "example-model",
                "--out",
                "refused",
                "--inputs",
                "4",
                "--input-tensors",
                tensors,
            ],
        )
    };
    refused("0").fails_with("--input-tensors 0 must be between 1 and --inputs 4");
    refused("5").fails_with("--input-tensors 5 must be between 1 and --inputs 4");
    assert!(!dir.path().join("refused").exists());
}

/// Regression: the load bench (`tests/benches/hub_load.rs`) publishes 100 inputs to measure
/// 100-feature drift batches, but since wide tensors are profiled as spans (issue 20) one
/// 100-column input gave a 30-feature profile, and the bench measured 30-feature batches. In 4
/// tensors of 25 every column is a feature again, and `model publish` takes the model with its
/// profile.
#[test]
fn a_model_of_100_inputs_in_4_tensors_publishes_a_profile_of_100_features() {
    let dir = tempfile::tempdir().unwrap();
    example_split(dir.path(), "wide", 100, 4);
    let profile = profile_of(&dir.path().join("wide/profile.bin"));
    assert_eq!(profile.features.len(), 100);
    for (index, feature) in profile.features.iter().enumerate() {
        let tensor = format!("x{}", index / 25);
        assert_eq!(
            feature.source,
            FeatureSource::Column {
                tensor: tensor.clone(),
                index: (index % 25) as u32
            }
        );
        assert_eq!(feature.name, format!("{tensor}[{}]", index % 25));
    }
    assert_eq!(profile.classes.len(), 1);

    let hub_under_test = TestHub::start();
    let fleet = Fleet::new(&hub_under_test);
    let bundle = dir.path().join("wide");
    let mut publish = fleet.publish_args(&bundle, "wide", 1);
    publish.push("--profile".into());
    publish.push(bundle.join("profile.bin").to_string_lossy().into_owned());
    let publish: Vec<&str> = publish.iter().map(String::as_str).collect();
    let published = hub_under_test.cli(&publish).ok();
    assert!(
        published.stderr.contains("validation passed: 8 case(s)"),
        "{}",
        published.stderr
    );
}

#[test]
fn bad_reference_data_is_refused_naming_where() {
    let dir = tempfile::tempdir().unwrap();
    example(dir.path(), "ex", 4);
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.path().join(name), bytes).unwrap();
    write("bad.csv", b"x0,x1,x2,x3\n1,2,3,4\n1,2,x,4\n");
    write("narrow.csv", b"a,b\n1,2\n");
    write("short.csv", b"1,2,3,4\n5,6,7\n");
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let mut header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 5), }".to_owned();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    npy.extend_from_slice(&(header.len() as u16).to_le_bytes());
    npy.extend_from_slice(header.as_bytes());
    npy.extend_from_slice(&[0; 60]);
    write("wide.npy", &npy);
    write("broken.npy", &npy[..npy.len() - 54]);

    let profile = |data: &str| {
        hub(
            dir.path(),
            &[
                "profile",
                "--model",
                "ex/model.onnx",
                "--data",
                data,
                "--out",
                "p.bin",
            ],
        )
    };
    profile("bad.csv").fails_with("--data bad.csv: CSV line 3: column 3: \"x\" is not a number");
    profile("narrow.csv").fails_with("the table has 2 columns, input \"x\" takes 4 per row");
    profile("short.csv").fails_with("CSV line 2: 3 fields, the first line has 4");
    profile("wide.npy").fails_with("the array's shape is [3, 5], input \"x\" takes [N, 4]");
    profile("broken.npy").fails_with("shape [3, 5] of float32 needs 60 data bytes, the file has 6");
    profile("nothing.csv").fails_with("nothing.csv");
    assert!(!dir.path().join("p.bin").exists(), "no profile was written");
}

#[test]
fn model_sign_refuses_a_profile_of_another_model() {
    let dir = tempfile::tempdir().unwrap();
    example(dir.path(), "four", 4);
    example(dir.path(), "six", 6);
    hub(
        dir.path(),
        &["keys", "generate", "--out", "keys", "--count", "1"],
    )
    .ok();
    let key = std::fs::read_dir(dir.path().join("keys"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.extension().is_some_and(|ext| ext == "key"))
        .unwrap();
    let sign = |profile: &str| {
        hub(
            dir.path(),
            &[
                "model",
                "sign",
                "--model",
                "four/model.onnx",
                "--name",
                "demo",
                "--version",
                "1",
                "--input",
                "x:FP32:N,4",
                "--output",
                "y:FP32:N,3",
                "--profile",
                profile,
                "--key",
                &key.to_string_lossy(),
                "--out",
                "manifest.bin",
            ],
        )
    };
    sign("six/profile.bin").fails_with("column 4 is past the 4 columns of \"x\"");
    assert!(!dir.path().join("manifest.bin").exists());
    sign("six/reference.csv").fails_with("--profile six/reference.csv");
    sign("four/profile.bin").ok();
    assert!(dir.path().join("manifest.bin").exists());
}
