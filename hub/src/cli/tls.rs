//! `outpost-hub tls generate`: a private CA and a server certificate for a hub, for sites without
//! a PKI of their own. Devices and the CLI trust the CA file; the hub serves the leaf.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use outpost_model::fsutil;

#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Write ca.pem, hub.pem and hub.key (mode 0600) into a directory.
    Generate(GenerateArgs),
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[arg(long)]
    pub out: PathBuf,
    /// Host names and IP addresses the hub is reached by.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    pub san: Vec<String>,
    /// Days the certificates stay valid.
    #[arg(long, default_value_t = 825)]
    pub days: u64,
}

impl TlsCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            TlsCommand::Generate(args) => args.run(),
        }
    }
}

impl GenerateArgs {
    fn run(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("creating {}", self.out.display()))?;
        // Valid from a fixed past date, so a device whose clock lags a little still accepts it.
        let not_before = rcgen::date_time_ymd(2024, 1, 1);
        const NOT_BEFORE_UNIX: u64 = 1_704_067_200;
        let lifetime = crate::unix_now().saturating_sub(NOT_BEFORE_UNIX) + self.days * 86_400;
        let not_after = not_before + std::time::Duration::from_secs(lifetime);

        let ca_key = KeyPair::generate().context("generating the CA key")?;
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.distinguished_name = name("Outpost hub CA");
        ca.not_before = not_before;
        ca.not_after = not_after;
        let ca_cert = ca
            .self_signed(&ca_key)
            .context("signing the CA certificate")?;

        let hub_key = KeyPair::generate().context("generating the hub key")?;
        let mut hub = CertificateParams::new(self.san.clone()).context("--san names")?;
        hub.distinguished_name = name("Outpost hub");
        hub.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        hub.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        hub.not_before = not_before;
        hub.not_after = not_after;
        let hub_cert = hub
            .signed_by(&hub_key, &ca_cert, &ca_key)
            .context("signing the hub certificate")?;

        fsutil::write_atomic(&self.out.join("ca.pem"), ca_cert.pem().as_bytes(), 0o644)?;
        fsutil::write_atomic(&self.out.join("hub.pem"), hub_cert.pem().as_bytes(), 0o644)?;
        fsutil::write_atomic(
            &self.out.join("hub.key"),
            hub_key.serialize_pem().as_bytes(),
            0o600,
        )?;
        println!(
            "wrote {0}/ca.pem (give to devices and the CLI as --ca), {0}/hub.pem and {0}/hub.key (serve --tls-cert/--tls-key) for {1}",
            self.out.display(),
            self.san.join(", ")
        );
        Ok(())
    }
}

fn name(common: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common);
    name
}
