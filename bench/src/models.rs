//! The benchmark's models and their inputs, all generated or fetched reproducibly.

use anyhow::Context;
use outpost_model::example::{example_inputs, mlp};
use outpost_model::inference::LoadedModel;
use outpost_protocol::device::Tensor;
use outpost_protocol::trust::{DType, TensorSpec};

use crate::cache::Cache;

/// The models the harness knows, in the order it runs them.
pub const NAMES: [&str; 5] = [
    "mlp",
    "silero",
    "silero-sequence",
    "squeezenet",
    "mobilenetv2",
];

/// Seed of every model's request inputs.
const INPUT_SEED: u64 = 42;

/// One model, ready to load into every runtime.
#[derive(Debug)]
pub struct BenchModel {
    pub name: &'static str,
    /// What the model is, for the report.
    pub description: String,
    pub onnx: Vec<u8>,
    /// The specs the model declares, read as `model publish` reads them.
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// One request: every batch axis 1, floats uniform in [-1, 1).
    pub request: Vec<Tensor>,
    /// The output a drift profile treats as classes (argmax), as an operator would name it.
    pub class_output: Option<&'static str>,
    /// Timed rounds unless `OUTPOST_BENCH_ROUNDS` says otherwise.
    pub default_rounds: usize,
}

impl BenchModel {
    /// A model from its ONNX bytes, with the specs it declares.
    pub fn new(
        name: &'static str,
        description: String,
        onnx: Vec<u8>,
        class_output: Option<&'static str>,
        default_rounds: usize,
    ) -> anyhow::Result<BenchModel> {
        let (inputs, outputs) =
            LoadedModel::describe(&onnx).with_context(|| format!("reading the specs of {name}"))?;
        if let Some(spec) = inputs
            .iter()
            .chain(&outputs)
            .find(|s| s.dtype != DType::F32)
        {
            anyhow::bail!(
                "{name}: tensor {:?} is not f32, which the harness assumes",
                spec.name
            );
        }
        let request = example_inputs(&inputs, 1, INPUT_SEED);
        Ok(BenchModel {
            name,
            description,
            onnx,
            inputs,
            outputs,
            request,
            class_output,
            default_rounds,
        })
    }

    /// Loads the named model, fetching or building it into the cache if needed. `notes` collects
    /// what the report should say about the choice of model.
    pub fn load(name: &str, cache: &Cache, notes: &mut Vec<String>) -> anyhow::Result<BenchModel> {
        match name {
            "mlp" => {
                let (n_inputs, hidden, n_outputs) = (64, 256, 10);
                BenchModel::new(
                    "mlp",
                    format!("MLP {n_inputs} → {hidden} → {n_outputs}, example::mlp, seed 1"),
                    mlp(n_inputs, hidden, n_outputs, 1),
                    Some("y"),
                    3000,
                )
            }
            "silero" => {
                // The issue names the OpenVINO export; use it when tract loads it.
                let openvino = "silero_vad_openvino_16k.onnx";
                let onnx = cache.silero(openvino)?;
                let file = match LoadedModel::describe(&onnx) {
                    Ok(_) => openvino,
                    Err(error) => {
                        notes.push(format!(
                            "silero: tract {} cannot load {openvino} ({:#}); ran \
                             silero_vad_16k_sequence.onnx from the same wheel instead",
                            tract_version(),
                            anyhow::Error::from(error)
                        ));
                        "silero_vad_16k_sequence.onnx"
                    }
                };
                BenchModel::new(
                    "silero",
                    format!("Silero VAD 6.2.3 {file}, one 576-sample chunk + LSTM state"),
                    cache.silero(file)?,
                    None,
                    2000,
                )
            }
            // The export the agent's earlier Silero bench ran (a batch axis on the chunk, LSTM
            // state as two tensors), kept for the comparison.
            "silero-sequence" => BenchModel::new(
                "silero-sequence",
                "Silero VAD 6.2.3 silero_vad_16k_sequence.onnx, one 576-sample chunk + LSTM state"
                    .to_owned(),
                cache.silero("silero_vad_16k_sequence.onnx")?,
                None,
                2000,
            ),
            "squeezenet" => BenchModel::new(
                "squeezenet",
                "SqueezeNet 1.0, 1×3×224×224, onnx's light_squeezenet graph, seeded weights"
                    .to_owned(),
                cache.cnn("squeezenet")?,
                Some("probabilities"),
                150,
            ),
            "mobilenetv2" => BenchModel::new(
                "mobilenetv2",
                "MobileNetV2 1.0, 1×3×224×224, built with onnx.helper, seeded weights".to_owned(),
                cache.cnn("mobilenetv2")?,
                Some("logits"),
                150,
            ),
            other => anyhow::bail!(
                "unknown model {other:?}: the harness has {}",
                NAMES.join(", ")
            ),
        }
    }

    /// One input's elements as f32 (every input is f32, checked at load).
    pub fn input_values(&self, index: usize) -> Vec<f32> {
        f32s(&self.request[index].data)
    }
}

/// Little-endian f32 bytes as values.
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The tract version the workspace builds, for the report.
pub fn tract_version() -> &'static str {
    "0.23.9"
}
