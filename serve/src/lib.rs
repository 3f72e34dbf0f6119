//! The one graceful accept loop: hub and agent both serve HTTP through it.
//!
//! It takes what the caller built (a bound listener, the router, a shutdown future) and owns what
//! happens between the socket and the router: accepting (backing off when accepting fails),
//! serving each connection on a task of its own, and on shutdown closing the listener and letting
//! in-flight requests drain for at most [`Options::drain_timeout`]. Limits on connections belong
//! here too, in [`Options`], so both servers get them from one place.
//!
//! The agent's local API is HTTP/1 only and must link neither `h2` nor TLS
//! (`.ci/check-boundaries`), so [`serve_http1`] is always built and [`serve_auto`] (HTTP/1 or
//! HTTP/2, optionally over TLS) only with the `auto` feature, which only the hub turns on.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};

/// How a server behaves around its connections, chosen by its caller.
#[derive(Debug, Clone)]
pub struct Options {
    /// Names the server in log lines, e.g. "inference API".
    pub name: &'static str,
    /// Time for in-flight requests to finish once shutdown begins; then they are closed.
    pub drain_timeout: Duration,
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
    accept_loop(listener, options, shutdown, move |stream, peer, watcher| {
        let service = TowerToHyperService::new(app.clone());
        async move {
            let connection = hyper::server::conn::http1::Builder::new()
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
    accept_loop(listener, options, shutdown, move |stream, peer, watcher| {
        let service = TowerToHyperService::new(app.clone());
        let tls = tls.clone();
        async move {
            let builder = Builder::new(TokioExecutor::new());
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
    F: Fn(TcpStream, SocketAddr, Watcher) -> C,
    C: Future<Output = ()> + Send + 'static,
{
    let name = options.name;
    let graceful = GracefulShutdown::new();
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
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(stream, peer, graceful.watcher()));
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
