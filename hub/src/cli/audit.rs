//! `outpost-hub audit`: read the hub's hash-chained audit log, and check the chain here, against
//! a head pinned outside the hub, as well as on the hub.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::api::{AuditEntry, AuditVerdict};
use crate::audit::{chain_problem, Link};

use super::connection::HubArgs;
use super::print_stdout;
use super::table::{self, OutputArgs, Table};

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Show audit entries, oldest first.
    Log(LogArgs),
    /// Check the hash chain of the whole log, here and on the hub; exits non-zero when it is
    /// broken, or when it no longer holds the head pinned in --pin.
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
    /// A file outside the hub holding the head (`SEQ HASH`) this command last verified: the log
    /// must still hold that entry with that hash, or the hub rewrote it. Created when missing,
    /// and moved to the new head after each verification that passes.
    #[arg(long, value_name = "FILE")]
    pub pin: Option<PathBuf>,
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
            AuditCommand::Verify(args) => args.run(),
        }
    }
}

/// A head pinned outside the hub: an entry's sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pin {
    seq: u64,
    hash: String,
}

impl Pin {
    fn read(path: &Path) -> anyhow::Result<Option<Pin>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
        };
        let parsed = text.trim().split_once(' ').and_then(|(seq, hash)| {
            let hash = hash.trim();
            let hex = hash.len() == 64 && hash.bytes().all(|byte| byte.is_ascii_hexdigit());
            Some(Pin {
                seq: seq.parse().ok()?,
                hash: hex.then(|| hash.to_ascii_lowercase())?,
            })
        });
        match parsed {
            Some(pin) => Ok(Some(pin)),
            None => bail!(
                "{} does not hold an audit head (`SEQ HASH`, 64 hex digits): {:?}",
                path.display(),
                table::clean(text.trim())
            ),
        }
    }

    fn write(&self, path: &Path) -> anyhow::Result<()> {
        outpost_model::fsutil::write_atomic(
            path,
            format!("{} {}\n", self.seq, self.hash).as_bytes(),
            0o644,
        )
        .with_context(|| format!("writing the audit head to {}", path.display()))
    }
}

/// The entries the hub listed, as the chain check reads them; a malformed hash is named.
fn links(entries: &[AuditEntry]) -> Result<Vec<Link<'_>>, String> {
    let digest = |seq: u64, field: &str, text: &str| -> Result<[u8; 32], String> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes)
            .map(|()| bytes)
            .map_err(|_| format!("entry {seq} has a malformed {field}"))
    };
    entries
        .iter()
        .map(|entry| {
            Ok(Link {
                seq: entry.seq,
                at: entry.at,
                actor: &entry.actor,
                action: &entry.action,
                target: &entry.target,
                detail: &entry.detail,
                prev_hash: digest(entry.seq, "prev_hash", &entry.prev_hash)?,
                hash: digest(entry.seq, "hash", &entry.hash)?,
            })
        })
        .collect()
}

impl VerifyArgs {
    fn run(self) -> anyhow::Result<()> {
        let client = self.hub.connect()?;
        let entries: Vec<AuditEntry> = client.get_json("/audit?since=0")?;
        let count = entries.len() as u64;
        // Checked here first: the hub's own verdict is worth only as much as the hub.
        let problem = match links(&entries) {
            Ok(links) => chain_problem(links),
            Err(problem) => Some(problem),
        };
        if let Some(problem) = problem {
            return self.broken(AuditVerdict {
                entries: count,
                intact: false,
                problem: Some(format!("checked here: {problem}")),
            });
        }
        // The hub checks what only it holds: the chain head beside the entries.
        let verdict: AuditVerdict = client.get_json("/audit/verify")?;
        if !verdict.intact {
            return self.broken(verdict);
        }
        let head = entries.last().map(|entry| Pin {
            seq: entry.seq,
            hash: entry.hash.to_ascii_lowercase(),
        });
        let mut pinned_note = String::new();
        if let Some(path) = &self.pin {
            if let Some(pin) = Pin::read(path)? {
                let problem = match entries.iter().find(|entry| entry.seq == pin.seq) {
                    None => Some(format!(
                        "the log has no entry {}, the head pinned in {}: entries were removed",
                        pin.seq,
                        path.display()
                    )),
                    Some(entry) if !entry.hash.eq_ignore_ascii_case(&pin.hash) => Some(format!(
                        "entry {} has hash {}, not the {} pinned in {}: the log was rewritten \
                         up to it",
                        pin.seq,
                        entry.hash,
                        pin.hash,
                        path.display()
                    )),
                    Some(_) => None,
                };
                if let Some(problem) = problem {
                    return self.broken(AuditVerdict {
                        entries: count,
                        intact: false,
                        problem: Some(problem),
                    });
                }
                pinned_note = format!("; holds entry {} pinned in {}", pin.seq, path.display());
            }
            if let Some(head) = &head {
                head.write(path)?;
                pinned_note.push_str(&format!(
                    "; head entry {} pinned in {}",
                    head.seq,
                    path.display()
                ));
            }
        }
        let verdict = AuditVerdict {
            entries: count,
            intact: true,
            problem: None,
        };
        if self.output.json {
            table::print_json(&verdict)
        } else {
            print_stdout(&format!(
                "audit log intact: {count} entries, checked here and on the hub{pinned_note}\n"
            ))
        }
    }

    fn broken(&self, verdict: AuditVerdict) -> anyhow::Result<()> {
        if self.output.json {
            table::print_json(&verdict)?;
        }
        bail!(
            "audit log is not intact ({} entries): {}",
            verdict.entries,
            table::clean(verdict.problem.as_deref().unwrap_or("no problem named"))
        )
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
