//! Webhook endpoints as pure logic: which URLs the hub sends to, how a delivery is signed, and
//! when a failed one is tried again.
//!
//! A receiver checks a delivery by computing HMAC-SHA256 over the exact body it received with
//! the endpoint's secret and comparing it with [`SIGNATURE_HEADER`] (`sha256=<hex>`, as GitHub
//! signs its webhooks), and drops a copy it already took by [`IDEMPOTENCY_HEADER`].

use std::time::Duration;

use axum::http::Uri;

/// The signature of a delivery: `sha256=` and the HMAC-SHA256 of the body, in lower-case hex.
pub const SIGNATURE_HEADER: &str = "x-outpost-signature-256";
/// The event's idempotency key, the same on every attempt and every copy of one event.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// `firing`, `resolved` or `test`.
pub const EVENT_HEADER: &str = "x-outpost-event";
/// Shortest secret an operator may give; generated ones are 64 hex digits.
pub const MIN_SECRET: usize = 16;
/// Longest secret or URL kept.
pub const MAX_SECRET: usize = 256;
pub const MAX_URL: usize = 2048;

/// What a webhook endpoint is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Outpost's own JSON ([`super::payload::OutpostPayload`]).
    Outpost,
    /// The JSON Alertmanager's webhook receiver sends ([`super::payload::AlertmanagerPayload`]).
    Alertmanager,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Outpost => "outpost",
            Format::Alertmanager => "alertmanager",
        }
    }

    pub fn parse(text: &str) -> Option<Format> {
        match text {
            "outpost" => Some(Format::Outpost),
            "alertmanager" => Some(Format::Alertmanager),
            _ => None,
        }
    }
}

/// Why a webhook URL or secret is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook URL {0:?} is not a URL with a host")]
    NotUrl(String),
    #[error(
        "webhook URL {0:?} is plain http to a host that is not loopback: use https (plain http \
         is allowed only to 127.0.0.0/8, ::1 and localhost)"
    )]
    PlainHttp(String),
    #[error("webhook URL {0:?} is neither https:// nor http://")]
    Scheme(String),
    #[error("webhook URL {0:?} has a fragment, which is never sent")]
    Fragment(String),
    #[error("webhook URL is {0} bytes long; at most {MAX_URL}")]
    TooLong(usize),
    #[error(
        "webhook secret is {0} characters; it must be {MIN_SECRET} to {MAX_SECRET} printable \
         ASCII characters without spaces"
    )]
    Secret(usize),
    #[error("webhook format {0:?} is not outpost or alertmanager")]
    Format(String),
}

/// Checks a webhook URL: https anywhere, plain http only to a loopback host (127.0.0.0/8, ::1,
/// localhost), never anything else. Its query may carry a receiver's token (a CI trigger's).
pub fn check_url(text: &str) -> Result<(), WebhookError> {
    if text.len() > MAX_URL {
        return Err(WebhookError::TooLong(text.len()));
    }
    let uri: Uri = text
        .parse()
        .map_err(|_| WebhookError::NotUrl(text.to_owned()))?;
    let Some(host) = uri.host().filter(|host| !host.is_empty()) else {
        return Err(WebhookError::NotUrl(text.to_owned()));
    };
    if text.contains('#') {
        return Err(WebhookError::Fragment(text.to_owned()));
    }
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if crate::client::is_loopback(host) => Ok(()),
        Some("http") => Err(WebhookError::PlainHttp(text.to_owned())),
        _ => Err(WebhookError::Scheme(text.to_owned())),
    }
}

/// A URL as listings show it: without its query, which may hold a receiver's token.
pub fn shown_url(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_owned(),
    }
}

/// Checks a secret an operator gave.
pub fn check_secret(secret: &str) -> Result<(), WebhookError> {
    let fine = (MIN_SECRET..=MAX_SECRET).contains(&secret.len())
        && secret.bytes().all(|b| b.is_ascii_graphic());
    if fine {
        Ok(())
    } else {
        Err(WebhookError::Secret(secret.len()))
    }
}

