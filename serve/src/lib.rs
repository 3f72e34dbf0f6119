//! The one graceful accept loop: hub and agent both serve HTTP through it.
//!
//! It takes what the caller built (a bound listener, the router, a shutdown future) and owns what
//! happens between the socket and the router: accepting (backing off when accepting fails),
//! serving each connection on a task of its own, and on shutdown closing the listener and letting
//! in-flight requests drain for at most [`Options::drain_timeout`].
//!
//! It also bounds what a client that sends nothing useful can hold, so that no number of such
//! clients starves the others (a slowloris): a connection must send each request's headers
//! within [`Options::header_timeout`] of its start or of the previous response, one that moves
//! no byte for [`Options::idle_timeout`] is closed, and connections beyond
//! [`Options::max_per_address`] from one IP address, or [`Options::max_connections`] in all, are
//! closed as soon as they are accepted.
//!
//! The agent's local API is HTTP/1 only and must link neither `h2` nor TLS
//! (`.ci/check-boundaries`), so [`serve_http1`] is always built and [`serve_auto`] (HTTP/1 or
//! HTTP/2, optionally over TLS) only with the `auto` feature, which only the hub turns on.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// How a server behaves around its connections, chosen by its caller.
#[derive(Debug, Clone)]
pub struct Options {
    /// Names the server in log lines, e.g. "inference API".
    pub name: &'static str,
    /// Time for in-flight requests to finish once shutdown begins; then they are closed.
    pub drain_timeout: Duration,
    /// Time an HTTP/1 client has to send a request's headers, counted from the connection's
    /// start or from the end of the previous response: it closes both a connection trickling
    /// its headers and one kept alive without a next request.
    pub header_timeout: Duration,
    /// A connection that reads or writes no byte for this long is closed, whatever its protocol
    /// (an HTTP/2 connection with no stream, say).
    pub idle_timeout: Duration,
    /// Connections held at once from one IP address; more are closed when accepted.
    pub max_per_address: usize,
    /// Connections held at once in all; more are closed when accepted.
    pub max_connections: usize,
}

