//! Small, deterministic ONNX models built in Rust, for tests, the quickstart and benchmarks.
//!
//! Outpost needs real ONNX bytes to exercise signing, publishing, probation and inference, and a
//! checked-in binary or a Python exporter would hide what the model is. These builders write the
//! ONNX protobuf directly with tract's generated types, with weights from a seeded PRNG: the same
//! arguments always give the same bytes. Two seeds give two models with the same specs and
//! different outputs, which is how tests get a "bad" model version that fails validation.

use outpost_protocol::device::{Tensor, ValidationCase, ValidationSet};
use outpost_protocol::trust::{DType, Dim, TensorSpec};
use prost::Message as _;
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::{dimension, Dimension};
use tract_onnx::pb::{
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

use crate::inference::{InferenceError, LoadedModel};

/// The ONNX operator set the builders target.
const OPSET: i64 = 13;
/// ONNX IR version 7 is the one that goes with opset 13.
const IR_VERSION: i64 = 7;

/// A two-layer perceptron classifier: `x` `[N, n_inputs]` f32 → Gemm → Relu → Gemm → Softmax →
/// `y` `[N, n_outputs]` f32, each row of `y` a probability distribution.
pub fn mlp(n_inputs: usize, hidden: usize, n_outputs: usize, seed: u64) -> Vec<u8> {
    mlp_split(n_inputs, 1, hidden, n_outputs, seed)
}

/// The perceptron of [`mlp`] with its `n_inputs` columns taken as `input_tensors` inputs
/// `x0`..`x{input_tensors - 1}`, each `[N, width]` f32 with the widths of [`split_widths`],
/// joined by a `Concat` on axis 1 before the first layer: a model whose features arrive in
/// several tensors, as many real ones do. The weights are [`mlp`]'s for the same seed, so the
/// concatenation of the parts gives the outputs [`mlp`] gives for the whole row. With one tensor
/// this is [`mlp`] itself, byte for byte: one input named `x` and no `Concat`.
///
/// `input_tensors` must be between 1 and `n_inputs` (see [`split_widths`]).
pub fn mlp_split(
    n_inputs: usize,
    input_tensors: usize,
    hidden: usize,
    n_outputs: usize,
    seed: u64,
) -> Vec<u8> {
    let initializers = mlp_weights(n_inputs, hidden, n_outputs, seed);
    let (inputs, outputs) = mlp_split_specs(n_inputs, input_tensors, n_outputs);
    let mut nodes = Vec::with_capacity(5);
    if inputs.len() > 1 {
        let parts: Vec<&str> = inputs.iter().map(|spec| spec.name.as_str()).collect();
        // The joined tensor takes the name the single input has, so the layers are the same nodes.
        nodes.push(node("Concat", &parts, "x", vec![int_attribute("axis", 1)]));
    }
    nodes.extend([
        node("Gemm", &["x", "w1", "b1"], "hidden", vec![]),
        node("Relu", &["hidden"], "activated", vec![]),
        node("Gemm", &["activated", "w2", "b2"], "logits", vec![]),
        node("Softmax", &["logits"], "y", vec![int_attribute("axis", -1)]),
    ]);
    encode("mlp", nodes, initializers, &inputs, &outputs)
}

/// The widths of `parts` tensors that share `n_inputs` columns as evenly as whole columns allow,
/// the first ones a column wider: 10 in 3 is `[4, 3, 3]`.
///
/// # Panics
///
/// When `parts` is 0 or more than `n_inputs`, which would leave a tensor with no columns: the
/// callers check their arguments first (`outpost-hub example-model --input-tensors`).
pub fn split_widths(n_inputs: usize, parts: usize) -> Vec<usize> {
    assert!(
        (1..=n_inputs.max(1)).contains(&parts),
        "{n_inputs} input columns cannot be split into {parts} tensors"
    );
    (0..parts)
        .map(|part| n_inputs / parts + usize::from(part < n_inputs % parts))
        .collect()
}

/// Rows of `values` (each as wide as `widths` together) cut by columns into one f32 tensor per
/// width, named as `specs` in order: the inputs of [`mlp_split`] for the rows [`mlp`] takes whole.
pub fn column_tensors(specs: &[TensorSpec], widths: &[usize], values: &[f32]) -> Vec<Tensor> {
    let row_width: usize = widths.iter().sum();
    let rows = values.len().checked_div(row_width).unwrap_or(0);
    let mut first = 0;
    specs
        .iter()
        .zip(widths)
        .map(|(spec, &width)| {
            let columns = first..first + width;
            first += width;
            Tensor {
                name: spec.name.clone(),
                dtype: DType::F32,
                shape: vec![rows as u64, width as u64],
                data: values
                    .chunks(row_width)
                    .flat_map(|row| &row[columns.clone()])
                    .flat_map(|value| value.to_le_bytes())
                    .collect(),
            }
        })
        .collect()
}

/// The perceptron of [`mlp`] (MatMul and Add in place of Gemm, which takes only matrices),
/// declaring `lead` as the first axis of `x` and `y`, or no batch axis at all: `Some(Dim::Fixed(1))`
/// is a model exported with a fixed batch of 1, as many published models are; `None` one that
/// takes a single `[n_inputs]` sample.
pub fn mlp_declaring(
    n_inputs: usize,
    hidden: usize,
    n_outputs: usize,
    seed: u64,
    lead: Option<Dim>,
) -> Vec<u8> {
    let initializers = mlp_weights(n_inputs, hidden, n_outputs, seed);
    let nodes = vec![
        node("MatMul", &["x", "w1"], "product", vec![]),
        node("Add", &["product", "b1"], "hidden", vec![]),
        node("Relu", &["hidden"], "activated", vec![]),
        node("MatMul", &["activated", "w2"], "scores", vec![]),
        node("Add", &["scores", "b2"], "logits", vec![]),
        node("Softmax", &["logits"], "y", vec![int_attribute("axis", -1)]),
    ];
    let (mut inputs, mut outputs) = mlp_specs(n_inputs, n_outputs);
    for spec in inputs.iter_mut().chain(outputs.iter_mut()) {
        spec.shape.remove(0);
        if let Some(lead) = lead {
            spec.shape.insert(0, lead);
        }
    }
    encode("mlp", nodes, initializers, &inputs, &outputs)
}

/// The weights and biases of both layers of [`mlp`], from `seed`.
fn mlp_weights(n_inputs: usize, hidden: usize, n_outputs: usize, seed: u64) -> Vec<TensorProto> {
    let mut rng = SplitMix64(seed);
    vec![
        f32_initializer("w1", &[n_inputs, hidden], &mut rng),
        f32_initializer("b1", &[hidden], &mut rng),
        f32_initializer("w2", &[hidden, n_outputs], &mut rng),
        f32_initializer("b2", &[n_outputs], &mut rng),
    ]
}

/// The specs [`mlp`] declares.
pub fn mlp_specs(n_inputs: usize, n_outputs: usize) -> (Vec<TensorSpec>, Vec<TensorSpec>) {
    mlp_split_specs(n_inputs, 1, n_outputs)
}

/// The specs [`mlp_split`] declares: inputs `x0`.. in order (`x` alone for one tensor), then `y`.
pub fn mlp_split_specs(
    n_inputs: usize,
    input_tensors: usize,
    n_outputs: usize,
) -> (Vec<TensorSpec>, Vec<TensorSpec>) {
    let f32_rows = |name: String, width: usize| TensorSpec {
        name,
        dtype: DType::F32,
        shape: vec![Dim::Batch, Dim::Fixed(width as u64)],
    };
    let inputs = if input_tensors == 1 {
        vec![f32_rows("x".to_owned(), n_inputs)]
    } else {
        split_widths(n_inputs, input_tensors)
            .into_iter()
            .enumerate()
            .map(|(part, width)| f32_rows(format!("x{part}"), width))
            .collect()
    };
    (inputs, vec![f32_rows("y".to_owned(), n_outputs)])
}

/// A model that touches every [`DType`]: inputs `pixels` `[N, width]` u8 and `offset` `[N, 1]`
/// i64; outputs `scaled` f32 (`pixels / 255`), `shifted` i64 (`pixels + offset`), `wide` f64 and
/// `narrow` i32 (`pixels` cast).
pub fn byte_casts(width: usize) -> Vec<u8> {
    let scale = TensorProto {
        name: "scale".to_owned(),
        dims: vec![],
        data_type: DataType::Float as i32,
        raw_data: 255f32.to_le_bytes().to_vec(),
        ..TensorProto::default()
    };
    let cast = |input: &str, output: &str, to: DataType| {
        node(
            "Cast",
            &[input],
            output,
            vec![int_attribute("to", to as i64)],
        )
    };
    let nodes = vec![
        cast("pixels", "pixels_f32", DataType::Float),
        node("Div", &["pixels_f32", "scale"], "scaled", vec![]),
        cast("pixels", "pixels_i64", DataType::Int64),
        node("Add", &["pixels_i64", "offset"], "shifted", vec![]),
        cast("pixels", "wide", DataType::Double),
        cast("pixels", "narrow", DataType::Int32),
    ];
    let (inputs, outputs) = byte_casts_specs(width);
    encode("byte_casts", nodes, vec![scale], &inputs, &outputs)
}

/// The specs [`byte_casts`] declares.
pub fn byte_casts_specs(width: usize) -> (Vec<TensorSpec>, Vec<TensorSpec>) {
    let spec = |name: &str, dtype, last: u64| TensorSpec {
        name: name.to_owned(),
        dtype,
        shape: vec![Dim::Batch, Dim::Fixed(last)],
    };
    let width = width as u64;
    (
        vec![
            spec("pixels", DType::U8, width),
            spec("offset", DType::I64, 1),
        ],
        vec![
            spec("scaled", DType::F32, width),
            spec("shifted", DType::I64, width),
            spec("wide", DType::F64, width),
            spec("narrow", DType::I32, width),
        ],
    )
}

/// A model with batch axes in several places: inputs `x` `[N, 3]`, `s` `[2, N, 4]` (the batch on
/// the second axis) and `w` `[3]` (no batch axis); outputs `y = x * w` `[N, 3]` and `z = s * s`
/// `[2, N, 4]`.
pub fn batch_axes() -> Vec<u8> {
    let nodes = vec![
        node("Mul", &["x", "w"], "y", vec![]),
        node("Mul", &["s", "s"], "z", vec![]),
    ];
    let (inputs, outputs) = batch_axes_specs();
    encode("batch_axes", nodes, vec![], &inputs, &outputs)
}

/// The specs [`batch_axes`] declares.
pub fn batch_axes_specs() -> (Vec<TensorSpec>, Vec<TensorSpec>) {
    let spec = |name: &str, shape: Vec<Dim>| TensorSpec {
        name: name.to_owned(),
        dtype: DType::F32,
        shape,
    };
    (
        vec![
            spec("x", vec![Dim::Batch, Dim::Fixed(3)]),
            spec("s", vec![Dim::Fixed(2), Dim::Batch, Dim::Fixed(4)]),
            spec("w", vec![Dim::Fixed(3)]),
        ],
        vec![
            spec("y", vec![Dim::Batch, Dim::Fixed(3)]),
            spec("z", vec![Dim::Fixed(2), Dim::Batch, Dim::Fixed(4)]),
        ],
    )
}

/// A model whose rows are not independent: `x` `[N, 3]` → `centred = x − mean of x over the
/// batch` `[N, 3]`, and with `with_mean` also that mean itself, `mean` `[3]` (no batch axis).
pub fn batch_mean(with_mean: bool) -> Vec<u8> {
    let reduce = |output: &str, keepdims: i64| {
        node(
            "ReduceMean",
            &["x"],
            output,
            vec![
                AttributeProto {
                    name: "axes".to_owned(),
                    r#type: AttributeType::Ints as i32,
                    ints: vec![0],
                    ..AttributeProto::default()
                },
                int_attribute("keepdims", keepdims),
            ],
        )
    };
    let mut nodes = vec![
        reduce("kept_mean", 1),
        node("Sub", &["x", "kept_mean"], "centred", vec![]),
    ];
    if with_mean {
        nodes.push(reduce("mean", 0));
    }
    let (inputs, outputs) = batch_mean_specs(with_mean);
    encode("batch_mean", nodes, vec![], &inputs, &outputs)
}

/// The specs [`batch_mean`] declares.
pub fn batch_mean_specs(with_mean: bool) -> (Vec<TensorSpec>, Vec<TensorSpec>) {
    let spec = |name: &str, shape: Vec<Dim>| TensorSpec {
        name: name.to_owned(),
        dtype: DType::F32,
        shape,
    };
    let mut outputs = vec![spec("centred", vec![Dim::Batch, Dim::Fixed(3)])];
    if with_mean {
        outputs.push(spec("mean", vec![Dim::Fixed(3)]));
    }
    (vec![spec("x", vec![Dim::Batch, Dim::Fixed(3)])], outputs)
}

/// Deterministic request tensors for `specs`, with every batch axis of size `batch`.
///
/// Floats are uniform in [-1, 1), integers in [0, 10), bytes over their whole range. Integer
/// inputs that a model uses as indices may need other values; these models have none.
pub fn example_inputs(specs: &[TensorSpec], batch: u64, seed: u64) -> Vec<Tensor> {
    let mut rng = SplitMix64(seed);
    specs
        .iter()
        .map(|spec| {
            let shape: Vec<u64> = spec
                .shape
                .iter()
                .map(|dim| match dim {
                    Dim::Fixed(size) => *size,
                    Dim::Batch => batch,
                })
                .collect();
            let elements = shape.iter().product::<u64>();
            let mut data = Vec::with_capacity(elements as usize * spec.dtype.size());
            for _ in 0..elements {
                match spec.dtype {
                    DType::F32 => data.extend_from_slice(&(rng.unit() as f32).to_le_bytes()),
                    DType::F64 => data.extend_from_slice(&rng.unit().to_le_bytes()),
                    DType::I32 => {
                        data.extend_from_slice(&((rng.next_u64() % 10) as i32).to_le_bytes())
                    }
                    DType::I64 => {
                        data.extend_from_slice(&((rng.next_u64() % 10) as i64).to_le_bytes())
                    }
                    DType::U8 => data.push(rng.next_u64() as u8),
                }
            }
            Tensor {
                name: spec.name.clone(),
                dtype: spec.dtype,
                shape,
                data,
            }
        })
        .collect()
}

/// A validation set whose expected outputs are what `onnx` computes on [`example_inputs`].
///
/// Case `i` has batch size `1 + i % 4`, so a set also exercises the batch axis. The set only pins
/// the model's current behaviour: it is the golden output of this model, not ground truth.
pub fn validation_set_for(
    onnx: &[u8],
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
    n_cases: usize,
    seed: u64,
    abs_tolerance: f64,
    rel_tolerance: f64,
) -> Result<ValidationSet, InferenceError> {
    let model = LoadedModel::load(onnx, inputs, outputs, 1)?;
    let mut seeds = SplitMix64(seed);
    let cases = (0..n_cases)
        .map(|case_ix| {
            let batch = 1 + (case_ix % 4) as u64;
            let inputs = example_inputs(inputs, batch, seeds.next_u64());
            let outputs = model.run(&inputs)?;
            Ok(ValidationCase { inputs, outputs })
        })
        .collect::<Result<_, InferenceError>>()?;
    Ok(ValidationSet {
        abs_tolerance,
        rel_tolerance,
        cases,
        checks: Vec::new(),
    })
}

fn encode(
    name: &str,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
) -> Vec<u8> {
    let model = ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "outpost-example".to_owned(),
        producer_version: env!("CARGO_PKG_VERSION").to_owned(),
        graph: Some(GraphProto {
            name: name.to_owned(),
            node: nodes,
            initializer: initializers,
            input: inputs.iter().map(value_info).collect(),
            output: outputs.iter().map(value_info).collect(),
            ..GraphProto::default()
        }),
        ..ModelProto::default()
    };
    model.encode_to_vec()
}

