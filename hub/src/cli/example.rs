//! `outpost-hub example-model`: writes a small real ONNX model, its validation set, reference data
//! and the drift profile of that data, for trying Outpost end to end without a model of one's own
//! (the quickstart and the tests use it).

use std::path::PathBuf;

use anyhow::{bail, Context};
use outpost_model::drift::{build_profile, ProfileOptions};
use outpost_model::example;
use outpost_model::inference::LoadedModel;

use outpost_model::fsutil;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory to write `model.onnx` and `validation.bin` into.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the model's weights; another seed gives a model with other outputs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Seed of the model whose outputs the validation set expects. Defaults to --seed; a different
    /// value yields a model that fails its own validation set.
    #[arg(long)]
    pub validation_seed: Option<u64>,
    #[arg(long, default_value_t = 4)]
    pub inputs: usize,
    /// Input tensors the --inputs columns come in. With 1, one input `x` whose reference data is
    /// `reference.csv` with columns `x0`, `x1`, ...; with P > 1, inputs `x0` to `x{P-1}` of
    /// widths as even as possible, joined inside the model, each with its reference data in
    /// `reference-x{t}.csv`, its columns named `x{t}[0]`, `x{t}[1]`, ... after the tensor they
    /// are in. A tensor over 32 columns is profiled as spans: split a wide input to keep a drift
    /// feature per column.
    #[arg(long, default_value_t = 1)]
    pub input_tensors: usize,
    #[arg(long, default_value_t = 16)]
    pub hidden: usize,
    #[arg(long, default_value_t = 3)]
    pub outputs: usize,
    /// Cases in the validation set.
    #[arg(long, default_value_t = 8)]
    pub cases: usize,
    /// Rows of reference data (standard normal inputs) in `reference.csv` (one file per input
    /// tensor with --input-tensors), which `profile.bin` summarises.
    #[arg(long, default_value_t = 2000)]
    pub reference_rows: usize,
}

impl Args {
    pub fn run(self) -> anyhow::Result<()> {
        if self.inputs == 0 {
            bail!("--inputs must be at least 1");
        }
        if self.input_tensors == 0 || self.input_tensors > self.inputs {
            bail!(
                "--input-tensors {} must be between 1 and --inputs {}: every tensor needs a column",
                self.input_tensors,
                self.inputs
            );
        }
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("creating {}", self.out.display()))?;
        let build = |seed| {
            example::mlp_split(
                self.inputs,
                self.input_tensors,
                self.hidden,
                self.outputs,
                seed,
            )
        };
        let model = build(self.seed);
        let reference = build(self.validation_seed.unwrap_or(self.seed));
        let (inputs, outputs) =
            example::mlp_split_specs(self.inputs, self.input_tensors, self.outputs);
        let validation = example::validation_set_for(
            &reference, &inputs, &outputs, self.cases, self.seed, 1e-5, 1e-4,
        )
        .context("computing the validation set")?;
        let model_path = self.out.join("model.onnx");
        let validation_path = self.out.join("validation.bin");
        fsutil::write_atomic(&model_path, &model, 0o644)?;
        fsutil::write_atomic(
            &validation_path,
            &validation
                .encode_oldest()
                .context("encoding the validation set")?,
            0o644,
        )?;

        // Reference data and its profile, made the way `outpost-hub profile` makes one. The rows
        // are the same whatever the split: each input tensor takes its columns of them.
        let rows = example::normal_rows(self.inputs, self.reference_rows.max(1), self.seed, 0.0);
        let widths = example::split_widths(self.inputs, self.input_tensors);
        let mut written = vec![model_path, validation_path];
        let mut column_names = Vec::with_capacity(inputs.len());
        let mut first_column = 0;
        for (spec, &width) in inputs.iter().zip(&widths) {
            let columns = first_column..first_column + width;
            first_column += width;
            let (names, path): (Vec<String>, _) = if self.input_tensors == 1 {
                (
                    columns.clone().map(|column| format!("x{column}")).collect(),
                    self.out.join("reference.csv"),
                )
            } else {
                (
                    (0..width)
                        .map(|column| format!("{}[{column}]", spec.name))
                        .collect(),
                    self.out.join(format!("reference-{}.csv", spec.name)),
                )
            };
            let mut csv = names.join(",");
            csv.push('\n');
            for row in rows.chunks(self.inputs) {
                let fields: Vec<String> = row[columns.clone()].iter().map(f32::to_string).collect();
                csv.push_str(&fields.join(","));
                csv.push('\n');
            }
            fsutil::write_atomic(&path, csv.as_bytes(), 0o644)?;
            written.push(path);
            column_names.push((spec.name.clone(), names));
        }
        let data = example::column_tensors(&inputs, &widths, &rows);
        let loaded =
            LoadedModel::load(&model, &inputs, &outputs, 1).context("loading the example model")?;
        let options = ProfileOptions {
            column_names,
            class_outputs: vec!["y".to_owned()],
            ..ProfileOptions::default()
        };
        let profile =
            build_profile(&loaded, &data, &options).context("profiling the example model")?;
        let profile_path = self.out.join("profile.bin");
        fsutil::write_atomic(
            &profile_path,
            &outpost_protocol::encode(&profile).context("encoding the profile")?,
            0o644,
        )?;
        written.push(profile_path);
        let mut written: Vec<String> = written
            .iter()
            .map(|path| path.display().to_string())
            .collect();
        let last = written.pop().unwrap_or_default();
        println!("wrote {} and {last}", written.join(", "));
        Ok(())
    }
}
