//! `outpost-hub admin-token`: create, list and revoke tokens for the people and scripts that
//! drive a hub.
//!
//! A token is shown once, when created; the hub keeps only its hash.

use std::time::Duration;

use crate::api::{AdminTokenInfo, CreateAdminToken, CreatedToken, Role};

use super::connection::HubArgs;
use super::table::{self, OutputArgs, Table};
use super::token::{ListArgs, RevokeArgs};
use super::{parse_duration, print_stdout};

#[derive(Debug, clap::Subcommand)]
pub enum AdminTokenCommand {
    /// Create an admin-API token with a role (needs an admin token).
    Create(CreateArgs),
    /// List the hub's admin tokens: id, name, role, created, expires (needs an admin token).
    List(ListArgs),
    /// Revoke an admin token by id: it stops working at once (needs an admin token). The hub's
    /// last admin token that has not expired cannot be revoked.
    Revoke(RevokeArgs),
}

/// When a new token stops working.
#[derive(Debug, Clone, Copy)]
pub enum Expiry {
    Never,
    After(Duration),
}

/// `--expires`: a duration, or `never`.
fn parse_expiry(text: &str) -> Result<Expiry, String> {
    if text == "never" {
        return Ok(Expiry::Never);
    }
    parse_duration(text).map(Expiry::After)
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Who or what the token is for; shown in the audit log.
    #[arg(long)]
    pub name: String,
    /// viewer (reads), operator (+ rollouts), publisher (+ models, roots), admin (+ tokens, devices).
    #[arg(long, value_parser = parse_role)]
    pub role: Role,
    /// How long the token works (`30d`, `12h`), or `never` (until revoked).
    #[arg(long, default_value = "90d", value_parser = parse_expiry)]
    pub expires: Expiry,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

impl AdminTokenCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            AdminTokenCommand::Create(args) => {
                let client = args.hub.connect()?;
                let expires_in_secs = match args.expires {
                    Expiry::Never => None,
                    Expiry::After(after) => Some(after.as_secs().max(1)),
                };
                let request = CreateAdminToken {
                    name: args.name.clone(),
                    role: args.role,
                    expires_in_secs,
                };
                let created: CreatedToken = client.post_json("/admin-tokens", &request)?;
                if args.output.json {
                    return table::print_json(&created);
                }
                let expires = expires_in_secs.map_or_else(
                    || "never".to_owned(),
                    |secs| table::time(crate::unix_now().saturating_add(secs)),
                );
                print_stdout(&format!(
                    "created {} token {:?} (id {}, expires {expires})\nthe token is shown only now; store it safely:\n{}\n",
                    args.role.as_str(),
                    args.name,
                    created.id,
                    created.token
                ))
            }
            AdminTokenCommand::List(args) => {
                let client = args.hub.connect()?;
                let tokens: Vec<AdminTokenInfo> = client.get_json("/admin-tokens")?;
                args.output.print(&tokens, |tokens| render_list(tokens))
            }
            AdminTokenCommand::Revoke(args) => {
                args.revoke("/admin-tokens", |revoked: &AdminTokenInfo| {
                    format!(
                        "revoked {} token {:?} (id {})\n",
                        revoked.role.as_str(),
                        revoked.name,
                        revoked.id
                    )
                })
            }
        }
    }
}

fn render_list(tokens: &[AdminTokenInfo]) -> String {
    let mut out = Table::new(&["ID", "NAME", "ROLE", "CREATED", "EXPIRES"]);
    for token in tokens {
        out.row(vec![
            token.id.clone(),
            token.name.clone(),
            token.role.as_str().to_owned(),
            table::time(token.created),
            token
                .expires
                .map_or_else(|| "never".to_owned(), table::time),
        ]);
    }
    out.render()
}

pub fn parse_role(text: &str) -> Result<Role, String> {
    Role::parse(text)
        .ok_or_else(|| format!("unknown role {text:?} (viewer, operator, publisher, admin)"))
}
