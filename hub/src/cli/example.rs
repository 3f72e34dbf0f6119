//! `outpost-hub example-model`: writes a small real ONNX model, its validation set, reference data
//! and the drift profile of that data, for trying Outpost end to end without a model of one's own
//! (the quickstart and the tests use it).

use std::path::PathBuf;

use anyhow::Context;
use outpost_model::drift::{build_profile, ProfileOptions};
use outpost_model::example;
use outpost_model::inference::LoadedModel;
use outpost_protocol::device::Tensor;
use outpost_protocol::trust::DType;

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
    #[arg(long, default_value_t = 16)]
    pub hidden: usize,
    #[arg(long, default_value_t = 3)]
    pub outputs: usize,
    /// Cases in the validation set.
    #[arg(long, default_value_t = 8)]
    pub cases: usize,
    /// Rows of reference data (standard normal inputs) in `reference.csv`, which `profile.bin`
    /// summarises.
    #[arg(long, default_value_t = 2000)]
    pub reference_rows: usize,
}

impl Args {
    pub fn run(self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("creating {}", self.out.display()))?;
        let model = example::mlp(self.inputs, self.hidden, self.outputs, self.seed);
        let reference = example::mlp(
            self.inputs,
            self.hidden,
            self.outputs,
            self.validation_seed.unwrap_or(self.seed),
        );
        let (inputs, outputs) = example::mlp_specs(self.inputs, self.outputs);
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

        // Reference data and its profile, made the way `outpost-hub profile` makes one.
        let reference_path = self.out.join("reference.csv");
        let profile_path = self.out.join("profile.bin");
        let rows = example::normal_rows(self.inputs, self.reference_rows.max(1), self.seed, 0.0);
        let mut csv = (0..self.inputs)
            .map(|column| format!("x{column}"))
            .collect::<Vec<_>>()
            .join(",");
        csv.push('\n');
        for row in rows.chunks(self.inputs.max(1)) {
            let fields: Vec<String> = row.iter().map(f32::to_string).collect();
            csv.push_str(&fields.join(","));
            csv.push('\n');
        }
        fsutil::write_atomic(&reference_path, csv.as_bytes(), 0o644)?;
        let loaded =
            LoadedModel::load(&model, &inputs, &outputs, 1).context("loading the example model")?;
        let data = Tensor {
            name: "x".to_owned(),
            dtype: DType::F32,
            shape: vec![(rows.len() / self.inputs.max(1)) as u64, self.inputs as u64],
            data: rows.iter().flat_map(|value| value.to_le_bytes()).collect(),
        };
        let options = ProfileOptions {
            column_names: vec![(
                "x".to_owned(),
                (0..self.inputs)
                    .map(|column| format!("x{column}"))
                    .collect(),
            )],
            class_outputs: vec!["y".to_owned()],
            ..ProfileOptions::default()
        };
        let profile =
            build_profile(&loaded, &[data], &options).context("profiling the example model")?;
        fsutil::write_atomic(
            &profile_path,
            &outpost_protocol::encode(&profile).context("encoding the profile")?,
            0o644,
        )?;
        println!(
            "wrote {}, {}, {} and {}",
            model_path.display(),
            validation_path.display(),
            reference_path.display(),
            profile_path.display()
        );
        Ok(())
    }
}
