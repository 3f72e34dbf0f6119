//! `outpost-hub rollout`: start rollouts from models a hub holds, watch them and steer them, and
//! retire a model from devices.
//!
//! `rollout create` signs the plan here, with the operator's keys, and takes nothing from the hub
//! on trust: the manifests it names are fetched and verified against the operator's own root
//! before their hashes go into the plan, and the signed plan is checked against that root before
//! it is uploaded. `rollout retire` signs a retirement here the same way. Plans and retirements
//! share one sequence, so each takes the one above the highest of both the hub holds.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use outpost_protocol::trust::{RetireBody, RootBody, Signed};
use outpost_protocol::{Label, ModelName, TimeFloor, VerifiedRoot};

use crate::api::{Decision, GateFigure, RetirementInfo, RolloutInfo};
use crate::client::{path_segment, AdminClient};
use crate::unix_now;
use outpost_model::fsutil;

use super::connection::HubArgs;
use super::device::model_ref;
use super::plan::{build_plan, outlives_no_manifest, parse_label, GateArgs, Named};
use super::table::{self, fields, OutputArgs, Table};
use super::{parse_duration, read_frame, sign_document, SigningKeys};

/// Largest signed manifest accepted from a hub; real ones are a few KiB.
const MAX_MANIFEST: u64 = 64 * 1024;
/// Width of a stage's progress bar.
const BAR_WIDTH: usize = 20;

// Parsed once per process, so the size of the `Create` variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Sign a rollout plan for a model version the hub holds and start it (operator).
    Create(CreateArgs),
    /// List rollouts, newest last.
    List(ListArgs),
    /// Show a rollout's stages, gate figures and decisions.
    Status(SeqArgs),
    /// Stop a rollout where it is.
    Pause(SeqArgs),
    /// Let a paused rollout go on.
    Resume(SeqArgs),
    /// Move a rollout to its next stage now.
    Advance(SeqArgs),
    /// Send the rollout's devices back to its fallback.
    Rollback(SeqArgs),
    /// Sign a retirement of a model and hand it to the hub (operator): at their next check-in,
    /// the devices it selects stop serving the model and remove its versions; agents of earlier
    /// releases, which run one model, keep it. Refused while a rollout of the model is active or
    /// paused; a later rollout of the model brings it back.
    Retire(RetireArgs),
    /// List retirements, newest last.
    Retirements(ListArgs),
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Model name.
    #[arg(long)]
    pub model: String,
    /// Version to roll out.
    #[arg(long)]
    pub version: u64,
    /// Version of the same model devices return to on rollback.
    #[arg(long)]
    pub fallback: Option<u64>,
    /// The signed root you trust; the hub's manifests are verified against it.
    #[arg(long)]
    pub root: PathBuf,
    #[command(flatten)]
    pub gates: GateArgs,
    /// How long the plan stays valid.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub expires: Duration,
    #[command(flatten)]
    pub signing: SigningKeys,
    /// Also write the signed plan here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct RetireArgs {
    /// Model name to retire.
    #[arg(long)]
    pub model: String,
    /// Only devices with all of these labels retire the model (k=v,...); without it, every
    /// device.
    #[arg(long, value_delimiter = ',', value_parser = parse_label)]
    pub selector: Vec<Label>,
    /// The signed root you trust; the signed retirement is checked against it before upload.
    #[arg(long)]
    pub root: PathBuf,
    /// How long devices accept the retirement.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub expires: Duration,
    #[command(flatten)]
    pub signing: SigningKeys,
    /// Also write the signed retirement here.
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
pub struct SeqArgs {
    /// The rollout's plan sequence number.
    pub sequence: u64,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

impl RolloutCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            RolloutCommand::Create(args) => args.run(),
            RolloutCommand::List(args) => {
                let client = args.hub.connect()?;
                let rollouts: Vec<RolloutInfo> = client.get_json("/rollouts")?;
                args.output
                    .print(&rollouts, |rollouts| render_list(rollouts))
            }
            RolloutCommand::Status(args) => {
                let client = args.hub.connect()?;
                let rollout: RolloutInfo =
                    client.get_json(&format!("/rollouts/{}", args.sequence))?;
                args.output
                    .print(&rollout, |rollout| render_status(rollout, unix_now()))
            }
            RolloutCommand::Pause(args) => act(args, "pause"),
            RolloutCommand::Resume(args) => act(args, "resume"),
            RolloutCommand::Advance(args) => act(args, "advance"),
            RolloutCommand::Rollback(args) => act(args, "rollback"),
            RolloutCommand::Retire(args) => args.run(),
            RolloutCommand::Retirements(args) => {
                let client = args.hub.connect()?;
                let retirements = retirements_of(&client)?.with_context(|| {
                    format!(
                        "{} keeps no retirements (it answers 404): it is older than this release",
                        client.base_url()
                    )
                })?;
                args.output
                    .print(&retirements, |retirements| render_retirements(retirements))
            }
        }
    }
}

