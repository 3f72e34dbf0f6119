//! The `outpost-hub` command line: one module per command group.
//!
//! The signing commands (`keys`, `root init|rotate`, `model sign`, `plan sign`, `sign`, `capture
//! keygen|sign|open`) work on
//! local files only: they load release keys from the operator's disk and write signed documents,
//! and never talk to a hub. The hub commands (`whoami`, `admin-token`, `token`, `root
//! upload|list`, `model publish|list|show`, `device`, `rollout`, `drift`, `alert`, `webhook`,
//! `audit`, `capture allow|allowances|list|download`) talk to a
//! hub's admin API through [`crate::client`], connected by [`connection::HubArgs`]; the three
//! that sign (`model publish`, `rollout create`, `rollout retire`) still sign here, and only
//! signed bytes leave the machine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_protocol::trust::{Signed, SignedBody};
use outpost_protocol::{Message, SecretKey};

use outpost_model::fsutil;

pub mod admin_token;
pub mod alert;
pub mod audit;
pub mod capture;
pub mod connection;
pub mod device;
pub mod drift;
pub mod example;
pub mod inspect;
pub mod keys;
pub mod model;
pub mod plan;
pub mod profile;
pub mod quickstart;
pub mod rollout;
pub mod root;
pub mod serve;
pub mod sign;
pub mod table;
pub mod tls;
pub mod token;
pub mod validation;
pub mod webhook;
pub mod whoami;

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
    /// Create and rotate the trust root (offline); upload and list a hub's roots.
    #[command(subcommand)]
    Root(root::RootCommand),
    /// Sign model manifests (offline); publish, list and show a hub's models.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Sign rollout plans (offline).
    #[command(subcommand)]
    Plan(plan::PlanCommand),
    /// Add signatures to an existing signed document, for threshold ceremonies across machines.
    Sign(sign::Args),
    /// Print a signed document or frame in readable form.
    Inspect(inspect::Args),
    /// Show which hub and admin token the CLI uses, and the token's role.
    Whoami(whoami::Args),
    /// Create admin-API tokens.
    #[command(subcommand)]
    AdminToken(admin_token::AdminTokenCommand),
    /// Create and list device enrollment tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// List, inspect, relabel and revoke devices.
    #[command(subcommand)]
    Device(device::DeviceCommand),
    /// Create, watch and steer rollouts; retire a model from devices.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// Report how far devices' inputs and outputs have drifted from a model's reference.
    #[command(subcommand)]
    Drift(drift::DriftCommand),
    /// Rules that notify webhooks when a model drifts, its data goes bad or it errs or slows.
    #[command(subcommand)]
    Alert(alert::AlertCommand),
    /// The webhook endpoints alert rules notify: create, test, and the dead-letter list.
    #[command(subcommand)]
    Webhook(webhook::WebhookCommand),
    /// Read and check the hub's audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Opt-in data capture under the release keys: the operator's key, signed allowances, and
    /// the sealed samples devices send.
    #[command(subcommand)]
    Capture(capture::CaptureCommand),
    /// Run the hub server.
    Serve(serve::ServeArgs),
    /// Write a small example ONNX model and its validation set.
    ExampleModel(example::Args),
    /// Make validation sets for your own models.
    #[command(subcommand)]
    Validation(validation::ValidationCommand),
    /// Build a model's drift reference profile from a reference dataset (offline).
    Profile(profile::Args),
    /// Make a private CA and a certificate for the hub.
    #[command(subcommand)]
    Tls(tls::TlsCommand),
    /// Run a hub and agents on this machine and roll a model out to them, end to end.
    Quickstart(quickstart::Args),
    /// Commands run on the hub host against its data directory.
    #[command(subcommand)]
    Admin(serve::AdminCommand),
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
            Command::Whoami(args) => args.run(),
            Command::AdminToken(command) => command.run(),
            Command::Token(command) => command.run(),
            Command::Device(command) => command.run(),
            Command::Rollout(command) => command.run(),
            Command::Drift(command) => command.run(),
            Command::Alert(command) => command.run(),
            Command::Webhook(command) => command.run(),
            Command::Audit(command) => command.run(),
            Command::Capture(command) => command.run(),
            Command::Serve(args) => args.run(),
            Command::ExampleModel(args) => args.run(),
            Command::Profile(args) => args.run(),
            Command::Validation(command) => command.run(),
            Command::Tls(command) => command.run(),
            Command::Admin(command) => command.run(),
            Command::Quickstart(args) => args.run(),
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

/// Writes a progress note to stderr, keeping stdout for the command's result (and `--json`).
/// A stderr that cannot be written loses the note, nothing more.
pub fn print_stderr(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Parses `30m`, `15m`, `365d` and the like.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|error| format!("{text:?}: {error}"))
}

/// Signs `body` with every key and returns the signed document's bytes.
pub fn sign_document<B: SignedBody>(body: &B, keys: &[SecretKey]) -> anyhow::Result<Vec<u8>>
where
    Signed<B>: Message,
{
    let mut signed = Signed::new(body).context("encoding document")?;
    for key in keys {
        signed.sign(key);
    }
    outpost_protocol::encode(&signed).context("encoding signed document")
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
    let bytes = sign_document(body, keys)?;
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
    #[arg(
        long = "key",
        visible_alias = "keys",
        value_delimiter = ',',
        required = true
    )]
    pub keys: Vec<PathBuf>,
}

impl SigningKeys {
    pub fn load(&self) -> anyhow::Result<Vec<SecretKey>> {
        crate::keyfile::load_all_private(&self.keys)
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn every_command_is_well_formed() {
        // Catches flags that two flattened argument groups both define.
        Cli::command().debug_assert();
    }
}
