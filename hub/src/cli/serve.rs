//! `outpost-hub serve` and `outpost-hub admin bootstrap`: the commands that run on the hub host.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;

use super::parse_duration;
use crate::server::{self, ServerConfig};
use crate::store::{Database, Store};
use crate::{audit, unix_now};
use outpost_model::fsutil;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Data directory: the artifacts unless --artifacts names a bucket, and the embedded store
    /// (SQLite, `hub.db`) unless --database names another.
    #[arg(long, env = "OUTPOST_HUB_DATA")]
    pub data: PathBuf,
    /// The SQL database to keep the hub's state in: `postgres://USER@HOST/NAME` (hubs sharing
    /// one database serve one fleet) or `sqlite:PATH`. Default: SQLite in the data directory.
    #[arg(long, env = "OUTPOST_HUB_DATABASE")]
    pub database: Option<Database>,
    /// Where artifacts are kept: `s3://BUCKET[/PREFIX]` in S3-compatible storage (hubs sharing
    /// one database share it too), its credentials and region from `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and `AWS_REGION`. Default: `artifacts/` in the data directory.
    #[arg(long, env = "OUTPOST_HUB_ARTIFACTS")]
    pub artifacts: Option<String>,
    /// The S3 endpoint, for storage other than AWS (MinIO, Garage, Ceph): `https://HOST:PORT`.
    /// Default: `AWS_ENDPOINT`, else AWS itself.
    #[arg(long, env = "OUTPOST_HUB_ARTIFACTS_ENDPOINT", requires = "artifacts")]
    pub artifacts_endpoint: Option<String>,
    /// How devices download artifacts: `hub` (the hub streams them from the store) or `signed`
    /// (the hub redirects each download to a presigned URL of the S3 store, which then carries
    /// the bytes; devices still check the signed hash and length).
    #[arg(
        long,
        value_enum,
        default_value = "hub",
        env = "OUTPOST_HUB_ARTIFACT_URLS"
    )]
    pub artifact_urls: crate::artifacts::ArtifactUrls,
    /// How long a presigned artifact URL stays valid. A download that breaks off asks the hub
    /// for a fresh one.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    pub artifact_url_ttl: Duration,
    /// Address to listen on; port 0 picks a free port (see --address-file).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// PEM certificate chain for HTTPS.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Allow plain HTTP on a non-loopback address. Devices and tokens then travel in the clear.
    #[arg(long)]
    pub insecure_http: bool,
    /// How often the rollout engine evaluates its gates.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub tick: Duration,
    /// Seconds devices wait between check-ins outside a rollout. At most 300: a device that
    /// missed one check-in is not yet silent (10 minutes), and a plan's device timeout (default
    /// 15 minutes) leaves room for the first check-in of a new rollout.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=300))]
    pub poll_secs: u32,
    /// Seconds devices wait between check-ins while an active or paused rollout applies to them;
    /// capped at --poll-secs.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=300))]
    pub rollout_poll_secs: u32,
    /// Largest artifact accepted, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub max_artifact_mib: u64,
    /// Time limit for a request to produce its response.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Time a client has to send a request's headers (HTTP/1), from connecting or from the end
    /// of its previous response: closes slow-header and idle keep-alive connections.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// A connection that moves no byte for this long is closed (HTTP/2 included). Longer than
    /// --request-timeout.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Connections held at once from one IP address; more are closed when accepted. Devices
    /// behind one NAT share an address: raise it for a large site.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_address: u32,
    /// Connections held at once in all; more are closed when accepted. Capped below the
    /// process's open-file limit (the unit sets LimitNOFILE=65536).
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Events (status reports, enrollment, label changes) kept per device, newest first. A
    /// report's reason is kept up to 1 KiB.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub retain_events: u32,
    /// How long drift summaries and shadow comparisons are kept after their hourly window ends;
    /// older windows are removed on the engine's tick and not stored when they arrive.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub retain_telemetry: Duration,
    /// How long the hourly drift aggregates (each model version's summaries merged per label
    /// group and hour, whatever the number of devices) are kept after their hour ends; removed
    /// on the engine's tick. Fleet-wide drift (`/metrics`, the dashboard, reports over a label
    /// group) reads them, so reports reach back this far. The hourly inference counters that
    /// error-rate and latency alert rules judge are kept as long.
    #[arg(long, default_value = "400d", value_parser = parse_duration)]
    pub retain_drift_aggregates: Duration,
    /// Serve `/metrics` to anyone who can reach the hub. By default a scrape needs an admin token
    /// of any role (`admin-token create --role viewer --expires never` makes one for a scraper):
    /// the metrics name models, features and the fleet's state.
    #[arg(long)]
    pub metrics_public: bool,
    /// How long a webhook delivery that failed waits before its next attempt; the wait doubles
    /// after each further failure, up to an hour.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub webhook_retry: Duration,
    /// Attempts at a webhook delivery before it moves to the dead-letter list (`outpost-hub
    /// webhook dead-letters`). The default, with --webhook-retry 10s, tries for about 3.4 hours.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub webhook_attempts: u32,
    /// Write the bound address (`host:port`) to this file once the hub can answer (store open).
    #[arg(long)]
    pub address_file: Option<PathBuf>,
}