/// `POST /rollouts/{sequence}/{action}`, then shows where the rollout stands.
fn act(args: SeqArgs, action: &str) -> anyhow::Result<()> {
    let client = args.hub.connect()?;
    let rollout: RolloutInfo = client.post_json(
        &format!("/rollouts/{}/{action}", args.sequence),
        &serde_json::json!({}),
    )?;
    args.output
        .print(&rollout, |rollout| render_status(rollout, unix_now()))
}

impl CreateArgs {
    fn run(self) -> anyhow::Result<()> {
        let name =
            ModelName::new(&self.model).with_context(|| format!("--model {:?}", self.model))?;
        if self.fallback == Some(self.version) {
            bail!(
                "--fallback {} is the version being rolled out",
                self.version
            );
        }
        let keys = self.signing.load()?;
        let (root_bytes, _) = read_frame::<Signed<RootBody>>(&self.root)?;
        let root = VerifiedRoot::load_trusted(&root_bytes)
            .with_context(|| format!("verifying root {}", self.root.display()))?;
        let floor = TimeFloor {
            wall_clock: unix_now(),
            ..TimeFloor::default()
        };

        let client = self.hub.connect()?;
        let target = fetch_manifest(&client, &root, &floor, &name, self.version)?;
        let fallback = self
            .fallback
            .map(|version| fetch_manifest(&client, &root, &floor, &name, version))
            .transpose()?;
        let rollouts: Vec<RolloutInfo> = client.get_json("/rollouts")?;
        // A hub older than retirements holds none.
        let retirements = retirements_of(&client)?.unwrap_or_default();
        let sequence = next_sequence(&rollouts, &retirements)?;

        let body = build_plan(
            sequence,
            target.clone(),
            fallback.clone(),
            &self.gates,
            self.expires,
        );
        outlives_no_manifest(&body, &target, fallback.as_ref())?;
        let bytes = sign_document(&body, &keys)?;
        if let Some(out) = &self.out {
            fsutil::write_atomic(out, &bytes, 0o644)?;
        }
        // Devices would refuse a plan short of the root's threshold, or one with bad stages; the
        // hub may not notice, so check here before anything is uploaded.
        root.verify_plan(&bytes, &floor, None)
            .context("the signed plan would be refused by devices")?;
        let rollout: RolloutInfo = client.post_bytes("/rollouts", &bytes)?;
        self.output
            .print(&rollout, |rollout| render_status(rollout, unix_now()))
    }
}

impl RetireArgs {
    fn run(self) -> anyhow::Result<()> {
        let name =
            ModelName::new(&self.model).with_context(|| format!("--model {:?}", self.model))?;
        let keys = self.signing.load()?;
        let (root_bytes, _) = read_frame::<Signed<RootBody>>(&self.root)?;
        let root = VerifiedRoot::load_trusted(&root_bytes)
            .with_context(|| format!("verifying root {}", self.root.display()))?;
        let floor = TimeFloor {
            wall_clock: unix_now(),
            ..TimeFloor::default()
        };

        let client = self.hub.connect()?;
        let rollouts: Vec<RolloutInfo> = client.get_json("/rollouts")?;
        let retirements = retirements_of(&client)?.with_context(|| {
            format!(
                "{} keeps no retirements (it answers 404): upgrade it before retiring a model",
                client.base_url()
            )
        })?;
        let sequence = next_sequence(&rollouts, &retirements)?;
        let created = unix_now();
        let body = RetireBody {
            sequence,
            created,
            expires: created.saturating_add(self.expires.as_secs()),
            model: name.as_str().to_owned(),
            selector: self.selector.clone(),
        };
        let bytes = sign_document(&body, &keys)?;
        if let Some(out) = &self.out {
            fsutil::write_atomic(out, &bytes, 0o644)?;
        }
        // Devices would refuse a retirement short of the root's threshold; the hub checks too,
        // but check here before anything is uploaded.
        root.verify_retire(&bytes, &floor, None)
            .context("the signed retirement would be refused by devices")?;
        let retirement: RetirementInfo = client.post_bytes("/retirements", &bytes)?;
        self.output.print(&retirement, render_retirement)
    }
}

