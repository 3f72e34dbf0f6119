//! `outpost-hub capture`: opt-in data capture under the release keys.
//!
//! Offline: `keygen` makes the operator's X25519 key pair samples are sealed to, `sign` signs an
//! allowance with the release keys (refusing one above the protocol's maxima), `open` decrypts a
//! downloaded sample with the operator's secret key. Against a hub: `allow` uploads a signed
//! allowance (publisher), `allowances` lists them, `list` and `download` read the sealed samples
//! devices sent (admin). The hub never sees the secret key: it stores samples it cannot read.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use outpost_protocol::capture::{open, recipient_of, CaptureSample};
use outpost_protocol::device::Tensor;
use outpost_protocol::trust::{
    CaptureBody, CaptureTrigger, CaptureVersions, DType, RootBody, Signed,
};
use outpost_protocol::{ModelName, TimeFloor, VerifiedRoot};

use crate::api::{CaptureAllowanceInfo, CaptureInfo};
use crate::client::path_segment;
use crate::unix_now;

use super::connection::HubArgs;
use super::table::{self, OutputArgs, Table};
use super::{parse_duration, print_stdout, read_frame, SigningKeys};
use outpost_model::fsutil;

/// The operator's secret key file `keygen` writes, and its public half.
const SECRET_FILE: &str = "capture.key";
const PUBLIC_FILE: &str = "capture.pub";

#[derive(Debug, clap::Subcommand)]
pub enum CaptureCommand {
    /// Make the operator's X25519 key pair samples are sealed to (offline): `capture.key`
    /// (secret, 0600) and `capture.pub`, hex.
    Keygen(KeygenArgs),
    /// Sign a capture allowance with the release keys (offline).
    Sign(SignArgs),
    /// Upload a signed capture allowance (needs a publisher token).
    Allow(AllowArgs),
    /// List the capture allowances the hub holds.
    Allowances(ListAllowancesArgs),
    /// List the sealed samples devices uploaded (needs an admin token).
    List(ListArgs),
    /// Download one sealed sample (needs an admin token).
    Download(DownloadArgs),
    /// Open a downloaded sample with the operator's secret key (offline) and print its tensors
    /// as JSON.
    Open(OpenArgs),
}

