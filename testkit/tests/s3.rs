//! The throwaway S3-compatible server the object-store suites run against
//! (`outpost_testkit::s3`): it starts with an empty bucket and a key for it, answers S3 requests,
//! stops, comes back on the same port with its bucket, and several run side by side.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use outpost_testkit::s3::{BUCKET, S3};

fn start() -> S3 {
    let started = Instant::now();
    let server = S3::start().unwrap_or_else(|error| panic!("{error}"));
    eprintln!(
        "Garage started at {} in {:?}",
        server.endpoint(),
        started.elapsed()
    );
    server
}

/// The status line of an unsigned `GET /<bucket>` to `endpoint`, or the connection's error.
fn unsigned_get(endpoint: &str, path: &str) -> Result<String, String> {
    let host = endpoint
        .strip_prefix("http://")
        .ok_or_else(|| format!("{endpoint} is not an http:// URL"))?;
    let mut stream = TcpStream::connect(host).map_err(|error| error.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|error| error.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|error| error.to_string())?;
    Ok(answer.lines().next().unwrap_or_default().to_owned())
}

#[test]
fn a_server_starts_empty_and_keeps_its_bucket_across_a_stop() {
    let mut server = start();
    let endpoint = server.endpoint();
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint}");
    assert_eq!(server.bucket(), BUCKET);
    assert_eq!(server.region(), "garage");
    let key_id = server.access_key_id().to_owned();
    assert!(
        key_id.len() == 26
            && key_id.starts_with("GK")
            && key_id[2..].bytes().all(|byte| byte.is_ascii_hexdigit()),
        "{key_id}"
    );
    assert_eq!(server.secret_access_key().len(), 64);
    assert_eq!(server.object_count().unwrap(), 0);
    assert_eq!(server.unfinished_uploads().unwrap(), 0);
    assert_eq!(server.unfinished_multipart_uploads().unwrap(), 0);
    // Unsigned, the request is refused by S3 itself: the API is up and checks signatures.
    let refused = unsigned_get(&endpoint, &format!("/{BUCKET}")).unwrap();
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");

    server.stop().unwrap();
    assert!(unsigned_get(&endpoint, "/").is_err());
    assert!(server.object_count().is_err());
    server.start_again().unwrap();
    assert_eq!(server.endpoint(), endpoint);
    assert_eq!(server.access_key_id(), key_id);
    assert_eq!(server.object_count().unwrap(), 0);
    let refused = unsigned_get(&endpoint, &format!("/{BUCKET}")).unwrap();
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(
        server.log().contains("Received SIGTERM"),
        "{}",
        server.log()
    );
}

#[test]
fn servers_run_side_by_side() {
    let first = start();
    let second = start();
    assert_ne!(first.endpoint(), second.endpoint());
    assert_ne!(first.access_key_id(), second.access_key_id());
    assert_eq!(first.object_count().unwrap(), 0);
    assert_eq!(second.object_count().unwrap(), 0);
}
