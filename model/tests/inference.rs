//! The inference path through its public API: loading, describing, running, validating, and every
//! refusal a caller acts on.

use std::time::{Duration, Instant};

use outpost_model::example::{
    batch_axes, batch_axes_specs, batch_mean, batch_mean_specs, byte_casts, byte_casts_specs,
    example_inputs, mlp, mlp_specs, validation_set_for,
};
use outpost_model::inference::{
    validate, InferenceError, LoadedModel, TensorKind, ValidationError,
};
use outpost_protocol::device::{Tensor, ValidationCase, ValidationSet};
use outpost_protocol::trust::{DType, Dim, TensorSpec};

const N_INPUTS: usize = 4;
const HIDDEN: usize = 8;
const N_OUTPUTS: usize = 3;

fn far_deadline() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

fn mlp_model(seed: u64) -> LoadedModel {
    let (inputs, outputs) = mlp_specs(N_INPUTS, N_OUTPUTS);
    LoadedModel::load(
        &mlp(N_INPUTS, HIDDEN, N_OUTPUTS, seed),
        &inputs,
        &outputs,
        1,
    )
    .expect("example mlp loads")
}

fn mlp_set(seed: u64, n_cases: usize, abs_tolerance: f64, rel_tolerance: f64) -> ValidationSet {
    let (inputs, outputs) = mlp_specs(N_INPUTS, N_OUTPUTS);
    validation_set_for(
        &mlp(N_INPUTS, HIDDEN, N_OUTPUTS, seed),
        &inputs,
        &outputs,
        n_cases,
        99,
        abs_tolerance,
        rel_tolerance,
    )
    .expect("validation set builds")
}

fn f32s(tensor: &Tensor) -> Vec<f32> {
    assert_eq!(tensor.dtype, DType::F32);
    tensor
        .data
        .chunks_exact(4)
        .map(|bytes| f32::from_le_bytes(bytes.try_into().expect("4 bytes")))
        .collect()
}

fn f32_tensor(name: &str, shape: &[u64], values: &[f32]) -> Tensor {
    Tensor {
        name: name.to_owned(),
        dtype: DType::F32,
        shape: shape.to_vec(),
        data: values
            .iter()
            .flat_map(|value| value.to_le_bytes())
            .collect(),
    }
}

/// Overwrites one f32 element of an expected output.
fn set_f32(tensor: &mut Tensor, element: usize, value: f32) {
    tensor.data[element * 4..element * 4 + 4].copy_from_slice(&value.to_le_bytes());
}

#[test]
fn mlp_runs_on_a_dynamic_batch_and_softmax_rows_sum_to_one() {
    let model = mlp_model(1);
    let (inputs, _) = mlp_specs(N_INPUTS, N_OUTPUTS);
    for batch in [1u64, 5] {
        let outputs = model.run(&example_inputs(&inputs, batch, 3)).expect("runs");
        assert_eq!(outputs.len(), 1);
        let y = &outputs[0];
        assert_eq!(y.name, "y");
        assert_eq!(y.shape, vec![batch, N_OUTPUTS as u64]);
        let values = f32s(y);
        for row in values.chunks(N_OUTPUTS) {
            assert!(row.iter().all(|p| *p > 0.0 && *p < 1.0), "{row:?}");
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "row {row:?} sums to {sum}");
        }
        // Rows come from different inputs, so a model ignoring its input would show here.
        if batch > 1 {
            assert_ne!(values[..N_OUTPUTS], values[N_OUTPUTS..2 * N_OUTPUTS]);
        }
    }
}

#[test]
fn batch_rows_match_single_row_runs() {
    let model = mlp_model(1);
    let (inputs, _) = mlp_specs(N_INPUTS, N_OUTPUTS);
    let batch = example_inputs(&inputs, 3, 11);
    let batched = f32s(&model.run(&batch).expect("runs")[0]);
    let x = f32s(&batch[0]);
    for (row, chunk) in x.chunks(N_INPUTS).enumerate() {
        let single = model
            .run(&[f32_tensor("x", &[1, N_INPUTS as u64], chunk)])
            .expect("runs");
        let got = f32s(&single[0]);
        let want = &batched[row * N_OUTPUTS..(row + 1) * N_OUTPUTS];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "row {row}: {got:?} vs {want:?}");
        }
    }
}

