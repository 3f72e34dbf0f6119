//! `outpost-hub token`: enrollment tokens, which let new devices join the fleet with preset
//! labels.

use std::time::Duration;

use outpost_protocol::Label;

use crate::api::{CreateEnrollToken, CreatedToken, EnrollTokenInfo};
use crate::unix_now;

use super::connection::HubArgs;
use super::plan::parse_label;
use super::table::{self, OutputArgs, Table};
use super::{parse_duration, print_stdout};

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Create an enrollment token (needs an admin token).
    Create(CreateArgs),
    /// List enrollment tokens that can still be used.
    List(ListArgs),
    /// Revoke an enrollment token by id: no device can enroll with it from now on (needs an
    /// admin token).
    Revoke(RevokeArgs),
}

/// `token revoke` and `admin-token revoke`: a token by id.
#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// The token's id, as `create` printed it or `list` shows it.
    pub id: String,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

impl RevokeArgs {
    /// `DELETE`s the token at `collection/ID` and prints what the hub answers.
    pub fn revoke<T: serde::de::DeserializeOwned + serde::Serialize>(
        self,
        collection: &str,
        render: impl FnOnce(&T) -> String,
    ) -> anyhow::Result<()> {
        let client = self.hub.connect()?;
        let path = format!("{collection}/{}", crate::client::path_segment(&self.id));
        let revoked: T = client.delete_json(&path)?;
        self.output.print(&revoked, render)
    }
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Labels every device enrolling with this token gets (k=v,...).
    #[arg(long, value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<Label>,
    /// How long the token works.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub expires: Duration,
    /// How many devices may enroll with it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub uses: u32,
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

impl TokenCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            TokenCommand::Create(args) => {
                let client = args.hub.connect()?;
                let request = CreateEnrollToken {
                    labels: args.labels.iter().map(Label::to_string).collect(),
                    expires_in_secs: args.expires.as_secs(),
                    uses: args.uses,
                };
                let created: CreatedToken = client.post_json("/enroll-tokens", &request)?;
                if args.output.json {
                    return table::print_json(&created);
                }
                print_stdout(&format!(
                    "created enrollment token {} ({} use(s), expires {})\n\
                     the token is shown only now; give it to the devices' installer:\n{}\n",
                    created.id,
                    args.uses,
                    table::time(unix_now().saturating_add(args.expires.as_secs())),
                    created.token
                ))
            }
            TokenCommand::List(args) => {
                let client = args.hub.connect()?;
                let tokens: Vec<EnrollTokenInfo> = client.get_json("/enroll-tokens")?;
                args.output.print(&tokens, |tokens| render_list(tokens))
            }
            TokenCommand::Revoke(args) => {
                args.revoke("/enroll-tokens", |revoked: &EnrollTokenInfo| {
                    format!(
                        "revoked enrollment token {} ({} use(s) left)\n",
                        revoked.id, revoked.uses_left
                    )
                })
            }
        }
    }
}

fn render_list(tokens: &[EnrollTokenInfo]) -> String {
    let mut out = Table::new(&["ID", "USES LEFT", "EXPIRES", "LABELS"]);
    for token in tokens {
        out.row(vec![
            token.id.clone(),
            token.uses_left.to_string(),
            table::time(token.expires),
            token.labels.join(","),
        ]);
    }
    out.render()
}