impl ServeArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let tls = self.tls_cert.clone().zip(self.tls_key.clone());
        if tls.is_none() && !self.listen.ip().is_loopback() {
            if !self.insecure_http {
                bail!(
                    "plain HTTP is only allowed on a loopback address; give --tls-cert and --tls-key, or --insecure-http"
                );
            }
            log::warn!(
                "serving plain HTTP on {}: device traffic and admin tokens are not encrypted",
                self.listen
            );
        }
        std::fs::create_dir_all(&self.data)
            .with_context(|| format!("creating data directory {}", self.data.display()))?;
        let config = ServerConfig {
            data_dir: self.data.clone(),
            database: self.database.clone(),
            artifacts: crate::artifacts::ArtifactConfig {
                location: self.artifacts.clone(),
                endpoint: self.artifacts_endpoint.clone(),
                urls: self.artifact_urls,
                url_ttl: self.artifact_url_ttl,
            },
            tls,
            tick: self.tick,
            poll_secs: self.poll_secs,
            rollout_poll_secs: self.rollout_poll_secs.min(self.poll_secs),
            max_artifact_bytes: self.max_artifact_mib.saturating_mul(1024 * 1024),
            request_timeout: self.request_timeout,
            drain_timeout: self.drain_timeout,
            connections: server::ConnectionLimits {
                header_timeout: self.header_timeout,
                idle_timeout: self.idle_timeout,
                max_per_address: self.max_connections_per_address as usize,
                max_connections: self.max_connections as usize,
            },
            metrics_public: self.metrics_public,
            retention: crate::store::Retention {
                events_per_device: self.retain_events as usize,
                telemetry_secs: self.retain_telemetry.as_secs(),
                drift_aggregate_secs: self.retain_drift_aggregates.as_secs(),
            },
            webhooks: server::RetrySettings {
                first_retry: self.webhook_retry,
                max_attempts: self.webhook_attempts,
            },
        };
        if self.metrics_public {
            log::warn!(
                "--metrics-public: /metrics, with model names, features and fleet state, is \
                 served to anyone who can reach {}",
                self.listen
            );
        }
        if config.connections.idle_timeout <= config.request_timeout {
            bail!(
                "--idle-timeout ({:?}) must be longer than --request-timeout ({:?}): a request \
                 being answered moves no byte meanwhile",
                config.connections.idle_timeout,
                config.request_timeout
            );
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind(self.listen)
                .await
                .with_context(|| format!("listening on {}", self.listen))?;
            let address_file = self.address_file;
            let ready = move |local: std::net::SocketAddr| match &address_file {
                Some(path) => fsutil::write_atomic(path, local.to_string().as_bytes(), 0o644),
                None => Ok(()),
            };
            server::run(config, listener, ready, outpost_serve::shutdown_signal()).await
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create the first admin token, on the hub host, from its data directory.
    Bootstrap(BootstrapArgs),
    /// Move a data directory's store of Outpost 0.1 (sled, in DATA/db) into the SQL store, once,
    /// with the hub stopped. The old store is left where it was.
    Migrate(MigrateArgs),
}

