//! `outpost-hub device`: see the fleet, relabel devices and revoke them.

use anyhow::bail;
use outpost_protocol::Label;

use crate::api::{AgentFilter, DeviceDetail, DeviceEvent, DeviceSummary, LabelChange, ModelRef};
use crate::client::path_segment;
use crate::unix_now;

use super::connection::HubArgs;
use super::plan::parse_label;
use super::table::{self, fields, OutputArgs, Table};

#[derive(Debug, clap::Subcommand)]
pub enum DeviceCommand {
    /// List devices, optionally only those carrying every label of a selector.
    List(ListArgs),
    /// Show one device and what happened to it.
    Show(ShowArgs),
    /// Set or remove labels of a device (needs an admin token).
    Label(LabelArgs),
    /// Revoke a device: the hub refuses it from now on (needs an admin token).
    Revoke(RevokeArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only devices with all of these labels (k=v,...).
    #[arg(long, value_delimiter = ',', value_parser = parse_label)]
    pub selector: Vec<Label>,
    /// Only devices whose agent version meets this condition: <0.3, >=0.2.1, =0.1.0.
    #[arg(long, value_parser = AgentFilter::parse)]
    pub agent: Option<AgentFilter>,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// Device id.
    pub id: String,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct LabelArgs {
    /// Device id.
    pub id: String,
    /// Labels to set, replacing any value of the same key (k=v,...).
    #[arg(long, value_delimiter = ',', value_parser = parse_label)]
    pub set: Vec<Label>,
    /// Label keys to remove (k,...).
    #[arg(long, value_delimiter = ',', value_parser = parse_label_key)]
    pub remove: Vec<String>,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// Device id.
    pub id: String,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

impl DeviceCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            DeviceCommand::List(args) => {
                let client = args.hub.connect()?;
                let devices: Vec<DeviceSummary> =
                    client.get_json(&list_path(&args.selector, args.agent.as_ref()))?;
                args.output
                    .print(&devices, |devices| render_list(devices, unix_now()))
            }
            DeviceCommand::Show(args) => {
                let client = args.hub.connect()?;
                let detail: DeviceDetail =
                    client.get_json(&format!("/devices/{}", path_segment(&args.id)))?;
                args.output
                    .print(&detail, |detail| render_detail(detail, unix_now()))
            }
            DeviceCommand::Label(args) => {
                if args.set.is_empty() && args.remove.is_empty() {
                    bail!("give labels to change with --set k=v,... and/or --remove k,...");
                }
                if let Some(label) = args
                    .set
                    .iter()
                    .find(|label| args.remove.contains(&label.key))
                {
                    bail!("label key {:?} is both set and removed", label.key);
                }
                let client = args.hub.connect()?;
                let change = LabelChange {
                    set: args.set.iter().map(Label::to_string).collect(),
                    remove: args.remove.clone(),
                };
                let device: DeviceSummary = client.post_json(
                    &format!("/devices/{}/labels", path_segment(&args.id)),
                    &change,
                )?;
                args.output.print(&device, |device| {
                    format!("{} labels: {}\n", device.id, device.labels.join(","))
                })
            }
            DeviceCommand::Revoke(args) => {
                let client = args.hub.connect()?;
                let device: DeviceSummary = client.post_json(
                    &format!("/devices/{}/revoke", path_segment(&args.id)),
                    &serde_json::json!({}),
                )?;
                args.output.print(&device, |device| {
                    format!("revoked {} (state {})\n", device.id, device.state)
                })
            }
        }
    }
}

/// `/devices`, with `selector=k=v,k=v` and `agent=<0.3` in its query when given.
pub fn list_path(selector: &[Label], agent: Option<&AgentFilter>) -> String {
    let mut query = Vec::new();
    if !selector.is_empty() {
        let joined = selector
            .iter()
            .map(Label::to_string)
            .collect::<Vec<_>>()
            .join(",");
        query.push(format!("selector={}", path_segment(&joined)));
    }
    if let Some(agent) = agent {
        query.push(format!("agent={}", path_segment(&agent.to_string())));
    }
    if query.is_empty() {
        "/devices".to_owned()
    } else {
        format!("/devices?{}", query.join("&"))
    }
}

