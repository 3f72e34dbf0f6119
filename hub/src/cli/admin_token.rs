//! `outpost-hub admin-token`: create tokens for the people and scripts that drive a hub.
//!
//! A token is shown once, when created; the hub keeps only its hash.

use crate::api::{CreateAdminToken, CreatedToken, Role};

use super::connection::HubArgs;
use super::print_stdout;
use super::table::OutputArgs;

#[derive(Debug, clap::Subcommand)]
pub enum AdminTokenCommand {
    /// Create an admin-API token with a role (needs an admin token).
    Create(CreateArgs),
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Who or what the token is for; shown in the audit log.
    #[arg(long)]
    pub name: String,
    /// viewer (reads), operator (+ rollouts), publisher (+ models, roots), admin (+ tokens, devices).
    #[arg(long, value_parser = parse_role)]
    pub role: Role,
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
                let request = CreateAdminToken {
                    name: args.name.clone(),
                    role: args.role,
                };
                let created: CreatedToken = client.post_json("/admin-tokens", &request)?;
                if args.output.json {
                    return super::table::print_json(&created);
                }
                print_stdout(&format!(
                    "created {} token {:?} (id {})\nthe token is shown only now; store it safely:\n{}\n",
                    args.role.as_str(),
                    args.name,
                    created.id,
                    created.token
                ))
            }
        }
    }
}

pub fn parse_role(text: &str) -> Result<Role, String> {
    Role::parse(text)
        .ok_or_else(|| format!("unknown role {text:?} (viewer, operator, publisher, admin)"))
}
