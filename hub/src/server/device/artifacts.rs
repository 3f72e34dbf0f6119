//! Artifact downloads (`/device/v1/artifacts/{sha256}`), whole or by a single byte range, so an
//! interrupted download resumes where it stopped, or by a redirect to a presigned URL of the
//! object store.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use outpost_protocol::Sha256;

use super::request::{authenticate, DeviceError, Kept};
use crate::artifacts::ArtifactError;
use crate::server::metrics::Metrics;
use crate::server::SharedHub;

/// Parses a single `bytes=START-` or `bytes=START-END` range against a file of `len` bytes.
fn parse_range(value: &str, len: u64) -> Option<(u64, u64)> {
    let spec = value.strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = match end.trim() {
        "" => len.checked_sub(1)?,
        end => end.parse::<u64>().ok()?.min(len.checked_sub(1)?),
    };
    (start <= end && start < len).then_some((start, end))
}

pub(super) async fn artifact(
    State(hub): State<SharedHub>,
    Path(digest): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, DeviceError> {
    authenticate(&hub, &method, &uri, &headers, &[], Kept::InMemory).await?;
    let digest = Sha256::from_hex(&digest)
        .ok_or_else(|| DeviceError::bad_request("artifact name is not a hex sha256"))?;
    let Some(len) = hub.artifacts.length(&digest).await.map_err(unavailable)? else {
        return Err(DeviceError::new(
            StatusCode::NOT_FOUND,
            format!("no artifact {digest}"),
        ));
    };
    // With `--artifact-urls signed` the store carries the bytes: the device follows this one
    // redirect, and checks what it gets against the signed length and hash as always.
    if let Some(url) = hub
        .artifacts
        .signed_url(&digest)
        .await
        .map_err(unavailable)?
    {
        Metrics::bump(&hub.metrics.artifact_redirects, 1);
        return Ok((
            StatusCode::TEMPORARY_REDIRECT,
            [
                (header::LOCATION, url),
                (header::CACHE_CONTROL, "no-store".into()),
            ],
        )
            .into_response());
    }
    let range = match headers.get(header::RANGE) {
        None => None,
        Some(value) => {
            let parsed = value.to_str().ok().and_then(|text| parse_range(text, len));
            if parsed.is_none() {
                return Ok((
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{len}"))],
                )
                    .into_response());
            }
            parsed
        }
    };
    let (start, end) = range.unwrap_or((0, len.saturating_sub(1)));
    let count = if len == 0 { 0 } else { end - start + 1 };
    let body = if count == 0 {
        Body::empty()
    } else {
        Body::from_stream(
            hub.artifacts
                .stream(&digest, start..end + 1)
                .await
                .map_err(unavailable)?,
        )
    };
    Metrics::bump(&hub.metrics.artifact_bytes_served, count);
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, count);
    response = match range {
        Some(_) => response
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}")),
        None => response.status(StatusCode::OK),
    };
    response.body(body).map_err(DeviceError::internal)
}

/// The artifact store failed: 503, so the device retries later, as it does when the hub is down.
/// The store's name and error stay in the hub's log.
fn unavailable(error: ArtifactError) -> DeviceError {
    log::error!("serving an artifact: {error}");
    DeviceError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the artifact store is unavailable; try again later",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-", 10), Some((0, 9)));
        assert_eq!(parse_range("bytes=4-", 10), Some((4, 9)));
        assert_eq!(parse_range("bytes=2-5", 10), Some((2, 5)));
        assert_eq!(parse_range("bytes=2-50", 10), Some((2, 9)));
        assert_eq!(parse_range("bytes=10-", 10), None);
        assert_eq!(parse_range("bytes=5-2", 10), None);
        assert_eq!(parse_range("items=0-1", 10), None);
        assert_eq!(parse_range("bytes=-5", 10), None);
    }
}
