//! The operator's side of the admin API: a small blocking HTTP client over ureq.
//!
//! The CLI's hub commands all talk through [`AdminClient`], so bearer-token auth, TLS with an
//! operator-given CA, response size caps and the mapping of error answers to readable messages
//! live in one place. The hub is not trusted with anything signed: commands that fetch signed
//! documents verify them themselves. What the hub says in an error is shown to the operator, so
//! it is capped and stripped of control characters first.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::de::DeserializeOwned;
use serde::Serialize;
use ureq::http::{Response, StatusCode, Uri};
use ureq::tls::{PemItem, RootCerts, TlsConfig};
use ureq::{Agent, Body, SendBody};

use crate::api::{self, ApiError};

/// Largest JSON answer read; the biggest listings (devices, audit log) stay far below it.
pub const MAX_JSON_BODY: u64 = 16 * 1024 * 1024;
/// Largest error answer read: enough for any message worth showing.
const MAX_ERROR_BODY: u64 = 64 * 1024;
/// Longest error message shown to the operator.
const MAX_ERROR_MESSAGE: usize = 1000;
/// How often the upload progress line is redrawn at most.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// A non-2xx answer from the hub. Kept as a type so that a caller can tell "not found" from a
/// failure (`error.downcast_ref::<HubStatusError>()`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hub answered {status}: {message}")]
pub struct HubStatusError {
    pub status: u16,
    /// The `error` of the hub's [`ApiError`] body, or the body text when it was not one.
    pub message: String,
}

/// Whether an upload draws a progress line on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Hidden,
    Stderr,
}

impl Progress {
    /// Draws progress only when stderr is a terminal, so logs and pipes stay clean.
    pub fn auto() -> Progress {
        if std::io::stderr().is_terminal() {
            Progress::Stderr
        } else {
            Progress::Hidden
        }
    }
}

/// A client of one hub's admin API, authenticated with one admin token.
pub struct AdminClient {
    agent: Agent,
    /// Scheme, authority and any path prefix, without a trailing slash.
    base_url: String,
    /// `Bearer <token>`.
    authorization: String,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token stays out of debug output and logs.
        f.debug_struct("AdminClient")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// Builds a client for the hub at `base_url` (`https://hub.example:8443`). `ca_pem` holds the
    /// certificates to trust instead of the public web roots, for a hub with its own CA or a
    /// self-signed certificate.
    pub fn new(base_url: &str, token: &str, ca_pem: Option<&[u8]>) -> anyhow::Result<AdminClient> {
        let base_url = check_base_url(base_url)?;
        check_token(token)?;
        let mut tls = TlsConfig::builder();
        if let Some(pem) = ca_pem {
            tls = tls.root_certs(parse_ca(pem)?);
        }
        let config = Agent::config_builder()
            .http_status_as_error(false)
            // A redirect would send the next request somewhere the operator did not name; the
            // admin API never redirects, so one is shown as the error it is.
            .max_redirects(0)
            .user_agent(format!("outpost-hub/{}", env!("CARGO_PKG_VERSION")))
            .timeout_resolve(Some(Duration::from_secs(15)))
            .timeout_connect(Some(Duration::from_secs(15)))
            // Per read and write rather than per call: an artifact upload may take long, but a
            // hub that stops answering is noticed.
            .timeout_per_read(Some(Duration::from_secs(120)))
            .timeout_per_write(Some(Duration::from_secs(120)))
            .tls_config(tls.build())
            .build();
        Ok(AdminClient {
            agent: config.new_agent(),
            base_url,
            authorization: format!("Bearer {token}"),
        })
    }

