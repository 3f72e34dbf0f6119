//! `outpost-hub sign`: add signatures to a signed document.
//!
//! A threshold of keys held on different machines signs by passing the file from one holder to
//! the next; each runs this with their own key.

use std::path::{Path, PathBuf};

use anyhow::bail;
use outpost_protocol::envelope::peek_kind;
use outpost_protocol::trust::{ManifestBody, PlanBody, RetireBody, RootBody, Signed, SignedBody};
use outpost_protocol::{Message, MessageKind, SecretKey};

use super::{read_frame, SigningKeys};
use outpost_model::fsutil;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The signed root, manifest, plan or retirement.
    #[arg(long = "in")]
    pub input: PathBuf,
    #[command(flatten)]
    pub signing: SigningKeys,
    /// Where to write the result; defaults to overwriting --in.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl Args {
    pub fn run(self) -> anyhow::Result<()> {
        let keys = self.signing.load()?;
        let out = self.out.as_ref().unwrap_or(&self.input);
        let head = fsutil::read_capped(&self.input, 64 * 1024)?;
        let count = match peek_kind(&head) {
            Some(MessageKind::SignedRoot) => add::<RootBody>(&self.input, &keys, out)?,
            Some(MessageKind::SignedManifest) => add::<ManifestBody>(&self.input, &keys, out)?,
            Some(MessageKind::SignedPlan) => add::<PlanBody>(&self.input, &keys, out)?,
            Some(MessageKind::SignedRetire) => add::<RetireBody>(&self.input, &keys, out)?,
            _ => bail!(
                "{} is not a signed root, manifest, plan or retirement",
                self.input.display()
            ),
        };
        println!("{} now carries {count} signature(s)", out.display());
        Ok(())
    }
}

fn add<B: SignedBody>(input: &Path, keys: &[SecretKey], out: &Path) -> anyhow::Result<usize>
where
    Signed<B>: Message,
{
    let (_, mut signed) = read_frame::<Signed<B>>(input)?;
    for key in keys {
        signed.sign(key);
    }
    fsutil::write_atomic(out, &outpost_protocol::encode(&signed)?, 0o644)?;
    Ok(signed.signatures.len())
}
