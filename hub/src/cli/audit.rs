//! `outpost-hub audit`: read the hub's hash-chained audit log and have the hub check the chain.

use anyhow::bail;

use crate::api::{AuditEntry, AuditVerdict};

use super::connection::HubArgs;
use super::print_stdout;
use super::table::{self, OutputArgs, Table};

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Show audit entries, oldest first.
    Log(LogArgs),
    /// Check the hash chain of the whole log; exits non-zero when it is broken.
    Verify(VerifyArgs),
}

#[derive(Debug, clap::Args)]
pub struct LogArgs {
    /// Only entries after this sequence number (the last one already seen).
    #[arg(long, default_value_t = 0)]
    pub since: u64,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

impl AuditCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            AuditCommand::Log(args) => {
                let client = args.hub.connect()?;
                let entries: Vec<AuditEntry> =
                    client.get_json(&format!("/audit?since={}", args.since))?;
                args.output.print(&entries, |entries| render_log(entries))
            }
            AuditCommand::Verify(args) => {
                let client = args.hub.connect()?;
                let verdict: AuditVerdict = client.get_json("/audit/verify")?;
                if args.output.json {
                    table::print_json(&verdict)?;
                } else if verdict.intact {
                    print_stdout(&format!("audit log intact: {} entries\n", verdict.entries))?;
                }
                if !verdict.intact {
                    bail!(
                        "audit log is not intact ({} entries): {}",
                        verdict.entries,
                        table::clean(verdict.problem.as_deref().unwrap_or("no problem named"))
                    );
                }
                Ok(())
            }
        }
    }
}

fn render_log(entries: &[AuditEntry]) -> String {
    let mut out = Table::new(&["SEQ", "AT", "ACTOR", "ACTION", "TARGET", "DETAIL"]);
    for entry in entries {
        out.row(vec![
            entry.seq.to_string(),
            table::time(entry.at),
            entry.actor.clone(),
            entry.action.clone(),
            entry.target.clone(),
            entry.detail.clone(),
        ]);
    }
    out.render()
}