    /// The hub's base URL, as given.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The full URL of an admin path such as `/whoami`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}{}", self.base_url, api::PREFIX, path)
    }

    /// `GET`s a JSON answer.
    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let url = self.url(path);
        let response = self
            .agent
            .get(&url)
            .header("Authorization", &self.authorization)
            .header("Accept", "application/json")
            .call();
        let mut response = checked(response, "GET", &url)?;
        read_json(&mut response, &url)
    }

    /// `GET`s a JSON answer, or `None` when the hub answers 404.
    pub fn get_json_opt<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<Option<T>> {
        match self.get_json(path) {
            Ok(value) => Ok(Some(value)),
            Err(error) if is_not_found(&error) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// `DELETE`s and reads a JSON answer.
    pub fn delete_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let url = self.url(path);
        let response = self
            .agent
            .delete(&url)
            .header("Authorization", &self.authorization)
            .header("Accept", "application/json")
            .call();
        let mut response = checked(response, "DELETE", &url)?;
        read_json(&mut response, &url)
    }

    /// `POST`s a JSON body and reads a JSON answer.
    pub fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let url = self.url(path);
        let bytes = serde_json::to_vec(body).context("encoding the request")?;
        let response = self
            .agent
            .post(&url)
            .header("Authorization", &self.authorization)
            .header("Accept", "application/json")
            .content_type("application/json")
            .send(&bytes[..]);
        let mut response = checked(response, "POST", &url)?;
        read_json(&mut response, &url)
    }

    /// `POST`s raw bytes (a signed document) and reads a JSON answer.
    pub fn post_bytes<T: DeserializeOwned>(&self, path: &str, bytes: &[u8]) -> anyhow::Result<T> {
        let url = self.url(path);
        let response = self
            .agent
            .post(&url)
            .header("Authorization", &self.authorization)
            .header("Accept", "application/json")
            .content_type("application/octet-stream")
            .send(bytes);
        let mut response = checked(response, "POST", &url)?;
        read_json(&mut response, &url)
    }

    /// `GET`s raw bytes, refusing an answer over `max` bytes.
    pub fn get_bytes(&self, path: &str, max: u64) -> anyhow::Result<Vec<u8>> {
        let url = self.url(path);
        let response = self
            .agent
            .get(&url)
            .header("Authorization", &self.authorization)
            .call();
        let mut response = checked(response, "GET", &url)?;
        read_capped(&mut response, max, &url)
    }

    /// Asks whether something exists: true on 2xx, false on 404, None on 503 (the hub cannot tell
    /// now: its artifact store is unreachable), an error otherwise. A HEAD answer has no body to
    /// say why; a publisher that uploads anyway gets the reason in the upload's answer.
    pub fn head(&self, path: &str) -> anyhow::Result<Option<bool>> {
        let url = self.url(path);
        let response = self
            .agent
            .head(&url)
            .header("Authorization", &self.authorization)
            .call();
        match checked(response, "HEAD", &url) {
            Ok(_) => Ok(Some(true)),
            Err(error) if is_not_found(&error) => Ok(Some(false)),
            Err(error)
                if error
                    .downcast_ref::<HubStatusError>()
                    .is_some_and(|status| {
                        status.status == StatusCode::SERVICE_UNAVAILABLE.as_u16()
                    }) =>
            {
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// Streams the file at `path` to `PUT /artifacts/{sha256_hex}`, never holding it in memory.
    /// The hub checks the bytes against the hash in the path.
    pub fn put_artifact(
        &self,
        sha256_hex: &str,
        path: &Path,
        progress: Progress,
    ) -> anyhow::Result<()> {
        let url = self.url(&format!("/artifacts/{}", path_segment(sha256_hex)));
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let length = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        let label = path.file_name().map_or_else(
            || path.display().to_string(),
            |name| name.to_string_lossy().into_owned(),
        );
        // Taking exactly `length` bytes keeps the body true to the Content-Length even if the file
        // grows meanwhile; the hub's hash check catches any other change.
        let mut reader = ProgressReader::new(file.take(length), length, label, progress);
        let response = self
            .agent
            .put(&url)
            .header("Authorization", &self.authorization)
            .header("Content-Length", length.to_string())
            .content_type("application/octet-stream")
            .send(SendBody::from_reader(&mut reader));
        reader.finish();
        let mut response = checked(response, "PUT", &url)?;
        // The answer's content does not matter, but reading it lets the connection be reused.
        read_capped(&mut response, MAX_ERROR_BODY, &url)?;
        Ok(())
    }
}

/// True when `error` is the hub answering 404.
pub fn is_not_found(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<HubStatusError>()
        .is_some_and(|status| status.status == StatusCode::NOT_FOUND.as_u16())
}

/// Percent-encodes one path segment or query value: everything but RFC 3986's unreserved
/// characters, so an id or label can never change which path is asked for.
pub fn path_segment(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Checks a hub URL and returns it without a trailing slash. Plain `http://` is accepted only for
/// a loopback host: anywhere else it would send the admin token in the clear.
pub fn check_base_url(text: &str) -> anyhow::Result<String> {
    let uri: Uri = text
        .parse()
        .map_err(|error| anyhow!("{text:?} is not a URL: {error}"))?;
    let Some(host) = uri.host().filter(|host| !host.is_empty()) else {
        bail!("{text:?} has no host; expected a URL like https://hub.example:8443");
    };
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if is_loopback(host) => {}
        Some("http") => bail!(
            "{text:?} uses plain http to a host that is not loopback; use https (the hub serves \
             plain http only on loopback)"
        ),
        _ => bail!("{text:?} is neither an http:// nor an https:// URL"),
    }
    if uri.query().is_some() || text.contains('#') {
        bail!("{text:?} has a query or fragment; give only the hub's base URL");
    }
    Ok(text.trim_end_matches('/').to_owned())
}

/// True for `localhost` and loopback addresses (127.0.0.0/8, ::1), bracketed or not.
pub(crate) fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

/// An admin token is sent in a header, so it must be printable ASCII without spaces.
fn check_token(token: &str) -> anyhow::Result<()> {
    if token.is_empty() {
        bail!("the admin token is empty");
    }
    if !token.bytes().all(|byte| byte.is_ascii_graphic()) {
        bail!("the admin token contains spaces or characters other than printable ASCII");
    }
    Ok(())
}

/// Reads the certificates of a PEM file; other PEM items (a stray key) are skipped.
fn parse_ca(pem: &[u8]) -> anyhow::Result<RootCerts> {
    let mut certificates = Vec::new();
    for item in ureq::tls::parse_pem(pem) {
        if let PemItem::Certificate(certificate) = item.context("reading PEM")? {
            certificates.push(certificate);
        }
    }
    if certificates.is_empty() {
        bail!("no PEM certificate found");
    }
    Ok(RootCerts::new_with_certs(&certificates))
}

/// Turns a transport failure into an error naming the URL, and a non-2xx answer into a
/// [`HubStatusError`].
fn checked(
    response: Result<Response<Body>, ureq::Error>,
    method: &str,
    url: &str,
) -> anyhow::Result<Response<Body>> {
    let mut response =
        response.map_err(|error| anyhow!(error).context(format!("cannot {method} {url}")))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_ERROR_BODY)
        .read_to_vec()
        .unwrap_or_default();
    let message = error_message(&body, status);
    Err(anyhow!(HubStatusError {
        status: status.as_u16(),
        message,
    })
    .context(format!("{method} {url}")))
}

/// The message of an error answer: the [`ApiError`]'s text, or else the body's, or else the
/// status's reason. Control characters are dropped so a hostile answer cannot drive the terminal.
fn error_message(body: &[u8], status: StatusCode) -> String {
    let text = match serde_json::from_slice::<ApiError>(body) {
        Ok(api_error) => api_error.error,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let cleaned: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut message: String = cleaned.trim().chars().take(MAX_ERROR_MESSAGE).collect();
    if message.is_empty() {
        message = status
            .canonical_reason()
            .unwrap_or("no reason given")
            .to_lowercase();
    }
    message
}

fn read_capped(response: &mut Response<Body>, max: u64, url: &str) -> anyhow::Result<Vec<u8>> {
    response
        .body_mut()
        .with_config()
        .limit(max)
        .read_to_vec()
        .map_err(|error| match error {
            ureq::Error::BodyExceedsLimit(_) => {
                anyhow!("the answer from {url} is over the {max}-byte limit")
            }
            other => anyhow!(other).context(format!("reading the answer from {url}")),
        })
}

fn read_json<T: DeserializeOwned>(response: &mut Response<Body>, url: &str) -> anyhow::Result<T> {
    let bytes = read_capped(response, MAX_JSON_BODY, url)?;
    serde_json::from_slice(&bytes).with_context(|| format!("decoding the answer from {url}"))
}

/// A reader that reports how much of an upload has been read, redrawing one stderr line.
struct ProgressReader<R> {
    inner: R,
    sent: u64,
    total: u64,
    label: String,
    progress: Progress,
    last_draw: Option<Instant>,
}

impl<R: Read> ProgressReader<R> {
    fn new(inner: R, total: u64, label: String, progress: Progress) -> ProgressReader<R> {
        ProgressReader {
            inner,
            sent: 0,
            total,
            label,
            progress,
            last_draw: None,
        }
    }

    fn draw(&mut self, force: bool) {
        if self.progress == Progress::Hidden {
            return;
        }
        let now = Instant::now();
        if !force
            && self
                .last_draw
                .is_some_and(|last| now.duration_since(last) < PROGRESS_INTERVAL)
        {
            return;
        }
        self.last_draw = Some(now);
        let line = format_progress(&self.label, self.sent, self.total);
        let mut stderr = std::io::stderr().lock();
        // Progress is a courtesy: a stderr that cannot be written must not fail the upload.
        let _ = write!(stderr, "\r{line}\x1b[K");
        let _ = stderr.flush();
    }

    /// Draws the final state and ends the line.
    fn finish(&mut self) {
        if self.progress == Progress::Stderr {
            self.draw(true);
            let _ = writeln!(std::io::stderr());
        }
    }
}

impl<R: Read> Read for ProgressReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buffer)?;
        self.sent += n as u64;
        self.draw(false);
        Ok(n)
    }
}

