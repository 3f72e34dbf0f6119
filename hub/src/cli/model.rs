//! `outpost-hub model`: sign model manifests (offline), publish model versions to a hub and look
//! at the ones it holds.
//!
//! `model publish` is the only way a model should reach a hub: it runs the validation set with
//! the agent's own inference code before anything is signed, so a model that would fail on
//! devices is never signed at all.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use outpost_model::drift::Extractor;
use outpost_model::inference::{validate, LoadedModel, ValidationReport};
use outpost_protocol::device::ValidationSet;
use outpost_protocol::drift::Profile;
use outpost_protocol::keys::StreamingSha256;
use outpost_protocol::trust::{Artifact, ArtifactRole, DType, Dim, ManifestBody, TensorSpec};
use outpost_protocol::{AgentVersion, Arch, Message, ModelName};

use super::connection::HubArgs;
use super::table::{self, fields, OutputArgs, Table};
use super::{parse_duration, print_stderr, sign_document, sign_to_file, SigningKeys};
use crate::api::{ModelDetail, ModelSummary, ModelVersionInfo, TensorInfo};
use crate::client::{format_bytes, path_segment, Progress};
use crate::unix_now;
use outpost_model::fsutil;

/// Largest model `model publish` loads to check and validate. ONNX protobufs cannot exceed 2 GiB.
pub const MAX_MODEL_IN_MEMORY: u64 = 2 * 1024 * 1024 * 1024;

/// The oldest agent release that reads every artifact `model publish` writes: the default
/// `--min-agent-version`. Raise it when an artifact gains a form that release's agent cannot
/// read.
pub const OLDEST_READING_AGENT: &str = "0.1.0";
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a signed manifest for a model version from local files.
    Sign(SignArgs),
    /// Validate, sign and upload a model version to a hub (publisher).
    Publish(PublishArgs),
    /// List the models a hub holds.
    List(ListArgs),
    /// Show a model's versions, or one version: NAME or NAME@VERSION.
    Show(ShowArgs),
}

