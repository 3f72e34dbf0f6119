//! `outpost-hub validation make`: a validation set for your own model, from your own sample
//! inputs, with expected outputs from your own framework or from the model itself.
//!
//! A validation set (`validation.bin`, a postcard frame of kind `ValidationSet`) holds cases of
//! inputs and the outputs the model must give for them, two default tolerances (an output element
//! passes when `|got - want| <= abs_tolerance + rel_tolerance * |want|`), and a check of its own
//! for any output: other tolerances, or top-1 agreement for a class output. `model publish` runs
//! it before it signs, and every device runs it before it commits the model.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use outpost_model::drift::ProfileOptions;
use outpost_model::fsutil;
use outpost_model::inference::{validate, LoadedModel};
use outpost_protocol::dataset::parse_npy;
use outpost_protocol::device::{OutputCheck, Tensor, Tolerance, ValidationCase, ValidationSet};
use outpost_protocol::trust::TensorSpec;
use outpost_protocol::Message;

use super::model::MAX_MODEL_IN_MEMORY;
use super::print_stderr;
use super::profile::{load_data, npy_tensor, pair_data, row_dims, SpecArgs};
use outpost_model::samples::Samples;

/// Largest expected-output file read.
const MAX_EXPECTED_FILE: u64 = 2 * 1024 * 1024 * 1024;
/// How long the made set may take to run here; a device gives it `probation_timeout`.
const CHECK_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, clap::Subcommand)]
pub enum ValidationCommand {
    /// Make a validation set from sample inputs, and check the model passes it.
    Make(MakeArgs),
}

#[derive(Debug, clap::Args)]
pub struct MakeArgs {
    /// The ONNX model.
    #[arg(long)]
    pub model: PathBuf,
    /// Sample inputs: a `.csv` table or `.npy` tensor for a model with one input, or INPUT=FILE
    /// for each input, one row per sample, as `profile --data` takes them.
    #[arg(long = "data", required = true)]
    pub data: Vec<String>,
    /// The outputs the model must give, as OUTPUT=FILE.npy for every output, one row per sample
    /// of --data: computed by the framework you trust (ONNX Runtime, PyTorch). Without them the
    /// expected outputs are what this model computes here, which pins its current behaviour.
    #[arg(long = "expected")]
    pub expected: Vec<String>,
    /// Where to write the validation set (give it to `model publish --validation`).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub specs: SpecArgs,
    /// Cases in the set, taken from the first rows of --data.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub cases: u32,
    /// Samples per case: the batch each case runs as (1 for a model that takes one at a time).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub rows_per_case: u32,
    /// Absolute tolerance of each output element. The defaults pass a model converted between
    /// runtimes (float32 reordering) and fail a model with other weights.
    #[arg(long, default_value_t = 1e-4)]
    pub abs_tolerance: f64,
    /// Relative tolerance of each output element.
    #[arg(long, default_value_t = 1e-3)]
    pub rel_tolerance: f64,
    /// OUTPUT=ABS,REL: that output's own tolerances, in place of --abs-tolerance and
    /// --rel-tolerance.
    #[arg(long = "tolerance", value_name = "OUTPUT=ABS,REL")]
    pub tolerances: Vec<String>,
    /// OUTPUT or OUTPUT=SHARE: judge that class output (scores along its last axis) on top-1
    /// agreement: the share of rows, 0.9 unless given, whose top class is the expected one's. Its
    /// elements are then compared only with a --tolerance of its own.
    #[arg(long = "top1", value_name = "OUTPUT[=SHARE]")]
    pub top1: Vec<String>,
}

/// The top-1 share `--top1 OUTPUT` asks for: one row in ten may flip on a near tie between two
/// runtimes, where a model with other weights agrees on far fewer.
const DEFAULT_TOP1: f64 = 0.9;

