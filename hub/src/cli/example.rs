//! `outpost-hub example-model`: writes a small real ONNX model and its validation set, for trying
//! Outpost end to end without a model of one's own (the quickstart and the tests use it).

use std::path::PathBuf;

use anyhow::Context;
use outpost_agent::example_model;

use crate::fsutil;

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
}

impl Args {
    pub fn run(self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("creating {}", self.out.display()))?;
        let model = example_model::mlp(self.inputs, self.hidden, self.outputs, self.seed);
        let reference = example_model::mlp(
            self.inputs,
            self.hidden,
            self.outputs,
            self.validation_seed.unwrap_or(self.seed),
        );
        let (inputs, outputs) = example_model::mlp_specs(self.inputs, self.outputs);
        let validation = example_model::validation_set_for(
            &reference, &inputs, &outputs, self.cases, self.seed, 1e-5, 1e-4,
        )
        .context("computing the validation set")?;
        let model_path = self.out.join("model.onnx");
        let validation_path = self.out.join("validation.bin");
        fsutil::write_atomic(&model_path, &model, 0o644)?;
        fsutil::write_atomic(
            &validation_path,
            &outpost_protocol::encode(&validation).context("encoding the validation set")?,
            0o644,
        )?;
        println!(
            "wrote {} and {}",
            model_path.display(),
            validation_path.display()
        );
        Ok(())
    }
}
