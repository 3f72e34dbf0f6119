//! `outpost-hub drift`: what a hub's devices see and say compared with the reference a model
//! version was published with.
//!
//! `drift report` asks the hub to merge the drift summaries of the devices in scope (all, a label
//! group or one device) over a time range and to judge every feature and output against the
//! version's profile; it shows them most severe first, then each device's most drifted feature.

use std::time::Duration;

use clap::Subcommand;
use outpost_protocol::Label;

use crate::api::DriftReport;
use crate::client::path_segment;
use crate::unix_now;

use super::connection::HubArgs;
use super::parse_duration;
use super::plan::parse_label;
use super::table::{self, fields, OutputArgs, Table};

/// Devices listed in the text output; `--json` has all of them.
const MAX_DEVICE_ROWS: usize = 20;

#[derive(Debug, Subcommand)]
pub enum DriftCommand {
    /// Show the drift of each feature and output of a model version, most severe first.
    Report(ReportArgs),
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Model name.
    #[arg(long)]
    pub model: String,
    /// Version; by default the latest published version with a drift profile.
    #[arg(long)]
    pub version: Option<u64>,
    /// Only devices with all of these labels (k=v,...).
    #[arg(long, value_delimiter = ',', value_parser = parse_label)]
    pub selector: Vec<Label>,
    /// Only this device (its id).
    #[arg(long)]
    pub device: Option<String>,
    /// How far back to look: summaries of windows that end within this time count.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub since: Duration,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

impl DriftCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            DriftCommand::Report(args) => {
                let client = args.hub.connect()?;
                let report: DriftReport = client.get_json(&report_path(&args))?;
                args.output
                    .print(&report, |report| render_report(report, unix_now()))
            }
        }
    }
}

/// `/drift/{model}?since_secs=S[&version=V][&selector=k=v,...][&device=ID]`.
pub fn report_path(args: &ReportArgs) -> String {
    let mut path = format!(
        "/drift/{}?since_secs={}",
        path_segment(&args.model),
        args.since.as_secs()
    );
    if let Some(version) = args.version {
        path.push_str(&format!("&version={version}"));
    }
    if !args.selector.is_empty() {
        let joined = args
            .selector
            .iter()
            .map(Label::to_string)
            .collect::<Vec<_>>()
            .join(",");
        path.push_str(&format!("&selector={}", path_segment(&joined)));
    }
    if let Some(device) = &args.device {
        path.push_str(&format!("&device={}", path_segment(device)));
    }
    path
}

/// The report as text: what it covers, the features table, and the most drifted devices.
pub fn render_report(report: &DriftReport, now: u64) -> String {
    let window = match (report.window_start, report.window_end) {
        (Some(start), Some(end)) => format!("{} to {}", table::time(start), table::time(end)),
        _ => "no data".to_owned(),
    };
    let scope = match (&report.device, report.selector.is_empty()) {
        (Some(device), _) => format!("device {device}"),
        (None, true) => "all devices".to_owned(),
        (None, false) => report.selector.join(","),
    };
    let mut text = fields(&[
        ("model", format!("{}@{}", report.model, report.version)),
        ("profile", report.profile_sha256.clone()),
        ("scope", scope),
        (
            "since",
            format!(
                "{} ({})",
                table::time(report.since),
                table::ago(report.since, now)
            ),
        ),
        ("windows", window),
        ("data", data_line(report)),
    ]);
    if report.features.is_empty() {
        text.push_str("\nno drift summaries in this scope and time range\n");
        return text;
    }
    let mut features = Table::new(&[
        "FEATURE",
        "KIND",
        "METRIC",
        "VALUE",
        "THRESHOLD",
        "SIGNIFICANT",
        "STATUS",
        "N",
        "QUALITY",
    ]);
    for feature in &report.features {
        features.row(vec![
            feature.name.clone(),
            feature.kind.clone(),
            feature.metric.clone(),
            table::number(feature.value),
            table::number(feature.threshold),
            if feature.significant { "yes" } else { "no" }.to_owned(),
            feature.status.to_uppercase(),
            feature.n.to_string(),
            feature.quality.join("; "),
        ]);
    }
    text.push('\n');
    text.push_str(&features.render());

    let mut devices = Table::new(&["DEVICE", "STATUS", "FEATURE", "VALUE", "N", "LABELS"]);
    for device in report.by_device.iter().take(MAX_DEVICE_ROWS) {
        devices.row(vec![
            device.device.clone(),
            device.status.to_uppercase(),
            device.feature.clone(),
            format!("{} {}", device.metric, table::number(device.value)),
            device.n.to_string(),
            device.labels.join(","),
        ]);
    }
    text.push('\n');
    text.push_str(&devices.render());
    if report.by_device.len() > MAX_DEVICE_ROWS {
        text.push_str(&format!(
            "... and {} more devices (--json lists all)\n",
            report.by_device.len() - MAX_DEVICE_ROWS
        ));
    }
    text
}

