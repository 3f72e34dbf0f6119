//! ONNX Runtime beside tract, through the public API: the same answers and refusals from both,
//! batches run alike, the runtime reported, and every way ONNX Runtime cannot serve ending on
//! tract with the reason.
//!
//! The library is the `onnxruntime` wheel's for this architecture, which `cargo xtask install`
//! puts in `target/onnxruntime/<arch>/` (x86_64 on the host, aarch64 for the run under
//! qemu-aarch64); without it these tests fail naming that command. No package a registry serves
//! has ONNX Runtime for 32-bit ARM, so on armv7 this file is not built. One process loads one
//! ONNX Runtime library, so the refusals of other libraries (missing, too old, crashing) are
//! proven over real agent processes in `tests/tests/runtimes.rs`.

#![cfg(all(feature = "onnxruntime", not(target_arch = "arm")))]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use outpost_model::example::{
    batch_axes, batch_axes_specs, batch_mean, batch_mean_specs, byte_casts, byte_casts_specs,
    example_inputs, installed_onnxruntime, mlp, mlp_specs, validation_set_for, with_ir_version,
};
use outpost_model::inference::{
    InferenceError, LoadedModel, OnnxRuntimeSettings, Provider, ProviderKind, RuntimeChoice,
    RuntimeKind, Runtimes, SelectError,
};
use outpost_protocol::device::Tensor;
use outpost_protocol::trust::TensorSpec;

/// The release `cargo xtask install` brings for this architecture.
const RELEASE: &str = if cfg!(target_arch = "aarch64") {
    "1.24.4"
} else {
    "1.32.0"
};

fn library() -> PathBuf {
    installed_onnxruntime(std::env::consts::ARCH)
}

fn runtimes(choice: RuntimeChoice, providers: Vec<Provider>) -> Runtimes {
    Runtimes::new(
        choice,
        &OnnxRuntimeSettings {
            library: Some(library()),
            providers,
        },
    )
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(120)
}

/// Loads `onnx` on both runtimes: ONNX Runtime's must be what serves.
fn both(onnx: &[u8], inputs: &[TensorSpec], outputs: &[TensorSpec]) -> (LoadedModel, LoadedModel) {
    let runtimes = runtimes(RuntimeChoice::OnnxRuntime, Vec::new());
    assert!(
        runtimes.onnxruntime_ready(),
        "{:?}",
        runtimes.onnxruntime_problem()
    );
    let selected = runtimes
        .load(onnx, inputs, outputs, 1, None, deadline())
        .expect("ONNX Runtime or tract loads the model");
    assert_eq!(selected.fallback, None);
    assert_eq!(selected.model.runtime().kind, RuntimeKind::OnnxRuntime);
    let tract = LoadedModel::load(onnx, inputs, outputs, 1).expect("tract loads the model");
    assert_eq!(tract.runtime().kind, RuntimeKind::Tract);
    (selected.model, tract)
}

fn assert_close(got: &[Tensor], want: &[Tensor]) {
    assert_eq!(got.len(), want.len());
    for (got, want) in got.iter().zip(want) {
        assert_eq!(
            (&got.name, got.dtype, &got.shape),
            (&want.name, want.dtype, &want.shape)
        );
        let values = |tensor: &Tensor| -> Vec<f64> {
            match tensor.dtype {
                outpost_protocol::trust::DType::F32 => tensor
                    .data
                    .chunks_exact(4)
                    .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                    .collect(),
                _ => tensor.data.iter().map(|&b| f64::from(b)).collect(),
            }
        };
        if got.dtype == outpost_protocol::trust::DType::F32 {
            for (g, w) in values(got).iter().zip(values(want)) {
                assert!((g - w).abs() <= 1e-5 + 1e-4 * w.abs(), "{g} vs {w}");
            }
        } else {
            assert_eq!(got.data, want.data, "{}", got.name);
        }
    }
}

#[test]
fn onnx_runtime_answers_as_tract_does_at_every_batch_size() {
    let (inputs, outputs) = mlp_specs(4, 3);
    let (ort, tract) = both(&mlp(4, 8, 3, 1), &inputs, &outputs);
    let info = ort.runtime();
    assert_eq!(info.version, RELEASE);
    assert_eq!(info.providers, ["CPUExecutionProvider"]);
    for batch in [1, 3, 17] {
        let request = example_inputs(&inputs, batch, batch);
        assert_close(&ort.run(&request).unwrap(), &tract.run(&request).unwrap());
    }

    // Two batch axes, an input without one; u8 in, casts out.
    let (inputs, outputs) = batch_axes_specs();
    let (ort, tract) = both(&batch_axes(), &inputs, &outputs);
    let request = example_inputs(&inputs, 5, 2);
    assert_close(&ort.run(&request).unwrap(), &tract.run(&request).unwrap());
    let (inputs, outputs) = byte_casts_specs(6);
    let (ort, tract) = both(&byte_casts(6), &inputs, &outputs);
    let request = example_inputs(&inputs, 4, 3);
    assert_close(&ort.run(&request).unwrap(), &tract.run(&request).unwrap());
}