/// `GET /retirements`, or `None` from a hub older than retirements (it answers 404).
fn retirements_of(client: &AdminClient) -> anyhow::Result<Option<Vec<RetirementInfo>>> {
    client.get_json_opt("/retirements")
}

/// Fetches `name@version`'s signed manifest and verifies it against the operator's root: the hub
/// could serve any bytes, and the plan pins whatever hash is taken here.
fn fetch_manifest(
    client: &AdminClient,
    root: &VerifiedRoot,
    floor: &TimeFloor,
    name: &ModelName,
    version: u64,
) -> anyhow::Result<Named> {
    let bytes = client.get_bytes(
        &format!("/models/{}/{version}/manifest", path_segment(name.as_str())),
        MAX_MANIFEST,
    )?;
    let manifest = root
        .verify_manifest(&bytes, floor, None)
        .with_context(|| format!("the hub's manifest of {name}@{version} fails verification"))?;
    if manifest.name() != name || manifest.version() != version {
        bail!(
            "asked the hub for {name}@{version}, it served a manifest of {}@{}",
            manifest.name(),
            manifest.version()
        );
    }
    Ok(Named {
        reference: manifest.reference(),
        expires: manifest.body().expires,
    })
}

/// One past the highest sequence the hub knows, of rollouts and retirements alike (they share
/// one sequence), or 1 for the first.
pub fn next_sequence(
    rollouts: &[RolloutInfo],
    retirements: &[RetirementInfo],
) -> anyhow::Result<u64> {
    rollouts
        .iter()
        .map(|rollout| rollout.sequence)
        .chain(retirements.iter().map(|retirement| retirement.sequence))
        .max()
        .unwrap_or(0)
        .checked_add(1)
        .context("the hub reports a rollout or retirement at the highest possible sequence")
}

fn selector_text(selector: &[String]) -> String {
    if selector.is_empty() {
        "all devices".to_owned()
    } else {
        selector.join(",")
    }
}

fn render_retirements(retirements: &[RetirementInfo]) -> String {
    let mut out = Table::new(&["SEQ", "MODEL", "SELECTOR", "CREATED", "EXPIRES", "BY"]);
    for retirement in retirements {
        out.row(vec![
            retirement.sequence.to_string(),
            retirement.model.clone(),
            selector_text(&retirement.selector),
            table::time(retirement.created),
            table::time(retirement.expires),
            retirement.by.clone(),
        ]);
    }
    out.render()
}

/// What `rollout retire` retired, and what devices do about it.
fn render_retirement(retirement: &RetirementInfo) -> String {
    let mut text = fields(&[
        ("retirement", retirement.sequence.to_string()),
        ("model", retirement.model.clone()),
        ("selector", selector_text(&retirement.selector)),
        ("created", table::time(retirement.created)),
        ("expires", table::time(retirement.expires)),
    ]);
    text.push_str(&format!(
        "\nAt their next check-in, the devices it selects stop serving {} and remove its \
         versions.\nAgents of earlier releases, which run one model, keep it. A later `rollout \
         create` of {} brings it back.\n",
        table::clean(&retirement.model),
        table::clean(&retirement.model),
    ));
    text
}

fn render_list(rollouts: &[RolloutInfo]) -> String {
    let mut out = Table::new(&[
        "SEQ", "STATE", "TARGET", "FALLBACK", "STAGE", "SELECTOR", "CREATED",
    ]);
    for rollout in rollouts {
        out.row(vec![
            rollout.sequence.to_string(),
            rollout.state.as_str().to_owned(),
            model_ref(&Some(rollout.target.clone())),
            model_ref(&rollout.fallback),
            stage_position(rollout),
            selector(rollout),
            table::time(rollout.created),
        ]);
    }
    out.render()
}

fn stage_position(rollout: &RolloutInfo) -> String {
    let percent = rollout
        .stages
        .get(rollout.stage_index)
        .map_or_else(String::new, |stage| {
            let shadow = if stage.shadow { "shadow " } else { "" };
            format!(" ({shadow}{}%)", stage.percent)
        });
    format!(
        "{}/{}{percent}",
        rollout.stage_index.saturating_add(1),
        rollout.stages.len()
    )
}