#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Directory to write `capture.key` and `capture.pub` into (made 0700 if missing).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// The model whose requests devices may capture.
    #[arg(long)]
    pub model: String,
    /// Per model, above every earlier allowance of it: devices keep the highest they verified.
    #[arg(long)]
    pub sequence: u64,
    /// `all`, or versions separated by commas.
    #[arg(long, default_value = "all")]
    pub versions: String,
    /// Chance a served request is captured, in parts per million (1000000: every request; 0
    /// turns capture off).
    #[arg(long)]
    pub rate_ppm: u32,
    /// Samples one device keeps per UTC day.
    #[arg(long)]
    pub max_samples_per_day: u64,
    /// Sealed bytes one device keeps per UTC day.
    #[arg(long)]
    pub max_bytes_per_day: u64,
    /// `always`, or `while-drift-alert`: only while the device's own drift summary of the model
    /// is flagged ALERT.
    #[arg(long, default_value = "always", value_parser = ["always", "while-drift-alert"])]
    pub trigger: String,
    /// Input tensors left out of every sample; repeat or separate with commas.
    #[arg(long = "drop-input", value_delimiter = ',')]
    pub drop_inputs: Vec<String>,
    /// Output tensors left out of every sample; repeat or separate with commas.
    #[arg(long = "drop-output", value_delimiter = ',')]
    pub drop_outputs: Vec<String>,
    /// The operator's public key file (`capture.pub` from `capture keygen`).
    #[arg(long)]
    pub recipient: PathBuf,
    /// How long devices accept the allowance.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub expires: Duration,
    /// The signed root you trust; the signed allowance is checked against it.
    #[arg(long)]
    pub root: PathBuf,
    #[command(flatten)]
    pub signing: SigningKeys,
    /// Where to write the signed allowance.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct AllowArgs {
    /// The signed allowance file (`capture sign --out`).
    pub file: PathBuf,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct ListAllowancesArgs {
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub version: Option<u64>,
    /// A device id (32 hex digits).
    #[arg(long)]
    pub device: Option<String>,
    /// Received at or after this Unix time.
    #[arg(long)]
    pub since: Option<u64>,
    /// Received before this Unix time.
    #[arg(long)]
    pub until: Option<u64>,
    #[arg(long, default_value_t = 1000)]
    pub limit: u64,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct DownloadArgs {
    /// The sample's id, as `capture list` shows it.
    pub id: u64,
    /// Where to write the sealed sample.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub hub: HubArgs,
}

#[derive(Debug, clap::Args)]
pub struct OpenArgs {
    /// The operator's secret key file (`capture.key`).
    #[arg(long)]
    pub key: PathBuf,
    /// The sealed sample (`capture download --out`).
    pub file: PathBuf,
    /// Write the JSON here instead of printing it.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl CaptureCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            CaptureCommand::Keygen(args) => keygen(&args.out),
            CaptureCommand::Sign(args) => args.run(),
            CaptureCommand::Allow(args) => {
                let (bytes, _) = read_frame::<Signed<CaptureBody>>(&args.file)?;
                let client = args.hub.connect()?;
                let info: CaptureAllowanceInfo =
                    client.post_bytes("/capture/allowances", &bytes)?;
                args.output.print(&info, |info| {
                    format!(
                        "stored capture allowance {} of {}: devices fetch it at their next poll\n",
                        info.sequence, info.model
                    )
                })
            }
            CaptureCommand::Allowances(args) => {
                let client = args.hub.connect()?;
                let infos: Vec<CaptureAllowanceInfo> = client.get_json("/capture/allowances")?;
                args.output.print(&infos, |infos| render_allowances(infos))
            }
            CaptureCommand::List(args) => {
                let client = args.hub.connect()?;
                let mut query = format!("/captures?limit={}", args.limit);
                if let Some(model) = &args.model {
                    let _ = write!(query, "&model={}", path_segment(model));
                }
                for (name, value) in [
                    ("version", args.version),
                    ("since", args.since),
                    ("until", args.until),
                ] {
                    if let Some(value) = value {
                        let _ = write!(query, "&{name}={value}");
                    }
                }
                if let Some(device) = &args.device {
                    let _ = write!(query, "&device={}", path_segment(device));
                }
                let captures: Vec<CaptureInfo> = client.get_json(&query)?;
                args.output.print(&captures, |captures| {
                    let mut out = Table::new(&[
                        "ID",
                        "MODEL",
                        "DEVICE",
                        "ALLOWANCE",
                        "CAPTURED",
                        "RECEIVED",
                        "BYTES",
                    ]);
                    for capture in captures {
                        out.row(vec![
                            capture.id.to_string(),
                            format!("{}@{}", capture.model, capture.version),
                            capture.device.clone(),
                            capture.allowance.to_string(),
                            table::time(capture.captured_at),
                            table::time(capture.received_at),
                            capture.bytes.to_string(),
                        ]);
                    }
                    out.render()
                })
            }
            CaptureCommand::Download(args) => {
                let client = args.hub.connect()?;
                let max = outpost_protocol::trust::MAX_CAPTURE_SAMPLE_BYTES as u64;
                let bytes = client.get_bytes(&format!("/captures/{}", args.id), max)?;
                fsutil::write_atomic(&args.out, &bytes, 0o600)?;
                print_stdout(&format!(
                    "wrote sealed sample {} ({} bytes) to {}\n",
                    args.id,
                    bytes.len(),
                    args.out.display()
                ))
            }
            CaptureCommand::Open(args) => open_sample(&args),
        }
    }
}

fn keygen(dir: &Path) -> anyhow::Result<()> {
    let secret_path = dir.join(SECRET_FILE);
    let public_path = dir.join(PUBLIC_FILE);
    for path in [&secret_path, &public_path] {
        if path.exists() {
            bail!("{} exists: not overwriting a capture key", path.display());
        }
    }
    if !dir.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private", dir.display()))?;
    }
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut secret).context("reading randomness for the capture key")?;
    let public = recipient_of(&secret);
    fsutil::write_atomic(
        &secret_path,
        format!("{}\n", hex::encode(secret)).as_bytes(),
        0o600,
    )?;
    fsutil::write_atomic(
        &public_path,
        format!("{}\n", hex::encode(public)).as_bytes(),
        0o644,
    )?;
    print_stdout(&format!(
        "wrote {} (secret: keep it off the hub) and {} (the recipient for `capture sign`)\n",
        secret_path.display(),
        public_path.display()
    ))
}

/// A 32-byte key from a file of 64 hex digits.
fn read_key(path: &Path, what: &str) -> anyhow::Result<[u8; 32]> {
    let bytes = fsutil::read_capped(path, 4096)?;
    let text =
        String::from_utf8(bytes).with_context(|| format!("{} is not text", path.display()))?;
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key).map_err(|_| {
        anyhow::anyhow!(
            "{} is not a capture {what} key (64 hex digits, as `capture keygen` writes)",
            path.display()
        )
    })?;
    Ok(key)
}

