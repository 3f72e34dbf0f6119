//! The agent's client of the hub's device API: postcard bodies, every request but enrollment
//! signed with the device key ([`outpost_protocol::auth`]), over HTTPS with the configured CA.
//!
//! A device may know several URLs of one hub (replicas on one database, `hub_urls`). A request
//! goes to the URL that answered last; when that one is unreachable or answers 502, 503 or 504 —
//! what another replica could fix — the request goes to the next URLs in turn, once each, and the
//! first that answers is kept for the requests after it. Any other answer is final: a replica
//! that refuses a request (401, 404) is up, and another would say the same. Each attempt is
//! signed afresh, with its own nonce and time: the replicas share their record of nonces, so a
//! request one of them has seen is refused by the others as a replay.
//!
//! The hub may answer an artifact download with a redirect to a short-lived (presigned) URL of an
//! object store. The agent follows that one hop only, held to the rule hub URLs obey (https, or
//! plain http to loopback), without the device's signing headers, which are for the hub alone.
//! There it trusts the web's roots as well as the configured CA, so a CA bundle for a private hub
//! does not shut out a public store. The URL's query carries the store's signature: logs and
//! errors name the URL as scheme://host/path only. The bytes are judged in `download.rs` whatever
//! their origin.

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};

use outpost_protocol::auth::{
    RequestToSign, HEADER_DEVICE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP,
};
use outpost_protocol::device::{DeviceId, EnrollRequest, EnrollResponse, ErrorResponse};
use outpost_protocol::{sha256, DecodeError, Message, SecretKey, Sha256};
use ureq::http::Uri;
use ureq::tls::{PemItem, RootCerts, TlsConfig};
use ureq::Agent;

use crate::config::Config;

const CONTENT_TYPE: &str = "application/x-outpost-postcard";

/// Answers of a hub URL that another replica could do better than: a load balancer or proxy in
/// front of a replica that is down (502, 504), or a replica that cannot serve now (503). The
/// request goes to the next URL.
const FAILOVER_STATUSES: [u16; 3] = [502, 503, 504];

/// Redirects an artifact download may be answered with; the agent follows one hop.
const REDIRECT_STATUSES: [u16; 5] = [301, 302, 303, 307, 308];

/// The device's identity: its id at the hub and its private key.
#[derive(Debug)]
pub struct DeviceIdentity {
    pub id: DeviceId,
    pub key: SecretKey,
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("cannot reach the hub at {url}: {message}")]
    Transport { url: String, message: String },
    /// Every one of several hub URLs was unreachable or answered 502, 503 or 504.
    #[error("no hub answered {path}: {tried}")]
    Unavailable {
        path: String,
        /// Each URL tried, with what became of the request there.
        tried: String,
    },
    #[error("hub refused {path} with {status}: {message}")]
    Refused {
        path: String,
        status: u16,
        message: String,
    },
    #[error("hub answered {path} with an undecodable body: {0}", path = .1)]
    Decode(#[source] DecodeError, String),
    /// The hub answered in a wire version this agent does not speak.
    #[error("hub answered {path}: {message}")]
    WireVersion { path: String, message: String },
    #[error("cannot read the CA bundle: {0}")]
    Ca(String),
    /// The hub redirected a download where the device does not follow: no absolute URL, a URL
    /// against the rule hub URLs obey, or a second redirect. A refusal, not network trouble.
    #[error("hub redirected {path} where the device does not follow: {reason}")]
    Redirect { path: String, reason: String },
    /// The object store a download was redirected to could not be reached or did not serve it.
    /// `target` is its URL without the query.
    #[error("cannot download {path} from {target}: {message}")]
    Store {
        path: String,
        target: String,
        message: String,
    },
}

impl HubError {
    /// True when the hub refused the request's authentication (401): a signed time outside its
    /// skew window, an unknown device, a replay.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, HubError::Refused { status: 401, .. })
    }

    /// True when retrying later may help (the hub was unreachable or overloaded).
    pub fn is_transient(&self) -> bool {
        match self {
            HubError::Transport { .. } | HubError::Unavailable { .. } | HubError::Store { .. } => {
                true
            }
            HubError::Refused { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            HubError::Decode(..)
            | HubError::WireVersion { .. }
            | HubError::Ca(_)
            | HubError::Redirect { .. } => false,
        }
    }
}

