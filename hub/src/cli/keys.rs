//! `outpost-hub keys`: release-key generation.

use std::path::PathBuf;

use clap::Subcommand;

use crate::keyfile;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate release keys: DIR/release-<id>.key (mode 0600) and .pub.
    Generate(GenerateArgs),
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Directory for the key files; created with mode 0700 if missing.
    #[arg(long)]
    pub out: PathBuf,
    /// How many keys to generate.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub count: u32,
}

impl KeysCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            KeysCommand::Generate(args) => {
                for _ in 0..args.count {
                    let key = keyfile::generate()?;
                    let path = keyfile::write_pair(&args.out, &key)?;
                    println!("{}  {}", key.public().key_id(), path.display());
                }
                Ok(())
            }
        }
    }
}