#[test]
fn two_threads_give_the_same_outputs_as_one() {
    let (inputs, outputs) = mlp_specs(N_INPUTS, N_OUTPUTS);
    let onnx = mlp(N_INPUTS, HIDDEN, N_OUTPUTS, 1);
    let single = LoadedModel::load(&onnx, &inputs, &outputs, 1).expect("loads");
    let pooled = LoadedModel::load(&onnx, &inputs, &outputs, 2).expect("loads");
    assert_eq!(pooled.threads(), 2);
    let request = example_inputs(&inputs, 4, 5);
    assert_eq!(
        single.run(&request).expect("runs"),
        pooled.run(&request).expect("runs")
    );
}

#[test]
fn validation_set_built_from_the_model_passes() {
    let model = mlp_model(1);
    let set = mlp_set(1, 6, 1e-6, 1e-5);
    let report = validate(&model, &set, far_deadline()).expect("passes");
    assert_eq!(report.cases, 6);
    // Batches 1, 2, 3, 4, 1, 2 of three outputs each.
    assert_eq!(report.elements, (1 + 2 + 3 + 4 + 1 + 2) * N_OUTPUTS as u64);
    assert!(report.max_abs_difference <= 1e-6);
}

#[test]
fn validation_set_fails_on_a_model_with_other_weights() {
    let set = mlp_set(1, 4, 1e-4, 1e-4);
    let other = mlp_model(2);
    let error = validate(&other, &set, far_deadline()).expect_err("other weights fail");
    let ValidationError::Mismatch {
        case,
        output,
        element,
        index,
        got,
        want,
        difference,
        tolerance,
    } = &error
    else {
        panic!("expected a mismatch, got {error:?}");
    };
    assert_eq!(*case, 0);
    assert_eq!(output, "y");
    let got_values = f32s(&other.run(&set.cases[0].inputs).expect("runs")[0]);
    let want_values = f32s(&set.cases[0].outputs[0]);
    assert_eq!(*got, f64::from(got_values[*element]));
    assert_eq!(*want, f64::from(want_values[*element]));
    assert_eq!(*difference, (got - want).abs());
    assert!(*difference > *tolerance);
    // Case 0 has batch 1, so element `e` is row 0, column `e`.
    assert_eq!(index, &vec![0, *element as u64]);
    // Every element before the reported one was within tolerance.
    for earlier in 0..*element {
        let (g, w) = (got_values[earlier], want_values[earlier]);
        assert!(f64::from((g - w).abs()) <= 1e-4 + 1e-4 * f64::from(w.abs()));
    }
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("case 0, output \"y\", element {element}")),
        "{message}"
    );
}

#[test]
fn absolute_tolerance_is_respected() {
    let model = mlp_model(1);
    let mut set = mlp_set(1, 3, 1e-3, 0.0);
    let want = f32s(&set.cases[1].outputs[0])[2];
    set_f32(&mut set.cases[1].outputs[0], 2, want + 5e-4);
    validate(&model, &set, far_deadline()).expect("within the absolute tolerance");

    set_f32(&mut set.cases[1].outputs[0], 2, want + 2e-3);
    let error = validate(&model, &set, far_deadline()).expect_err("beyond the tolerance");
    assert!(
        matches!(
            &error,
            ValidationError::Mismatch { case: 1, element: 2, output, .. } if output == "y"
        ),
        "{error:?}"
    );
}

#[test]
fn relative_tolerance_is_respected() {
    let model = mlp_model(1);
    let mut set = mlp_set(1, 2, 0.0, 1e-2);
    let want = f32s(&set.cases[0].outputs[0])[1];
    // The tolerance is relative to the stored (perturbed) value.
    set_f32(&mut set.cases[0].outputs[0], 1, want * 1.005);
    validate(&model, &set, far_deadline()).expect("within the relative tolerance");

    set_f32(&mut set.cases[0].outputs[0], 1, want * 1.03);
    let error = validate(&model, &set, far_deadline()).expect_err("beyond the tolerance");
    assert!(
        matches!(
            error,
            ValidationError::Mismatch {
                case: 0,
                element: 1,
                ..
            }
        ),
        "{error:?}"
    );
}

