//! `outpost-hub profile`: the drift reference profile of a model, made by running it over a
//! reference dataset (its training or validation data) with the agent's own inference and
//! feature-reading code, so devices fill exactly the bins the profile was made with.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use outpost_model::drift::{build_profile, unsummarised, ProfileOptions};
use outpost_model::inference::LoadedModel;
use outpost_model::samples::Samples;
use outpost_protocol::dataset::{parse_csv, parse_npy, NdArray, Table};
use outpost_protocol::device::Tensor;
use outpost_protocol::drift::{least_significant_psi, Profile, Thresholds};
use outpost_protocol::trust::{DType, TensorSpec};
use outpost_protocol::Message;

use super::model::{parse_tensor_spec, MAX_MODEL_IN_MEMORY};
use super::print_stderr;
use outpost_model::fsutil;

/// Largest reference data file read.
const MAX_DATA_FILE: u64 = 2 * 1024 * 1024 * 1024;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The ONNX model.
    #[arg(long)]
    pub model: PathBuf,
    /// Reference data: a `.csv` table or `.npy` tensor for a model with one input, or
    /// INPUT=FILE for each input. Rows are samples; CSV columns are the input's features.
    #[arg(long = "data", required = true)]
    pub data: Vec<String>,
    /// Where to write the profile (give it to `model publish --profile`).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub specs: SpecArgs,
    /// Outputs to summarise as classes (argmax of [N, K] scores, or [N] labels). Integer outputs of
    /// shape [N] are labels without this.
    #[arg(long = "classes", value_delimiter = ',')]
    pub classes: Vec<String>,
    /// PSI from which a numeric feature warns (when also above the sampling-noise bound).
    #[arg(long, default_value_t = Thresholds::default().psi_warn)]
    pub psi_warn: f64,
    /// PSI from which a numeric feature alerts.
    #[arg(long, default_value_t = Thresholds::default().psi_alert)]
    pub psi_alert: f64,
    /// Confidence of the chi-square sampling-noise bound on PSI.
    #[arg(long, default_value_t = Thresholds::default().confidence)]
    pub confidence: f64,
    /// Jensen–Shannon distance from which a class output is flagged.
    #[arg(long, default_value_t = Thresholds::default().js_flag)]
    pub js_flag: f64,
    /// A missing share above the reference's times this is flagged.
    #[arg(long, default_value_t = Thresholds::default().missing_factor)]
    pub missing_factor: f64,
    /// Rows per model run.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
}

/// A warning when the profile's reference is too small for a shift of `psi_warn` to differ from
/// it beyond chance ([`least_significant_psi`]): below that, drift goes unflagged.
fn few_rows_warning(profile: &Profile) -> Option<String> {
    let thresholds = &profile.thresholds;
    let (smallest, rows) = profile
        .features
        .iter()
        .filter_map(|feature| {
            let psi = least_significant_psi(feature, thresholds.confidence)?;
            Some((psi, feature.reference.n))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))?;
    (smallest > thresholds.psi_warn).then(|| {
        format!(
            "warning: with {rows} reference values a feature's shift differs from the reference \
             beyond chance only from a PSI of about {smallest:.2}, above --psi-warn {}: smaller \
             drift goes unflagged. Profile from more rows (a thousand or more).\n",
            thresholds.psi_warn
        )
    })
}

impl Args {
    pub fn run(self) -> anyhow::Result<()> {
        let thresholds = self.thresholds()?;
        let onnx = fsutil::read_capped(&self.model, MAX_MODEL_IN_MEMORY)?;
        let (inputs, outputs) = self.specs.of(&self.model, &onnx)?;
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let model = LoadedModel::load(&onnx, &inputs, &outputs, threads)
            .with_context(|| format!("loading {}", self.model.display()))?;
        drop(onnx);

        let mut options = ProfileOptions {
            class_outputs: self.classes.clone(),
            thresholds,
            batch_rows: self.batch,
            ..ProfileOptions::default()
        };
        let mut data = Vec::new();
        for (spec, path) in pair_data(&self.data, &inputs)? {
            let tensor = load_data(spec, &path, &mut options)
                .with_context(|| format!("--data {}", path.display()))?;
            data.push(tensor);
        }
        let rows = data
            .first()
            .and_then(|tensor| tensor.shape.first())
            .copied()
            .unwrap_or(0);
        let profile = build_profile(&model, &data, &options).context("building the profile")?;
        for (output, reason) in unsummarised(&outputs) {
            print_stderr(&format!("output {output:?} is not summarised: {reason}\n"));
        }
        let bytes = outpost_protocol::encode(&profile).context("encoding the profile")?;
        if bytes.len() > Profile::MAX_FRAME {
            bail!(
                "the profile is {} bytes, more than the {} a device accepts; summarise fewer features",
                bytes.len(),
                Profile::MAX_FRAME
            );
        }
        fsutil::write_atomic(&self.out, &bytes, 0o644)?;
        print_stderr(&format!(
            "wrote {}: {} numeric feature(s), {} class output(s), from {rows} reference rows ({} bytes)\n",
            self.out.display(),
            profile.features.len(),
            profile.classes.len(),
            bytes.len()
        ));
        if let Some(warning) = few_rows_warning(&profile) {
            print_stderr(&warning);
        }
        Ok(())
    }