fn selector(rollout: &RolloutInfo) -> String {
    selector_text(&rollout.selector)
}

/// The full picture of one rollout: where it stands, each stage's devices, the gates and the
/// decisions taken so far.
pub fn render_status(rollout: &RolloutInfo, now: u64) -> String {
    let mut text = fields(&[
        ("rollout", rollout.sequence.to_string()),
        ("state", rollout.state.as_str().to_owned()),
        ("target", model_ref(&Some(rollout.target.clone()))),
        ("fallback", model_ref(&rollout.fallback)),
        ("selector", selector(rollout)),
        ("stage", stage_position(rollout)),
        (
            "stage started",
            format!(
                "{} ({})",
                table::time(rollout.stage_started_at),
                table::ago(rollout.stage_started_at, now)
            ),
        ),
        ("created", table::time(rollout.created)),
    ]);

    let mut stages = Table::new(&[
        "",
        "STAGE",
        "PERCENT",
        "DEVICES",
        "SUCCEEDED",
        "FAILED",
        "SILENT",
        "PENDING",
        "SKIPPED",
        "PROGRESS",
    ]);
    for (index, stage) in rollout.stages.iter().enumerate() {
        let done = stage.succeeded;
        let percent_done = if stage.devices == 0 {
            0
        } else {
            u128::from(done.min(stage.devices)) * 100 / u128::from(stage.devices)
        };
        stages.row(vec![
            if index == rollout.stage_index {
                ">"
            } else {
                ""
            }
            .to_owned(),
            if stage.shadow {
                "shadow".to_owned()
            } else {
                (index + 1).to_string()
            },
            format!("{}%", stage.percent),
            stage.devices.to_string(),
            stage.succeeded.to_string(),
            stage.failed.to_string(),
            stage.silent.to_string(),
            stage.pending.to_string(),
            stage.skipped.to_string(),
            format!(
                "{} {percent_done}%",
                table::bar(done, stage.devices, BAR_WIDTH)
            ),
        ]);
    }
    text.push('\n');
    text.push_str(&stages.render());

    if !rollout.gates.is_empty() {
        let mut gates = Table::new(&["GATE", "VALUE", "LIMIT", "STATUS", "DETAIL"]);
        for figure in &rollout.gates {
            gates.row(vec![
                figure.gate.clone(),
                figure.value.map_or_else(|| "-".to_owned(), table::number),
                table::number(figure.limit),
                gate_status(figure).to_owned(),
                figure.detail.clone(),
            ]);
        }
        text.push('\n');
        text.push_str(&gates.render());
    }

    if !rollout.decisions.is_empty() {
        let mut decisions = Table::new(&["AT", "ACTION", "BY", "STAGE", "REASON", "FIGURES"]);
        for decision in &rollout.decisions {
            decisions.row(decision_row(decision));
        }
        text.push('\n');
        text.push_str(&decisions.render());
    }
    text
}

fn gate_status(figure: &GateFigure) -> &'static str {
    match (figure.breached, figure.value) {
        (true, _) => "BREACHED",
        (false, None) => "no data",
        (false, Some(_)) => "ok",
    }
}