/// One progress line: `model.onnx  42%  1.2 MiB / 2.9 MiB`.
pub fn format_progress(label: &str, sent: u64, total: u64) -> String {
    let percent = if total == 0 {
        100
    } else {
        (u128::from(sent.min(total)) * 100 / u128::from(total)) as u64
    };
    format!(
        "{label}  {percent:>3}%  {} / {}",
        format_bytes(sent),
        format_bytes(total)
    )
}

/// Bytes in binary units with one decimal: `512 B`, `1.5 KiB`, `3.0 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_accepts_https_and_loopback_http() {
        assert_eq!(
            check_base_url("https://hub.example:8443/").unwrap(),
            "https://hub.example:8443"
        );
        assert_eq!(
            check_base_url("http://127.0.0.1:7000").unwrap(),
            "http://127.0.0.1:7000"
        );
        assert_eq!(
            check_base_url("http://localhost:7000/").unwrap(),
            "http://localhost:7000"
        );
        assert_eq!(
            check_base_url("http://[::1]:7000").unwrap(),
            "http://[::1]:7000"
        );
        assert_eq!(
            check_base_url("https://proxy.example/outpost/").unwrap(),
            "https://proxy.example/outpost"
        );
    }

    #[test]
    fn base_url_refuses_cleartext_to_remote_hosts_and_junk() {
        let error = check_base_url("http://hub.example:7000").unwrap_err();
        assert!(error.to_string().contains("use https"), "{error}");
        assert!(check_base_url("http://10.0.0.1").is_err());
        assert!(check_base_url("ftp://hub.example").is_err());
        assert!(check_base_url("hub.example:8443").is_err());
        assert!(check_base_url("https://hub.example/?x=1").is_err());
        assert!(check_base_url("not a url").is_err());
    }

    #[test]
    fn client_refuses_tokens_that_cannot_be_a_header() {
        assert!(AdminClient::new("http://127.0.0.1:1", "", None).is_err());
        assert!(AdminClient::new("http://127.0.0.1:1", "a b", None).is_err());
        assert!(AdminClient::new("http://127.0.0.1:1", "tok\n", None).is_err());
        let client = AdminClient::new("http://127.0.0.1:1/", "op_abc123", None).unwrap();
        assert_eq!(client.url("/whoami"), "http://127.0.0.1:1/admin/v1/whoami");
        assert!(!format!("{client:?}").contains("op_abc123"));
    }

    #[test]
    fn ca_file_must_hold_a_certificate() {
        let error = parse_ca(b"not pem at all").unwrap_err();
        assert!(error.to_string().contains("no PEM certificate"), "{error}");
    }

    #[test]
    fn connection_errors_name_the_url() {
        // Port 1 on loopback: nothing listens there, so connecting fails at once.
        let client = AdminClient::new("http://127.0.0.1:1", "token", None).unwrap();
        let error = client.get_json::<api::WhoAmI>("/whoami").unwrap_err();
        let text = format!("{error:#}");
        assert!(
            text.contains("cannot GET http://127.0.0.1:1/admin/v1/whoami"),
            "{text}"
        );
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(path_segment("iris-2.v1_x~"), "iris-2.v1_x~");
        assert_eq!(path_segment("../x"), "..%2Fx");
        assert_eq!(path_segment("site=a,tier=b"), "site%3Da%2Ctier%3Db");
        assert_eq!(path_segment("a b?#"), "a%20b%3F%23");
        assert_eq!(path_segment("é"), "%C3%A9");
    }

    #[test]
    fn error_messages_prefer_the_api_error() {
        let status = StatusCode::CONFLICT;
        assert_eq!(
            error_message(br#"{"error":"version 3 exists"}"#, status),
            "version 3 exists"
        );
        assert_eq!(error_message(b"  plain text\n", status), "plain text");
        assert_eq!(error_message(b"", status), "conflict");
        assert_eq!(error_message(b"\x1b[2Jhostile\x07", status), "[2Jhostile");
        let long = "x".repeat(5000);
        assert_eq!(
            error_message(long.as_bytes(), status).len(),
            MAX_ERROR_MESSAGE
        );
        let error = HubStatusError {
            status: 403,
            message: "role viewer may not publish".to_owned(),
        };
        assert_eq!(
            error.to_string(),
            "hub answered 403: role viewer may not publish"
        );
        assert!(is_not_found(
            &anyhow!(HubStatusError {
                status: 404,
                message: String::new()
            })
            .context("GET x")
        ));
    }

    #[test]
    fn progress_lines() {
        assert_eq!(
            format_progress("m.onnx", 0, 2048),
            "m.onnx    0%  0 B / 2.0 KiB"
        );
        assert_eq!(
            format_progress("m.onnx", 1536, 2048),
            "m.onnx   75%  1.5 KiB / 2.0 KiB"
        );
        assert_eq!(
            format_progress("m.onnx", 3 * 1024 * 1024 * 1024, 3 * 1024 * 1024 * 1024),
            "m.onnx  100%  3.0 GiB / 3.0 GiB"
        );
        assert_eq!(format_progress("empty", 0, 0), "empty  100%  0 B / 0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(10 * 1024 * 1024 + 512 * 1024), "10.5 MiB");
    }

    #[test]
    fn progress_reader_counts_every_byte() {
        let data = vec![7u8; 200_000];
        let mut reader = ProgressReader::new(
            &data[..],
            data.len() as u64,
            "x".to_owned(),
            Progress::Hidden,
        );
        let mut sink = Vec::new();
        reader.read_to_end(&mut sink).unwrap();
        assert_eq!(reader.sent, 200_000);
        assert_eq!(sink, data);
    }
}