    fn thresholds(&self) -> anyhow::Result<Thresholds> {
        let checks = [
            ("--psi-warn", self.psi_warn),
            ("--psi-alert", self.psi_alert),
            ("--js-flag", self.js_flag),
            ("--missing-factor", self.missing_factor),
        ];
        for (flag, value) in checks {
            if !(value.is_finite() && value > 0.0) {
                bail!("{flag} {value} must be a positive number");
            }
        }
        if self.psi_alert < self.psi_warn {
            bail!(
                "--psi-alert {} is below --psi-warn {}",
                self.psi_alert,
                self.psi_warn
            );
        }
        if !(self.confidence > 0.0 && self.confidence < 1.0) {
            bail!("--confidence {} must be between 0 and 1", self.confidence);
        }
        Ok(Thresholds {
            psi_warn: self.psi_warn,
            psi_alert: self.psi_alert,
            confidence: self.confidence,
            js_flag: self.js_flag,
            missing_factor: self.missing_factor,
        })
    }
}

/// `--input` and `--output`: the model's tensors, where its own declarations need help.
#[derive(Debug, clap::Args)]
pub struct SpecArgs {
    /// Input tensor as NAME:DTYPE:DIMS, as `model publish` takes it; default: the model's own.
    #[arg(long = "input", value_parser = parse_tensor_spec)]
    pub inputs: Vec<TensorSpec>,
    /// Output tensor, same form as --input.
    #[arg(long = "output", value_parser = parse_tensor_spec)]
    pub outputs: Vec<TensorSpec>,
}

impl SpecArgs {
    /// The model's input and output specs: those given, else those the ONNX file at `path`
    /// declares.
    pub(super) fn of(
        &self,
        path: &Path,
        onnx: &[u8],
    ) -> anyhow::Result<(Vec<TensorSpec>, Vec<TensorSpec>)> {
        super::model::model_specs(path, onnx, &self.inputs, &self.outputs)
    }
}

/// Pairs every model input with its data file: `--data FILE` for a model with one input, or
/// `--data INPUT=FILE` for each input.
pub(super) fn pair_data<'a>(
    data: &[String],
    inputs: &'a [TensorSpec],
) -> anyhow::Result<Vec<(&'a TensorSpec, PathBuf)>> {
    if let [only] = inputs {
        if let [file] = data {
            let path = file
                .strip_prefix(&format!("{}=", only.name))
                .unwrap_or(file);
            return Ok(vec![(only, PathBuf::from(path))]);
        }
    }
    let mut pairs = Vec::new();
    for spec in inputs {
        let prefix = format!("{}=", spec.name);
        let path = data
            .iter()
            .find_map(|entry| entry.strip_prefix(&prefix))
            .with_context(|| {
                format!(
                    "the model has {} inputs: give --data {}=FILE for each",
                    inputs.len(),
                    spec.name
                )
            })?;
        pairs.push((spec, PathBuf::from(path)));
    }
    if let Some(extra) = data.iter().find(|entry| {
        !inputs
            .iter()
            .any(|spec| entry.starts_with(&format!("{}=", spec.name)))
    }) {
        bail!("--data {extra}: the model has no such input");
    }
    Ok(pairs)
}

/// Reads one input's reference data as a tensor of that input's type.
pub(super) fn load_data(
    spec: &TensorSpec,
    path: &Path,
    options: &mut ProfileOptions,
) -> anyhow::Result<Tensor> {
    let bytes = fsutil::read_capped(path, MAX_DATA_FILE)?;
    if bytes.starts_with(b"\x93NUMPY") {
        let array = parse_npy(&bytes)?;
        return npy_tensor("input", spec, &array);
    }
    let is_npy = path.extension().is_some_and(|ext| ext == "npy");
    if is_npy {
        bail!("not an .npy file (no \\x93NUMPY magic)");
    }
    let table = parse_csv(&bytes)?;
    csv_tensor(spec, table, options)
}