#[test]
fn nan_never_passes() {
    let model = mlp_model(1);
    let mut set = mlp_set(1, 1, 1e9, 1e9);
    set_f32(&mut set.cases[0].outputs[0], 0, f32::NAN);
    let error = validate(&model, &set, far_deadline()).expect_err("nan fails");
    assert!(
        matches!(
            error,
            ValidationError::Mismatch {
                case: 0,
                element: 0,
                ..
            }
        ),
        "{error:?}"
    );
}

#[test]
fn a_deadline_in_the_past_times_out() {
    let model = mlp_model(1);
    let set = mlp_set(1, 2, 1e-6, 1e-5);
    let error = validate(&model, &set, Instant::now()).expect_err("no time to run");
    assert!(
        matches!(
            error,
            ValidationError::Timeout {
                completed: 0,
                total: 2,
                ..
            }
        ),
        "{error:?}"
    );
}

#[test]
fn malformed_validation_sets_are_refused() {
    let model = mlp_model(1);
    let mut set = mlp_set(1, 2, 1e-6, 1e-5);

    let mut empty = set.clone();
    empty.cases.clear();
    let error = validate(&model, &empty, far_deadline()).expect_err("no cases");
    assert!(matches!(error, ValidationError::NoCases), "{error:?}");

    let mut negative = set.clone();
    negative.abs_tolerance = -1.0;
    let error = validate(&model, &negative, far_deadline()).expect_err("negative tolerance");
    assert!(
        matches!(error, ValidationError::BadTolerance { .. }),
        "{error:?}"
    );

    set.cases[1].outputs[0].name = "z".to_owned();
    let error = validate(&model, &set, far_deadline()).expect_err("unknown output");
    assert!(
        matches!(&error, ValidationError::UnknownOutput { case: 1, output } if output == "z"),
        "{error:?}"
    );

    set.cases[1].outputs.clear();
    let error = validate(&model, &set, far_deadline()).expect_err("missing output");
    assert!(
        matches!(&error, ValidationError::MissingOutput { case: 1, output } if output == "y"),
        "{error:?}"
    );

    set.cases[0].inputs[0].name = "z".to_owned();
    let error = validate(&model, &set, far_deadline()).expect_err("bad inputs");
    assert!(
        matches!(
            &error,
            ValidationError::Inference { case: 0, source: InferenceError::UnknownInput { name } }
                if name == "z"
        ),
        "{error:?}"
    );
}

#[test]
fn requests_are_checked_against_the_specs_before_running() {
    let model = mlp_model(1);
    let ones = [1.0f32; N_INPUTS];
    let x = f32_tensor("x", &[1, N_INPUTS as u64], &ones);

    let error = model
        .run(&[f32_tensor("z", &[1, N_INPUTS as u64], &ones)])
        .expect_err("unknown name");
    assert!(
        matches!(&error, InferenceError::UnknownInput { name } if name == "z"),
        "{error:?}"
    );

    let error = model.run(&[]).expect_err("missing input");
    assert!(
        matches!(&error, InferenceError::MissingInput { name } if name == "x"),
        "{error:?}"
    );

    let error = model.run(&[x.clone(), x.clone()]).expect_err("duplicate");
    assert!(
        matches!(&error, InferenceError::DuplicateInput { name } if name == "x"),
        "{error:?}"
    );

    let as_f64 = Tensor {
        dtype: DType::F64,
        data: ones
            .iter()
            .flat_map(|v| f64::from(*v).to_le_bytes())
            .collect(),
        ..x.clone()
    };
    let error = model.run(&[as_f64]).expect_err("wrong dtype");
    assert!(
        matches!(
            &error,
            InferenceError::WrongDType { name, expected: DType::F32, got: DType::F64 } if name == "x"
        ),
        "{error:?}"
    );

    let error = model
        .run(&[f32_tensor("x", &[N_INPUTS as u64], &ones)])
        .expect_err("wrong rank");
    assert!(
        matches!(&error, InferenceError::WrongRank { name, expected: 2, got: 1 } if name == "x"),
        "{error:?}"
    );

    let error = model
        .run(&[f32_tensor("x", &[1, 5], &[1.0; 5])])
        .expect_err("wrong size");
    assert!(
        matches!(
            &error,
            InferenceError::WrongDim { name, axis: 1, expected: 4, got: 5 } if name == "x"
        ),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "input \"x\" has size 5 on axis 1, the model takes 4"
    );

    let error = model
        .run(&[f32_tensor("x", &[0, N_INPUTS as u64], &[])])
        .expect_err("empty batch");
    assert!(
        matches!(&error, InferenceError::EmptyBatch { name, axis: 0 } if name == "x"),
        "{error:?}"
    );

    let short = Tensor {
        data: x.data[..x.data.len() - 1].to_vec(),
        ..x.clone()
    };
    let error = model.run(&[short]).expect_err("short data");
    assert!(
        matches!(&error, InferenceError::BadData { name, .. } if name == "x"),
        "{error:?}"
    );

    model.run(&[x]).expect("the well-formed request still runs");
}