#[derive(Debug, clap::Args)]
pub struct ManifestArgs {
    /// Model name: ASCII letters, digits, `-`, `_` and `.`, at most 128 bytes, not starting with `.`
    /// and never containing `..`.
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
    /// Default: the inputs the ONNX file declares.
    #[arg(long = "input", value_parser = parse_tensor_spec)]
    pub inputs: Vec<TensorSpec>,
    /// Output tensor, same form as --input; repeatable. Default: the outputs the ONNX file
    /// declares.
    #[arg(long = "output", value_parser = parse_tensor_spec)]
    pub outputs: Vec<TensorSpec>,
    /// Architectures the model may run on.
    #[arg(long = "arch", value_delimiter = ',', default_value = "x86_64,aarch64,armv7", value_parser = parse_arch)]
    pub archs: Vec<Arch>,
    /// Oldest agent that may run this model. By default the oldest release whose agent reads
    /// every artifact this tool writes (validation sets of both forms, profiles with wide spans):
    /// devices of older agents are skipped by its rollouts.
    #[arg(long, default_value = OLDEST_READING_AGENT, value_parser = parse_agent_version)]
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

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// The ONNX model file.
    pub file: PathBuf,
    /// Omit --input and --output to take them from the model's own declarations.
    #[command(flatten)]
    pub manifest: ManifestArgs,
    /// Longest the validation set may take to run.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub validation_timeout: Duration,
    #[command(flatten)]
    pub signing: SigningKeys,
    /// Also write the signed manifest here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// NAME for all versions, NAME@VERSION for one.
    #[arg(value_parser = parse_model_at)]
    pub model: ModelAt,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `NAME` or `NAME@VERSION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelAt {
    pub name: ModelName,
    pub version: Option<u64>,
}

impl ModelCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            ModelCommand::Publish(args) => args.run(),
            ModelCommand::List(args) => {
                let client = args.hub.connect()?;
                let models: Vec<ModelSummary> = client.get_json("/models")?;
                args.output.print(&models, |models| {
                    let mut out = Table::new(&["NAME", "LATEST", "VERSIONS"]);
                    for model in models {
                        out.row(vec![
                            model.name.clone(),
                            model.latest_version.to_string(),
                            model.versions.to_string(),
                        ]);
                    }
                    out.render()
                })
            }
            ModelCommand::Show(args) => {
                let client = args.hub.connect()?;
                let name = path_segment(args.model.name.as_str());
                match args.model.version {
                    Some(version) => {
                        let info: ModelVersionInfo =
                            client.get_json(&format!("/models/{name}/{version}"))?;
                        args.output.print(&info, render_version)
                    }
                    None => {
                        let detail: ModelDetail = client.get_json(&format!("/models/{name}"))?;
                        args.output.print(&detail, render_detail)
                    }
                }
            }
            ModelCommand::Sign(mut args) => {
                let keys = args.signing.load()?;
                let onnx = fsutil::read_capped(&args.model, MAX_MODEL_IN_MEMORY)?;
                args.manifest.declared_specs(&args.model, &onnx)?;
                drop(onnx);
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
    /// Fills in `--input` and `--output` where not given from what the ONNX file at `path`
    /// declares.
    pub fn declared_specs(&mut self, path: &Path, onnx: &[u8]) -> anyhow::Result<()> {
        let (inputs, outputs) = model_specs(path, onnx, &self.inputs, &self.outputs)?;
        (self.inputs, self.outputs) = (inputs, outputs);
        Ok(())
    }

    /// Hashes the artifacts and builds the manifest body, checking everything the agent would.
    pub fn build(&self, model: &Path) -> anyhow::Result<ManifestBody> {
        ModelName::new(&self.name).with_context(|| format!("--name {:?}", self.name))?;
        if self.inputs.is_empty() || self.outputs.is_empty() {
            bail!("a manifest needs at least one --input and one --output");
        }
        let mut artifacts = vec![hash_artifact(ArtifactRole::Model, model)?];
        if let Some(path) = &self.profile {
            // Devices refuse a version whose profile does not fit its model; refuse it here first.
            let bytes = fsutil::read_capped(path, Profile::MAX_FRAME as u64)?;
            let profile = outpost_protocol::decode::<Profile>(&bytes)
                .with_context(|| format!("--profile {}", path.display()))?;
            Extractor::new(&profile, &self.inputs, &self.outputs)
                .with_context(|| format!("--profile {}", path.display()))?;
            artifacts.push(hash_artifact(ArtifactRole::Profile, path)?);
        }
        if let Some(path) = &self.validation {
            let bytes = fsutil::read_capped(path, ValidationSet::MAX_FRAME as u64)?;
            ValidationSet::decode(&bytes)
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

impl PublishArgs {
    fn run(mut self) -> anyhow::Result<()> {
        let name = ModelName::new(&self.manifest.name)
            .with_context(|| format!("--name {:?}", self.manifest.name))?;
        let version = self.manifest.version;
        let keys = self.signing.load()?;

        // The gate comes first: nothing is hashed, signed or sent for a model that fails it.
        let onnx = fsutil::read_capped(&self.file, MAX_MODEL_IN_MEMORY)?;
        self.manifest.declared_specs(&self.file, &onnx)?;
        let report = check_model(
            &onnx,
            &self.manifest.inputs,
            &self.manifest.outputs,
            self.manifest.validation.as_deref(),
            self.validation_timeout,
        )?;
        drop(onnx);
        match report {
            Some(report) => print_stderr(&format!(
                "validation passed: {} case(s), {} output elements, largest difference {:e} ({:.1?})\n",
                report.cases, report.elements, report.max_abs_difference, report.elapsed
            )),
            None => print_stderr(
                "no --validation set: the model loads with these specs, but devices will activate \
                 it without checking its outputs\n",
            ),
        }

        let body = self.manifest.build(&self.file)?;
        let client = self.hub.connect()?;
        let version_path = format!("/models/{}/{version}", path_segment(name.as_str()));
        // Signing again would give a new manifest (new created and expires), which the hub must
        // refuse as a second manifest for the same version; so a re-run compares artifacts first.
        if let Some(existing) = client.get_json_opt::<ModelVersionInfo>(&version_path)? {
            check_same_artifacts(&existing, &body.artifacts)?;
            let existing = ModelVersionInfo {
                already_published: true,
                ..existing
            };
            return self.output.print(&existing, |info| {
                format!(
                    "{name}@{version} is already published with these files (manifest {})\n",
                    info.manifest_sha256
                )
            });
        }

        let signed = sign_document(&body, &keys)?;
        if let Some(out) = &self.out {
            fsutil::write_atomic(out, &signed, 0o644)?;
        }
        for artifact in &body.artifacts {
            let path = match artifact.role {
                ArtifactRole::Model => Some(&self.file),
                ArtifactRole::Profile => self.manifest.profile.as_ref(),
                ArtifactRole::Validation => self.manifest.validation.as_ref(),
            };
            let Some(path) = path else {
                continue;
            };
            let hex = artifact.sha256.to_hex();
            // Unknown (503) uploads anyway, and the upload's answer says what is wrong.
            if client.head(&format!("/artifacts/{hex}"))? == Some(true) {
                print_stderr(&format!(
                    "{} {} is already on the hub\n",
                    artifact.role,
                    path.display()
                ));
                continue;
            }
            client
                .put_artifact(&hex, path, Progress::auto())
                .with_context(|| format!("uploading {}", path.display()))?;
            print_stderr(&format!(
                "uploaded {} {} ({})\n",
                artifact.role,
                path.display(),
                format_bytes(artifact.length)
            ));
        }
        let info: ModelVersionInfo = client.post_bytes("/models", &signed)?;
        self.output.print(&info, |info| {
            let verb = if info.already_published {
                "was already published"
            } else {
                "published"
            };
            format!(
                "{}@{} {verb} (manifest {})\n",
                info.name, info.version, info.manifest_sha256
            )
        })
    }
}

/// Loads the model with the manifest's specs, as a device will, and runs the validation set if
/// there is one. Any failure names what failed; the caller then signs nothing.
pub fn check_model(
    onnx: &[u8],
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
    validation: Option<&Path>,
    timeout: Duration,
) -> anyhow::Result<Option<ValidationReport>> {
    let set = match validation {
        Some(path) => {
            let bytes = fsutil::read_capped(path, ValidationSet::MAX_FRAME as u64)?;
            Some(
                ValidationSet::decode(&bytes)
                    .with_context(|| format!("--validation {}", path.display()))?,
            )
        }
        None => None,
    };
    // One thread: the validation result should not depend on this machine's core count.
    let model = LoadedModel::load(onnx, inputs, outputs, 1)
        .context("the model does not load with these input and output specs; it was not signed")?;
    let Some(set) = set else {
        return Ok(None);
    };
    let report = validate(&model, &set, Instant::now() + timeout)
        .context("the model fails its validation set; it was not signed")?;
    Ok(Some(report))
}

/// Succeeds when the hub's version has exactly these artifacts (by role and hash), and explains
/// the conflict otherwise.
pub fn check_same_artifacts(existing: &ModelVersionInfo, local: &[Artifact]) -> anyhow::Result<()> {
    let mut theirs: Vec<(String, String)> = existing
        .artifacts
        .iter()
        .map(|artifact| (artifact.role.clone(), artifact.sha256.to_ascii_lowercase()))
        .collect();
    let mut ours: Vec<(String, String)> = local
        .iter()
        .map(|artifact| (artifact.role.as_str().to_owned(), artifact.sha256.to_hex()))
        .collect();
    theirs.sort();
    ours.sort();
    if theirs == ours {
        return Ok(());
    }
    let describe = |artifacts: &[(String, String)]| {
        artifacts
            .iter()
            .map(|(role, sha256)| format!("{role} {sha256}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    bail!(
        "{}@{} is already published with other files (hub: {}; here: {}); publish these under a \
         new --version",
        table::clean(&existing.name),
        existing.version,
        table::clean(&describe(&theirs)),
        describe(&ours)
    )
}

/// Parses `NAME` or `NAME@VERSION`.
pub fn parse_model_at(text: &str) -> Result<ModelAt, String> {
    let (name, version) = match text.rsplit_once('@') {
        Some((name, version)) => {
            let version = version
                .parse::<u64>()
                .map_err(|_| format!("{text:?}: version {version:?} is not a number"))?;
            (name, Some(version))
        }
        None => (text, None),
    };
    let name = ModelName::new(name).map_err(|error| format!("model name {name:?}: {error}"))?;
    Ok(ModelAt { name, version })
}

fn tensors(tensors: &[TensorInfo]) -> String {
    tensors
        .iter()
        .map(|tensor| {
            let shape = tensor
                .shape
                .iter()
                .map(|dim| {
                    if *dim < 0 {
                        "N".to_owned()
                    } else {
                        dim.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(",");
            format!("{} {} [{shape}]", tensor.name, tensor.datatype)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn render_version(info: &ModelVersionInfo) -> String {
    let mut text = fields(&[
        ("model", format!("{}@{}", info.name, info.version)),
        ("manifest", info.manifest_sha256.clone()),
        ("created", table::time(info.created)),
        ("expires", table::time(info.expires)),
        ("inputs", tensors(&info.inputs)),
        ("outputs", tensors(&info.outputs)),
        ("archs", info.archs.join(",")),
        ("min agent", info.min_agent_version.clone()),
    ]);
    let mut artifacts = Table::new(&["ARTIFACT", "SIZE", "SHA256"]);
    for artifact in &info.artifacts {
        artifacts.row(vec![
            artifact.role.clone(),
            format_bytes(artifact.length),
            artifact.sha256.clone(),
        ]);
    }
    text.push('\n');
    text.push_str(&artifacts.render());
    text
}

fn render_detail(detail: &ModelDetail) -> String {
    let mut out = Table::new(&["VERSION", "CREATED", "EXPIRES", "ARCHS", "MANIFEST"]);
    for version in &detail.versions {
        out.row(vec![
            version.version.to_string(),
            table::time(version.created),
            table::time(version.expires),
            version.archs.join(","),
            version.manifest_sha256.clone(),
        ]);
    }
    format!("{}\n{}", table::clean(&detail.name), out.render())
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

/// The model's input and output specs: those given, else those the ONNX file declares.
pub(super) fn model_specs(
    path: &Path,
    onnx: &[u8],
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
) -> anyhow::Result<(Vec<TensorSpec>, Vec<TensorSpec>)> {
    let (mut inputs, mut outputs) = (inputs.to_vec(), outputs.to_vec());
    if inputs.is_empty() || outputs.is_empty() {
        let (declared_inputs, declared_outputs) =
            LoadedModel::describe(onnx).with_context(|| {
                format!("reading the inputs and outputs {} declares", path.display())
            })?;
        if inputs.is_empty() {
            inputs = declared_inputs;
        }
        if outputs.is_empty() {
            outputs = declared_outputs;
        }
    }
    Ok((inputs, outputs))
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

#[cfg(test)]
mod tests {
    use outpost_model::example;
    use outpost_protocol::{sha256, Sha256};

    use super::*;
    use crate::api::ArtifactInfo;

    fn validation_file(dir: &Path, set: &ValidationSet) -> PathBuf {
        let path = dir.join("validation.bin");
        std::fs::write(&path, outpost_protocol::encode(set).unwrap()).unwrap();
        path
    }

    #[test]
    fn the_gate_passes_a_model_on_its_own_validation_set() {
        let dir = tempfile::tempdir().unwrap();
        let onnx = example::mlp(4, 8, 3, 1);
        let (inputs, outputs) = example::mlp_specs(4, 3);
        let set = example::validation_set_for(&onnx, &inputs, &outputs, 3, 7, 1e-5, 1e-4).unwrap();
        let path = validation_file(dir.path(), &set);
        let report = check_model(
            &onnx,
            &inputs,
            &outputs,
            Some(&path),
            Duration::from_secs(60),
        )
        .unwrap()
        .unwrap();
        assert_eq!(report.cases, 3);
        assert!(
            check_model(&onnx, &inputs, &outputs, None, Duration::from_secs(60))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn the_gate_names_the_failing_case_and_difference() {
        let dir = tempfile::tempdir().unwrap();
        let (inputs, outputs) = example::mlp_specs(4, 3);
        let good = example::mlp(4, 8, 3, 1);
        let set = example::validation_set_for(&good, &inputs, &outputs, 3, 7, 1e-5, 1e-4).unwrap();
        let path = validation_file(dir.path(), &set);
        // Same specs, other weights: the "bad release" a publisher must not sign.
        let bad = example::mlp(4, 8, 3, 2);
        let error = check_model(
            &bad,
            &inputs,
            &outputs,
            Some(&path),
            Duration::from_secs(60),
        )
        .unwrap_err();
        let text = format!("{error:#}");
        assert!(text.contains("it was not signed"), "{text}");
        assert!(
            text.contains("case 0, output \"y\", element") && text.contains("difference"),
            "{text}"
        );
    }

    #[test]
    fn the_gate_refuses_specs_the_model_does_not_have() {
        let onnx = example::mlp(4, 8, 3, 1);
        let (inputs, _) = example::mlp_specs(4, 3);
        let (_, wrong_outputs) = example::mlp_specs(4, 5);
        let error = check_model(
            &onnx,
            &inputs,
            &wrong_outputs,
            None,
            Duration::from_secs(60),
        )
        .unwrap_err();
        assert!(format!("{error:#}").contains("does not load"), "{error:#}");
    }

    #[test]
    fn model_at_parses_name_and_version() {
        let plain = parse_model_at("iris").unwrap();
        assert_eq!((plain.name.as_str(), plain.version), ("iris", None));
        let versioned = parse_model_at("iris-v2@12").unwrap();
        assert_eq!(
            (versioned.name.as_str(), versioned.version),
            ("iris-v2", Some(12))
        );
        assert!(parse_model_at("iris@x")
            .unwrap_err()
            .contains("not a number"));
        assert!(parse_model_at("../etc@1").is_err());
        assert!(parse_model_at("@1").is_err());
    }

    #[test]
    fn republishing_compares_artifacts_by_role_and_hash() {
        let model = Artifact {
            role: ArtifactRole::Model,
            sha256: sha256(b"model"),
            length: 5,
        };
        let validation = Artifact {
            role: ArtifactRole::Validation,
            sha256: sha256(b"set"),
            length: 3,
        };
        let info = |artifacts: &[(&str, Sha256)]| ModelVersionInfo {
            name: "iris".into(),
            version: 2,
            manifest_sha256: String::new(),
            created: 0,
            expires: 0,
            artifacts: artifacts
                .iter()
                .map(|(role, sha)| ArtifactInfo {
                    role: (*role).to_owned(),
                    sha256: sha.to_hex().to_ascii_uppercase(),
                    length: 0,
                })
                .collect(),
            inputs: vec![],
            outputs: vec![],
            archs: vec![],
            min_agent_version: String::new(),
            already_published: false,
        };
        let same = info(&[("validation", validation.sha256), ("model", model.sha256)]);
        check_same_artifacts(&same, &[model, validation]).unwrap();

        let other = info(&[("model", sha256(b"other model"))]);
        let text = check_same_artifacts(&other, &[model])
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("iris@2 is already published with other files")
                && text.contains("new --version"),
            "{text}"
        );
        let fewer = info(&[("model", model.sha256)]);
        assert!(check_same_artifacts(&fewer, &[model, validation]).is_err());
    }
}