/// The shape of one sample of `spec` (after its batch axis or fixed batch of 1, or the whole
/// tensor when it has none): data files hold one row per sample.
pub(super) fn row_dims(spec: &TensorSpec) -> anyhow::Result<Vec<u64>> {
    Samples::of(spec)
        .map(|samples| samples.sample)
        .map_err(|reason| anyhow::anyhow!("{reason}; data files hold one row per sample"))
}

fn csv_tensor(
    spec: &TensorSpec,
    table: Table,
    options: &mut ProfileOptions,
) -> anyhow::Result<Tensor> {
    let row = row_dims(spec)?;
    let width = match row.as_slice() {
        [] => 1,
        [width] => *width,
        _ => bail!(
            "a CSV table feeds [N] or [N, F] inputs; {:?} has rank {}: use an .npy file",
            spec.name,
            row.len() + 1
        ),
    };
    if table.columns as u64 != width {
        bail!(
            "the table has {} columns, input {:?} takes {width} per row",
            table.columns,
            spec.name
        );
    }
    let mut nulls = vec![0u64; table.columns];
    let mut values = Vec::with_capacity(table.values.len());
    for (at, value) in table.values.iter().enumerate() {
        match value {
            Some(value) => values.push(*value),
            None => {
                if !matches!(spec.dtype, DType::F32 | DType::F64) {
                    bail!(
                        "data row {}, column {}: missing value for {} input {:?}",
                        at / table.columns + 1,
                        at % table.columns + 1,
                        spec.dtype.as_str(),
                        spec.name
                    );
                }
                nulls[at % table.columns] += 1;
                values.push(f64::NAN);
            }
        }
    }
    if let Some(names) = table.names.clone() {
        options.column_names.push((spec.name.clone(), names));
    }
    options.null_counts.push((spec.name.clone(), nulls));
    let rows = table.rows() as u64;
    let mut shape = vec![rows];
    shape.extend(row);
    typed_tensor("input", spec, shape, &values)
}

/// `array` as a tensor of `spec` (the model's `role`, "input" or "output"), one row per sample.
pub(super) fn npy_tensor(role: &str, spec: &TensorSpec, array: &NdArray) -> anyhow::Result<Tensor> {
    let row = row_dims(spec)?;
    let shape: Vec<u64> = array.shape.iter().map(|&dim| dim as u64).collect();
    let fits = shape.len() == row.len() + 1 && shape[1..] == row[..];
    if !fits || shape.first().is_none_or(|&rows| rows == 0) {
        bail!(
            "the array's shape is {:?}, {role} {:?} takes [N, {}] with N ≥ 1",
            array.shape,
            spec.name,
            row.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    typed_tensor(role, spec, shape, &array.to_f64())
}

/// Encodes `values` as the spec's element type, refusing values that type cannot hold.
fn typed_tensor(
    role: &str,
    spec: &TensorSpec,
    shape: Vec<u64>,
    values: &[f64],
) -> anyhow::Result<Tensor> {
    let mut data = Vec::with_capacity(values.len() * spec.dtype.size());
    let integral = |at: usize, value: f64, min: f64, max: f64| -> anyhow::Result<f64> {
        if value.fract() != 0.0 || !(min..=max).contains(&value) {
            bail!(
                "element {at} of {role} {:?}: {value} is not a valid {}",
                spec.name,
                spec.dtype.as_str()
            );
        }
        Ok(value)
    };
    for (at, &value) in values.iter().enumerate() {
        match spec.dtype {
            DType::F32 => data.extend_from_slice(&(value as f32).to_le_bytes()),
            DType::F64 => data.extend_from_slice(&value.to_le_bytes()),
            DType::I32 => {
                let value = integral(at, value, f64::from(i32::MIN), f64::from(i32::MAX))?;
                data.extend_from_slice(&(value as i32).to_le_bytes());
            }
            DType::I64 => {
                let value = integral(
                    at,
                    value,
                    -9.007_199_254_740_992e15,
                    9.007_199_254_740_992e15,
                )?;
                data.extend_from_slice(&(value as i64).to_le_bytes());
            }
            DType::U8 => {
                let value = integral(at, value, 0.0, 255.0)?;
                data.push(value as u8);
            }
        }
    }
    Ok(Tensor {
        name: spec.name.clone(),
        dtype: spec.dtype,
        shape,
        data,
    })
}