#[test]
fn inputs_must_agree_on_the_batch_size() {
    let (inputs, outputs) = byte_casts_specs(3);
    let model = LoadedModel::load(&byte_casts(3), &inputs, &outputs, 1).expect("loads");
    let mut request = example_inputs(&inputs, 2, 1);
    request[1] = example_inputs(&inputs[1..], 3, 1).remove(0);
    let error = model.run(&request).expect_err("batch 2 and 3");
    assert!(
        matches!(
            &error,
            InferenceError::BatchMismatch { name, axis: 0, expected: 2, got: 3 } if name == "offset"
        ),
        "{error:?}"
    );
}

#[test]
fn every_dtype_goes_in_and_out() {
    let (inputs, outputs) = byte_casts_specs(3);
    let model = LoadedModel::load(&byte_casts(3), &inputs, &outputs, 1).expect("loads");
    let pixels = Tensor {
        name: "pixels".to_owned(),
        dtype: DType::U8,
        shape: vec![2, 3],
        data: vec![0, 128, 255, 1, 2, 3],
    };
    let offset = Tensor {
        name: "offset".to_owned(),
        dtype: DType::I64,
        shape: vec![2, 1],
        data: [10i64, -1].iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    // Inputs in the opposite order of the specs: matched by name, not position.
    let got = model.run(&[offset, pixels]).expect("runs");
    let names: Vec<&str> = got.iter().map(|tensor| tensor.name.as_str()).collect();
    assert_eq!(names, ["scaled", "shifted", "wide", "narrow"]);
    assert!(got.iter().all(|tensor| tensor.shape == [2, 3]));

    let scaled = f32s(&got[0]);
    let want = [
        0.0,
        128.0 / 255.0,
        1.0,
        1.0 / 255.0,
        2.0 / 255.0,
        3.0 / 255.0,
    ];
    for (g, w) in scaled.iter().zip(want) {
        assert!((g - w).abs() < 1e-7, "{scaled:?}");
    }
    let shifted: Vec<i64> = got[1]
        .data
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    assert_eq!(shifted, [10, 138, 265, 0, 1, 2]);
    let wide: Vec<f64> = got[2]
        .data
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    assert_eq!(wide, [0.0, 128.0, 255.0, 1.0, 2.0, 3.0]);
    let narrow: Vec<i32> = got[3]
        .data
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    assert_eq!(narrow, [0, 128, 255, 1, 2, 3]);
    assert_eq!(got[1].dtype, DType::I64);
    assert_eq!(got[2].dtype, DType::F64);
    assert_eq!(got[3].dtype, DType::I32);

    let set =
        validation_set_for(&byte_casts(3), &inputs, &outputs, 3, 4, 0.0, 0.0).expect("builds");
    validate(&model, &set, far_deadline()).expect("exact integer outputs pass a zero tolerance");
}

#[test]
fn describe_reads_the_model_declarations() {
    let described = LoadedModel::describe(&mlp(N_INPUTS, HIDDEN, N_OUTPUTS, 1)).expect("describes");
    assert_eq!(described, mlp_specs(N_INPUTS, N_OUTPUTS));
    assert_eq!(described.0[0].shape[0], Dim::Batch);

    let described = LoadedModel::describe(&byte_casts(5)).expect("describes");
    assert_eq!(described, byte_casts_specs(5));
}

/// A model whose input declares its width as a name (`[N, features]`) cannot be described from
/// the file: the error names every flag to give, as the file declares them, with `?` for the
/// size it does not; with those flags the model loads.
#[test]
fn a_model_that_does_not_declare_its_sizes_names_the_flags_to_give() {
    use prost::Message as _;
    use tract_onnx::pb::tensor_shape_proto::dimension::Value;
    use tract_onnx::pb::{type_proto, ModelProto};

    let mut proto = ModelProto::decode(&mlp(N_INPUTS, HIDDEN, N_OUTPUTS, 1)[..]).expect("decodes");
    let graph = proto.graph.as_mut().expect("a graph");
    let Some(type_proto::Value::TensorType(tensor)) = graph.input[0]
        .r#type
        .as_mut()
        .and_then(|declared| declared.value.as_mut())
    else {
        panic!("x declares a tensor type");
    };
    let width = &mut tensor.shape.as_mut().expect("a shape").dim[1];
    width.value = Some(Value::DimParam("features".to_owned()));
    let onnx = proto.encode_to_vec();

    let error = LoadedModel::describe(&onnx).expect_err("the width is not declared");
    let text = error.to_string();
    assert!(
        text.contains(
            "(replace each ? with the type or size): --input x:FP32:N,? --output y:FP32:N,3"
        ),
        "{text}"
    );
    let cause = std::error::Error::source(&error)
        .expect("the cause")
        .to_string();
    assert!(cause.contains("axis 1 has no fixed size"), "{cause}");
    let (inputs, outputs) = mlp_specs(N_INPUTS, N_OUTPUTS);
    LoadedModel::load(&onnx, &inputs, &outputs, 1).expect("loads with the flags' specs");
}

#[test]
fn specs_that_disagree_with_the_model_are_refused_at_load() {
    let onnx = mlp(N_INPUTS, HIDDEN, N_OUTPUTS, 1);
    let (inputs, outputs) = mlp_specs(N_INPUTS, N_OUTPUTS);

    let error = LoadedModel::load(&onnx, &inputs, &outputs, 0).expect_err("zero threads");
    assert!(matches!(error, InferenceError::ZeroThreads), "{error:?}");

    let mut renamed = inputs.clone();
    renamed[0].name = "z".to_owned();
    let error = LoadedModel::load(&onnx, &renamed, &outputs, 1).expect_err("unknown input");
    assert!(
        matches!(&error, InferenceError::UnknownSpec { kind: TensorKind::Input, name } if name == "z"),
        "{error:?}"
    );

    let error = LoadedModel::load(&onnx, &inputs, &[], 1).expect_err("no output spec");
    assert!(
        matches!(
            &error,
            InferenceError::UnspecifiedTensor { kind: TensorKind::Output, name } if name == "y"
        ),
        "{error:?}"
    );

    let doubled = [outputs.clone(), outputs.clone()].concat();
    let error = LoadedModel::load(&onnx, &inputs, &doubled, 1).expect_err("duplicate spec");
    assert!(
        matches!(
            &error,
            InferenceError::DuplicateSpec {
                kind: TensorKind::Output,
                ..
            }
        ),
        "{error:?}"
    );

    let mut retyped = inputs.clone();
    retyped[0].dtype = DType::F64;
    let error = LoadedModel::load(&onnx, &retyped, &outputs, 1).expect_err("wrong dtype");
    assert!(
        matches!(&error, InferenceError::SpecMismatch { kind: TensorKind::Input, name, .. } if name == "x"),
        "{error:?}"
    );

    let mut resized = inputs.clone();
    resized[0].shape[1] = Dim::Fixed(5);
    let error = LoadedModel::load(&onnx, &resized, &outputs, 1).expect_err("wrong size");
    assert!(
        matches!(
            &error,
            InferenceError::SpecMismatch {
                kind: TensorKind::Input,
                ..
            }
        ),
        "{error:?}"
    );

    let mut wrong_output: Vec<TensorSpec> = outputs.clone();
    wrong_output[0].shape[1] = Dim::Fixed(7);
    let error = LoadedModel::load(&onnx, &inputs, &wrong_output, 1).expect_err("output size");
    assert!(
        matches!(&error, InferenceError::SpecMismatch { kind: TensorKind::Output, name, .. } if name == "y"),
        "{error:?}"
    );

    // A batch axis may be pinned to a fixed size: the model then takes exactly that batch.
    let mut pinned = inputs.clone();
    pinned[0].shape[0] = Dim::Fixed(2);
    let model = LoadedModel::load(&onnx, &pinned, &outputs, 1).expect("a fixed batch loads");
    let error = model
        .run(&example_inputs(&inputs, 3, 1))
        .expect_err("batch 3 on a model pinned to 2");
    assert!(
        matches!(
            error,
            InferenceError::WrongDim {
                axis: 0,
                expected: 2,
                got: 3,
                ..
            }
        ),
        "{error:?}"
    );
}

#[test]
fn garbage_and_truncated_models_are_errors() {
    let (inputs, outputs) = mlp_specs(N_INPUTS, N_OUTPUTS);
    let garbage: Vec<u8> = (0..997u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let error = LoadedModel::load(&garbage, &inputs, &outputs, 1).expect_err("garbage");
    assert!(matches!(error, InferenceError::Decode(_)), "{error:?}");
    assert!(LoadedModel::describe(&garbage).is_err());
    assert!(LoadedModel::load(&[], &inputs, &outputs, 1).is_err());

    let onnx = mlp(N_INPUTS, HIDDEN, N_OUTPUTS, 1);
    for cut in [1, 2, 10, onnx.len() / 3, onnx.len() / 2, onnx.len() - 1] {
        let result = LoadedModel::load(&onnx[..cut], &inputs, &outputs, 1);
        assert!(
            result.is_err(),
            "truncated at {cut} of {} loaded",
            onnx.len()
        );
        assert!(LoadedModel::describe(&onnx[..cut]).is_err(), "cut {cut}");
    }
}

/// A well-formed protobuf whose graph names an output no node produces: tract 0.23.9 indexes a
/// map with that name and panics, which must come back as an error.
#[test]
fn a_graph_that_makes_tract_panic_is_an_error() {
    use outpost_model::example::mlp as build;
    use prost::Message as _;
    use tract_onnx::pb::ModelProto;

    let mut proto = ModelProto::decode(build(N_INPUTS, HIDDEN, N_OUTPUTS, 1).as_slice())
        .expect("example decodes");
    let graph = proto.graph.as_mut().expect("has a graph");
    graph.output[0].name = "nowhere".to_owned();
    let onnx = proto.encode_to_vec();
    let (inputs, mut outputs) = mlp_specs(N_INPUTS, N_OUTPUTS);
    outputs[0].name = "nowhere".to_owned();
    let error = LoadedModel::load(&onnx, &inputs, &outputs, 1).expect_err("broken graph");
    assert!(
        matches!(
            error,
            InferenceError::Panicked {
                stage: "parsing the model",
                ..
            }
        ),
        "{error:?}"
    );
    let error = LoadedModel::describe(&onnx).expect_err("broken graph");
    assert!(
        matches!(error, InferenceError::Panicked { .. }),
        "{error:?}"
    );
}

#[test]
fn one_loaded_model_serves_concurrent_requests() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<LoadedModel>();

    let model = mlp_model(1);
    let (inputs, _) = mlp_specs(N_INPUTS, N_OUTPUTS);
    let requests: Vec<Vec<Tensor>> = (0..4)
        .map(|seed| example_inputs(&inputs, 2, seed))
        .collect();
    let sequential: Vec<Vec<Tensor>> = requests
        .iter()
        .map(|request| model.run(request).expect("runs"))
        .collect();
    let concurrent: Vec<Vec<Tensor>> = std::thread::scope(|scope| {
        let handles: Vec<_> = requests
            .iter()
            .map(|request| scope.spawn(|| model.run(request).expect("runs")))
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("thread finishes"))
            .collect()
    });
    assert_eq!(sequential, concurrent);
}

