//! The agent's command line.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use outpost_protocol::name::Label;
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
    /// Generate this device's key, enroll with the hub, and store the identity.
    Enroll(EnrollArgs),
    /// Run the agent service.
    Run(RunArgs),
    /// Show the active and previous model, pending state, last check-in and telemetry queue.
    Status(StatusArgs),
    /// Check, offline, whether this device would accept signed documents, and say why not.
    Verify(VerifyArgs),
    /// Load the configured ONNX Runtime library, run a small model on it, and say whether it
    /// serves: what `run` does in a child process before it loads the library itself.
    ProbeRuntime(RunArgs),
}

#[derive(Debug, clap::Args)]
pub struct EnrollArgs {
    /// The hub to enroll with, e.g. https://hub.example.com:8443; given several times (replicas
    /// of one hub), each is tried in turn. Without it, the config's `hub_url` or `hub_urls`.
    #[arg(long)]
    pub hub: Vec<String>,
    /// The enrollment token from `outpost-hub token create`.
    #[arg(long, env = "OUTPOST_ENROLL_TOKEN")]
    pub token: String,
    #[arg(long, default_value = "/etc/outpost/agent.toml")]
    pub config: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[arg(long, default_value = "/etc/outpost/agent.toml")]
    pub config: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[arg(long, default_value = "/etc/outpost/agent.toml")]
    pub config: PathBuf,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
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
    /// Highest version of this model the device committed under an earlier plan: a plan's
    /// fallback below it is refused.
    #[arg(long)]
    pub committed: Option<u64>,
    /// The device's own labels, as its agent.toml `labels` holds them (`k=v,k=v`): a plan whose
    /// signed selector is not among them is refused. None: only plans for every device pass.
    #[arg(long, value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<Label>,
}

fn parse_label(text: &str) -> Result<Label, String> {
    Label::parse(text).map_err(|error| format!("{text:?}: {error}"))
}

impl Command {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Enroll(args) => {
                let config = crate::config::load(&args.config)?;
                let id = crate::service::enroll(&config, &args.hub, &args.token)?;
                println!("enrolled as device {id}");
                Ok(())
            }
            Command::Run(args) => run_service(crate::config::load(&args.config)?),
            Command::Status(args) => args.run(),
            Command::Verify(args) => args.run(),
            Command::ProbeRuntime(args) => {
                crate::runtime::probe(&crate::config::load(&args.config)?)
            }
        }
    }
}

/// `outpost-agent run`: binds the inference API's address and serves until SIGTERM or SIGINT.
fn run_service(config: crate::config::Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listen = config.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the inference API to {listen}"))?;
        crate::service::run(config, listener, outpost_serve::shutdown_signal()).await
    })
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
            committed_before: self.committed,
            labels: &self.labels,
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

impl StatusArgs {
    fn run(self) -> anyhow::Result<()> {
        let config = crate::config::load(&self.config)?;
        let path = crate::sync::status_path(&config);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let enrolled = crate::service::load_identity(&config.data_dir).is_ok();
                bail!(
                    "the agent has not run yet ({} is missing); enrolled: {}",
                    path.display(),
                    if enrolled { "yes" } else { "no" }
                );
            }
            Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
        };
        if self.json {
            println!("{}", text.trim_end());
            return Ok(());
        }
        let status: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let field = |key: &str| match &status[key] {
            serde_json::Value::Null => "-".to_owned(),
            serde_json::Value::String(text) => text.clone(),
            serde_json::Value::Array(items) if items.is_empty() => "-".to_owned(),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|item| item.as_str().unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
                .join(", "),
            other => other.to_string(),
        };
        let models = status["models"].as_array().cloned().unwrap_or_default();
        let mut rows = vec![("device", "device_id"), ("hub", "hub_url")];
        if models.len() <= 1 {
            rows.extend([
                ("active", "active"),
                ("previous", "previous"),
                ("pending", "pending"),
            ]);
        }
        for (label, key) in rows {
            println!("{label:<20} {}", field(key));
        }
        if models.len() > 1 {
            // One line per model: its active version, then what else it has under way.
            for model in &models {
                let text = |key: &str| model[key].as_str().map(str::to_owned);
                let mut line = text("active").unwrap_or_else(|| "-".to_owned());
                for (label, key) in [("pending", "pending"), ("shadow", "shadow")] {
                    if let Some(value) = text(key) {
                        line.push_str(&format!(", {label} {value}"));
                    }
                }
                if let Some(previous) = model["previous"].as_array().filter(|list| !list.is_empty())
                {
                    let previous: Vec<&str> =
                        previous.iter().filter_map(|item| item.as_str()).collect();
                    line.push_str(&format!(", previous {}", previous.join(" ")));
                }
                if let Some(plan) = model["plan_sequence"].as_u64() {
                    line.push_str(&format!(", plan {plan}"));
                }
                let name = format!("model {}", model["name"].as_str().unwrap_or_default());
                println!("{name:<20} {line}");
            }
        }
        for (label, key) in [
            ("last check-in", "last_checkin"),
            ("last error", "last_error"),
            ("root version", "root_version"),
            ("plan", "plan_sequence"),
            ("queue bytes", "queue_bytes"),
            ("queued windows", "queued_windows"),
            ("dropped records", "dropped_records"),
            ("undelivered reports", "undelivered_reports"),
        ] {
            println!("{label:<20} {}", field(key));
        }
        Ok(())
    }
}
