//! `outpost-hub inspect`: show what a signed document says and who signed it, and what a
//! validation set or a drift profile holds, whatever its size.

use std::fmt::Write;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use outpost_protocol::device::{Tensor, ValidationSet};
use outpost_protocol::drift::Profile;
use outpost_protocol::envelope::peek_kind;
use outpost_protocol::trust::{ManifestBody, PlanBody, RetireBody, RootBody, Signed, SignedBody};
use outpost_protocol::{sha256, Message, MessageKind};

use super::{print_stdout, read_frame};
use outpost_model::fsutil;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A signed root, manifest, plan or retirement, a validation set or a drift profile.
    pub file: PathBuf,
}

impl Args {
    pub fn run(self) -> anyhow::Result<()> {
        let mut head = Vec::with_capacity(16);
        std::fs::File::open(&self.file)
            .and_then(|file| file.take(16).read_to_end(&mut head))
            .with_context(|| format!("reading {}", self.file.display()))?;
        match peek_kind(&head) {
            Some(MessageKind::SignedRoot) => show::<RootBody>(&self.file),
            Some(MessageKind::SignedManifest) => show::<ManifestBody>(&self.file),
            Some(MessageKind::SignedPlan) => show::<PlanBody>(&self.file),
            Some(MessageKind::SignedRetire) => show::<RetireBody>(&self.file),
            Some(MessageKind::ValidationSet | MessageKind::ValidationSetV1) => {
                show_validation_set(&self.file)
            }
            Some(MessageKind::Profile) => show_profile(&self.file),
            _ => bail!(
                "{} is not a signed root, manifest, plan or retirement, a validation set or a \
                 drift profile",
                self.file.display()
            ),
        }
    }
}

/// A tensor's name, type and shape, as `x FP32 [2, 4]`.
fn describe(tensor: &Tensor) -> String {
    format!(
        "{} {} {:?}",
        tensor.name,
        tensor.dtype.as_str(),
        tensor.shape
    )
}

fn show_validation_set(path: &Path) -> anyhow::Result<()> {
    let bytes = fsutil::read_capped(path, ValidationSet::MAX_FRAME as u64)?;
    let set =
        ValidationSet::decode(&bytes).with_context(|| format!("reading {}", path.display()))?;
    let mut text = format!(
        "validation set (sha256 {}, {} bytes)\nan output element passes when |got - want| <= \
         {:e} + {:e} * |want|, unless its output is checked below\n",
        sha256(&bytes),
        bytes.len(),
        set.abs_tolerance,
        set.rel_tolerance,
    );
    for check in &set.checks {
        let elements = match check.tolerance {
            Some(tolerance) => format!(
                "elements pass when |got - want| <= {:e} + {:e} * |want|",
                tolerance.abs, tolerance.rel
            ),
            None => "elements not compared".to_owned(),
        };
        let top1 = match check.min_top1 {
            Some(share) => format!(", top-1 agreement in at least {share} of rows"),
            None => String::new(),
        };
        writeln!(text, "output {:?}: {elements}{top1}", check.output)?;
    }
    writeln!(text, "{} case(s):", set.cases.len())?;
    for (index, case) in set.cases.iter().enumerate() {
        let inputs: Vec<String> = case.inputs.iter().map(describe).collect();
        let outputs: Vec<String> = case.outputs.iter().map(describe).collect();
        writeln!(
            text,
            "  case {index}: inputs {} -> outputs {}",
            inputs.join(", "),
            outputs.join(", ")
        )?;
    }
    print_stdout(&text)
}

fn show_profile(path: &Path) -> anyhow::Result<()> {
    let (bytes, profile) = read_frame::<Profile>(path)?;
    let mut text = format!(
        "drift profile (sha256 {}, {} bytes)\n{:?}\n{} numeric feature(s):\n",
        sha256(&bytes),
        bytes.len(),
        profile.thresholds,
        profile.features.len()
    );
    for feature in &profile.features {
        let reference = &feature.reference;
        writeln!(
            text,
            "  {} ({:?}): {} values, mean {}, null {}, nan {}, below {}, above {}\n    edges \
             {:?}\n    reference counts {:?}",
            feature.name,
            feature.side,
            reference.n,
            reference.mean,
            reference.null,
            reference.nan,
            reference.below,
            reference.above,
            feature.edges,
            reference.bins
        )?;
    }
    writeln!(text, "{} class output(s):", profile.classes.len())?;
    for class in &profile.classes {
        writeln!(
            text,
            "  {}: classes {:?}\n    reference counts {:?}",
            class.name, class.classes, class.reference.counts
        )?;
    }
    print_stdout(&text)
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