/// `count` distinct values, so a row taken from the wrong place shows.
fn ramp(count: usize, start: f32) -> Vec<f32> {
    (0..count).map(|ix| start + ix as f32 * 0.25).collect()
}

#[test]
fn batch_axes_anywhere_answer_batch_1_and_n_like_the_arithmetic() {
    let (inputs, outputs) = batch_axes_specs();
    let model = LoadedModel::load(&batch_axes(), &inputs, &outputs, 1).expect("loads");
    let w = [2.0f32, -1.0, 0.5];
    for batch in [1usize, 4] {
        let x = ramp(batch * 3, 1.0);
        let s = ramp(2 * batch * 4, -3.0);
        let request = vec![
            f32_tensor("s", &[2, batch as u64, 4], &s),
            f32_tensor("w", &[3], &w),
            f32_tensor("x", &[batch as u64, 3], &x),
        ];
        let answer = model.run(&request).expect("runs");
        assert_eq!(answer[0].name, "y");
        assert_eq!(answer[0].shape, vec![batch as u64, 3]);
        let want_y: Vec<f32> = x.iter().enumerate().map(|(ix, v)| v * w[ix % 3]).collect();
        assert_eq!(f32s(&answer[0]), want_y, "y at batch {batch}");
        assert_eq!(answer[1].name, "z");
        assert_eq!(answer[1].shape, vec![2, batch as u64, 4]);
        let want_z: Vec<f32> = s.iter().map(|v| v * v).collect();
        assert_eq!(f32s(&answer[1]), want_z, "z at batch {batch}");
    }
}