#[derive(Debug)]
pub struct HubClient {
    agent: Agent,
    /// The hub's URLs, at least one, in the configured order.
    hub_urls: Vec<String>,
    /// Index into `hub_urls` of the URL that answered last: every request goes there first.
    current: AtomicUsize,
    store: StoreAgents,
    identity: Option<DeviceIdentity>,
}

/// The clients for an object store a download is redirected to. Their TLS config is not the
/// hub's: the store may be a public one, whose certificate the web's roots vouch for and a
/// private CA bundle does not.
#[derive(Debug)]
struct StoreAgents {
    /// Trusts the web's roots (Mozilla's, as ureq ships them).
    web: Agent,
    /// Trusts the configured CA bundle, when there is one: tried when `web` does not trust the
    /// store's certificate. A chain that ends at a root of either set is trusted, as one verifier
    /// holding both sets would.
    ca: Option<Agent>,
}

/// A started artifact download.
pub struct Download {
    /// 206 when the range was honoured, 200 when the whole file comes.
    pub status: u16,
    /// Where the bytes come from, for messages: the hub's URL, or the object store's it
    /// redirected to without the query (which carries the store's signature).
    pub source: String,
    pub body: Box<dyn Read + Send>,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Download({} from {})", self.status, self.source)
    }
}

/// What one attempt at one hub URL came to.
enum Attempt<T> {
    /// The hub answered: final, whatever it said.
    Answered(T),
    /// Unreachable, or answered 502, 503 or 504: the next URL is tried.
    Unavailable(Unanswered),
}

/// Why one hub URL did not answer.
struct Unanswered {
    /// The error when this URL is the only one.
    error: HubError,
    /// The same, short, for naming beside the URL: the transport error, or the status and the
    /// hub's message.
    reason: String,
}

impl Unanswered {
    fn transport(url: &str, error: &ureq::Error) -> Unanswered {
        let message = error.to_string();
        Unanswered {
            error: HubError::Transport {
                url: url.to_owned(),
                message: message.clone(),
            },
            reason: message,
        }
    }

    fn status(path: &str, status: u16, body: &[u8]) -> Unanswered {
        let error = HubClient::refused(path, status, body);
        let reason = match &error {
            HubError::Refused { message, .. } if !message.is_empty() => {
                format!("answered {status}: {message}")
            }
            _ => format!("answered {status}"),
        };
        Unanswered { error, reason }
    }
}

/// Where the hub redirected a download, checked by [`check_redirect`].
#[derive(Debug)]
pub struct RedirectTarget {
    uri: Uri,
    /// The URL as scheme://host[:port]/path: no user information, no query.
    shown: String,
}

