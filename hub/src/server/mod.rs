//! `outpost-hub serve`: the HTTP(S) server, its shared state, and the rollout engine's clock.
//!
//! One listener serves the device API (postcard, under `/device/v1`), the admin API (JSON, under
//! `/admin/v1`), the operator's dashboard (HTML, under `/dashboard`) and `/metrics`. Every route
//! has a body limit and a timeout. On shutdown the listener closes, in-flight requests drain, and
//! the store is flushed.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use tokio::net::TcpListener;

use crate::artifacts::ArtifactStore;
use crate::store::Store;

mod admin;
mod alerts;
mod dashboard;
mod device;
mod drift;
mod engine;
mod fleet;
mod metrics;
mod nonces;
mod tls;
mod verifier;
mod webhooks;

pub use admin::new_admin_token;
pub use engine::{Live, LiveRetirement, LiveRollout};
pub use metrics::Metrics;
pub use webhooks::RetrySettings;

/// Everything `serve` needs, validated by the CLI.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Artifacts unless `artifacts` names a bucket, uploads being staged, and the embedded store
    /// unless `database` names another.
    pub data_dir: PathBuf,
    /// The SQL database the hub keeps its state in; None for SQLite in `data_dir`.
    pub database: Option<crate::store::Database>,
    /// Where artifacts are kept, and how devices download them.
    pub artifacts: crate::artifacts::ArtifactConfig,
    /// PEM certificate chain and private key; None serves plain HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// How often the rollout engine evaluates gates.
    pub tick: Duration,
    /// Seconds a device is told to wait between check-ins when no active or paused rollout
    /// applies to it.
    pub poll_secs: u32,
    /// Seconds a device is told to wait while an active or paused rollout applies to it; never
    /// more than `poll_secs`.
    pub rollout_poll_secs: u32,
    pub max_artifact_bytes: u64,
    /// Time limit for a request to produce its response.
    pub request_timeout: Duration,
    /// Time limit for in-flight requests once shutdown begins.
    pub drain_timeout: Duration,
    pub connections: ConnectionLimits,
    /// Serve `/metrics` without a token.
    pub metrics_public: bool,
    /// What the store keeps of each device's events and telemetry.
    pub retention: crate::store::Retention,
    /// How webhook deliveries that fail are retried.
    pub webhooks: RetrySettings,
}

#[cfg(test)]
impl ServerConfig {
    /// A plain-HTTP configuration in `data_dir` for the server's unit tests, with small limits
    /// and the given check-in intervals.
    pub fn for_tests(data_dir: &std::path::Path, poll_secs: u32, rollout_poll_secs: u32) -> Self {
        ServerConfig {
            data_dir: data_dir.to_owned(),
            database: None,
            artifacts: crate::artifacts::ArtifactConfig::default(),
            tls: None,
            tick: Duration::from_secs(60),
            poll_secs,
            rollout_poll_secs,
            max_artifact_bytes: 1 << 20,
            request_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(1),
            connections: ConnectionLimits {
                header_timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(60),
                max_per_address: 16,
                max_connections: 16,
            },
            metrics_public: false,
            retention: crate::store::Retention::default(),
            webhooks: RetrySettings {
                first_retry: Duration::from_secs(1),
                max_attempts: 3,
            },
        }
    }
}

/// What one client may hold of the hub's connections (see [`outpost_serve::Options`]).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_per_address: usize,
    pub max_connections: usize,
}

/// The state every handler shares.
#[derive(Debug)]
pub struct Hub {
    pub store: Store,
    pub artifacts: ArtifactStore,
    pub metrics: Metrics,
    pub config: ServerConfig,
    /// Requests signed before this instant are refused: nonces are remembered in memory only, so
    /// a request captured before a restart must not become replayable after it.
    pub started_at: u64,
    /// Per device, its latest requests accepted before this start: a device whose clock runs
    /// ahead signs requests dated after `started_at`, and one of those captured before the
    /// restart is refused by this, not by the (empty) nonce cache.
    pub signed_before_start: std::collections::HashMap<[u8; 16], crate::store::LatestRequests>,
    pub nonces: Mutex<nonces::NonceCache>,
    pub keys: RwLock<device::KeyCache>,
    /// Checks device request signatures in batches.
    pub verifier: verifier::Verifier,
    /// Rollouts and retirements as devices see them, rebuilt whenever one changes.
    pub live: RwLock<Arc<Live>>,
    /// This process among the hubs that may share its store: the holder name of its leases.
    pub instance: String,
    /// Whether this hub held the engine's lease at its last tick (for the log).
    pub engine_held: std::sync::atomic::AtomicBool,
    /// Drift profiles of published versions, read once.
    pub profiles: drift::ProfileCache,
    /// What wakes alert evaluation and webhook delivery.
    pub alerts: alerts::AlertWork,
    /// The HTTP client of webhook deliveries.
    pub webhooks: webhooks::WebhookClient,
}

