//! `outpost-hub validation make` through the real binary (issue 20): a validation set for a model
//! from its user's own sample inputs, with expected outputs from the user's own framework or from
//! the model; the right model passes it and a model with other weights does not; `inspect`
//! prints it; `model sign` runs it; and bad input is refused naming what is wrong.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use outpost_model::example::normal_rows;
use outpost_model::inference::LoadedModel;
use outpost_protocol::device::{Tensor, ValidationSet};
use outpost_protocol::trust::{DType, Dim, TensorSpec};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::{run, Run};

fn hub(dir: &Path, args: &[&str]) -> Run {
    run("outpost-hub", dir, args)
}

/// An `.npy` file (format 1.0) of little-endian float32 `values` in `shape`.
fn npy_f32(shape: &[usize], values: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
        dims.join(", ")
    );
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(values.iter().flat_map(|value| value.to_le_bytes()));
    bytes
}

fn f32s(tensor: &Tensor) -> Vec<f32> {
    tensor
        .data
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap()))
        .collect()
}

const ROWS: usize = 40;

/// The outputs the example model at `path` gives for the rows of four `values` each, as the
/// user's own framework would compute them.
fn outputs_of(path: &Path, values: &[f32]) -> Vec<f32> {
    let onnx = std::fs::read(path).unwrap();
    let (inputs, outputs) = LoadedModel::describe(&onnx).unwrap();
    let model = LoadedModel::load(&onnx, &inputs, &outputs, 1).unwrap();
    let x = Tensor {
        name: "x".to_owned(),
        dtype: DType::F32,
        shape: vec![(values.len() / 4) as u64, 4],
        data: values
            .iter()
            .flat_map(|value| value.to_le_bytes())
            .collect(),
    };
    f32s(&model.run(&[x]).unwrap()[0])
}

/// Two example models in `d` (`ex` and, with other weights, `other`) and `x.npy`, standard
/// normal sample rows from `seed`, which it returns.
fn two_models_and_samples(d: &Path, seed: u64) -> Vec<f32> {
    hub(d, &["example-model", "--out", "ex", "--seed", "1"]).ok();
    hub(d, &["example-model", "--out", "other", "--seed", "2"]).ok();
    let rows = normal_rows(4, ROWS, seed, 0.0);
    std::fs::write(d.join("x.npy"), npy_f32(&[ROWS, 4], &rows)).unwrap();
    rows
}

/// `validation make` of `model` from `x.npy` into `v.bin`, with `extra` flags.
fn make_from_samples(d: &Path, model: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        "validation",
        "make",
        "--model",
        model,
        "--data",
        "x=x.npy",
        "--out",
        "v.bin",
    ];
    args.extend_from_slice(extra);
    hub(d, &args)
}

