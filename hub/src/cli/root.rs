//! `outpost-hub root`: create the trust root and rotate it (offline), upload it to a hub and list
//! the roots a hub holds.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use outpost_protocol::trust::{RootBody, Signed};
use outpost_protocol::{PublicKey, VerifiedRoot, VerifyError};

use super::connection::HubArgs;
use super::table::{self, OutputArgs, Table};
use super::{parse_duration, read_frame, sign_to_file, SigningKeys};
use crate::api::RootInfo;
use crate::{keyfile, unix_now};

#[derive(Debug, Subcommand)]
pub enum RootCommand {
    /// Create root version 1, listing the given keys and signed by those with private halves here.
    Init(InitArgs),
    /// Create the next root version: signed by a threshold of the current keys and of the new ones.
    Rotate(RotateArgs),
    /// Upload a signed root (the first one, or the next rotation) to a hub.
    Upload(UploadArgs),
    /// List the roots a hub holds.
    List(ListArgs),
}

#[derive(Debug, clap::Args)]
pub struct KeySet {
    /// Public key (or private key) files of keys the new root lists but that do not sign here.
    #[arg(
        long = "public-key",
        visible_alias = "public-keys",
        value_delimiter = ','
    )]
    pub public_keys: Vec<PathBuf>,
    /// Signature threshold of the new root.
    #[arg(long)]
    pub threshold: u32,
    /// How long the new root stays valid.
    #[arg(long, default_value = "365d", value_parser = parse_duration)]
    pub expires: Duration,
    /// Where to write the signed root.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub signing: SigningKeys,
    #[command(flatten)]
    pub keys: KeySet,
}

#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    /// The currently trusted signed root.
    #[arg(long)]
    pub root: PathBuf,
    /// Private keys of the current root that sign the rotation.
    #[arg(
        long = "old-key",
        visible_alias = "old-keys",
        value_delimiter = ',',
        required = true
    )]
    pub old_keys: Vec<PathBuf>,
    /// Private keys listed by, and signing, the new root.
    #[command(flatten)]
    pub signing: SigningKeys,
    #[command(flatten)]
    pub keys: KeySet,
}

#[derive(Debug, clap::Args)]
pub struct UploadArgs {
    /// The signed root file.
    pub file: PathBuf,
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

impl RootCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            RootCommand::Init(args) => {
                let signers = args.signing.load()?;
                let body = new_body(1, &signers, &args.keys)?;
                let bytes = sign_to_file(&body, &signers, &args.keys.out)?;
                report_threshold(VerifiedRoot::load_trusted(&bytes), &args.keys.out);
                Ok(())
            }
            RootCommand::Rotate(args) => {
                let (current_bytes, _) = read_frame::<Signed<RootBody>>(&args.root)?;
                let current = VerifiedRoot::load_trusted(&current_bytes)
                    .with_context(|| format!("verifying current root {}", args.root.display()))?;
                let new_signers = args.signing.load()?;
                let body = new_body(current.version() + 1, &new_signers, &args.keys)?;
                let mut signers = keyfile::load_all_private(&args.old_keys)?;
                signers.extend(new_signers);
                let bytes = sign_to_file(&body, &signers, &args.keys.out)?;
                report_threshold(current.verify_rotation(&bytes), &args.keys.out);
                Ok(())
            }
            RootCommand::Upload(args) => {
                let (bytes, _) = read_frame::<Signed<RootBody>>(&args.file)?;
                // A root short of its own threshold would only be refused by the hub; say so here,
                // where the operator can still add signatures.
                VerifiedRoot::load_trusted(&bytes).with_context(|| {
                    format!(
                        "{} is not a complete root; add signatures with `outpost-hub sign`",
                        args.file.display()
                    )
                })?;
                let client = args.hub.connect()?;
                let root: RootInfo = client.post_bytes("/roots", &bytes)?;
                args.output.print(&root, |root| {
                    format!(
                        "hub now holds root version {} ({}-of-{}, expires {})\n",
                        root.version,
                        root.threshold,
                        root.key_ids.len(),
                        table::time(root.expires)
                    )
                })
            }
            RootCommand::List(args) => {
                let client = args.hub.connect()?;
                let roots: Vec<RootInfo> = client.get_json("/roots")?;
                args.output.print(&roots, |roots| render_list(roots))
            }
        }
    }
}

fn new_body(
    version: u64,
    signers: &[outpost_protocol::SecretKey],
    set: &KeySet,
) -> anyhow::Result<RootBody> {
    let mut keys: Vec<PublicKey> = signers.iter().map(|key| key.public()).collect();
    for path in &set.public_keys {
        let key = keyfile::load_public(path)?;
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    if set.threshold == 0 || set.threshold as usize > keys.len() {
        bail!(
            "--threshold {} must be between 1 and the {} key(s) listed",
            set.threshold,
            keys.len()
        );
    }
    let created = unix_now();
    Ok(RootBody {
        version,
        created,
        expires: created + set.expires.as_secs(),
        threshold: set.threshold,
        keys,
    })
}

fn render_list(roots: &[RootInfo]) -> String {
    let mut out = Table::new(&["VERSION", "THRESHOLD", "EXPIRES", "KEYS"]);
    for root in roots {
        out.row(vec![
            root.version.to_string(),
            format!("{}-of-{}", root.threshold, root.key_ids.len()),
            table::time(root.expires),
            root.key_ids.join(","),
        ]);
    }
    out.render()
}

/// Says whether the document just written is complete, or which signatures it still needs.
fn report_threshold(outcome: Result<VerifiedRoot, VerifyError>, out: &std::path::Path) {
    match outcome {
        Ok(root) => println!(
            "wrote root version {} ({}-of-{}) to {}",
            root.version(),
            root.body().threshold,
            root.body().keys.len(),
            out.display()
        ),
        Err(error) => println!(
            "wrote {} but it is not yet valid: {error}\nadd signatures with `outpost-hub sign --in {} --key KEY`",
            out.display(),
            out.display()
        ),
    }
}