#[derive(Debug, clap::Args)]
pub struct BootstrapArgs {
    #[arg(long, env = "OUTPOST_HUB_DATA")]
    pub data: PathBuf,
    /// The hub's SQL database, as `serve --database` takes it; default: SQLite in --data.
    #[arg(long, env = "OUTPOST_HUB_DATABASE")]
    pub database: Option<Database>,
    /// Name recorded for the token in the audit log.
    #[arg(long, default_value = "admin")]
    pub name: String,
    /// How long the token works (`90d`, ...); without it, until revoked. Bootstrap again if
    /// every admin token has expired.
    #[arg(long, value_parser = parse_duration)]
    pub expires: Option<Duration>,
}

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The data directory that holds the old store (DATA/db).
    #[arg(long, env = "OUTPOST_HUB_DATA")]
    pub data: PathBuf,
    /// The SQL database to fill, as `serve --database` takes it; default: SQLite in --data. It
    /// must be new: the migration refuses a store that already holds devices, tokens, models or
    /// audit entries.
    #[arg(long, env = "OUTPOST_HUB_DATABASE")]
    pub database: Option<Database>,
}

/// A current-thread runtime for a command that runs outside the server.
fn block_on<T>(work: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(work)
}

/// The store `database` names, or the embedded one in `data`.
async fn open_store(data: &std::path::Path, database: Option<&Database>) -> anyhow::Result<Store> {
    Ok(match database {
        Some(database) => Store::connect(database)
            .await
            .with_context(|| format!("opening the store in {}", database.describe()))?,
        None => Store::open(data)
            .await
            .with_context(|| format!("opening the store in {}", data.display()))?,
    })
}

impl AdminCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            AdminCommand::Bootstrap(args) => block_on(bootstrap(args)),
            AdminCommand::Migrate(args) => block_on(migrate(args)),
        }
    }
}

async fn bootstrap(args: BootstrapArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating data directory {}", args.data.display()))?;
    let store = open_store(&args.data, args.database.as_ref()).await?;
    // Bootstrapping again is for a hub whose admin tokens all expired or were lost.
    let now = unix_now();
    let working_admin = store
        .admin_tokens()
        .await?
        .iter()
        .any(|token| token.role == crate::store::RoleRecord::Admin && !token.expired(now));
    if working_admin {
        bail!("this hub already has an admin token that has not expired; create more with `outpost-hub admin-token create`");
    }
    let expires = args
        .expires
        .map(|after| now.saturating_add(after.as_secs()));
    let created =
        server::new_admin_token(&store, &args.name, crate::api::Role::Admin, expires).await?;
    audit::append(
        &store,
        unix_now(),
        "bootstrap",
        "admin-token create",
        &created.id,
        &format!("{} as admin", args.name),
    )
    .await?;
    store.close().await?;
    println!("{}", created.token);
    Ok(())
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let store = match &args.database {
        Some(database) => Store::connect(database)
            .await
            .with_context(|| format!("opening the store in {}", database.describe()))?,
        None => Store::connect(&Database::Sqlite(Store::sqlite_file(&args.data)))
            .await
            .with_context(|| format!("opening the store in {}", args.data.display()))?,
    };
    let imported = store
        .import_sled(&args.data)
        .await
        .with_context(|| format!("migrating the store in {}", args.data.display()))?;
    store.close().await?;
    println!("migrated: {imported}");
    println!(
        "the old store stays in {}; remove it once the hub runs on the new one",
        args.data.join("db").display()
    );
    Ok(())
}
