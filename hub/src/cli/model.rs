//! `outpost-hub model`: sign model manifests.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use outpost_protocol::device::ValidationSet;
use outpost_protocol::keys::StreamingSha256;
use outpost_protocol::trust::{Artifact, ArtifactRole, DType, Dim, ManifestBody, TensorSpec};
use outpost_protocol::{AgentVersion, Arch, Message, ModelName};

use super::{parse_duration, sign_to_file, SigningKeys};
use crate::{fsutil, unix_now};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a signed manifest for a model version from local files.
    Sign(SignArgs),
}

#[derive(Debug, clap::Args)]
pub struct ManifestArgs {
    #[arg(long)]
    pub name: String,
    /// Version number; must be higher than every earlier version of this name.
    #[arg(long)]
    pub version: u64,
    /// Reference profile for drift monitoring.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Validation set (golden inputs, expected outputs, tolerance).
    #[arg(long)]
    pub validation: Option<PathBuf>,
    /// Input tensor as NAME:DTYPE:DIMS, e.g. `x:FP32:N,4` (N marks the batch axis); repeatable.
    #[arg(long = "input", value_parser = parse_tensor_spec)]
    pub inputs: Vec<TensorSpec>,
    /// Output tensor, same form as --input; repeatable.
    #[arg(long = "output", value_parser = parse_tensor_spec)]
    pub outputs: Vec<TensorSpec>,
    /// Architectures the model may run on.
    #[arg(long = "arch", value_delimiter = ',', default_value = "x86_64,aarch64,armv7", value_parser = parse_arch)]
    pub archs: Vec<Arch>,
    /// Oldest agent that may run this model.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"), value_parser = parse_agent_version)]
    pub min_agent_version: AgentVersion,
    /// How long the manifest stays valid.
    #[arg(long, default_value = "365d", value_parser = parse_duration)]
    pub expires: Duration,
}

#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// The ONNX model file.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub manifest: ManifestArgs,
    #[command(flatten)]
    pub signing: SigningKeys,
    /// Where to write the signed manifest.
    #[arg(long)]
    pub out: PathBuf,
}

impl ModelCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            ModelCommand::Sign(args) => {
                let keys = args.signing.load()?;
                let body = args.manifest.build(&args.model)?;
                sign_to_file(&body, &keys, &args.out)?;
                println!(
                    "wrote manifest {}@{} to {}",
                    body.name,
                    body.version,
                    args.out.display()
                );
                Ok(())
            }
        }
    }
}

impl ManifestArgs {
    /// Hashes the artifacts and builds the manifest body, checking everything the agent would.
    pub fn build(&self, model: &Path) -> anyhow::Result<ManifestBody> {
        ModelName::new(&self.name).with_context(|| format!("--name {:?}", self.name))?;
        if self.inputs.is_empty() || self.outputs.is_empty() {
            bail!("a manifest needs at least one --input and one --output");
        }
        let mut artifacts = vec![hash_artifact(ArtifactRole::Model, model)?];
        if let Some(path) = &self.profile {
            artifacts.push(hash_artifact(ArtifactRole::Profile, path)?);
        }
        if let Some(path) = &self.validation {
            let bytes = fsutil::read_capped(path, ValidationSet::MAX_FRAME as u64)?;
            outpost_protocol::decode::<ValidationSet>(&bytes)
                .with_context(|| format!("--validation {}", path.display()))?;
            artifacts.push(hash_artifact(ArtifactRole::Validation, path)?);
        }
        let created = unix_now();
        Ok(ManifestBody {
            name: self.name.clone(),
            version: self.version,
            created,
            expires: created + self.expires.as_secs(),
            artifacts,
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
            archs: self.archs.clone(),
            min_agent_version: self.min_agent_version,
        })
    }
}

/// Streams a file through SHA-256, so a large model is never held in memory.
pub fn hash_artifact(role: ArtifactRole, path: &Path) -> anyhow::Result<Artifact> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = StreamingSha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut length = 0u64;
    loop {
        let n = file
            .read(&mut buffer)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        length += n as u64;
    }
    Ok(Artifact {
        role,
        sha256: hasher.finish(),
        length,
    })
}

/// Parses `NAME:DTYPE:DIMS`, where DIMS is comma-separated sizes and `N` marks the batch axis.
pub fn parse_tensor_spec(text: &str) -> Result<TensorSpec, String> {
    let mut parts = text.splitn(3, ':');
    let (Some(name), Some(dtype), Some(dims)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!(
            "{text:?}: expected NAME:DTYPE:DIMS, e.g. x:FP32:N,4"
        ));
    };
    if name.is_empty() {
        return Err(format!("{text:?}: tensor name is empty"));
    }
    let dtype = DType::parse(dtype).ok_or_else(|| {
        format!("{text:?}: unknown datatype {dtype:?} (FP32, FP64, INT32, INT64, UINT8)")
    })?;
    let shape = dims
        .split(',')
        .filter(|dim| !dim.is_empty())
        .map(|dim| match dim {
            "N" | "n" | "batch" => Ok(Dim::Batch),
            size => size
                .parse::<u64>()
                .map(Dim::Fixed)
                .map_err(|_| format!("{text:?}: dimension {size:?} is neither a size nor N")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TensorSpec {
        name: name.to_owned(),
        dtype,
        shape,
    })
}

pub fn parse_arch(text: &str) -> Result<Arch, String> {
    Arch::parse(text)
        .ok_or_else(|| format!("unknown architecture {text:?} (x86_64, aarch64, armv7)"))
}

pub fn parse_agent_version(text: &str) -> Result<AgentVersion, String> {
    AgentVersion::parse(text).ok_or_else(|| format!("{text:?} is not MAJOR.MINOR.PATCH"))
}