/// `x` `[rows, 3]` minus its mean over the rows, and that mean, computed here.
fn centred(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / 3;
    let mean: Vec<f32> = (0..3)
        .map(|col| (0..rows).map(|row| x[row * 3 + col]).sum::<f32>() / rows as f32)
        .collect();
    let centred = x
        .iter()
        .enumerate()
        .map(|(ix, v)| v - mean[ix % 3])
        .collect();
    (centred, mean)
}

#[test]
fn a_model_whose_rows_cannot_be_put_back_together_answers_batch_1_and_refuses_more() {
    // `mean` has no batch axis, so the rows of a larger batch cannot be stacked into it.
    let (inputs, outputs) = batch_mean_specs(true);
    let model = LoadedModel::load(&batch_mean(true), &inputs, &outputs, 1).expect("loads");
    let x = [2.0f32, -1.0, 0.5];
    let answer = model
        .run(&[f32_tensor("x", &[1, 3], &x)])
        .expect("batch 1 runs");
    assert_eq!(answer[0].shape, vec![1, 3]);
    assert_eq!(f32s(&answer[0]), vec![0.0; 3], "a row centred on itself");
    assert_eq!(answer[1].shape, vec![3]);
    assert_eq!(f32s(&answer[1]), x.to_vec(), "the mean of one row");
    let error = model
        .run(&[f32_tensor("x", &[3, 3], &ramp(9, 2.0))])
        .expect_err("batch 3");
    assert!(
        matches!(&error, InferenceError::BatchOfOneOnly { got: 3, reason } if reason.contains("\"mean\"")),
        "{error:?}"
    );
    assert!(error.to_string().contains("batch of 1 only"), "{error}");
}

