//! A man in the middle between an agent and a real hub, for tests of what a network or a broken
//! hub can do to a device.
//!
//! [`Proxy`] listens on loopback and forwards each HTTP/1.1 request to the hub on a fresh
//! connection. A test's hook sees every answer before the agent does, and may pass it on, change
//! it (a replayed or re-signed document), cut the connection partway through the body, or
//! trickle the body at a set rate (a stalling hub, or one pushing more bytes than it should).
//! Every exchange is logged with the request's headers and the body bytes actually sent, so a
//! test can assert what crossed the wire.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest request or response head the proxy reads.
const MAX_HEAD: usize = 64 * 1024;
/// Largest body the proxy buffers; test artifacts are far smaller.
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Largest piece of a body written at once. Small, so that when the agent closes the connection
/// the proxy learns of it, and stops counting bytes as sent, within a few writes.
const WRITE_CHUNK: usize = 16 * 1024;

/// One request as the agent sent it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// One answer, with its body de-chunked. `content-length`, `transfer-encoding` and `connection`
/// are set by the proxy when it sends the answer on.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What the proxy does with an answer.
#[derive(Debug)]
pub enum Verdict {
    /// Send it on (possibly changed by the hook).
    Forward(Response),
    /// Announce the full body, send only this many bytes of it, and close the connection.
    Cut(Response, usize),
    /// Announce the full body and send it at this many bytes per second, until it is all sent,
    /// the agent closes the connection or the proxy is dropped.
    Trickle(Response, u64),
}

/// A finished exchange, for assertions.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub request: Request,
    pub status: u16,
    /// The body's full length as the hub sent it.
    pub body_len: usize,
    /// Body bytes written to the agent's connection before the answer ended or the agent closed
    /// it. Socket buffers hold a little more than the agent read when it closed.
    pub body_sent: usize,
    /// From the request's arrival to the end of the answer (or of the connection).
    pub elapsed: Duration,
}

type Hook = Box<dyn FnMut(&Request, Response) -> Verdict + Send>;
type Intercept = Box<dyn FnMut(&Request) -> Option<Response> + Send>;

struct Shared {
    upstream: SocketAddr,
    hook: Mutex<Hook>,
    intercept: Mutex<Intercept>,
    log: Mutex<Vec<Exchange>>,
    stop: AtomicBool,
}