#[test]
fn a_set_from_your_own_data_passes_the_right_model_and_fails_another() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The user's sample inputs, and the outputs their own framework computed for them: here the
    // model's own, with the float noise a conversion between runtimes brings.
    let rows = two_models_and_samples(d, 7);
    let noisy: Vec<f32> = outputs_of(&d.join("ex/model.onnx"), &rows)
        .iter()
        .map(|value| value * (1.0 + 2e-6))
        .collect();
    std::fs::write(d.join("y.npy"), npy_f32(&[ROWS, 3], &noisy)).unwrap();

    let make = |model: &str, extra: &[&str]| make_from_samples(d, model, extra);
    let made = make(
        "ex/model.onnx",
        &[
            "--expected",
            "y=y.npy",
            "--cases",
            "8",
            "--rows-per-case",
            "2",
        ],
    )
    .ok();
    assert!(
        made.stderr
            .contains("8 case(s) of 2 row(s), expected outputs from --expected"),
        "{}",
        made.stderr
    );
    let bytes = std::fs::read(d.join("v.bin")).unwrap();
    // No per-output check: written in the first form, which agents of every release read.
    assert_eq!(
        outpost_protocol::envelope::peek_kind(&bytes),
        Some(outpost_protocol::MessageKind::ValidationSetV1)
    );
    let set = ValidationSet::decode(&bytes).unwrap();
    assert_eq!(set.cases.len(), 8);
    for (index, case) in set.cases.iter().enumerate() {
        assert_eq!(case.inputs[0].shape, [2, 4]);
        assert_eq!(f32s(&case.inputs[0]), rows[index * 8..index * 8 + 8]);
        assert_eq!(f32s(&case.outputs[0]), noisy[index * 6..index * 6 + 6]);
    }
    let shown = hub(d, &["inspect", "v.bin"]).ok().stdout;
    assert!(shown.contains("8 case(s):"), "{shown}");
    assert!(
        shown.contains("case 7: inputs x FP32 [2, 4] -> outputs y FP32 [2, 3]"),
        "{shown}"
    );

    // `model publish` runs the set before it signs, as every device will before it commits:
    // the model passes, and one with other weights is not published.
    let hub_under_test = TestHub::start();
    let fleet = Fleet::new(&hub_under_test);
    let bundle = |name: &str, model: &str| {
        let bundle = d.join(name);
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::copy(d.join(model), bundle.join("model.onnx")).unwrap();
        std::fs::copy(d.join("v.bin"), bundle.join("validation.bin")).unwrap();
        fleet.publish_args(&bundle, "mine", 1)
    };
    let published = bundle("mine", "ex/model.onnx");
    let published: Vec<&str> = published.iter().map(String::as_str).collect();
    let out = hub_under_test.cli(&published).ok();
    assert!(
        out.stderr.contains("validation passed: 8 case(s)"),
        "{}",
        out.stderr
    );
    let other = bundle("other-mine", "other/model.onnx");
    let other: Vec<&str> = other.iter().map(String::as_str).collect();
    hub_under_test
        .cli(&other)
        .fails_with("the model fails its validation set");
    make("other/model.onnx", &["--expected", "y=y.npy"])
        .fails_with("the model's outputs here are not the --expected ones within the tolerances");

    // Without --expected, the set pins what the model computes here.
    let pinned = make("ex/model.onnx", &[]).ok();
    assert!(
        pinned
            .stderr
            .contains("16 case(s) of 1 row(s), expected outputs computed by the model"),
        "{}",
        pinned.stderr
    );
}

#[test]
fn bad_validation_input_is_refused_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    hub(d, &["example-model", "--out", "ex"]).ok();
    let write = |name: &str, bytes: Vec<u8>| std::fs::write(d.join(name), bytes).unwrap();
    write("x.npy", npy_f32(&[4, 4], &[0.5; 16]));
    write("x3.npy", npy_f32(&[4, 3], &[0.5; 12]));
    write("y2.npy", npy_f32(&[4, 2], &[0.5; 8]));
    write("y_short.npy", npy_f32(&[2, 3], &[0.5; 6]));
    write("broken.npy", b"\x93NUMPY\x01\x00garbage".to_vec());
    let make = |data: &str, extra: &[&str]| {
        let mut args = vec![
            "validation",
            "make",
            "--model",
            "ex/model.onnx",
            "--data",
            data,
            "--out",
            "v.bin",
        ];
        args.extend_from_slice(extra);
        hub(d, &args)
    };
    make("x3.npy", &[]).fails_with("the array's shape is [4, 3], input \"x\" takes [N, 4]");
    make("broken.npy", &[]).fails_with("--data broken.npy");
    make("x.npy", &["--rows-per-case", "5"])
        .fails_with("--data has 4 row(s), fewer than the 5 of one case");
    make("x.npy", &["--expected", "y=y2.npy"])
        .fails_with("the array's shape is [4, 2], output \"y\" takes [N, 3]");
    make("x.npy", &["--expected", "y=y_short.npy"])
        .fails_with("--expected has 2 row(s), --data has 4");
    make("x.npy", &["--expected", "z=y2.npy"]).fails_with("not for output \"y\"");
    make("x.npy", &["--abs-tolerance=-1"]).fails_with("--abs-tolerance -1 must be");
    // Values the input's type cannot hold: fractions for a UINT8 input.
    write("bytes.onnx", outpost_model::example::byte_casts(4));
    write("offset.npy", npy_f32(&[4, 1], &[1.0; 4]));
    hub(
        d,
        &[
            "validation",
            "make",
            "--model",
            "bytes.onnx",
            "--data",
            "pixels=x.npy",
            "--data",
            "offset=offset.npy",
            "--out",
            "v.bin",
        ],
    )
    .fails_with("element 0 of input \"pixels\": 0.5 is not a valid UINT8");
    assert!(!d.join("v.bin").exists(), "nothing was written");
}

