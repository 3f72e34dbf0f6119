//! Artifact downloads (`/device/v1/artifacts/{sha256}`), whole or by a single byte range, so an
//! interrupted download resumes where it stopped.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use outpost_protocol::Sha256;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::request::{authenticate, DeviceError, Kept};
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
    let path = hub.artifacts.path(&digest);
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(DeviceError::new(
                StatusCode::NOT_FOUND,
                format!("no artifact {digest}"),
            ));
        }
        Err(error) => return Err(DeviceError::internal(error)),
    };
    let len = file.metadata().await.map_err(DeviceError::internal)?.len();
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
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(DeviceError::internal)?;
    Metrics::bump(&hub.metrics.artifact_bytes_served, count);
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        file.take(count),
        64 * 1024,
    ));
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