/// A running proxy; stops accepting when dropped.
pub struct Proxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("address", &self.address)
            .field("upstream", &self.shared.upstream)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Starts forwarding to the plain-HTTP hub at `upstream` (`http://127.0.0.1:PORT`), passing
    /// every answer on unchanged until [`Proxy::set_hook`] says otherwise.
    pub fn start(upstream: &str) -> Proxy {
        let upstream: SocketAddr = upstream
            .strip_prefix("http://")
            .unwrap_or(upstream)
            .parse()
            .expect("the proxy's upstream is http://IP:PORT");
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let address = listener.local_addr().expect("reading the proxy's address");
        listener
            .set_nonblocking(true)
            .expect("making the proxy's listener non-blocking");
        let shared = Arc::new(Shared {
            upstream,
            hook: Mutex::new(Box::new(|_, response| Verdict::Forward(response))),
            intercept: Mutex::new(Box::new(|_| None)),
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let accept = {
            let shared = shared.clone();
            std::thread::spawn(move || accept_loop(listener, shared))
        };
        Proxy {
            address,
            shared,
            accept: Some(accept),
        }
    }

    /// The URL agents use instead of the hub's.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Replaces the function that sees every request before it is sent on, from now on: when it
    /// returns an answer, the proxy gives that answer and the hub never sees the request.
    pub fn set_intercept(
        &self,
        intercept: impl FnMut(&Request) -> Option<Response> + Send + 'static,
    ) {
        *self.shared.intercept.lock().expect("proxy intercept lock") = Box::new(intercept);
    }

    /// Replaces the hook that sees every answer from now on.
    pub fn set_hook(&self, hook: impl FnMut(&Request, Response) -> Verdict + Send + 'static) {
        *self.shared.hook.lock().expect("proxy hook lock") = Box::new(hook);
    }

    /// Every exchange so far, in order of completion.
    pub fn log(&self) -> Vec<Exchange> {
        self.shared.log.lock().expect("proxy log lock").clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    if let Err(error) = serve(client, &shared) {
                        eprintln!("proxy: {error}");
                    }
                });
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(error) => {
                eprintln!("proxy: accepting: {error}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// One request on one client connection, then close.
fn serve(client: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let arrived = Instant::now();
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let (start, headers) = read_head(&mut reader)?;
    let mut parts = start.split(' ');
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Err(invalid(format!("request line {start:?}")));
    };
    let length = content_length(&headers)?;
    let body = read_exact_body(&mut reader, length)?;
    let request = Request {
        method: method.to_owned(),
        path: path.to_owned(),
        headers,
        body,
    };

    let intercepted = {
        let mut intercept = shared
            .intercept
            .lock()
            .map_err(|_| invalid("intercept lock"))?;
        intercept(&request)
    };
    let (response, intercepted) = match intercepted {
        Some(response) => (response, true),
        None => {
            let mut upstream = TcpStream::connect(shared.upstream)?;
            upstream.set_read_timeout(Some(Duration::from_secs(60)))?;
            let mut head = format!("{} {} HTTP/1.1\r\n", request.method, request.path);
            for (name, value) in &request.headers {
                if name != "connection" {
                    head.push_str(&format!("{name}: {value}\r\n"));
                }
            }
            head.push_str("connection: close\r\n\r\n");
            upstream.write_all(head.as_bytes())?;
            upstream.write_all(&request.body)?;
            let response = read_response(&mut BufReader::new(upstream), &request.method)?;
            (response, false)
        }
    };

    let body_len = response.body.len();
    let status = response.status;
    let verdict = if intercepted {
        Verdict::Forward(response)
    } else {
        let mut hook = shared.hook.lock().map_err(|_| invalid("hook lock"))?;
        hook(&request, response)
    };
    let (response, keep, rate) = match verdict {
        Verdict::Forward(response) => {
            let len = response.body.len();
            (response, len, None)
        }
        Verdict::Cut(response, keep) => {
            let keep = keep.min(response.body.len());
            (response, keep, None)
        }
        Verdict::Trickle(response, rate) => {
            let len = response.body.len();
            (response, len, Some(rate.max(1)))
        }
    };
    let mut out = format!("HTTP/1.1 {} {}\r\n", response.status, response.reason);
    // An answer to HEAD has no body, and its content-length is that of the body a GET would get
    // (an object store's HEAD tells an object's size so): passed on as it came.
    let head = request.method == "HEAD";
    for (name, value) in &response.headers {
        let framing = matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "connection"
        );
        if !framing || (head && name == "content-length") {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    if !head {
        out.push_str(&format!("content-length: {}\r\n", response.body.len()));
    }
    out.push_str("connection: close\r\n\r\n");
    let mut client = client;
    let mut sent = 0;
    let written = client.write_all(out.as_bytes()).and_then(|()| {
        send_body(
            &mut client,
            &response.body[..keep],
            rate,
            &shared.stop,
            &mut sent,
        )
    });
    let _ = client.shutdown(Shutdown::Both);
    shared
        .log
        .lock()
        .map_err(|_| invalid("log lock"))?
        .push(Exchange {
            request,
            status,
            body_len,
            body_sent: sent,
            elapsed: arrived.elapsed(),
        });
    written
}

/// Writes `body` in small pieces, at `rate` bytes per second when one is given, counting in
/// `sent` what the connection took. Stops early, without error, when the proxy is dropped.
fn send_body(
    client: &mut TcpStream,
    body: &[u8],
    rate: Option<u64>,
    stop: &AtomicBool,
    sent: &mut usize,
) -> std::io::Result<()> {
    let started = Instant::now();
    // Twenty pieces a second at most when paced, so a slow rate still sends in whole bytes.
    let chunk = rate.map_or(WRITE_CHUNK, |rate| {
        usize::try_from(rate / 20).map_or(WRITE_CHUNK, |piece| piece.clamp(1, WRITE_CHUNK))
    });
    for piece in body.chunks(chunk) {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        client.write_all(piece)?;
        *sent += piece.len();
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(*sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    client.flush()
}

fn invalid(message: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message.into())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// Reads a start line and headers, names lower-cased.
fn read_head(reader: &mut impl BufRead) -> std::io::Result<(String, Vec<(String, String)>)> {
    let mut total = 0;
    let mut line = String::new();
    let mut start = None;
    let mut headers = Vec::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        total += n;
        if n == 0 {
            return Err(invalid("connection closed inside the head"));
        }
        if total > MAX_HEAD {
            return Err(invalid("head too long"));
        }
        let trimmed = line.trim_end_matches(['\r', '\n']);
        if trimmed.is_empty() {
            break;
        }
        match start {
            None => start = Some(trimmed.to_owned()),
            Some(_) => {
                let (name, value) = trimmed
                    .split_once(':')
                    .ok_or_else(|| invalid(format!("header line {trimmed:?}")))?;
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
    }
    Ok((start.unwrap_or_default(), headers))
}

fn content_length(headers: &[(String, String)]) -> std::io::Result<usize> {
    match header(headers, "content-length") {
        None => Ok(0),
        Some(text) => {
            let length: usize = text
                .parse()
                .map_err(|_| invalid(format!("content-length {text:?}")))?;
            if length > MAX_BODY {
                return Err(invalid(format!("body of {length} bytes")));
            }
            Ok(length)
        }
    }
}

fn read_exact_body(reader: &mut impl Read, length: usize) -> std::io::Result<Vec<u8>> {
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(body)
}

fn read_response(reader: &mut impl BufRead, method: &str) -> std::io::Result<Response> {
    let (start, headers) = read_head(reader)?;
    let mut parts = start.splitn(3, ' ');
    let status: u16 = parts
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid(format!("status line {start:?}")))?;
    let reason = parts.next().unwrap_or("").to_owned();
    let body = if method == "HEAD" || status == 204 || status == 304 {
        Vec::new()
    } else if header(&headers, "transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        read_chunked(reader)?
    } else if header(&headers, "content-length").is_some() {
        read_exact_body(reader, content_length(&headers)?)?
    } else {
        let mut body = Vec::new();
        reader.take(MAX_BODY as u64 + 1).read_to_end(&mut body)?;
        if body.len() > MAX_BODY {
            return Err(invalid("response body too long"));
        }
        body
    };
    Ok(Response {
        status,
        reason,
        headers,
        body,
    })
}

fn read_chunked(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let size_text = line.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| invalid(format!("chunk size {size_text:?}")))?;
        if body.len() + size > MAX_BODY {
            return Err(invalid("response body too long"));
        }
        if size == 0 {
            // Trailers, then the blank line.
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let at = body.len();
        body.resize(at + size, 0);
        reader.read_exact(&mut body[at..])?;
        line.clear();
        reader.read_line(&mut line)?;
    }
}