/// `model sign` reads the specs a model declares, as `model publish`, `profile` and
/// `validation make` do: no `--input` or `--output` for a model that declares its tensors.
#[test]
fn model_sign_reads_the_specs_the_model_declares() {
    use outpost_protocol::trust::{ManifestBody, Signed};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    hub(d, &["example-model", "--out", "ex"]).ok();
    hub(d, &["keys", "generate", "--out", "keys", "--count", "1"]).ok();
    let key = std::fs::read_dir(d.join("keys"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.extension().is_some_and(|ext| ext == "key"))
        .unwrap();
    hub(
        d,
        &[
            "model",
            "sign",
            "--name",
            "mine",
            "--version",
            "1",
            "--model",
            "ex/model.onnx",
            "--validation",
            "ex/validation.bin",
            "--key",
            &key.to_string_lossy(),
            "--out",
            "manifest.bin",
        ],
    )
    .ok();
    let signed: Signed<ManifestBody> =
        outpost_protocol::decode(&std::fs::read(d.join("manifest.bin")).unwrap()).unwrap();
    let body = signed.decode_unverified().unwrap();
    let spec = |name: &str, width: u64| TensorSpec {
        name: name.to_owned(),
        dtype: DType::F32,
        shape: vec![Dim::Batch, Dim::Fixed(width)],
    };
    assert_eq!(body.inputs, [spec("x", 4)]);
    assert_eq!(body.outputs, [spec("y", 3)]);
}

/// A model exported with a fixed batch of 1 (`[1, 4]`), and one with no batch axis (`[4]`), as
/// many published models are: `validation make`, `profile` and `model publish` read their specs
/// from the file with no flags, take one sample a request from a file of one row per sample, and
/// an agent serves the first and counts its drift.
#[test]
fn models_with_a_fixed_batch_of_one_or_no_batch_axis_need_no_flags() {
    use outpost_model::example::mlp_declaring;
    use outpost_protocol::drift::Profile;
    use outpost_tests::agent::{http, TestAgent, AGENT_WAIT};
    use outpost_tests::wait_until;

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rows = normal_rows(4, ROWS, 11, 0.0);
    std::fs::write(d.join("x.npy"), npy_f32(&[ROWS, 4], &rows)).unwrap();
    for (name, lead, request) in [
        ("none", None, vec![4u64]),
        ("single", Some(Dim::Fixed(1)), vec![1u64, 4]),
    ] {
        std::fs::create_dir_all(d.join(name)).unwrap();
        let onnx = d.join(name).join("model.onnx");
        std::fs::write(&onnx, mlp_declaring(4, 8, 3, 1, lead)).unwrap();
        let onnx = onnx.to_string_lossy().into_owned();
        let validation = format!("{name}/validation.bin");
        let profile = format!("{name}/profile.bin");
        let made = hub(
            d,
            &[
                "validation",
                "make",
                "--model",
                &onnx,
                "--data",
                "x.npy",
                "--out",
                &validation,
            ],
        )
        .ok();
        assert!(
            made.stderr.contains("16 case(s) of 1 row(s)"),
            "{}",
            made.stderr
        );
        let set = ValidationSet::decode(&std::fs::read(d.join(&validation)).unwrap()).unwrap();
        assert_eq!(set.cases[3].inputs[0].shape, request, "{name}");
        assert_eq!(f32s(&set.cases[3].inputs[0]), rows[12..16], "{name}");
        hub(
            d,
            &[
                "validation",
                "make",
                "--model",
                &onnx,
                "--data",
                "x.npy",
                "--rows-per-case",
                "2",
                "--out",
                "refused.bin",
            ],
        )
        .fails_with("--rows-per-case 2: input \"x\" takes one sample a request");
        hub(
            d,
            &[
                "profile",
                "--model",
                &onnx,
                "--data",
                "x.npy",
                "--classes",
                "y",
                "--out",
                &profile,
            ],
        )
        .ok();
        let profile: Profile =
            outpost_protocol::decode(&std::fs::read(d.join(&profile)).unwrap()).unwrap();
        let names: Vec<&str> = profile.features.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["x[0]", "x[1]", "x[2]", "x[3]"], "{name}");
        assert_eq!(profile.features[0].reference.n, ROWS as u64, "{name}");
        assert_eq!(profile.classes[0].reference.total(), ROWS as u64, "{name}");
    }
    assert!(!d.join("refused.bin").exists());

    // The fixed-batch model, published with no --input or --output, served by an agent.
    let hub_under_test = TestHub::start();
    let fleet = Fleet::new(&hub_under_test);
    let bundle = d.join("single");
    let mut publish = fleet.publish_args(&bundle, "single", 1);
    publish.push("--profile".into());
    publish.push(bundle.join("profile.bin").to_string_lossy().into_owned());
    let publish: Vec<&str> = publish.iter().map(String::as_str).collect();
    hub_under_test.cli(&publish).ok();
    fleet.first_rollout(&hub_under_test, "single", 1);
    let mut agent = TestAgent::enroll(&hub_under_test, &fleet, "", "");
    agent.start();
    agent.wait_status("active", serde_json::json!("single@1"));
    let client = http();
    for row in rows.chunks(4).take(20) {
        let (status, body) = agent.infer_row(&client, "single", row);
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["outputs"][0]["shape"],
            serde_json::json!([1, 3]),
            "{body}"
        );
    }
    // Two samples in one request do not fit a model exported with a batch of 1.
    let mut response = client
        .post(format!("http://{}/v2/models/single/infer", agent.listen))
        .send(
            serde_json::json!({"inputs": [
                {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": &rows[..8]}
            ]})
            .to_string(),
        )
        .unwrap();
    let text = response.body_mut().read_to_string().unwrap();
    assert_eq!(response.status().as_u16(), 400, "{text}");
    assert!(
        text.contains("has size 2 on axis 0, the model takes 1"),
        "{text}"
    );
    wait_until(AGENT_WAIT, "the fixed-batch model's drift", || {
        let report: outpost_hub::api::DriftReport =
            hub_under_test.cli_json(&["drift", "report", "--model", "single"]);
        report
            .features
            .iter()
            .any(|feature| feature.name == "x[0]" && feature.n == 20)
            .then_some(())
    });
}

