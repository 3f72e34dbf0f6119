//! `outpost-hub whoami`: which hub and token the CLI is using, and what that token may do. The
//! first thing to run when a hub command is refused.

use crate::api::WhoAmI;

use super::connection::HubArgs;
use super::table::{fields, OutputArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

impl Args {
    pub fn run(self) -> anyhow::Result<()> {
        let client = self.hub.connect()?;
        let me: WhoAmI = client.get_json("/whoami")?;
        self.output.print(&me, |me| {
            fields(&[
                ("hub", client.base_url().to_owned()),
                ("token", me.name.clone()),
                ("token id", me.token_id.clone()),
                ("role", me.role.as_str().to_owned()),
            ])
        })
    }
}