fn node(op_type: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        name: output.to_owned(),
        op_type: op_type.to_owned(),
        input: inputs.iter().map(|&input| input.to_owned()).collect(),
        output: vec![output.to_owned()],
        attribute,
        ..NodeProto::default()
    }
}

fn int_attribute(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..AttributeProto::default()
    }
}

/// Weights uniform in ±1/√fan-in, the usual scale that keeps activations near 1.
fn f32_initializer(name: &str, dims: &[usize], rng: &mut SplitMix64) -> TensorProto {
    let fan_in = dims.first().copied().unwrap_or(1).max(1);
    let scale = 1.0 / (fan_in as f64).sqrt();
    let count: usize = dims.iter().product();
    let raw_data = (0..count)
        .flat_map(|_| ((rng.unit() * scale) as f32).to_le_bytes())
        .collect();
    TensorProto {
        name: name.to_owned(),
        dims: dims.iter().map(|&dim| dim as i64).collect(),
        data_type: DataType::Float as i32,
        raw_data,
        ..TensorProto::default()
    }
}

fn value_info(spec: &TensorSpec) -> ValueInfoProto {
    let elem_type = match spec.dtype {
        DType::F32 => DataType::Float,
        DType::F64 => DataType::Double,
        DType::I32 => DataType::Int32,
        DType::I64 => DataType::Int64,
        DType::U8 => DataType::Uint8,
    };
    let dim = spec
        .shape
        .iter()
        .map(|dim| Dimension {
            value: Some(match dim {
                Dim::Fixed(size) => dimension::Value::DimValue(*size as i64),
                Dim::Batch => dimension::Value::DimParam("N".to_owned()),
            }),
            ..Dimension::default()
        })
        .collect();
    ValueInfoProto {
        name: spec.name.clone(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem_type as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..TypeProto::default()
        }),
        ..ValueInfoProto::default()
    }
}