/// A class output judged on top-1 agreement: expected scores from another runtime that keep each
/// row's top class pass with `--top1`, where the element tolerances refuse them; another model's
/// fail it; `--tolerance` sets an output's own; `inspect` shows the checks; bad flags are refused.
#[test]
fn class_outputs_can_be_checked_on_top1_agreement() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rows = two_models_and_samples(d, 9);
    // Scores 30% off everywhere, as a quantized export might give, with every top class kept.
    let y: Vec<f32> = outputs_of(&d.join("ex/model.onnx"), &rows)
        .iter()
        .map(|value| value * 1.3)
        .collect();
    std::fs::write(d.join("y.npy"), npy_f32(&[ROWS, 3], &y)).unwrap();
    let make = |model: &str, extra: &[&str]| {
        make_from_samples(d, model, &[&["--expected", "y=y.npy"], extra].concat())
    };
    make("ex/model.onnx", &[])
        .fails_with("the model's outputs here are not the --expected ones within the tolerances");
    make("ex/model.onnx", &["--top1", "y=2"]).fails_with("the share must be a number from 0 to 1");
    make("ex/model.onnx", &["--top1", "z"]).fails_with("names \"z\", which is not an output");
    make("ex/model.onnx", &["--tolerance", "y=1"]).fails_with("give OUTPUT=ABS,REL");
    assert!(!d.join("v.bin").exists(), "nothing was written");

    let made = make("ex/model.onnx", &["--top1", "y"]).ok();
    assert!(
        made.stderr
            .contains("top-1 of \"y\" agreeing in 16 of 16 rows"),
        "{}",
        made.stderr
    );
    assert_eq!(
        outpost_protocol::envelope::peek_kind(&std::fs::read(d.join("v.bin")).unwrap()),
        Some(outpost_protocol::MessageKind::ValidationSet),
        "a set with checks is written in the current form"
    );
    let shown = hub(d, &["inspect", "v.bin"]).ok().stdout;
    assert!(
        shown.contains(
            "output \"y\": elements not compared, top-1 agreement in at least 0.9 of rows"
        ),
        "{shown}"
    );
    make("other/model.onnx", &["--top1", "y"])
        .fails_with("the top class agrees with the expected one in");
    make("ex/model.onnx", &["--tolerance", "y=0.5,0"]).ok();
    let shown = hub(d, &["inspect", "v.bin"]).ok().stdout;
    assert!(
        shown.contains("output \"y\": elements pass when |got - want| <= 5e-1 + 0e0 * |want|"),
        "{shown}"
    );
}
