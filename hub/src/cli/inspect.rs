//! `outpost-hub inspect`: show what a signed document says, and who signed it.

use std::path::{Path, PathBuf};

use anyhow::bail;
use outpost_protocol::envelope::peek_kind;
use outpost_protocol::trust::{ManifestBody, PlanBody, RootBody, Signed, SignedBody};
use outpost_protocol::{sha256, Message, MessageKind};

use super::{print_stdout, read_frame};
use outpost_model::fsutil;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A signed root, manifest or plan.
    pub file: PathBuf,
}

impl Args {
    pub fn run(self) -> anyhow::Result<()> {
        let head = fsutil::read_capped(&self.file, 64 * 1024)?;
        match peek_kind(&head) {
            Some(MessageKind::SignedRoot) => show::<RootBody>(&self.file),
            Some(MessageKind::SignedManifest) => show::<ManifestBody>(&self.file),
            Some(MessageKind::SignedPlan) => show::<PlanBody>(&self.file),
            _ => bail!(
                "{} is not a signed root, manifest or plan",
                self.file.display()
            ),
        }
    }
}

fn show<B: SignedBody + std::fmt::Debug>(path: &Path) -> anyhow::Result<()>
where
    Signed<B>: Message,
{
    let (bytes, signed) = read_frame::<Signed<B>>(path)?;
    let mut text = format!("{} (sha256 {})\n", <Signed<B>>::NAME, sha256(&bytes));
    text.push_str("signatures (unverified):\n");
    for entry in &signed.signatures {
        text.push_str(&format!("  {}\n", entry.key_id));
    }
    text.push_str(&format!("{:#?}\n", signed.decode_unverified()?));
    print_stdout(&text)
}