#[test]
fn refusals_are_the_same_on_both_runtimes() {
    // A model whose output has no batch axis answers a batch of 1 only, on either runtime.
    let (inputs, outputs) = batch_mean_specs(true);
    let (ort, tract) = both(&batch_mean(true), &inputs, &outputs);
    let one = example_inputs(&inputs, 1, 1);
    assert_close(&ort.run(&one).unwrap(), &tract.run(&one).unwrap());
    let two = example_inputs(&inputs, 2, 1);
    let (ort_error, tract_error) = (ort.run(&two).unwrap_err(), tract.run(&two).unwrap_err());
    assert!(matches!(
        ort_error,
        InferenceError::BatchOfOneOnly { got: 2, .. }
    ));
    assert_eq!(ort_error.to_string(), tract_error.to_string());

    // Bad requests are refused before either runtime sees them, with the same words.
    let (inputs, outputs) = mlp_specs(4, 3);
    let (ort, tract) = both(&mlp(4, 8, 3, 1), &inputs, &outputs);
    let mut wrong = example_inputs(&inputs, 2, 1);
    wrong[0].shape = vec![2, 5];
    wrong[0].data.extend_from_slice(&[0; 8]);
    for request in [wrong, Vec::new()] {
        assert_eq!(
            ort.run(&request).unwrap_err().to_string(),
            tract.run(&request).unwrap_err().to_string()
        );
    }
}

#[test]
fn the_validation_set_runs_under_the_runtime_that_serves() {
    let (inputs, outputs) = mlp_specs(4, 3);
    let onnx = mlp(4, 8, 3, 1);
    let set = validation_set_for(&onnx, &inputs, &outputs, 8, 5, 1e-4, 1e-3).unwrap();
    let runtimes = runtimes(RuntimeChoice::Auto, Vec::new());
    let selected = runtimes
        .load(&onnx, &inputs, &outputs, 2, Some(&set), deadline())
        .unwrap();
    assert_eq!(selected.model.runtime().kind, RuntimeKind::OnnxRuntime);
    assert_eq!(selected.model.threads(), 2);

    // Other weights fail the set under ONNX Runtime and then under tract: tract's refusal.
    let other = mlp(4, 8, 3, 2);
    let error = runtimes
        .load(&other, &inputs, &outputs, 1, Some(&set), deadline())
        .unwrap_err();
    assert!(matches!(error, SelectError::Validation(_)), "{error}");
}

#[test]
fn a_model_onnx_runtime_cannot_load_is_served_by_tract_with_the_reason() {
    let (inputs, outputs) = mlp_specs(4, 3);
    let onnx = with_ir_version(&mlp(4, 8, 3, 1), 99).unwrap();
    let set = validation_set_for(&onnx, &inputs, &outputs, 4, 5, 1e-4, 1e-3).unwrap();
    for choice in [RuntimeChoice::Auto, RuntimeChoice::OnnxRuntime] {
        let selected = runtimes(choice, Vec::new())
            .load(&onnx, &inputs, &outputs, 1, Some(&set), deadline())
            .unwrap();
        assert_eq!(selected.model.runtime().kind, RuntimeKind::Tract);
        let fallback = selected
            .fallback
            .expect("the reason ONNX Runtime was passed over");
        assert!(fallback.starts_with("onnxruntime: "), "{fallback}");
        assert!(fallback.contains("IR version"), "{fallback}");
    }
    // Asked for tract, ONNX Runtime is never tried and nothing is reported.
    let selected = runtimes(RuntimeChoice::Tract, Vec::new())
        .load(&onnx, &inputs, &outputs, 1, Some(&set), deadline())
        .unwrap();
    assert_eq!(
        (selected.model.runtime().kind, selected.fallback),
        (RuntimeKind::Tract, None)
    );
}

#[test]
fn a_provider_the_library_lacks_or_a_missing_library_falls_back_to_tract() {
    let (inputs, outputs) = mlp_specs(4, 3);
    let onnx = mlp(4, 8, 3, 1);
    let cuda = Provider {
        kind: ProviderKind::Cuda,
        options: vec![("device_id".to_owned(), "0".to_owned())],
    };
    let runtimes = runtimes(RuntimeChoice::OnnxRuntime, vec![cuda]);
    let problem = runtimes.onnxruntime_problem().unwrap().to_owned();
    assert!(problem.contains("execution provider cuda"), "{problem}");
    assert!(problem.contains(RELEASE), "{problem}");
    let selected = runtimes
        .load(&onnx, &inputs, &outputs, 1, None, deadline())
        .unwrap();
    assert_eq!(selected.model.runtime().kind, RuntimeKind::Tract);
    assert_eq!(selected.fallback, Some(format!("onnxruntime: {problem}")));

    let missing = Runtimes::new(
        RuntimeChoice::OnnxRuntime,
        &OnnxRuntimeSettings {
            library: Some(PathBuf::from("/nonexistent/libonnxruntime.so")),
            providers: Vec::new(),
        },
    );
    let selected = missing
        .load(&onnx, &inputs, &outputs, 1, None, deadline())
        .unwrap();
    assert_eq!(selected.model.runtime().kind, RuntimeKind::Tract);
    assert_eq!(
        selected.fallback.as_deref(),
        Some("onnxruntime: no ONNX Runtime library at /nonexistent/libonnxruntime.so")
    );

    // The probe a device runs before it loads the library itself.
    let probed = self::runtimes(RuntimeChoice::Auto, Vec::new())
        .probe()
        .unwrap();
    assert_eq!(probed.kind, RuntimeKind::OnnxRuntime);
}