/// The value of [`SIGNATURE_HEADER`] for `body`: HMAC-SHA256 keyed with the secret's bytes.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
}

/// When a delivery that failed `attempts` times (1 or more) is tried again: `first` after the
/// first failure, doubling after each further one, never more than an hour.
pub fn backoff(first: Duration, attempts: u32) -> Duration {
    const CAP: Duration = Duration::from_secs(3600);
    let doublings = attempts.saturating_sub(1).min(31);
    first
        .checked_mul(1u32 << doublings)
        .map_or(CAP, |delay| delay.min(CAP))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_an_independent_hmac() {
        // printf '%s' '{"kind":"test"}' | openssl dgst -sha256 -hmac 'whsec-known-vector'
        assert_eq!(
            signature("whsec-known-vector", br#"{"kind":"test"}"#),
            "sha256=5454c392f71c23efd68dc8817c472148ceac0ff95ef8b24f70d94e6ee91388d9"
        );
        // RFC 4231-style vector, from the same openssl command with -hmac 'key'.
        assert_eq!(
            signature("key", b"The quick brown fox jumps over the lazy dog"),
            "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
        // One byte of difference in the body changes the signature.
        assert_ne!(
            signature("whsec-known-vector", br#"{"kind":"test"} "#),
            signature("whsec-known-vector", br#"{"kind":"test"}"#)
        );
    }

    #[test]
    fn backoff_doubles_from_the_first_delay_up_to_an_hour() {
        let first = Duration::from_secs(10);
        let schedule: Vec<u64> = (1..=11).map(|n| backoff(first, n).as_secs()).collect();
        assert_eq!(
            schedule,
            vec![10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600]
        );
        assert_eq!(backoff(first, u32::MAX), Duration::from_secs(3600));
        assert_eq!(
            backoff(Duration::from_millis(200), 3),
            Duration::from_millis(800)
        );
    }

    #[test]
    fn urls_are_https_or_loopback_http() {
        for good in [
            "https://ci.example/hooks/outpost",
            "https://gitlab.example/api/v4/projects/7/ref/main/trigger/pipeline?token=abc",
            "http://127.0.0.1:9000/hook",
            "http://127.8.9.10/hook",
            "http://[::1]:9000/hook",
            "http://localhost:9000/hook",
        ] {
            assert_eq!(check_url(good), Ok(()), "{good}");
        }
        assert_eq!(
            check_url("http://ci.example/hook"),
            Err(WebhookError::PlainHttp("http://ci.example/hook".to_owned()))
        );
        assert!(check_url("http://10.0.0.1/hook")
            .unwrap_err()
            .to_string()
            .contains("\"http://10.0.0.1/hook\""));
        assert!(matches!(
            check_url("http://128.0.0.1/hook"),
            Err(WebhookError::PlainHttp(_))
        ));
        assert!(matches!(
            check_url("ftp://ci.example/hook"),
            Err(WebhookError::Scheme(_))
        ));
        assert!(matches!(
            check_url("ci.example/hook"),
            Err(WebhookError::NotUrl(_))
        ));
        assert!(matches!(
            check_url("not a url"),
            Err(WebhookError::NotUrl(_))
        ));
        assert!(matches!(
            check_url("https://ci.example/hook#x"),
            Err(WebhookError::Fragment(_))
        ));
        assert_eq!(
            shown_url("https://gitlab.example/trigger?token=abc"),
            "https://gitlab.example/trigger?…"
        );
    }

    #[test]
    fn secrets_are_long_printable_ascii() {
        assert!(check_secret("0123456789abcdef").is_ok());
        assert_eq!(check_secret("short"), Err(WebhookError::Secret(5)));
        assert!(check_secret("0123456789 abcdef").is_err());
    }
}