#[test]
fn validation_at_batch_n_refuses_a_model_whose_rows_are_not_independent() {
    // Every output has one batch axis, so a batch runs row by row through the batch-1 plan, and
    // this model's rows then come out centred on themselves (all zeros). Its exporter's golden
    // outputs, centred on the batch mean, pass at batch 1 and fail at batch 3: the gate refuses
    // the model, because validation runs the path the device runs.
    let (inputs, outputs) = batch_mean_specs(false);
    let model = LoadedModel::load(&batch_mean(false), &inputs, &outputs, 1).expect("loads");
    let case = |batch: u64| {
        let x = ramp(batch as usize * 3, 2.0);
        let (want, _) = centred(&x);
        ValidationCase {
            inputs: vec![f32_tensor("x", &[batch, 3], &x)],
            outputs: vec![f32_tensor("centred", &[batch, 3], &want)],
        }
    };
    let set = |cases| ValidationSet {
        abs_tolerance: 1e-6,
        rel_tolerance: 0.0,
        cases,
        checks: Vec::new(),
    };
    validate(&model, &set(vec![case(1)]), far_deadline()).expect("batch 1 passes");
    let error =
        validate(&model, &set(vec![case(1), case(3)]), far_deadline()).expect_err("batch 3 fails");
    assert!(
        matches!(error, ValidationError::Mismatch { case: 1, .. }),
        "{error}"
    );
}