/// The per-output checks of `--tolerance` and `--top1`, one per output named.
fn output_checks(tolerances: &[String], top1: &[String]) -> anyhow::Result<Vec<OutputCheck>> {
    let mut checks: Vec<OutputCheck> = Vec::new();
    let mut check_of = |output: &str| -> usize {
        match checks.iter().position(|check| check.output == output) {
            Some(index) => index,
            None => {
                checks.push(OutputCheck {
                    output: output.to_owned(),
                    tolerance: None,
                    min_top1: None,
                });
                checks.len() - 1
            }
        }
    };
    let mut parsed = Vec::new();
    for entry in tolerances {
        let parse = || -> Option<(&str, Tolerance)> {
            let (output, values) = entry.split_once('=')?;
            let (abs, rel) = values.split_once(',')?;
            let tolerance = Tolerance {
                abs: abs.trim().parse().ok()?,
                rel: rel.trim().parse().ok()?,
            };
            let usable = [tolerance.abs, tolerance.rel]
                .iter()
                .all(|value| value.is_finite() && *value >= 0.0);
            (usable && !output.is_empty()).then_some((output, tolerance))
        };
        let (output, tolerance) = parse().with_context(|| {
            format!(
                "--tolerance {entry}: give OUTPUT=ABS,REL, two finite numbers 0 or more, e.g. \
                 y=1e-4,1e-3"
            )
        })?;
        parsed.push((check_of(output), Some(tolerance), None));
    }
    for entry in top1 {
        let (output, share) = match entry.split_once('=') {
            None => (entry.as_str(), DEFAULT_TOP1),
            Some((output, share)) => {
                let share = share
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|share| (0.0..=1.0).contains(share))
                    .with_context(|| {
                        format!("--top1 {entry}: the share must be a number from 0 to 1")
                    })?;
                (output, share)
            }
        };
        if output.is_empty() {
            bail!("--top1 {entry}: name an output");
        }
        parsed.push((check_of(output), None, Some(share)));
    }
    for (index, tolerance, share) in parsed {
        let check = &mut checks[index];
        if tolerance.is_some() {
            if check.tolerance.is_some() {
                bail!("--tolerance names {:?} twice", check.output);
            }
            check.tolerance = tolerance;
        }
        if share.is_some() {
            if check.min_top1.is_some() {
                bail!("--top1 names {:?} twice", check.output);
            }
            check.min_top1 = share;
        }
    }
    Ok(checks)
}

impl ValidationCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            ValidationCommand::Make(args) => args.run(),
        }
    }
}

impl MakeArgs {
    fn run(self) -> anyhow::Result<()> {
        for (flag, value) in [
            ("--abs-tolerance", self.abs_tolerance),
            ("--rel-tolerance", self.rel_tolerance),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                bail!("{flag} {value} must be a finite number, 0 or more");
            }
        }
        let onnx = fsutil::read_capped(&self.model, MAX_MODEL_IN_MEMORY)?;
        let (inputs, outputs) = self.specs.of(&self.model, &onnx)?;
        // One thread, as `model publish` checks it: the outcome must not depend on the machine.
        let model = LoadedModel::load(&onnx, &inputs, &outputs, 1)
            .with_context(|| format!("loading {}", self.model.display()))?;
        drop(onnx);

        let mut ignored = ProfileOptions::default();
        let mut data = Vec::new();
        for (spec, path) in pair_data(&self.data, &inputs)? {
            let tensor = load_data(spec, &path, &mut ignored)
                .with_context(|| format!("--data {}", path.display()))?;
            data.push(tensor);
        }
        let rows = common_rows("--data", &data)?;
        let per_case = u64::from(self.rows_per_case);
        let input_samples = samples_of(&data, &inputs)?;
        if let Some((tensor, samples)) = data
            .iter()
            .zip(&input_samples)
            .find(|(_, samples)| samples.per_request().is_some_and(|one| one != per_case))
        {
            bail!(
                "--rows-per-case {per_case}: input {:?} takes one sample a request ({}), so a case \
                 holds one row",
                tensor.name,
                samples.describe()
            );
        }
        let cases = (rows / per_case).min(u64::from(self.cases));
        if cases == 0 {
            bail!(
                "--data has {rows} row(s), fewer than the {per_case} of one case (--rows-per-case)"
            );
        }
        let expected = self.expected_outputs(&outputs, rows)?;

        let mut set = ValidationSet {
            abs_tolerance: self.abs_tolerance,
            rel_tolerance: self.rel_tolerance,
            cases: Vec::new(),
            checks: output_checks(&self.tolerances, &self.top1)?,
        };
        if let Some(check) = set
            .checks
            .iter()
            .find(|check| !outputs.iter().any(|spec| spec.name == check.output))
        {
            bail!(
                "--tolerance or --top1 names {:?}, which is not an output of the model",
                check.output
            );
        }
        for case in 0..cases {
            let span = case * per_case..(case + 1) * per_case;
            let case_inputs = data
                .iter()
                .zip(&input_samples)
                .map(|(tensor, samples)| rows_of(tensor, span.clone(), samples))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let case_outputs = match &expected {
                Some((expected, samples)) => expected
                    .iter()
                    .zip(samples)
                    .map(|(tensor, samples)| rows_of(tensor, span.clone(), samples))
                    .collect::<anyhow::Result<Vec<_>>>()?,
                None => model
                    .run(&case_inputs)
                    .with_context(|| format!("running the model on case {case}"))?,
            };
            set.cases.push(ValidationCase {
                inputs: case_inputs,
                outputs: case_outputs,
            });
        }

