//! `outpost-hub webhook`: the endpoints alert rules notify, a test message to one, and the
//! deliveries the hub gave up on (the dead-letter list).

use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::api::{CreateWebhook, CreatedWebhook, DeliveryInfo, WebhookInfo, WebhookTestResult};
use crate::client::path_segment;
use crate::unix_now;

use super::connection::HubArgs;
use super::print_stdout;
use super::table::{self, OutputArgs, Table};
use super::token::ListArgs;

/// Largest secret file read.
const MAX_SECRET_FILE: u64 = 4096;

#[derive(Debug, clap::Subcommand)]
pub enum WebhookCommand {
    /// Create an endpoint (needs an operator token); prints its signing secret once.
    Create(CreateArgs),
    /// List the endpoints (their URLs without the query, never their secrets).
    List(ListArgs),
    /// Delete an endpoint no rule notifies (needs an operator token); what is pending for it
    /// becomes dead letters.
    Delete(NameArgs),
    /// Send a test message now and show the receiver's answer; fails unless it answers 2xx
    /// (needs an operator token).
    Test(NameArgs),
    /// List the notifications given up on after their last attempt, with the last error.
    DeadLetters(ListArgs),
    /// List notifications by state: pending, delivered or dead.
    Deliveries(DeliveriesArgs),
    /// Put a dead letter back in the outbox, due now (needs an operator token).
    Retry(RetryArgs),
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The endpoint's name: letters, digits, '.', '_' and '-'.
    pub name: String,
    /// Where to POST: https, or http to a loopback host only.
    #[arg(long)]
    pub url: String,
    /// `outpost` (Outpost's JSON) or `alertmanager` (Alertmanager's webhook JSON).
    #[arg(long, default_value = "outpost")]
    pub format: String,
    /// A file holding the signing secret to use (16 to 256 printable characters); by default
    /// the hub makes one.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// A webhook or alert rule by name.
#[derive(Debug, clap::Args)]
pub struct NameArgs {
    pub name: String,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct DeliveriesArgs {
    #[arg(long, default_value = "pending", value_parser = ["pending", "delivered", "dead"])]
    pub state: String,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct RetryArgs {
    /// The dead letter's id, as `dead-letters` shows it.
    pub id: u64,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

impl WebhookCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            WebhookCommand::Create(args) => create(args),
            WebhookCommand::List(args) => {
                let client = args.hub.connect()?;
                let webhooks: Vec<WebhookInfo> = client.get_json("/webhooks")?;
                args.output.print(&webhooks, |webhooks| {
                    let mut out = Table::new(&["NAME", "FORMAT", "URL", "CREATED BY"]);
                    for webhook in webhooks {
                        out.row(vec![
                            webhook.name.clone(),
                            webhook.format.clone(),
                            webhook.url.clone(),
                            webhook.created_by.clone(),
                        ]);
                    }
                    out.render()
                })
            }
            WebhookCommand::Delete(args) => {
                let client = args.hub.connect()?;
                let deleted: WebhookInfo =
                    client.delete_json(&format!("/webhooks/{}", path_segment(&args.name)))?;
                args.output.print(&deleted, |webhook| {
                    format!("deleted webhook {}\n", webhook.name)
                })
            }
            WebhookCommand::Test(args) => test(args),
            WebhookCommand::DeadLetters(args) => list(&args.hub, args.output, "dead"),
            WebhookCommand::Deliveries(args) => list(&args.hub, args.output, &args.state),
            WebhookCommand::Retry(args) => {
                let client = args.hub.connect()?;
                let retried: Vec<DeliveryInfo> = client.post_json(
                    &format!("/webhooks/deliveries/{}/retry", args.id),
                    &serde_json::json!({}),
                )?;
                args.output.print(&retried, |_| {
                    format!("dead letter {} is back in the outbox\n", args.id)
                })
            }
        }
    }
}

fn create(args: CreateArgs) -> anyhow::Result<()> {
    let secret = match &args.secret_file {
        Some(path) => {
            let bytes = outpost_model::fsutil::read_capped(path, MAX_SECRET_FILE)?;
            let text = String::from_utf8(bytes)
                .with_context(|| format!("{} is not text", path.display()))?;
            Some(text.trim().to_owned())
        }
        None => None,
    };
    let client = args.hub.connect()?;
    let request = CreateWebhook {
        name: args.name,
        url: args.url,
        format: Some(args.format),
        secret,
    };
    let created: CreatedWebhook = client.post_json("/webhooks", &request)?;
    if args.output.json {
        return table::print_json(&created);
    }
    print_stdout(&format!(
        "created webhook {} ({}) posting to {}\n\
         its signing secret is shown only now; give it to the receiver:\n{}\n",
        created.webhook.name, created.webhook.format, created.webhook.url, created.secret
    ))
}

fn test(args: NameArgs) -> anyhow::Result<()> {
    let client = args.hub.connect()?;
    let result: WebhookTestResult = client.post_json(
        &format!("/webhooks/{}/test", path_segment(&args.name)),
        &serde_json::json!({}),
    )?;
    if args.output.json {
        table::print_json(&result)?;
    } else {
        let answer = match (&result.status, &result.error) {
            (Some(status), _) => format!(
                "webhook {} answered {status}: {}\n",
                result.webhook,
                table::clean(&result.body)
            ),
            (None, error) => format!(
                "webhook {} could not be reached: {}\n",
                result.webhook,
                table::clean(error.as_deref().unwrap_or(""))
            ),
        };
        print_stdout(&answer)?;
    }
    match result.status {
        Some(status) if (200..300).contains(&status) => Ok(()),
        Some(status) => bail!("webhook {} answered {status}, not 2xx", result.webhook),
        None => bail!("webhook {} could not be reached", result.webhook),
    }
}

fn list(hub: &HubArgs, output: OutputArgs, state: &str) -> anyhow::Result<()> {
    let client = hub.connect()?;
    let deliveries: Vec<DeliveryInfo> =
        client.get_json(&format!("/webhooks/deliveries?state={state}"))?;
    let now = unix_now();
    output.print(&deliveries, |deliveries| {
        let mut out = Table::new(&[
            "ID", "WEBHOOK", "KIND", "ALERT", "ATTEMPTS", "LAST", "CREATED", "KEY", "ERROR",
        ]);
        for delivery in deliveries {
            out.row(vec![
                delivery.id.to_string(),
                delivery.webhook.clone(),
                delivery.kind.clone(),
                format!("{} {}", delivery.rule, delivery.alert_key),
                delivery.attempts.to_string(),
                delivery
                    .last_status
                    .map_or_else(|| "-".to_owned(), |status| status.to_string()),
                table::ago(delivery.created, now),
                delivery.idempotency_key.clone(),
                delivery.last_error.clone(),
            ]);
        }
        if out.is_empty() {
            return format!("no {state} deliveries\n");
        }
        out.render()
    })
}
