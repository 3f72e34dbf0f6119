//! `outpost-hub plan`: sign rollout plans.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};
use outpost_protocol::trust::{
    BreachAction, GatePolicy, ManifestBody, ManifestRef, PlanBody, ShadowStage, Signed,
};
use outpost_protocol::{sha256, Label};

use super::table;
use super::{parse_duration, read_frame, sign_to_file, SigningKeys};
use crate::unix_now;

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Write a signed rollout plan naming a target and an optional fallback manifest.
    Sign(SignArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnBreach {
    Pause,
    Rollback,
}

/// Gate limits, signed into the plan so that a hub cannot loosen them.
#[derive(Debug, clap::Args)]
pub struct GateArgs {
    /// Cumulative stage percentages.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50,100")]
    pub stages: Vec<u8>,
    /// Only devices with all of these labels take part (k=v,...).
    #[arg(long, value_delimiter = ',', value_parser = parse_label)]
    pub selector: Vec<Label>,
    /// How long each stage must hold its gates before it advances.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub bake: Duration,
    /// A device silent for this long counts as failed.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    pub device_timeout: Duration,
    #[arg(long, default_value_t = 5.0)]
    pub max_failure_pct: f64,
    /// Largest fraction of inferences that may error.
    #[arg(long, default_value_t = 0.05)]
    pub max_error_rate: f64,
    /// Largest p95 latency increase over devices on the fallback, in percent.
    #[arg(long, default_value_t = 50.0)]
    pub max_p95_regression_pct: f64,
    /// Largest drift (PSI) any feature may show on the target.
    #[arg(long)]
    pub max_drift_psi: Option<f64>,
    #[arg(long, value_enum, default_value = "pause")]
    pub on_breach: OnBreach,
    /// Wait for `rollout advance` instead of advancing once a stage has baked.
    #[arg(long)]
    pub manual_advance: bool,
    /// Start with a shadow stage over this percentage of the fleet: its devices keep serving the
    /// fallback and run the target beside it on their live inputs, comparing both answers.
    #[arg(long, value_name = "PERCENT")]
    pub shadow_pct: Option<u8>,
    /// Fewest comparisons the shadow stage needs before it may be left [default: 1000].
    #[arg(long, requires = "shadow_pct")]
    pub shadow_min_comparisons: Option<u64>,
    /// Smallest share (0 to 1) of comparisons whose top-1 class agrees [default: 0.95].
    #[arg(long, requires = "shadow_pct")]
    pub shadow_min_top1_agreement: Option<f64>,
    /// Largest mean absolute difference between the two models' outputs [default: 0.05].
    #[arg(long, requires = "shadow_pct")]
    pub shadow_max_mean_abs_diff: Option<f64>,
}

impl GateArgs {
    pub fn policy(&self) -> GatePolicy {
        GatePolicy {
            bake_secs: self.bake.as_secs(),
            device_timeout_secs: self.device_timeout.as_secs(),
            max_failure_pct: self.max_failure_pct,
            max_error_rate: self.max_error_rate,
            max_p95_regression_pct: self.max_p95_regression_pct,
            max_drift_psi: self.max_drift_psi,
            on_breach: match self.on_breach {
                OnBreach::Pause => BreachAction::Pause,
                OnBreach::Rollback => BreachAction::Rollback,
            },
            auto_advance: !self.manual_advance,
        }
    }

    /// The shadow stage, when `--shadow-pct` asks for one.
    pub fn shadow(&self) -> Option<ShadowStage> {
        Some(ShadowStage {
            percent: self.shadow_pct?,
            min_comparisons: self.shadow_min_comparisons.unwrap_or(1000),
            min_top1_agreement: self.shadow_min_top1_agreement.unwrap_or(0.95),
            max_mean_abs_diff: self.shadow_max_mean_abs_diff.unwrap_or(0.05),
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// Plan sequence; must be higher than every plan signed before.
    #[arg(long)]
    pub sequence: u64,
    /// The signed manifest to roll out.
    #[arg(long)]
    pub target: PathBuf,
    /// The signed manifest devices return to on rollback.
    #[arg(long)]
    pub fallback: Option<PathBuf>,
    #[command(flatten)]
    pub gates: GateArgs,
    /// How long the plan stays valid.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub expires: Duration,
    #[command(flatten)]
    pub signing: SigningKeys,
    /// Where to write the signed plan.
    #[arg(long)]
    pub out: PathBuf,
}

impl PlanCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            PlanCommand::Sign(args) => {
                let keys = args.signing.load()?;
                let target = manifest_ref(&args.target)?;
                let fallback = args
                    .fallback
                    .as_ref()
                    .map(|path| manifest_ref(path))
                    .transpose()?;
                let body = build_plan(
                    args.sequence,
                    target.clone(),
                    fallback.clone(),
                    &args.gates,
                    args.expires,
                );
                outlives_no_manifest(&body, &target, fallback.as_ref())?;
                sign_to_file(&body, &keys, &args.out)?;
                println!("wrote plan {} to {}", body.sequence, args.out.display());
                Ok(())
            }
        }
    }
}

/// The plan body `plan sign` and `rollout create` sign: valid from now for `valid_for`.
pub fn build_plan(
    sequence: u64,
    target: Named,
    fallback: Option<Named>,
    gates: &GateArgs,
    valid_for: Duration,
) -> PlanBody {
    let created = unix_now();
    PlanBody {
        sequence,
        created,
        expires: created.saturating_add(valid_for.as_secs()),
        target: target.reference,
        fallback: fallback.map(|fallback| fallback.reference),
        stages: gates.stages.clone(),
        selector: gates.selector.clone(),
        gates: gates.policy(),
        shadow: gates.shadow(),
    }
}

/// A manifest a plan names, and when it expires.
#[derive(Debug, Clone)]
pub struct Named {
    pub reference: ManifestRef,
    pub expires: u64,
}

/// Refers to a signed manifest file by the hash of its exact bytes.
pub fn manifest_ref(path: &Path) -> anyhow::Result<Named> {
    let (bytes, signed) = read_frame::<Signed<ManifestBody>>(path)?;
    let body = signed
        .decode_unverified()
        .with_context(|| format!("reading manifest in {}", path.display()))?;
    Ok(Named {
        reference: ManifestRef {
            name: body.name,
            version: body.version,
            manifest_sha256: sha256(&bytes),
        },
        expires: body.expires,
    })
}

/// Refuses to sign a plan that outlives its target or fallback manifest: devices refuse an
/// expired manifest, so once the fallback expired a rollback would fail on every device (and a
/// target, the rollout), while the plan still looked valid.
pub fn outlives_no_manifest(
    plan: &PlanBody,
    target: &Named,
    fallback: Option<&Named>,
) -> anyhow::Result<()> {
    let named = std::iter::once(("target", target)).chain(fallback.map(|f| ("fallback", f)));
    for (slot, manifest) in named {
        if manifest.expires < plan.expires {
            let reference = &manifest.reference;
            bail!(
                "the {slot} {}@{} expires at {}, before the plan would ({}): devices refuse an \
                 expired manifest, so after then {} would fail on every device. Give the plan \
                 an --expires of at most {}s, or sign {}@{} again with a later --expires",
                reference.name,
                reference.version,
                table::time(manifest.expires),
                table::time(plan.expires),
                if slot == "fallback" {
                    "a rollback"
                } else {
                    "the rollout"
                },
                manifest.expires.saturating_sub(plan.created),
                reference.name,
                reference.version,
            );
        }
    }
    Ok(())
}

pub fn parse_label(text: &str) -> Result<Label, String> {
    Label::parse(text).map_err(|error| format!("label {text:?}: {error} (expected key=value)"))
}
