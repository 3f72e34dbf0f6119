//! The `outpost-hub` command line: one module per command group.
//!
//! The signing commands (`keys`, `root`, `model sign`, `plan sign`, `sign`) work on local files
//! only: they load release keys from the operator's disk and write signed documents, and never
//! talk to a hub.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_protocol::trust::{Signed, SignedBody};
use outpost_protocol::{Message, SecretKey};

use crate::fsutil;

pub mod inspect;
pub mod keys;
pub mod model;
pub mod plan;
pub mod root;
pub mod sign;

#[derive(Debug, Parser)]
#[command(
    name = "outpost-hub",
    version,
    about = "Outpost hub server and operator tools"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate release keys (offline).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Create and rotate the trust root (offline).
    #[command(subcommand)]
    Root(root::RootCommand),
    /// Sign model manifests (offline).
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Sign rollout plans (offline).
    #[command(subcommand)]
    Plan(plan::PlanCommand),
    /// Add signatures to an existing signed document, for threshold ceremonies across machines.
    Sign(sign::Args),
    /// Print a signed document or frame in readable form.
    Inspect(inspect::Args),
}

impl Command {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Keys(command) => command.run(),
            Command::Root(command) => command.run(),
            Command::Model(command) => command.run(),
            Command::Plan(command) => command.run(),
            Command::Sign(args) => args.run(),
            Command::Inspect(args) => args.run(),
        }
    }
}

/// Writes command output to stdout. A reader that went away (`| head`) ends the output quietly
/// instead of panicking as `println!` would.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(error).context("writing to stdout")
        }
        _ => Ok(()),
    }
}

/// Parses `30m`, `15m`, `365d` and the like.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|error| format!("{text:?}: {error}"))
}

/// Signs `body` with every key and writes the signed document to `out`.
pub fn sign_to_file<B: SignedBody>(
    body: &B,
    keys: &[SecretKey],
    out: &Path,
) -> anyhow::Result<Vec<u8>>
where
    Signed<B>: Message,
{
    let mut signed = Signed::new(body).context("encoding document")?;
    for key in keys {
        signed.sign(key);
    }
    let bytes = outpost_protocol::encode(&signed).context("encoding signed document")?;
    fsutil::write_atomic(out, &bytes, 0o644)?;
    Ok(bytes)
}

/// Reads a signed document from disk, capped at its type's frame limit.
pub fn read_frame<M: Message>(path: &Path) -> anyhow::Result<(Vec<u8>, M)> {
    let bytes = fsutil::read_capped(path, M::MAX_FRAME as u64)?;
    let message = outpost_protocol::decode::<M>(&bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok((bytes, message))
}

/// Repeatable `--key` arguments: private release-key files that sign.
#[derive(Debug, clap::Args)]
pub struct SigningKeys {
    /// Private release-key file to sign with; repeat or separate with commas.
    #[arg(long = "key", value_delimiter = ',', required = true)]
    pub keys: Vec<PathBuf>,
}

impl SigningKeys {
    pub fn load(&self) -> anyhow::Result<Vec<SecretKey>> {
        crate::keyfile::load_all_private(&self.keys)
    }
}