/// A future that resolves on SIGTERM or SIGINT, with both handlers installed when this is called,
/// not when the future is first polled: a server calls it before it says it is ready (writes its
/// address file, notifies systemd), so a stop sent right after that finds the handler in place
/// and drains, instead of the signal's default action killing the process. Must be called within
/// a tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        match (term, interrupt) {
            (Ok(mut term), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            (Err(error), _) | (_, Err(error)) => {
                log::error!("cannot listen for SIGTERM and SIGINT: {error}");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Time a client has to complete a TLS handshake.
#[cfg(feature = "auto")]
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` over HTTP/1 on `listener` until `shutdown` resolves, then drains.
pub async fn serve_http1(
    listener: TcpListener,
    app: Router,
    options: &Options,
    shutdown: impl Future<Output = ()>,
) {
    let name = options.name;
    let header_timeout = options.header_timeout;
    accept_loop(listener, options, shutdown, move |stream, peer, watcher| {
        let service = TowerToHyperService::new(app.clone());
        async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = watcher.watch(connection).await {
                log::debug!("{name}: connection from {peer} ended: {error}");
            }
        }
    })
    .await;
}

/// Serves `app` over HTTP/1 or HTTP/2 (whichever the client speaks), over TLS when `tls` is
/// given, on `listener` until `shutdown` resolves, then drains.
#[cfg(feature = "auto")]
pub async fn serve_auto(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    options: &Options,
    shutdown: impl Future<Output = ()>,
) {
    use hyper_util::rt::TokioExecutor;
    use hyper_util::server::conn::auto::Builder;

    let name = options.name;
    let header_timeout = options.header_timeout;
    accept_loop(listener, options, shutdown, move |stream, peer, watcher| {
        let service = TowerToHyperService::new(app.clone());
        let tls = tls.clone();
        async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            builder.http2().timer(TokioTimer::new());
            let result = match tls {
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(tls_stream)) => {
                            let connection =
                                builder.serve_connection(TokioIo::new(tls_stream), service);
                            watcher.watch(connection.into_owned()).await
                        }
                        Ok(Err(error)) => {
                            return log::debug!("tls handshake from {peer} failed: {error}");
                        }
                        Err(_) => return log::debug!("tls handshake from {peer} timed out"),
                    }
                }
                None => {
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(connection.into_owned()).await
                }
            };
            if let Err(error) = result {
                log::debug!("{name}: connection from {peer} ended: {error}");
            }
        }
    })
    .await;
}

/// Accepts until `shutdown` resolves, hands each connection to `serve_connection` on a task of
/// its own, then closes the listener and waits for the watched connections to finish.
async fn accept_loop<F, C>(
    listener: TcpListener,
    options: &Options,
    shutdown: impl Future<Output = ()>,
    serve_connection: F,
) where
    F: Fn(Idle<TcpStream>, SocketAddr, Watcher) -> C,
    C: Future<Output = ()> + Send + 'static,
{
    let name = options.name;
    let graceful = GracefulShutdown::new();
    let capacity = open_file_capacity();
    if capacity < options.max_connections {
        log::warn!(
            "{name}: holding at most {capacity} connections, not {}: the process may open no \
             more files (raise LimitNOFILE)",
            options.max_connections
        );
    }
    let held = Held::new(
        options.max_per_address,
        options.max_connections.min(capacity),
    );
    let refused = AtomicU64::new(0);
    let idle_timeout = options.idle_timeout;
    let header_timeout = options.header_timeout;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    log::warn!("{name}: accepting a connection failed: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(slot) = held.take(peer.ip()) else {
            // Dropping the stream closes it. Logged at the first refusal and then at every
            // power of two, so a flood cannot flood the log too.
            let count = refused.fetch_add(1, Ordering::Relaxed) + 1;
            if count.is_power_of_two() {
                log::warn!(
                    "{name}: closed a connection from {peer}: over the limit of {} per address \
                     or {} in all ({count} refused so far)",
                    held.per_address,
                    held.total
                );
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (stream, activity) = Idle::new(stream);
        let connection = serve_connection(stream, peer, graceful.watcher());
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                () = connection => {}
                () = activity.idle_for(idle_timeout) => {
                    log::debug!("{name}: closed the connection from {peer}: idle for {idle_timeout:?}");
                }
                // Before its first byte a connection is not yet HTTP/1's to time: telling
                // HTTP/1 from HTTP/2 (or starting TLS) waits for that byte.
                () = activity.silent_for(header_timeout) => {
                    log::debug!("{name}: closed the connection from {peer}: nothing sent in {header_timeout:?}");
                }
            }
        });
    }
    drop(listener);
    let drain = options.drain_timeout;
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        log::warn!("{name}: requests still in flight after {drain:?}; closing them");
    }
}

/// Open files kept aside for what a server opens besides its clients' connections: its store,
/// artifacts, log, outgoing connections.
const RESERVED_FILES: u64 = 128;

/// Raises this process's soft limit on open files to its hard limit (the limit systemd's
/// `LimitNOFILE` sets; a soft limit of 1,024 is a common default) and returns how many
/// connections it can then hold beside [`RESERVED_FILES`].
fn open_file_capacity() -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let soft = match (limit.current, limit.maximum) {
        (Some(current), maximum) if maximum.is_none_or(|maximum| maximum > current) => {
            let raised = Rlimit {
                current: maximum,
                maximum,
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => maximum,
                Err(error) => {
                    log::warn!("raising the open-file limit from {current}: {error}");
                    Some(current)
                }
            }
        }
        (current, _) => current,
    };
    soft.map_or(usize::MAX, |soft| {
        usize::try_from(soft.saturating_sub(RESERVED_FILES)).unwrap_or(usize::MAX)
    })
}

/// Counts the connections held, per IP address and in all.
struct Held {
    per_address: usize,
    total: usize,
    counts: Arc<Mutex<Counts>>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

impl Held {
    fn new(per_address: usize, total: usize) -> Held {
        Held {
            per_address,
            total,
            counts: Arc::default(),
        }
    }

    /// A place for one more connection from `address`, or None when a limit is reached.
    fn take(&self, address: IpAddr) -> Option<Slot> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let from_address = counts.by_address.get(&address).copied().unwrap_or(0);
        if counts.total >= self.total || from_address >= self.per_address {
            return None;
        }
        counts.total += 1;
        counts.by_address.insert(address, from_address + 1);
        Some(Slot {
            address,
            counts: self.counts.clone(),
        })
    }
}

/// One connection's place among those held; given back when dropped.
struct Slot {
    address: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.total = counts.total.saturating_sub(1);
        if let Some(count) = counts.by_address.get_mut(&self.address) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.by_address.remove(&self.address);
            }
        }
    }
}

/// A stream that notes when it last read or wrote a byte.
struct Idle<S> {
    inner: S,
    activity: Activity,
}

/// When a connection last moved a byte, as milliseconds since it was accepted, and whether the
/// client has sent one yet.
#[derive(Clone)]
struct Activity {
    start: Instant,
    last: Arc<AtomicU64>,
    heard: Arc<AtomicBool>,
}

impl Activity {
    fn note(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    fn note_read(&self) {
        self.heard.store(true, Ordering::Relaxed);
        self.note();
    }

    /// Resolves if the client has sent no byte `timeout` after the connection was accepted;
    /// never, once it has.
    async fn silent_for(&self, timeout: Duration) {
        tokio::time::sleep_until(self.start + timeout).await;
        if self.heard.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves once the connection has moved no byte for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl<S> Idle<S> {
    fn new(inner: S) -> (Idle<S>, Activity) {
        let activity = Activity {
            start: Instant::now(),
            last: Arc::default(),
            heard: Arc::default(),
        };
        (
            Idle {
                inner,
                activity: activity.clone(),
            },
            activity,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.note_read();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Idle<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(written)) if written > 0) {
            self.activity.note();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(written)) if written > 0) {
            self.activity.note();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_given_back_when_its_connection_ends() {
        let held = Held::new(2, 3);
        let (a, b) = (IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2]));
        let first = held.take(a).unwrap();
        let _second = held.take(a).unwrap();
        assert!(held.take(a).is_none(), "a third from one address");
        let _third = held.take(b).unwrap();
        assert!(
            held.take(IpAddr::from([10, 0, 0, 1])).is_none(),
            "a fourth in all"
        );
        drop(first);
        assert!(held.take(a).is_some());
    }
}