/// A label key on its own, checked by the same rules as a `key=value` label's key.
pub fn parse_label_key(text: &str) -> Result<String, String> {
    Label::new(text, "x")
        .map(|label| label.key)
        .map_err(|error| format!("label key {text:?}: {error}"))
}

pub fn model_ref(model: &Option<ModelRef>) -> String {
    model.as_ref().map_or_else(
        || "-".to_owned(),
        |model| format!("{}@{}", model.name, model.version),
    )
}

/// Every model a device runs, as `name@version`, comma-separated; `-` for none.
fn models_cell(device: &DeviceSummary) -> String {
    let running = device.running();
    if running.is_empty() {
        return "-".to_owned();
    }
    running
        .iter()
        .map(|model| format!("{}@{}", model.name, model.version))
        .collect::<Vec<_>>()
        .join(",")
}

fn render_list(devices: &[DeviceSummary], now: u64) -> String {
    let mut out = Table::new(&[
        "ID",
        "STATE",
        "MODEL",
        "ARCH",
        "AGENT",
        "LAST CHECK-IN",
        "LABELS",
    ]);
    for device in devices {
        out.row(vec![
            device.id.clone(),
            device.state.clone(),
            models_cell(device),
            device.arch.clone(),
            device.agent_version.clone(),
            device
                .last_checkin
                .map_or_else(|| "never".to_owned(), |at| table::ago(at, now)),
            device.labels.join(","),
        ]);
    }
    out.render()
}