/// How many summaries the figures merge, and from how many devices. A fleet-wide report's
/// figures come from the hourly aggregates, which outlive the devices' own rows: past the
/// telemetry retention there are summaries but no devices to count, and the line says so instead
/// of "from 0 devices".
fn data_line(report: &DriftReport) -> String {
    if report.device.is_none() && report.devices == 0 && report.summaries > 0 {
        format!(
            "{} summaries (their devices' own rows are past the hub's telemetry retention)",
            report.summaries
        )
    } else {
        format!(
            "{} summaries from {} devices",
            report.summaries, report.devices
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{DeviceDriftInfo, FeatureDriftInfo};

    fn feature(name: &str, value: f64, status: &str) -> FeatureDriftInfo {
        FeatureDriftInfo {
            name: name.into(),
            kind: "numeric".into(),
            metric: "psi".into(),
            value,
            threshold: 0.1,
            significant: status != "ok",
            status: status.into(),
            n: 400,
            psi: value,
            js: 0.0,
            hellinger: 0.0,
            chi_square: 0.0,
            ks: 0.0,
            quality: Vec::new(),
            reference_bins: vec![100, 200, 100],
            current_bins: vec![100, 200, 100],
            edges: vec![-1.0, 1.0],
            classes: Vec::new(),
        }
    }

    #[test]
    fn report_paths_encode_every_filter() {
        let args = ReportArgs {
            model: "demo".into(),
            version: Some(3),
            selector: vec![parse_label("tier=canary").unwrap()],
            device: Some("ab".into()),
            since: Duration::from_secs(3600),
            hub: HubArgs {
                hub: None,
                token: None,
                ca: None,
                cli_config: None,
            },
            output: OutputArgs { json: false },
        };
        assert_eq!(
            report_path(&args),
            "/drift/demo?since_secs=3600&version=3&selector=tier%3Dcanary&device=ab"
        );
    }

    #[test]
    fn report_lists_features_most_severe_first_and_devices() {
        let report = DriftReport {
            model: "demo".into(),
            version: 1,
            profile_sha256: "ff".into(),
            selector: vec!["tier=canary".into()],
            device: None,
            since: 0,
            until: 3600,
            window_start: Some(0),
            window_end: Some(3600),
            devices: 1,
            summaries: 2,
            features: vec![feature("x1", 2.5, "alert"), feature("x0", 0.01, "ok")],
            by_device: vec![DeviceDriftInfo {
                device: "d1".into(),
                labels: vec!["tier=canary".into()],
                summaries: 2,
                status: "alert".into(),
                feature: "x1".into(),
                metric: "psi".into(),
                value: 2.5,
                n: 400,
            }],
        };
        let text = render_report(&report, 3600);
        assert!(text.contains("scope    tier=canary\n"), "{text}");
        assert!(
            text.contains("data     2 summaries from 1 devices\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "FEATURE  KIND     METRIC  VALUE  THRESHOLD  SIGNIFICANT  STATUS  N    QUALITY\n\
                 x1       numeric  psi     2.5    0.1        yes          ALERT   400\n\
                 x0       numeric  psi     0.01   0.1        no           OK      400\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("d1      ALERT   x1       psi 2.5  400  tier=canary\n"),
            "{text}"
        );
    }

    #[test]
    fn a_report_past_the_retention_does_not_say_zero_devices() {
        let report = DriftReport {
            model: "demo".into(),
            version: 1,
            profile_sha256: "ff".into(),
            selector: Vec::new(),
            device: None,
            since: 0,
            until: 90 * 86_400,
            window_start: Some(0),
            window_end: Some(3600),
            devices: 0,
            summaries: 7,
            features: vec![feature("x1", 2.5, "alert")],
            by_device: Vec::new(),
        };
        let text = render_report(&report, 90 * 86_400);
        assert!(
            text.contains(
                "data     7 summaries (their devices' own rows are past the hub's telemetry \
                 retention)\n"
            ),
            "{text}"
        );
        assert!(!text.contains("from 0 devices"), "{text}");
    }

    #[test]
    fn an_empty_report_says_so() {
        let report = DriftReport {
            model: "demo".into(),
            version: 1,
            profile_sha256: "ff".into(),
            selector: Vec::new(),
            device: None,
            since: 0,
            until: 0,
            window_start: None,
            window_end: None,
            devices: 0,
            summaries: 0,
            features: Vec::new(),
            by_device: Vec::new(),
        };
        let text = render_report(&report, 0);
        assert!(text.contains("windows  no data\n"), "{text}");
        assert!(text.contains("no drift summaries in this scope"), "{text}");
    }
}
