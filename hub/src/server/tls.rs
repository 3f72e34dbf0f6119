//! TLS for the hub's listener: rustls with the ring provider, HTTP/1.1.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio_rustls::TlsAcceptor;

pub fn acceptor(cert_path: &Path, key_path: &Path) -> anyhow::Result<TlsAcceptor> {
    let cert_pem = outpost_model::fsutil::read_capped(cert_path, 1024 * 1024)?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading certificates from {}", cert_path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", cert_path.display());
    }
    let key_pem = outpost_model::fsutil::read_capped(key_path, 1024 * 1024)?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .with_context(|| format!("reading the private key from {}", key_path.display()))?
        .with_context(|| format!("{} holds no PEM private key", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("configuring TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not form a usable pair")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