pub type SharedHub = Arc<Hub>;

impl Hub {
    pub async fn open(config: ServerConfig) -> anyhow::Result<SharedHub> {
        let store = match &config.database {
            Some(database) => Store::connect(database)
                .await
                .with_context(|| format!("opening the store in {}", database.describe()))?,
            None => Store::open(&config.data_dir)
                .await
                .with_context(|| format!("opening the store in {}", config.data_dir.display()))?,
        };
        // Each group of telemetry batches prunes its devices' markers as the retention says.
        store.keep_batch_markers_for(config.retention.telemetry_secs);
        let artifacts = ArtifactStore::open(&config.data_dir, &config.artifacts)
            .context("opening the artifact store")?;
        log::info!("artifacts in {}", artifacts.describe());
        match artifacts.check().await {
            crate::artifacts::StoreCheck::Ready => {}
            crate::artifacts::StoreCheck::Refused(message) => anyhow::bail!("{message}"),
            crate::artifacts::StoreCheck::Unreachable(message) => log::warn!(
                "{message}; serving anyway: publishing and downloads fail until it answers"
            ),
        }
        let signed_before_start = store
            .signed_at()
            .await
            .context("reading the devices' latest request times")?;
        let hub = Arc::new(Hub {
            store,
            artifacts,
            metrics: Metrics::default(),
            config,
            started_at: crate::unix_now(),
            signed_before_start,
            nonces: Mutex::new(nonces::NonceCache::default()),
            keys: RwLock::new(device::KeyCache::default()),
            verifier: verifier::Verifier::start(verifier::Verifier::threads_for_this_machine())
                .context("starting the signature verifier threads")?,
            live: RwLock::new(Arc::new(Live::default())),
            instance: instance_name(),
            engine_held: std::sync::atomic::AtomicBool::new(false),
            profiles: drift::ProfileCache::default(),
            alerts: alerts::AlertWork::default(),
            webhooks: webhooks::WebhookClient::new()?,
        });
        engine::reload(&hub).await?;
        Ok(hub)
    }
}

pub fn router(hub: SharedHub) -> Router {
    Router::new()
        .merge(device::routes(hub.clone()))
        .merge(admin::routes(hub.clone()))
        .merge(metrics::routes(hub.clone()))
        .merge(dashboard::routes(hub.clone()))
        .layer(axum::middleware::from_fn_with_state(hub, metrics::track))
}