fn render_detail(detail: &DeviceDetail, now: u64) -> String {
    let device = &detail.device;
    // One line per model the device runs.
    let models: Vec<(&str, String)> = match device.running() {
        [] => vec![("model", "-".to_owned())],
        running => running
            .iter()
            .map(|model| ("model", format!("{}@{}", model.name, model.version)))
            .collect(),
    };
    let mut pairs = vec![
        ("device", device.id.clone()),
        ("state", device.state.clone()),
        (
            "revoked",
            if device.revoked { "yes" } else { "no" }.to_owned(),
        ),
        ("labels", device.labels.join(",")),
        ("arch", device.arch.clone()),
        ("agent", device.agent_version.clone()),
    ];
    pairs.extend(models);
    // One line per model of the device's latest runtime report: its runtime, and why the runtime
    // it preferred does not serve it.
    pairs.extend(device.runtimes.iter().map(|runtime| {
        let mut line = format!(
            "{}@{} {}",
            runtime.name,
            runtime.version,
            runtime.runtime_text()
        );
        if let Some(reason) = &runtime.fallback {
            line.push_str(&format!(" (fallback: {reason})"));
        }
        ("runtime", line)
    }));
    pairs.extend([
        (
            "plan",
            detail
                .plan_sequence
                .map_or_else(|| "-".to_owned(), |sequence| sequence.to_string()),
        ),
        ("enrolled", table::time(device.enrolled_at)),
        (
            "last check-in",
            device.last_checkin.map_or_else(
                || "never".to_owned(),
                |at| format!("{} ({})", table::time(at), table::ago(at, now)),
            ),
        ),
        ("public key", detail.public_key.clone()),
        ("dropped records", detail.dropped_records.to_string()),
        (
            "inferences",
            if detail.inferences.is_empty() {
                "-".to_owned()
            } else {
                detail
                    .inferences
                    .iter()
                    .map(|counts| {
                        format!(
                            "{}@{}: {} ({} errors)",
                            counts.model.name, counts.model.version, counts.count, counts.errors
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
    ]);
    let mut text = fields(&pairs);
    text.push('\n');
    text.push_str(&render_events(&detail.events));
    text
}

fn render_events(events: &[DeviceEvent]) -> String {
    let mut out = Table::new(&["AT", "EVENT", "PLAN", "MODEL", "DETAIL"]);
    for event in events {
        out.row(vec![
            table::time(event.at),
            event.kind.clone(),
            event
                .plan_sequence
                .map_or_else(|| "-".to_owned(), |sequence| sequence.to_string()),
            model_ref(&event.model),
            event.detail.clone(),
        ]);
    }
    out.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ModelRuntimeJson;

    #[test]
    fn selectors_become_one_encoded_query_value() {
        assert_eq!(list_path(&[], None), "/devices");
        let selector = vec![
            parse_label("site=berlin").unwrap(),
            parse_label("tier=canary").unwrap(),
        ];
        assert_eq!(
            list_path(&selector, None),
            "/devices?selector=site%3Dberlin%2Ctier%3Dcanary"
        );
        let agent = AgentFilter::parse("<0.3").unwrap();
        assert_eq!(list_path(&[], Some(&agent)), "/devices?agent=%3C0.3.0");
    }

    #[test]
    fn agent_filters_compare_versions() {
        let filter = |text: &str| AgentFilter::parse(text).unwrap();
        assert!(filter("<0.3").matches("0.2.9"));
        assert!(!filter("<0.3").matches("0.3.0"));
        assert!(filter("<=0.3").matches("0.3.0"));
        assert!(filter(">=0.2.1").matches("0.10.0"));
        assert!(!filter(">0.2.1").matches("0.2.1"));
        assert!(filter("0.1").matches("0.1.0"));
        assert!(filter("=0.1.0").matches("0.1.0"));
        assert!(!filter("<1").matches("not a version"));
        for bad in ["<", "<0.x", "0.1.2.3", "~0.1"] {
            assert!(
                AgentFilter::parse(bad)
                    .unwrap_err()
                    .contains("expected a comparison and a version"),
                "{bad}"
            );
        }
    }

    #[test]
    fn labels_and_keys_are_checked_locally() {
        assert_eq!(parse_label("site=a").unwrap().to_string(), "site=a");
        assert!(parse_label("site").unwrap_err().contains("key=value"));
        assert!(parse_label("site=a/b").is_err());
        assert!(parse_label("=a").is_err());
        assert_eq!(parse_label_key("site").unwrap(), "site");
        assert!(parse_label_key("").is_err());
        assert!(parse_label_key("a=b").is_err());
        assert!(parse_label_key("../x").is_err());
    }

    #[test]
    fn device_detail_shows_fields_and_events() {
        let detail = DeviceDetail {
            device: DeviceSummary {
                id: "d1".into(),
                labels: vec!["site=a".into()],
                arch: "x86_64".into(),
                agent_version: "0.1.0".into(),
                state: "steady".into(),
                active: Some(ModelRef {
                    name: "iris".into(),
                    version: 2,
                }),
                models: Vec::new(),
                enrolled_at: 0,
                last_checkin: Some(940),
                revoked: false,
                runtimes: Vec::new(),
            },
            public_key: "ab".into(),
            plan_sequence: Some(3),
            dropped_records: 0,
            inferences: Vec::new(),
            events: vec![DeviceEvent {
                at: 60,
                kind: "committed".into(),
                plan_sequence: Some(3),
                model: Some(ModelRef {
                    name: "iris".into(),
                    version: 2,
                }),
                detail: "probation passed".into(),
            }],
        };
        let text = render_detail(&detail, 1000);
        // A device the hub knows only the active model of, as a store of 0.1.0 holds it.
        assert!(
            text.contains("agent            0.1.0\nmodel            iris@2\nplan"),
            "{text}"
        );
        assert!(
            text.contains("last check-in    1970-01-01T00:15:40Z (1m ago)\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "AT                    EVENT      PLAN  MODEL   DETAIL\n\
                 1970-01-01T00:01:00Z  committed  3     iris@2  probation passed\n"
            ),
            "{text}"
        );
    }

    /// `device show`'s answer about `device`, with no plan, inferences or events.
    fn detail_of(device: DeviceSummary) -> DeviceDetail {
        DeviceDetail {
            device,
            public_key: "ab".into(),
            plan_sequence: None,
            dropped_records: 0,
            inferences: Vec::new(),
            events: Vec::new(),
        }
    }

    fn model(name: &str, version: u64) -> ModelRef {
        ModelRef {
            name: name.into(),
            version,
        }
    }

    /// Issue 20: a device running several models shows each of them, in `device show` one line
    /// per model and in `device list` all in its model column.
    #[test]
    fn every_model_a_device_runs_is_shown() {
        let summary = DeviceSummary {
            id: "d1".into(),
            labels: Vec::new(),
            arch: "x86_64".into(),
            agent_version: "0.3.0".into(),
            state: "steady".into(),
            active: Some(model("vad", 4)),
            models: vec![model("iris", 2), model("vad", 4)],
            enrolled_at: 0,
            last_checkin: None,
            revoked: false,
            runtimes: Vec::new(),
        };
        let detail = detail_of(summary.clone());
        let text = render_detail(&detail, 1000);
        assert!(
            text.contains("model            iris@2\nmodel            vad@4\n"),
            "{text}"
        );
        let list = render_list(std::slice::from_ref(&summary), 1000);
        assert!(list.contains(" iris@2,vad@4 "), "{list}");

        let idle = DeviceSummary {
            active: None,
            models: Vec::new(),
            ..summary.clone()
        };
        let idle_detail = DeviceDetail {
            device: idle.clone(),
            ..detail
        };
        let text = render_detail(&idle_detail, 1000);
        assert!(text.contains("model            -\n"), "{text}");
        let list = render_list(&[idle], 1000);
        assert!(list.contains("steady  -  "), "{list}");

        // JSON from a hub that sent no list still parses, and an empty list is left out.
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(
            serde_json::from_value::<DeviceSummary>(json.clone()).unwrap(),
            summary
        );
        let mut older = json;
        older.as_object_mut().unwrap().remove("models");
        let parsed: DeviceSummary = serde_json::from_value(older).unwrap();
        assert_eq!(parsed.running(), [model("vad", 4)]);
        let without = DeviceSummary {
            models: Vec::new(),
            ..summary
        };
        assert!(serde_json::to_value(&without)
            .unwrap()
            .get("models")
            .is_none());
    }

    /// `device show` prints one `runtime` line per model of the device's latest runtime report,
    /// with its providers and any fallback reason; without a report there is none, and the JSON
    /// leaves the field out, as hubs printed it before runtime reports.
    #[test]
    fn device_show_prints_the_runtime_of_each_model() {
        let runtime = |name: &str, runtime: &str, version: &str| ModelRuntimeJson {
            name: name.into(),
            version: 3,
            runtime: runtime.into(),
            runtime_version: version.into(),
            providers: Vec::new(),
            fallback: None,
        };
        let summary = DeviceSummary {
            id: "d1".into(),
            labels: Vec::new(),
            arch: "aarch64".into(),
            agent_version: "0.4.0".into(),
            state: "steady".into(),
            active: Some(model("demo", 3)),
            models: vec![model("demo", 3), model("kws", 3)],
            enrolled_at: 0,
            last_checkin: None,
            revoked: false,
            runtimes: vec![
                ModelRuntimeJson {
                    providers: vec!["CPUExecutionProvider".into()],
                    ..runtime("demo", "onnxruntime", "1.22.0")
                },
                ModelRuntimeJson {
                    fallback: Some("onnxruntime: library /x not found".into()),
                    ..runtime("kws", "tract", "0.23.9")
                },
            ],
        };
        let detail = detail_of(summary.clone());
        let text = render_detail(&detail, 1000);
        assert!(
            text.contains(
                "model            kws@3\n\
                 runtime          demo@3 onnxruntime 1.22.0 [CPUExecutionProvider]\n\
                 runtime          kws@3 tract 0.23.9 (fallback: onnxruntime: library /x not found)\n\
                 plan             -\n"
            ),
            "{text}"
        );
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["runtimes"][0]["runtime"], "onnxruntime");
        assert_eq!(
            json["runtimes"][1]["fallback"],
            "onnxruntime: library /x not found"
        );
        assert_eq!(
            serde_json::from_value::<DeviceSummary>(json).unwrap(),
            summary
        );

        let unreported = DeviceSummary {
            runtimes: Vec::new(),
            ..summary
        };
        let text = render_detail(&detail_of(unreported.clone()), 1000);
        assert!(!text.contains("runtime"), "{text}");
        assert!(serde_json::to_value(&unreported)
            .unwrap()
            .get("runtimes")
            .is_none());
    }
}