fn decision_row(decision: &Decision) -> Vec<String> {
    let figures = decision
        .figures
        .iter()
        .map(|figure| {
            format!(
                "{} {} (limit {}{})",
                figure.gate,
                figure.value.map_or_else(|| "-".to_owned(), table::number),
                table::number(figure.limit),
                if figure.breached { ", breached" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    vec![
        table::time(decision.at),
        decision.action.clone(),
        decision.by.clone(),
        (decision.stage_index + 1).to_string(),
        decision.reason.clone(),
        figures,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ModelRef, RolloutState, StageProgress};

    fn rollout(sequence: u64) -> RolloutInfo {
        RolloutInfo {
            sequence,
            target: ModelRef {
                name: "iris".into(),
                version: 4,
            },
            fallback: Some(ModelRef {
                name: "iris".into(),
                version: 3,
            }),
            selector: vec!["site=a".into()],
            state: RolloutState::Paused,
            stage_index: 1,
            stage_started_at: 700,
            stages: vec![
                StageProgress {
                    percent: 10,
                    shadow: false,
                    devices: 4,
                    succeeded: 4,
                    failed: 0,
                    silent: 0,
                    pending: 0,
                    skipped: 0,
                },
                StageProgress {
                    percent: 100,
                    shadow: false,
                    devices: 40,
                    succeeded: 10,
                    failed: 3,
                    silent: 1,
                    pending: 24,
                    skipped: 2,
                },
            ],
            gates: vec![
                GateFigure {
                    gate: "failure_pct".into(),
                    value: Some(7.5),
                    limit: 5.0,
                    breached: true,
                    detail: "3 of 40 devices".into(),
                },
                GateFigure {
                    gate: "drift_psi".into(),
                    value: None,
                    limit: 0.2,
                    breached: false,
                    detail: String::new(),
                },
            ],
            decisions: vec![Decision {
                at: 900,
                action: "pause".into(),
                by: "engine".into(),
                stage_index: 1,
                reason: "failure_pct breached".into(),
                figures: vec![GateFigure {
                    gate: "failure_pct".into(),
                    value: Some(7.5),
                    limit: 5.0,
                    breached: true,
                    detail: "3 of 40 devices".into(),
                }],
            }],
            created: 0,
        }
    }

    fn retirement(sequence: u64) -> RetirementInfo {
        RetirementInfo {
            sequence,
            model: "iris".into(),
            selector: Vec::new(),
            created: 0,
            expires: 86_400,
            stored_at: 10,
            by: "ops".into(),
        }
    }

    #[test]
    fn next_sequence_is_one_past_the_highest() {
        assert_eq!(next_sequence(&[], &[]).unwrap(), 1);
        assert_eq!(
            next_sequence(&[rollout(3), rollout(7), rollout(5)], &[]).unwrap(),
            8
        );
        assert!(next_sequence(&[rollout(u64::MAX)], &[]).is_err());
    }

    /// Issue 20: plans and retirements share one sequence, so a rollout after a retirement (and
    /// a retirement after one) must not reuse the other's sequence: devices refuse a second
    /// document at a sequence they hold.
    #[test]
    fn next_sequence_counts_retirements() {
        assert_eq!(next_sequence(&[], &[retirement(4)]).unwrap(), 5);
        assert_eq!(
            next_sequence(&[rollout(3), rollout(7)], &[retirement(9), retirement(8)]).unwrap(),
            10
        );
        assert_eq!(next_sequence(&[rollout(12)], &[retirement(9)]).unwrap(), 13);
        assert!(next_sequence(&[], &[retirement(u64::MAX)]).is_err());
    }

    #[test]
    fn retirements_show_model_selector_and_times() {
        let mut selected = retirement(9);
        selected.model = "vad".into();
        selected.selector = vec!["site=a".into(), "tier=b".into()];
        let list = render_retirements(&[retirement(4), selected.clone()]);
        assert_eq!(
            list,
            "SEQ  MODEL  SELECTOR       CREATED               EXPIRES               BY\n\
             4    iris   all devices    1970-01-01T00:00:00Z  1970-01-02T00:00:00Z  ops\n\
             9    vad    site=a,tier=b  1970-01-01T00:00:00Z  1970-01-02T00:00:00Z  ops\n"
        );
        let shown = render_retirement(&selected);
        assert!(
            shown.starts_with("retirement  9\nmodel       vad\n"),
            "{shown}"
        );
        assert!(shown.contains("selector    site=a,tier=b\n"), "{shown}");
        assert!(
            shown.contains("stop serving vad and remove its versions"),
            "{shown}"
        );
    }

    #[test]
    fn status_shows_stages_gates_and_decisions() {
        let text = render_status(&rollout(3), 1000);
        assert!(text.contains("state          paused\n"), "{text}");
        assert!(text.contains("stage          2/2 (100%)\n"), "{text}");
        assert!(text.contains("(5m ago)"), "{text}");
        assert!(
            text.contains("   1      10%      4        4          0       0       0        0        [####################] 100%\n"),
            "{text}"
        );
        assert!(
            text.contains(">  2      100%     40       10         3       1       24       2        [#####---------------] 25%\n"),
            "{text}"
        );
        assert!(
            text.contains("failure_pct  7.5    5      BREACHED  3 of 40 devices\n"),
            "{text}"
        );
        assert!(
            text.contains("drift_psi    -      0.2    no data\n"),
            "{text}"
        );
        assert!(
            text.contains("pause   engine  2      failure_pct breached  failure_pct 7.5 (limit 5, breached)\n"),
            "{text}"
        );
    }
}