/// Serves on `listener` until `shutdown` resolves, then drains and flushes. `ready` is called
/// with the bound address once the store is open and TLS is loaded, just before the first
/// connection is accepted: whoever waits for the hub (an `--address-file` reader) learns of it
/// only when it can answer.
pub async fn run(
    config: ServerConfig,
    listener: TcpListener,
    ready: impl FnOnce(std::net::SocketAddr) -> anyhow::Result<()>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let local = listener
        .local_addr()
        .context("reading the listen address")?;
    let acceptor = match &config.tls {
        Some((cert, key)) => Some(tls::acceptor(cert, key)?),
        None => None,
    };
    let hub = Hub::open(config).await?;
    ready(local)?;
    let engine_task = tokio::spawn(clock(hub.clone()));
    let evaluator_task = tokio::spawn(alerts::evaluator(hub.clone()));
    let deliverer_task = tokio::spawn(webhooks::deliverer(hub.clone()));
    let app = router(hub.clone());
    let scheme = if acceptor.is_some() { "https" } else { "http" };
    log::info!("hub serving on {scheme}://{local}");

    // The engine stops when shutdown begins, before in-flight requests drain.
    // So do alert evaluation and webhook delivery: what they had not finished is in the store
    // (the touched models aside, which the next tick evaluates) and resumes at the next start.
    let background = [
        engine_task.abort_handle(),
        evaluator_task.abort_handle(),
        deliverer_task.abort_handle(),
    ];
    let shutdown = async move {
        shutdown.await;
        log::info!("shutting down: draining in-flight requests");
        for task in background {
            task.abort();
        }
    };
    let limits = &hub.config.connections;
    let options = outpost_serve::Options {
        name: "hub",
        drain_timeout: hub.config.drain_timeout,
        header_timeout: limits.header_timeout,
        idle_timeout: limits.idle_timeout,
        max_per_address: limits.max_per_address,
        max_connections: limits.max_connections,
    };
    outpost_serve::serve_auto(listener, acceptor, app, &options, shutdown).await;
    // Another hub sharing the store takes the engine at its next tick.
    if let Err(error) = hub
        .store
        .release_lease(crate::store::ENGINE_LEASE, &hub.instance)
        .await
    {
        log::warn!("releasing the rollout engine's lease: {error}");
    }
    hub.store.flush().await.context("flushing the store")?;
    log::info!("hub stopped");
    Ok(())
}

/// The hub's clock, until the task is aborted: each tick, on the hub that holds the engine's
/// lease, the engine evaluates every rollout, telemetry past the retention is removed and every
/// alert rule is evaluated; on a
/// hub whose store may be shared, the newest root and the rollouts are read back; and on every
/// hub the gauges `/metrics` serves are computed afresh.
async fn clock(hub: SharedHub) {
    let mut interval = tokio::time::interval(hub.config.tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        match engine_lease(&hub).await {
            Ok(true) => {
                if let Err(error) = engine::tick(&hub).await {
                    log::error!("rollout engine: {error:#}");
                }
                if let Err(error) = engine::prune(&hub).await {
                    log::error!("pruning telemetry past the retention: {error:#}");
                }
                if let Err(error) = alerts::evaluate(&hub, None).await {
                    log::error!("evaluating alert rules: {error:#}");
                }
            }
            Ok(false) => {}
            Err(error) => log::error!("renewing the rollout engine's lease: {error:#}"),
        }
        // Another hub sharing the store may have changed a rollout: check-ins answer from what
        // the store holds now.
        if hub.store.shared() {
            if let Err(error) = hub.store.refresh().await {
                log::error!("reading the newest root back: {error:#}");
            }
            if let Err(error) = engine::reload(&hub).await {
                log::error!("reading the rollouts back: {error:#}");
            }
        }
        if let Err(error) = metrics::refresh_fleet(&hub).await {
            log::error!("computing the fleet's metrics: {error:#}");
        }
    }
}

/// Takes or renews the rollout engine's lease, on a store other hubs may share: whether this hub
/// runs the engine this tick. It
/// lasts three ticks (at least two seconds), so a hub that stops renewing it (killed, cut off
/// from the database) hands the engine to another within that.
async fn engine_lease(hub: &SharedHub) -> anyhow::Result<bool> {
    // An embedded store is this process's alone (its file lock): no other hub can run the
    // engine, and a hub restarted after a crash must not wait out its predecessor's lease.
    if !hub.store.shared() {
        return Ok(true);
    }
    let ttl = (hub.config.tick * 3).max(Duration::from_secs(2));
    let held = hub
        .store
        .hold_lease(
            crate::store::ENGINE_LEASE,
            &hub.instance,
            unix_millis(),
            u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        )
        .await?;
    let was = hub
        .engine_held
        .swap(held, std::sync::atomic::Ordering::SeqCst);
    if held != was {
        if held {
            log::info!("this hub ({}) runs the rollout engine", hub.instance);
        } else {
            log::info!("another hub runs the rollout engine");
        }
    }
    Ok(held)
}

pub(crate) fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// A name for this process among hubs: its host, its process id and random bytes.
fn instance_name() -> String {
    let mut random = [0u8; 4];
    let _ = getrandom::getrandom(&mut random);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!(
        "{}/{}/{}",
        host.trim(),
        std::process::id(),
        hex::encode(random)
    )
}
