//! The agent's command line.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use outpost_protocol::{Arch, TimeFloor};

use crate::check::{check, DeviceView, Offered};

#[derive(Debug, Parser)]
#[command(name = "outpost-agent", version, about = "Outpost device agent")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check, offline, whether this device would accept signed documents, and say why not.
    Verify(VerifyArgs),
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The root this device trusts.
    #[arg(long)]
    pub root: PathBuf,
    /// Newer roots to rotate through, oldest first.
    #[arg(long = "rotation")]
    pub rotations: Vec<PathBuf>,
    #[arg(long)]
    pub plan: Option<PathBuf>,
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Highest plan sequence this device has accepted.
    #[arg(long)]
    pub highest_plan: Option<u64>,
    /// Highest manifest version of this model the device has seen.
    #[arg(long)]
    pub highest_manifest: Option<u64>,
}

impl Command {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Verify(args) => args.run(),
        }
    }
}

/// Largest signed document read from disk; the protocol caps each kind lower still.
const MAX_DOCUMENT: u64 = 1024 * 1024;

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > MAX_DOCUMENT {
        bail!(
            "{} is {len} bytes, larger than any signed document",
            path.display()
        );
    }
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

impl VerifyArgs {
    fn run(self) -> anyhow::Result<()> {
        let Some(arch) = Arch::current() else {
            bail!("this CPU architecture is not one Outpost supports");
        };
        let trusted_root = read(&self.root)?;
        let plan = self.plan.as_deref().map(read).transpose()?;
        let manifest = self.manifest.as_deref().map(read).transpose()?;
        let offered = Offered {
            roots: self
                .rotations
                .iter()
                .map(|path| read(path))
                .collect::<Result<_, _>>()?,
            plan: plan.as_deref(),
            manifest: manifest.as_deref(),
        };
        let view = DeviceView {
            trusted_root: &trusted_root,
            floor: TimeFloor {
                wall_clock: crate::unix_now(),
                ..TimeFloor::default()
            },
            highest_plan: self.highest_plan,
            highest_manifest: self.highest_manifest,
            arch,
            agent: crate::agent_version(),
        };
        let verdict = check(&view, &offered).context("refused")?;
        println!("root version {} trusted", verdict.root.version());
        if let Some(plan) = &verdict.plan {
            println!("plan {} accepted", plan.sequence());
        }
        if let Some((slot, manifest)) = &verdict.manifest {
            let slot = slot.map_or(String::new(), |slot| format!(" as {slot:?}"));
            println!(
                "manifest {}@{} accepted{slot}",
                manifest.name(),
                manifest.version()
            );
        }
        Ok(())
    }
}