/// `rows × n_inputs` values drawn from a normal distribution with mean `mean` and standard
/// deviation 1 (Box–Muller over SplitMix64, deterministic from `seed`), row-major: reference data
/// for the example model, and shifted live inputs in tests and the quickstart.
pub fn normal_rows(n_inputs: usize, rows: usize, seed: u64, mean: f64) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..rows * n_inputs)
        .map(|_| {
            // (0, 1] so the logarithm is finite.
            let u1 = ((rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
            let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            (mean + z) as f32
        })
        .collect()
}

/// SplitMix64 (Steele, Lea and Flood): tiny, fast, and the same on every platform, which is all
/// example weights need, and the end-to-end tests' seeded kill schedules.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1), from the top 53 bits.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

/// `onnx` re-encoded claiming ONNX IR version `ir_version`: with a version newer than any
/// ONNX Runtime reads (`99`), a model ONNX Runtime refuses to load and tract, which does not read
/// the field, runs as before. How tests make a model fail on one runtime only.
pub fn with_ir_version(onnx: &[u8], ir_version: i64) -> Result<Vec<u8>, InferenceError> {
    let mut model = ModelProto::decode(onnx).map_err(InferenceError::Decode)?;
    model.ir_version = ir_version;
    Ok(model.encode_to_vec())
}

/// The `libonnxruntime.so` that `cargo xtask install` extracts from an `onnxruntime` wheel into
/// the workspace's `target/onnxruntime/<folder>/` for the tests: `x86_64` and `aarch64` (each
/// architecture's own, [`std::env::consts::ARCH`]), and `old` (a release too old to load). Panics
/// naming that command when it is missing, so a test never passes without it.
pub fn installed_onnxruntime(folder: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/onnxruntime")
        .join(folder)
        .join("libonnxruntime.so");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask install` first",
        path.display()
    );
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(tensor: &Tensor) -> Vec<f32> {
        tensor
            .data
            .chunks_exact(4)
            .map(|bytes| f32::from_le_bytes(bytes.try_into().expect("4 bytes")))
            .collect()
    }

    #[test]
    fn split_widths_are_as_even_as_whole_columns_allow() {
        assert_eq!(split_widths(10, 3), [4, 3, 3]);
        assert_eq!(split_widths(100, 4), [25, 25, 25, 25]);
        assert_eq!(split_widths(5, 5), [1, 1, 1, 1, 1]);
        assert_eq!(split_widths(7, 1), [7]);
    }

    #[test]
    fn one_input_tensor_is_the_plain_mlp() {
        assert_eq!(mlp_split(6, 1, 5, 3, 9), mlp(6, 5, 3, 9));
        assert_eq!(mlp_split_specs(6, 1, 3), mlp_specs(6, 3));
        let (inputs, _) = mlp_specs(6, 3);
        assert_eq!(inputs[0].name, "x");
    }

    /// The split model sees the same columns as the whole one, so for one seed it is the same
    /// function of a row: what lets `example-model --input-tensors` profile the same data.
    #[test]
    fn a_split_mlp_gives_the_outputs_of_the_whole_one() {
        let (n_inputs, hidden, n_outputs, seed) = (10, 16, 3, 5);
        for input_tensors in [2, 3, 10] {
            let (inputs, outputs) = mlp_split_specs(n_inputs, input_tensors, n_outputs);
            let widths = split_widths(n_inputs, input_tensors);
            let names: Vec<&str> = inputs.iter().map(|spec| spec.name.as_str()).collect();
            let expected_names: Vec<String> =
                (0..input_tensors).map(|part| format!("x{part}")).collect();
            assert_eq!(names, expected_names);
            let declared: Vec<Vec<Dim>> = inputs.iter().map(|spec| spec.shape.clone()).collect();
            let expected_shapes: Vec<Vec<Dim>> = widths
                .iter()
                .map(|&width| vec![Dim::Batch, Dim::Fixed(width as u64)])
                .collect();
            assert_eq!(declared, expected_shapes);

            let split = LoadedModel::load(
                &mlp_split(n_inputs, input_tensors, hidden, n_outputs, seed),
                &inputs,
                &outputs,
                1,
            )
            .expect("the split mlp loads");
            let (whole_inputs, whole_outputs) = mlp_specs(n_inputs, n_outputs);
            let whole = LoadedModel::load(
                &mlp(n_inputs, hidden, n_outputs, seed),
                &whole_inputs,
                &whole_outputs,
                1,
            )
            .expect("the mlp loads");

            let values = normal_rows(n_inputs, 7, 3, 0.0);
            let from_parts = split
                .run(&column_tensors(&inputs, &widths, &values))
                .expect("the split mlp runs");
            let from_rows = whole
                .run(&column_tensors(&whole_inputs, &[n_inputs], &values))
                .expect("the mlp runs");
            assert_eq!(from_parts[0].shape, [7, n_outputs as u64]);
            assert_eq!(from_parts[0].shape, from_rows[0].shape);
            for (part, row) in f32s(&from_parts[0]).iter().zip(f32s(&from_rows[0])) {
                assert!(
                    (part - row).abs() <= 1e-6,
                    "{input_tensors} tensors: {part} from the parts, {row} from the rows"
                );
            }
        }
    }
}
