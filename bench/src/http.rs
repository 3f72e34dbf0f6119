//! What an HTTP exchange over loopback costs without the agent's API: a keep-alive client that
//! does nothing but write a request and read its answer ([`RawClient`]), and a server that does
//! nothing but read a request and answer a fixed body ([`HttpFloor`]). With them the harness
//! splits the local API's fixed cost into the exchange itself (client, kernel, hyper) and what the
//! API adds (routing, its layers, decoding, encoding, telemetry).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use hyper_util::rt::TokioIo;

/// A keep-alive HTTP/1.1 client over one loopback connection: each call writes the request in one
/// write and reads the answer's head and `Content-Length` body. It parses only what it must, so
/// its own cost is close to the kernel's.
#[derive(Debug)]
pub struct RawClient {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl RawClient {
    pub fn connect(address: SocketAddr) -> anyhow::Result<RawClient> {
        let stream = TcpStream::connect(address)?;
        stream.set_nodelay(true)?;
        // A server that stops answering fails the bench instead of hanging it.
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(RawClient {
            stream,
            buffer: Vec::with_capacity(64 * 1024),
        })
    }

    /// The bytes of a `POST path` with `headers` (each `name: value`) and `body`.
    pub fn request(path: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
        let mut request = format!("POST {path} HTTP/1.1\r\nhost: localhost\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        let mut request = request.into_bytes();
        request.extend_from_slice(body);
        request
    }

    /// Sends `request` (made by [`RawClient::request`]) and returns the answer's body length,
    /// failing on any status but 200.
    pub fn exchange(&mut self, request: &[u8]) -> anyhow::Result<usize> {
        self.stream.write_all(request)?;
        self.buffer.clear();
        let mut chunk = [0u8; 16 * 1024];
        let (head_end, length) = loop {
            let read = self.stream.read(&mut chunk)?;
            anyhow::ensure!(read > 0, "the server closed the connection");
            self.buffer.extend_from_slice(&chunk[..read]);
            if let Some(end) = find(&self.buffer, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buffer[..end]).context("answer head")?;
                anyhow::ensure!(
                    head.starts_with("HTTP/1.1 200"),
                    "the server answered {:?}",
                    head.lines().next().unwrap_or_default()
                );
                let length = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .context("the answer has no Content-Length")?;
                break (end + 4, length);
            }
        };
        while self.buffer.len() < head_end + length {
            let read = self.stream.read(&mut chunk)?;
            anyhow::ensure!(read > 0, "the server closed the connection mid-answer");
            self.buffer.extend_from_slice(&chunk[..read]);
        }
        Ok(length)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Work a [`HttpFloor`] does for each request before answering, on the worker that read it.
pub type FloorWork = Box<dyn Fn() -> anyhow::Result<()> + Send + Sync>;

/// A bare hyper HTTP/1.1 server on loopback, on a runtime like the API's (two workers): it reads
/// each request's body and answers `answer` with status 200, and does nothing else, or only the
/// work it was started with ([`HttpFloor::start_with`]).
#[derive(Debug)]
pub struct HttpFloor {
    address: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl HttpFloor {
    pub fn start(answer: Vec<u8>) -> anyhow::Result<HttpFloor> {
        HttpFloor::start_with(answer, None)
    }

    /// [`HttpFloor::start`] doing `work` for every request, after reading its body: with the
    /// agent path as the work, it is the API without the API's own parsing, routing and encoding.
    pub fn start_with(answer: Vec<u8>, work: Option<FloorWork>) -> anyhow::Result<HttpFloor> {
        let work = std::sync::Arc::new(work);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("http-floor")
            .enable_all()
            .build()?;
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let answer = axum::body::Bytes::from(answer);
        runtime.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let answer = answer.clone();
                let work = work.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let answer = answer.clone();
                        let work = work.clone();
                        async move {
                            let request: hyper::Request<hyper::body::Incoming> = request;
                            let body =
                                axum::body::to_bytes(Body::new(request.into_body()), 1 << 26).await;
                            let worked = match work.as_ref() {
                                Some(work) => work().is_ok(),
                                None => true,
                            };
                            let status = if body.is_ok() && worked { 200 } else { 500 };
                            hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Body::from(answer))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(HttpFloor {
            address,
            runtime: Some(runtime),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for HttpFloor {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