impl RedirectTarget {
    /// The URL as logs and errors may name it.
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

/// Checks the `Location` of a redirect the hub answered a download with: an absolute URL with
/// no user information, https or plain http to a loopback host (the rule of
/// [`crate::config::check_hub_url`], the URL taken as it is). The error never repeats the query.
pub fn check_redirect(location: Option<&str>) -> Result<RedirectTarget, String> {
    let text = location.ok_or("the redirect names no Location")?;
    // What an error may show of a URL that does not parse: up to its query, and not too much.
    let before_query: String = text
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    let uri: Uri = text
        .parse()
        .map_err(|error| format!("Location {before_query:?} is not a URL: {error}"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(format!("Location {before_query:?} is not an absolute URL"));
    };
    let port = uri
        .port_u16()
        .map(|port| format!(":{port}"))
        .unwrap_or_default();
    let shown = format!("{scheme}://{}{port}{}", authority.host(), uri.path());
    if authority.as_str().contains('@') {
        return Err(format!("{shown} carries user information"));
    }
    crate::config::check_transport(text, &shown)?;
    Ok(RedirectTarget { uri, shown })
}

/// True when TLS failed on the server's certificate: another set of roots may trust it.
fn is_certificate_error(error: &ureq::Error) -> bool {
    let tls_error = match error {
        ureq::Error::Rustls(error) => Some(error),
        ureq::Error::Io(error) => error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        _ => None,
    };
    matches!(tls_error, Some(rustls::Error::InvalidCertificate(_)))
}

/// The error code of an S3-style XML error body (`<Code>AccessDenied</Code>`), when it has a
/// plain one. Nothing else of the body is shown: an S3 error can quote the request's signature.
fn store_error_code(body: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(body).ok()?;
    let (_, rest) = text.split_once("<Code>")?;
    let (code, _) = rest.split_once("</Code>")?;
    (!code.is_empty() && code.len() <= 64 && code.chars().all(|c| c.is_ascii_alphanumeric()))
        .then_some(code)
}

impl HubClient {
    pub fn new(config: &Config, identity: Option<DeviceIdentity>) -> Result<HubClient, HubError> {
        let mut tls = TlsConfig::builder();
        let mut store_ca = None;
        if let Some(path) = &config.ca_bundle {
            let pem = std::fs::read(path)
                .map_err(|error| HubError::Ca(format!("{}: {error}", path.display())))?;
            let mut certificates = Vec::new();
            for item in ureq::tls::parse_pem(&pem) {
                if let PemItem::Certificate(certificate) =
                    item.map_err(|error| HubError::Ca(format!("{}: {error}", path.display())))?
                {
                    certificates.push(certificate);
                }
            }
            if certificates.is_empty() {
                return Err(HubError::Ca(format!(
                    "{} holds no certificate",
                    path.display()
                )));
            }
            tls = tls.root_certs(RootCerts::new_with_certs(&certificates));
            store_ca = Some(http_agent(
                config,
                TlsConfig::builder()
                    .root_certs(RootCerts::new_with_certs(&certificates))
                    .build(),
            ));
        }
        let store = StoreAgents {
            web: http_agent(
                config,
                TlsConfig::builder().root_certs(RootCerts::WebPki).build(),
            ),
            ca: store_ca,
        };
        Ok(HubClient {
            agent: http_agent(config, tls.build()),
            hub_urls: config.hub_urls.clone(),
            current: AtomicUsize::new(0),
            store,
            identity,
        })
    }

    /// The hub URL in use: the one that answered last (the first configured before any did).
    pub fn base_url(&self) -> &str {
        self.hub_urls
            .get(self.current_index())
            .map_or("", String::as_str)
    }

    fn current_index(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.hub_urls.len().max(1)
    }

    /// Makes one attempt of a request at each hub URL in turn, from the one in use, until one
    /// answers; that one is in use from then on. Every URL failing is an error naming each with
    /// why (with one URL, that URL's own error).
    fn with_failover<T>(
        &self,
        path: &str,
        mut attempt: impl FnMut(&str) -> Attempt<T>,
    ) -> Result<T, HubError> {
        let first = self.current_index();
        let mut failures: Vec<(&str, Unanswered)> = Vec::new();
        for step in 0..self.hub_urls.len() {
            let index = (first + step) % self.hub_urls.len();
            let url = self.hub_urls[index].as_str();
            match attempt(url) {
                Attempt::Answered(answer) => {
                    if index != first {
                        self.current.store(index, Ordering::Relaxed);
                        let skipped: Vec<String> = failures
                            .iter()
                            .map(|(url, failure)| {
                                format!("hub {url} unreachable ({})", failure.reason)
                            })
                            .collect();
                        log::info!("{}; using {url}", skipped.join("; "));
                    }
                    return Ok(answer);
                }
                Attempt::Unavailable(failure) => failures.push((url, failure)),
            }
        }
        if failures.len() == 1 {
            if let Some((_, failure)) = failures.pop() {
                return Err(failure.error);
            }
        }
        let tried: Vec<String> = failures
            .iter()
            .map(|(url, failure)| format!("{url} ({})", failure.reason))
            .collect();
        Err(HubError::Unavailable {
            path: path.to_owned(),
            tried: tried.join(", "),
        })
    }

    /// The signing headers for one request.
    fn sign(&self, method: &str, path: &str, body: &[u8]) -> Vec<(&'static str, String)> {
        let Some(identity) = &self.identity else {
            return Vec::new();
        };
        let mut nonce = [0u8; 16];
        // Without randomness the nonce is still unique per process thanks to the timestamp and
        // body; a failed read only weakens replay detection to the hub's timestamp window.
        let _ = getrandom::getrandom(&mut nonce);
        let timestamp = crate::unix_now();
        let signature = RequestToSign {
            method,
            path_and_query: path,
            body_sha256: sha256(body),
            timestamp,
            nonce,
        }
        .sign(&identity.key);
        vec![
            (HEADER_DEVICE, identity.id.to_hex()),
            (HEADER_TIMESTAMP, timestamp.to_string()),
            (HEADER_NONCE, hex::encode(nonce)),
            (HEADER_SIGNATURE, hex::encode(signature.0)),
        ]
    }

    /// Posts `frame` to `path` at the hub, failing over between its URLs, each attempt signed
    /// afresh.
    fn post_frame(
        &self,
        path: &str,
        frame: &[u8],
        max_response: usize,
    ) -> Result<(u16, Vec<u8>), HubError> {
        self.with_failover(path, |base_url| {
            let mut request = self
                .agent
                .post(format!("{base_url}{path}"))
                .header("Content-Type", CONTENT_TYPE);
            for (name, value) in self.sign("POST", path, frame) {
                request = request.header(name, value);
            }
            let response = match request.send(frame) {
                Ok(response) => response,
                Err(error) => return Attempt::Unavailable(Unanswered::transport(base_url, &error)),
            };
            let status = response.status().as_u16();
            let body = match response
                .into_body()
                .into_with_config()
                .limit(max_response as u64)
                .read_to_vec()
            {
                Ok(body) => body,
                Err(error) => return Attempt::Unavailable(Unanswered::transport(base_url, &error)),
            };
            if FAILOVER_STATUSES.contains(&status) {
                return Attempt::Unavailable(Unanswered::status(path, status, &body));
            }
            Attempt::Answered((status, body))
        })
    }

    fn refused(path: &str, status: u16, body: &[u8]) -> HubError {
        let message = outpost_protocol::decode::<ErrorResponse>(body)
            .map(|error| error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
        HubError::Refused {
            path: path.to_owned(),
            status,
            message,
        }
    }

    /// Sends `message` to `path` and decodes the answer as `R`.
    pub fn call<M: Message, R: Message>(&self, path: &str, message: &M) -> Result<R, HubError> {
        let frame = outpost_protocol::encode(message).map_err(|error| HubError::Refused {
            path: path.to_owned(),
            status: 0,
            message: error.to_string(),
        })?;
        let (status, body) =
            self.post_frame(path, &frame, R::MAX_FRAME.max(ErrorResponse::MAX_FRAME))?;
        if status != 200 {
            return Err(Self::refused(path, status, &body));
        }
        outpost_protocol::decode(&body).map_err(|error| Self::undecodable(path, error))
    }

    /// A body that does not decode; one in another wire version says which side to upgrade.
    fn undecodable(path: &str, error: DecodeError) -> HubError {
        match error.reason {
            outpost_protocol::DecodeReason::UnsupportedVersion { found } => HubError::WireVersion {
                path: path.to_owned(),
                message: outpost_protocol::envelope::version_mismatch("agent", "hub", found),
            },
            _ => HubError::Decode(error, path.to_owned()),
        }
    }

    /// Sends `message` to `path`, expecting no answer body.
    pub fn send<M: Message>(&self, path: &str, message: &M) -> Result<(), HubError> {
        let frame = outpost_protocol::encode(message).map_err(|error| HubError::Refused {
            path: path.to_owned(),
            status: 0,
            message: error.to_string(),
        })?;
        let (status, body) = self.post_frame(path, &frame, ErrorResponse::MAX_FRAME)?;
        if !(200..300).contains(&status) {
            return Err(Self::refused(path, status, &body));
        }
        Ok(())
    }

    /// Enrolls with a token; needs no identity. Fails over between the hub's URLs like any
    /// request.
    pub fn enroll(&self, request: &EnrollRequest) -> Result<EnrollResponse, HubError> {
        self.call("/device/v1/enroll", request)
    }

    /// Starts downloading an artifact from byte `offset`: from the hub (failing over between its
    /// URLs), or from the object store it redirects to.
    pub fn download(&self, digest: &Sha256, offset: u64) -> Result<Download, HubError> {
        let path = format!("/device/v1/artifacts/{}", digest.to_hex());
        let (source, response) = self.with_failover(&path, |base_url| {
            let mut request = self.agent.get(format!("{base_url}{path}"));
            if offset > 0 {
                request = request.header("Range", format!("bytes={offset}-"));
            }
            for (name, value) in self.sign("GET", &path, &[]) {
                request = request.header(name, value);
            }
            match request.call() {
                Err(error) => Attempt::Unavailable(Unanswered::transport(base_url, &error)),
                Ok(response) if FAILOVER_STATUSES.contains(&response.status().as_u16()) => {
                    let status = response.status().as_u16();
                    let body = error_body(response);
                    Attempt::Unavailable(Unanswered::status(&path, status, &body))
                }
                Ok(response) => Attempt::Answered((format!("{base_url}{path}"), response)),
            }
        })?;
        let status = response.status().as_u16();
        if REDIRECT_STATUSES.contains(&status) {
            let redirect = |reason: String| HubError::Redirect {
                path: path.clone(),
                reason,
            };
            let location = match response
                .headers()
                .get("location")
                .map(|value| value.to_str())
            {
                Some(Err(_)) => return Err(redirect("the redirect's Location is not text".into())),
                Some(Ok(text)) => Some(text),
                None => None,
            };
            let target = check_redirect(location).map_err(redirect)?;
            return self.download_from_store(&path, &target, offset);
        }
        if status != 200 && status != 206 {
            let body = error_body(response);
            return Err(Self::refused(&path, status, &body));
        }
        Ok(Download {
            status,
            source,
            body: Box::new(response.into_body().into_reader()),
        })
    }

    /// Starts downloading `path`'s artifact from the object store the hub redirected to, without
    /// the device's signing headers; a further redirect is refused.
    fn download_from_store(
        &self,
        path: &str,
        target: &RedirectTarget,
        offset: u64,
    ) -> Result<Download, HubError> {
        let get = |agent: &Agent| {
            let mut request = agent.get(target.uri.clone());
            if offset > 0 {
                request = request.header("Range", format!("bytes={offset}-"));
            }
            request.call()
        };
        let answer = match (get(&self.store.web), &self.store.ca) {
            (Err(error), Some(ca)) if is_certificate_error(&error) => get(ca),
            (answer, _) => answer,
        };
        let store_error = |message: String| HubError::Store {
            path: path.to_owned(),
            target: target.shown.clone(),
            message,
        };
        let response = answer.map_err(|error| {
            // ureq names the URL in few errors, but the query must not reach a log.
            let message = match error {
                ureq::Error::BadUri(_) => "ureq refused the URL".to_owned(),
                error => error.to_string(),
            };
            let query = target.uri.query().unwrap_or_default();
            store_error(if query.is_empty() {
                message
            } else {
                message.replace(query, "…")
            })
        })?;
        let status = response.status().as_u16();
        if (300..400).contains(&status) {
            return Err(HubError::Redirect {
                path: path.to_owned(),
                reason: format!(
                    "{} redirected it again ({status}); the device follows one redirect only",
                    target.shown
                ),
            });
        }
        if status != 200 && status != 206 {
            let body = error_body(response);
            return Err(store_error(match store_error_code(&body) {
                Some(code) => format!("answered {status} ({code})"),
                None => format!("answered {status}"),
            }));
        }
        Ok(Download {
            status,
            source: target.shown.clone(),
            body: Box::new(response.into_body().into_reader()),
        })
    }
}

/// The first bytes of an answer's body, for its error message.
fn error_body(response: ureq::http::Response<ureq::Body>) -> Vec<u8> {
    response
        .into_body()
        .into_with_config()
        .limit(ErrorResponse::MAX_FRAME as u64)
        .read_to_vec()
        .unwrap_or_default()
}

/// A ureq client with the agent's timeouts and `tls`, following no redirect and giving every
/// status as an answer.
fn http_agent(config: &Config, tls: TlsConfig) -> Agent {
    Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .user_agent(format!("outpost-agent/{}", env!("CARGO_PKG_VERSION")))
        .timeout_resolve(Some(config.connect_timeout))
        .timeout_connect(Some(config.connect_timeout))
        .timeout_per_read(Some(config.read_timeout))
        .timeout_per_write(Some(config.read_timeout))
        .tls_config(tls)
        .build()
        .new_agent()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "X-Amz-Signature=0123abcd";

    fn client(urls: &[&str]) -> HubClient {
        let text = format!("hub_urls = {urls:?}\ntrust_root = \"r\"\ndata_dir = \"d\"\n");
        let raw = toml::from_str(&text).unwrap();
        let config = crate::config::validate(raw, std::path::Path::new("t.toml")).unwrap();
        HubClient::new(&config, None).unwrap()
    }

    fn down(url: &str) -> Attempt<String> {
        Attempt::Unavailable(Unanswered {
            error: HubError::Transport {
                url: url.to_owned(),
                message: "connection refused".into(),
            },
            reason: "connection refused".into(),
        })
    }

    #[test]
    fn a_presigned_url_is_followed_and_shown_without_its_query() {
        let url = format!("https://s3.example.com:9000/bucket/key?X-Amz-Date=1&{SECRET}");
        let target = check_redirect(Some(&url)).unwrap();
        assert_eq!(target.shown(), "https://s3.example.com:9000/bucket/key");
        assert_eq!(target.uri.to_string(), url, "requested as given");
        let target = check_redirect(Some(&format!("http://127.0.0.1:9000/b/k?{SECRET}"))).unwrap();
        assert_eq!(target.shown(), "http://127.0.0.1:9000/b/k");
        let target = check_redirect(Some("http://[::1]/b/k")).unwrap();
        assert_eq!(target.shown(), "http://[::1]/b/k");
        // A fragment is the client's own: never sent, never shown.
        let target =
            check_redirect(Some(&format!("https://cdn.example.com/k?{SECRET}#f"))).unwrap();
        assert_eq!(target.shown(), "https://cdn.example.com/k");
        assert_eq!(target.uri.query(), Some(SECRET));
    }

    #[test]
    fn a_redirect_against_the_rule_is_refused_without_showing_the_query() {
        for (location, says) in [
            (
                format!("http://s3.example.com/b/k?{SECRET}"),
                "http://s3.example.com/b/k uses plain http to a non-loopback host; device \
                 traffic must use https",
            ),
            (
                format!("/device/v1/artifacts/ab?{SECRET}"),
                "Location \"/device/v1/artifacts/ab\" is not an absolute URL",
            ),
            (
                format!("s3.example.com/b/k?{SECRET}"),
                "Location \"s3.example.com/b/k\" is not a URL",
            ),
            (
                format!("ftp://s3.example.com/b/k?{SECRET}"),
                "ftp://s3.example.com/b/k must start with https:// or http://",
            ),
            (
                format!("https://user:pass@s3.example.com/b/k?{SECRET}"),
                "https://s3.example.com/b/k carries user information",
            ),
            (
                format!("http://127.0.0.1:80@s3.example.com/b/k?{SECRET}"),
                "http://s3.example.com/b/k carries user information",
            ),
            (
                format!("https://s3 example.com/b?{SECRET}"),
                "Location \"https://s3 example.com/b\" is not a URL",
            ),
        ] {
            let error = check_redirect(Some(&location)).unwrap_err();
            assert!(error.starts_with(says), "{location}: {error}");
            assert!(!error.contains(SECRET), "{location}: {error}");
            assert!(!error.contains("pass"), "{location}: {error}");
        }
        assert_eq!(
            check_redirect(None).unwrap_err(),
            "the redirect names no Location"
        );
    }

    #[test]
    fn only_a_plain_s3_error_code_is_shown() {
        let body = b"<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code>\
            <Message>Request has expired</Message></Error>";
        assert_eq!(store_error_code(body), Some("AccessDenied"));
        assert_eq!(store_error_code(b"<Code>a b</Code>"), None);
        assert_eq!(store_error_code(b"not found"), None);
    }

    #[test]
    fn a_request_fails_over_once_to_each_url_and_sticks_to_the_one_that_answered() {
        let client = client(&["https://a:8443", "https://b:8443", "https://c:8443"]);
        assert_eq!(client.base_url(), "https://a:8443");
        let mut tried = Vec::new();
        let answer = client
            .with_failover("/p", |url| {
                tried.push(url.to_owned());
                match url {
                    "https://c:8443" => Attempt::Answered(url.to_owned()),
                    _ => down(url),
                }
            })
            .unwrap();
        assert_eq!(answer, "https://c:8443");
        assert_eq!(
            tried,
            ["https://a:8443", "https://b:8443", "https://c:8443"]
        );
        assert_eq!(client.base_url(), "https://c:8443");

        // The next request starts where the last one was answered, and wraps around.
        let mut tried = Vec::new();
        let answer = client
            .with_failover("/p", |url| {
                tried.push(url.to_owned());
                match url {
                    "https://a:8443" => Attempt::Answered(url.to_owned()),
                    _ => down(url),
                }
            })
            .unwrap();
        assert_eq!(answer, "https://a:8443");
        assert_eq!(tried, ["https://c:8443", "https://a:8443"]);

        // Every URL down: each tried once, all named, and the one in use unchanged.
        let mut tried = Vec::new();
        let error = client
            .with_failover("/p", |url| {
                tried.push(url.to_owned());
                down(url)
            })
            .unwrap_err();
        assert_eq!(tried.len(), 3);
        assert!(error.is_transient());
        assert_eq!(
            error.to_string(),
            "no hub answered /p: https://a:8443 (connection refused), https://b:8443 \
             (connection refused), https://c:8443 (connection refused)"
        );
        assert_eq!(client.base_url(), "https://a:8443");
    }

    #[test]
    fn an_answer_is_final_and_one_url_fails_as_before() {
        let client = client(&["https://a:8443", "https://b:8443"]);
        let mut tried = 0;
        let answer: (u16, Vec<u8>) = client
            .with_failover("/p", |_| {
                tried += 1;
                Attempt::Answered((401, Vec::new()))
            })
            .unwrap();
        assert_eq!((answer.0, tried), (401, 1));

        let client = self::client(&["https://a:8443"]);
        let error = client.with_failover("/p", down).unwrap_err();
        assert_eq!(
            error.to_string(),
            "cannot reach the hub at https://a:8443: connection refused"
        );
        let error = client
            .with_failover("/p", |_| -> Attempt<()> {
                Attempt::Unavailable(Unanswered::status("/p", 503, b"busy"))
            })
            .unwrap_err();
        assert!(
            matches!(error, HubError::Refused { status: 503, .. }),
            "{error:?}"
        );
    }

    #[test]
    fn every_attempt_is_signed_afresh() {
        let text = "hub_url = \"https://a\"\ntrust_root = \"r\"\ndata_dir = \"d\"\n";
        let config =
            crate::config::validate(toml::from_str(text).unwrap(), std::path::Path::new("t"))
                .unwrap();
        let identity = DeviceIdentity {
            id: DeviceId([0xab; 16]),
            key: SecretKey::from_seed([7; 32]),
        };
        let client = HubClient::new(&config, Some(identity)).unwrap();
        let nonce = |headers: Vec<(&'static str, String)>| {
            headers
                .into_iter()
                .find(|(name, _)| *name == HEADER_NONCE)
                .map(|(_, value)| value)
                .unwrap()
        };
        assert_ne!(
            nonce(client.sign("POST", "/p", b"x")),
            nonce(client.sign("POST", "/p", b"x"))
        );
    }
}