/// Each output's expected values scaled by `factor`, which keeps every row's top class.
fn scaled(set: &ValidationSet, factor: f32) -> ValidationSet {
    let mut set = set.clone();
    for tensor in set
        .cases
        .iter_mut()
        .flat_map(|case| case.outputs.iter_mut())
    {
        tensor.data = tensor
            .data
            .chunks_exact(4)
            .flat_map(|bytes| {
                let value = f32::from_le_bytes(bytes.try_into().expect("4 bytes"));
                (value * factor).to_le_bytes()
            })
            .collect();
    }
    set
}

/// A class output checked on top-1 alone passes expected scores that keep every row's top class
/// (a quantized or converted model's), where the element tolerances fail them; expected classes
/// of another model fail it; a tolerance of the output's own replaces the set's; and a check that
/// cannot be applied is refused naming the output.
#[test]
fn per_output_checks_judge_top1_and_tolerances_of_their_own() {
    use outpost_protocol::device::{OutputCheck, Tolerance};
    let model = mlp_model(1);
    let rescaled = scaled(&mlp_set(1, 8, 1e-5, 1e-4), 1.3);
    let error = validate(&model, &rescaled, far_deadline()).expect_err("elements are off");
    assert!(matches!(error, ValidationError::Mismatch { .. }), "{error}");

    let top1 = |min: f64| OutputCheck {
        output: "y".into(),
        tolerance: None,
        min_top1: Some(min),
    };
    let checked = ValidationSet {
        checks: vec![top1(1.0)],
        ..rescaled.clone()
    };
    let report = validate(&model, &checked, far_deadline()).expect("top classes agree");
    let rows: u64 = checked
        .cases
        .iter()
        .map(|case| case.outputs[0].shape[0])
        .sum();
    assert_eq!(
        (report.top1[0].agreed, report.top1[0].rows),
        (rows, rows),
        "{report:?}"
    );
    assert_eq!(report.elements, 0, "no element compared");

    let others = ValidationSet {
        checks: vec![top1(0.9)],
        ..mlp_set(2, 8, 1e-5, 1e-4)
    };
    let error = validate(&model, &others, far_deadline()).expect_err("another model's classes");
    let ValidationError::Top1 { agreed, rows, .. } = error else {
        panic!("{error}");
    };
    assert!((agreed as f64) < 0.9 * rows as f64, "{agreed} of {rows}");

    let loose = ValidationSet {
        checks: vec![OutputCheck {
            output: "y".into(),
            tolerance: Some(Tolerance { abs: 0.5, rel: 0.0 }),
            min_top1: None,
        }],
        ..rescaled.clone()
    };
    validate(&model, &loose, far_deadline()).expect("the output's own tolerance");

    for (check, reason) in [
        (
            OutputCheck {
                output: "z".into(),
                ..top1(0.9)
            },
            "the model has no such output",
        ),
        (top1(1.5), "between 0 and 1"),
        (
            OutputCheck {
                min_top1: None,
                ..top1(0.9)
            },
            "it checks nothing",
        ),
    ] {
        let set = ValidationSet {
            checks: vec![check],
            ..rescaled.clone()
        };
        let error = validate(&model, &set, far_deadline()).expect_err(reason);
        assert!(
            matches!(error, ValidationError::BadCheck { .. }) && error.to_string().contains(reason),
            "{error}"
        );
    }
}