        let report = validate(&model, &set, Instant::now() + CHECK_TIMEOUT).with_context(|| {
            if expected.is_some() {
                "the model's outputs here are not the --expected ones within the tolerances; a \
                 model converted between runtimes differs by float rounding, far less than a \
                 wrong model"
            } else {
                "the model does not give the same outputs twice"
            }
        })?;
        // Without per-output checks, in the first form, which agents of every release read.
        let bytes = set.encode_oldest().context("encoding the validation set")?;
        if bytes.len() > ValidationSet::MAX_FRAME {
            bail!(
                "the validation set is {} bytes, more than the {} a device accepts; use fewer \
                 --cases or --rows-per-case",
                bytes.len(),
                ValidationSet::MAX_FRAME
            );
        }
        fsutil::write_atomic(&self.out, &bytes, 0o644)?;
        let top1: String = report
            .top1
            .iter()
            .map(|agreement| {
                format!(
                    ", top-1 of {:?} agreeing in {} of {} rows",
                    agreement.output, agreement.agreed, agreement.rows
                )
            })
            .collect();
        print_stderr(&format!(
            "wrote {}: {cases} case(s) of {per_case} row(s), expected outputs {}; the model \
             passes it here, largest difference {:e}{top1} ({} bytes)\n",
            self.out.display(),
            if expected.is_some() {
                "from --expected"
            } else {
                "computed by the model"
            },
            report.max_abs_difference,
            bytes.len()
        ));
        Ok(())
    }

    /// The `--expected` files, one per output in the model's order, each with `rows` rows, and
    /// how each output holds samples; none when not given.
    fn expected_outputs(
        &self,
        outputs: &[TensorSpec],
        rows: u64,
    ) -> anyhow::Result<Option<(Vec<Tensor>, Vec<Samples>)>> {
        if self.expected.is_empty() {
            return Ok(None);
        }
        let mut tensors = Vec::new();
        for spec in outputs {
            let prefix = format!("{}=", spec.name);
            let path = self
                .expected
                .iter()
                .find_map(|entry| entry.strip_prefix(&prefix))
                .with_context(|| {
                    format!(
                        "--expected is given, but not for output {:?}: give OUTPUT=FILE.npy for \
                         every output",
                        spec.name
                    )
                })?;
            row_dims(spec).map_err(|reason| {
                anyhow::anyhow!(
                    "--expected rows cannot be matched to output {:?}: {reason}; give --output \
                     {}:{}:N,... if the model allows it",
                    spec.name,
                    spec.name,
                    spec.dtype.as_str()
                )
            })?;
            let bytes = fsutil::read_capped(std::path::Path::new(path), MAX_EXPECTED_FILE)
                .with_context(|| format!("--expected {}", spec.name))?;
            let array = parse_npy(&bytes).with_context(|| format!("--expected {path}"))?;
            tensors.push(
                npy_tensor("output", spec, &array).with_context(|| format!("--expected {path}"))?,
            );
        }
        if let Some(extra) = self.expected.iter().find(|entry| {
            !outputs
                .iter()
                .any(|spec| entry.starts_with(&format!("{}=", spec.name)))
        }) {
            bail!("--expected {extra}: the model has no such output");
        }
        let expected_rows = common_rows("--expected", &tensors)?;
        if expected_rows < rows {
            bail!("--expected has {expected_rows} row(s), --data has {rows}: give one per sample");
        }
        let samples = samples_of(&tensors, outputs)?;
        Ok(Some((tensors, samples)))
    }
}

/// How the model's tensor of each of `tensors` (by name) holds samples.
fn samples_of(tensors: &[Tensor], specs: &[TensorSpec]) -> anyhow::Result<Vec<Samples>> {
    tensors
        .iter()
        .map(|tensor| {
            let spec = specs
                .iter()
                .find(|spec| spec.name == tensor.name)
                .with_context(|| format!("the model has no tensor {:?}", tensor.name))?;
            Samples::of(spec).map_err(anyhow::Error::msg)
        })
        .collect()
}

/// The rows (first axis) every tensor has; an error names the flag when they differ.
fn common_rows(flag: &str, tensors: &[Tensor]) -> anyhow::Result<u64> {
    let mut rows = tensors.iter().map(|tensor| tensor.shape[0]);
    let first = rows.next().unwrap_or(0);
    if let Some(other) = rows.find(|rows| *rows != first) {
        bail!("the {flag} files have {first} and {other} rows: give one row per sample in each");
    }
    Ok(first)
}

/// Rows `span` of `tensor`, along its first axis, shaped as a request of the tensor that holds
/// its `samples`.
fn rows_of(
    tensor: &Tensor,
    span: std::ops::Range<u64>,
    samples: &Samples,
) -> anyhow::Result<Tensor> {
    let rows = tensor.shape[0];
    if span.end > rows {
        bail!("{:?} has {rows} rows, not {}", tensor.name, span.end);
    }
    let row_bytes = tensor.data.len() as u64 / rows.max(1);
    let (start, end) = (span.start * row_bytes, span.end * row_bytes);
    let shape = samples
        .request_shape(span.end - span.start)
        .with_context(|| {
            format!(
                "{:?} takes one sample a request ({}), not {}",
                tensor.name,
                samples.describe(),
                span.end - span.start
            )
        })?;
    Ok(Tensor {
        name: tensor.name.clone(),
        dtype: tensor.dtype,
        shape,
        data: tensor.data[start as usize..end as usize].to_vec(),
    })
}