impl SignArgs {
    fn run(self) -> anyhow::Result<()> {
        ModelName::new(&self.model).with_context(|| format!("--model {:?}", self.model))?;
        let versions = if self.versions == "all" {
            CaptureVersions::All
        } else {
            CaptureVersions::Only(
                self.versions
                    .split(',')
                    .map(|text| {
                        text.trim().parse::<u64>().with_context(|| {
                            format!("--versions {:?}: not `all` or versions", self.versions)
                        })
                    })
                    .collect::<anyhow::Result<_>>()?,
            )
        };
        let now = unix_now();
        let body = CaptureBody {
            sequence: self.sequence,
            created: now,
            expires: now.saturating_add(self.expires.as_secs()),
            model: self.model.clone(),
            versions,
            rate_ppm: self.rate_ppm,
            max_samples_per_day: self.max_samples_per_day,
            max_bytes_per_day: self.max_bytes_per_day,
            trigger: match self.trigger.as_str() {
                "while-drift-alert" => CaptureTrigger::WhileDriftAlert,
                _ => CaptureTrigger::Always,
            },
            drop_inputs: self.drop_inputs.clone(),
            drop_outputs: self.drop_outputs.clone(),
            recipient: read_key(&self.recipient, "public")?,
        };
        body.validate()
            .context("refusing to sign this capture allowance")?;
        let keys = self.signing.load()?;
        let (root_bytes, _) = read_frame::<Signed<RootBody>>(&self.root)?;
        let root = VerifiedRoot::load_trusted(&root_bytes)
            .with_context(|| format!("verifying root {}", self.root.display()))?;
        let bytes = super::sign_document(&body, &keys)?;
        let floor = TimeFloor {
            wall_clock: now,
            ..TimeFloor::default()
        };
        root.verify_capture(&bytes, &floor, None, None)
            .context("the signed allowance does not verify against --root (too few keys?)")?;
        fsutil::write_atomic(&self.out, &bytes, 0o644)?;
        print_stdout(&format!(
            "signed capture allowance {} of {} ({} ppm, {} samples and {} bytes per device and \
             day, {}) to {}\n",
            body.sequence,
            body.model,
            body.rate_ppm,
            body.max_samples_per_day,
            body.max_bytes_per_day,
            body.trigger.as_str(),
            self.out.display()
        ))
    }
}

fn render_allowances(infos: &[CaptureAllowanceInfo]) -> String {
    let mut out = Table::new(&[
        "MODEL",
        "SEQUENCE",
        "VERSIONS",
        "RATE PPM",
        "SAMPLES/DAY",
        "BYTES/DAY",
        "TRIGGER",
        "EXPIRES",
        "BY",
    ]);
    for info in infos {
        out.row(vec![
            info.model.clone(),
            info.sequence.to_string(),
            if info.versions.is_empty() {
                "all".to_owned()
            } else {
                info.versions
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            },
            info.rate_ppm.to_string(),
            info.max_samples_per_day.to_string(),
            info.max_bytes_per_day.to_string(),
            info.trigger.clone(),
            table::time(info.expires),
            info.by.clone(),
        ]);
    }
    out.render()
}

fn open_sample(args: &OpenArgs) -> anyhow::Result<()> {
    let secret = read_key(&args.key, "secret")?;
    let sealed = fsutil::read_capped(
        &args.file,
        outpost_protocol::trust::MAX_CAPTURE_SAMPLE_BYTES as u64,
    )?;
    let plain = open(&secret, &sealed).with_context(|| {
        format!(
            "opening {} with {}",
            args.file.display(),
            args.key.display()
        )
    })?;
    let sample: CaptureSample = outpost_protocol::decode(&plain)
        .with_context(|| format!("{} opened, but holds no sample", args.file.display()))?;
    let json = serde_json::json!({
        "model": sample.model,
        "version": sample.version,
        "allowance": sample.allowance,
        "captured_at": sample.captured_at,
        "inputs": sample.inputs.iter().map(tensor_json).collect::<anyhow::Result<Vec<_>>>()?,
        "outputs": sample.outputs.iter().map(tensor_json).collect::<anyhow::Result<Vec<_>>>()?,
    });
    let text = serde_json::to_string_pretty(&json)? + "\n";
    match &args.out {
        Some(path) => fsutil::write_atomic(path, text.as_bytes(), 0o600),
        None => print_stdout(&text),
    }
}

/// A tensor as the Open Inference Protocol writes one in JSON: name, datatype, shape, data.
fn tensor_json(tensor: &Tensor) -> anyhow::Result<serde_json::Value> {
    tensor
        .check()
        .with_context(|| format!("tensor {:?} of the sample", tensor.name))?;
    let size = tensor.dtype.size();
    let values: Vec<serde_json::Value> = tensor
        .data
        .chunks_exact(size)
        .map(|chunk| {
            let mut bytes = [0u8; 8];
            bytes[..size].copy_from_slice(chunk);
            match tensor.dtype {
                DType::F32 => {
                    serde_json::json!(f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
                }
                DType::F64 => serde_json::json!(f64::from_le_bytes(bytes)),
                DType::I32 => {
                    serde_json::json!(i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
                }
                DType::I64 => serde_json::json!(i64::from_le_bytes(bytes)),
                DType::U8 => serde_json::json!(bytes[0]),
            }
        })
        .collect();
    Ok(serde_json::json!({
        "name": tensor.name,
        "datatype": tensor.dtype.as_str(),
        "shape": tensor.shape,
        "data": values,
    }))
}
