//! `outpost-agent enroll` and `outpost-agent run`: the device identity, and the service that ties
//! the sync loop, the telemetry cache and the local inference API together under systemd.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use outpost_protocol::device::{DeviceId, EnrollRequest};
use outpost_protocol::{Arch, SecretKey};
use tokio::net::TcpListener;

use crate::agent_version;
use crate::api::{self, ApiLimits, ApiState, QueueStats};
use crate::cache::TelemetryCache;
use crate::config::Config;
use crate::hub_client::{DeviceIdentity, HubClient};
use crate::notify::Notifier;
use crate::shadow::{self, Shadow};
use crate::slot::ModelSlot;
use crate::sync::{Shared, Syncer};
use crate::telemetry::Recorder;
use outpost_model::fsutil;

fn identity_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("identity")
}

/// Loads the device key and id written by `enroll`.
pub fn load_identity(data_dir: &Path) -> anyhow::Result<DeviceIdentity> {
    let dir = identity_dir(data_dir);
    let id_path = dir.join("device.id");
    if !id_path.exists() {
        bail!(
            "this device is not enrolled ({} is missing): run `outpost-agent enroll`",
            id_path.display()
        );
    }
    let id_text =
        String::from_utf8(fsutil::read_capped(&id_path, 64)?).context("device.id is not text")?;
    let id = DeviceId::from_hex(id_text.trim())
        .with_context(|| format!("{} is not a device id", id_path.display()))?;
    let key_text = String::from_utf8(fsutil::read_capped(&dir.join("device.key"), 256)?)
        .context("device.key is not text")?;
    let mut seed = [0u8; 32];
    hex::decode_to_slice(key_text.trim(), &mut seed).context("device.key is malformed")?;
    Ok(DeviceIdentity {
        id,
        key: SecretKey::from_seed(seed),
    })
}

/// Generates the device key (mode 0600), enrolls with `token` at the hub, and stores the id. The
/// hub is at `hub_urls` (`--hub`, tried in turn like the config's), or at the config's URLs when
/// it is empty. Each is held to the config's rule (https, or http on loopback) before anything
/// is sent: the token must not travel in the clear.
pub fn enroll(config: &Config, hub_urls: &[String], token: &str) -> anyhow::Result<DeviceId> {
    let mut checked: Vec<String> = Vec::with_capacity(hub_urls.len());
    for text in hub_urls {
        let url = crate::config::check_hub_url(text).map_err(|reason| anyhow!("--hub {reason}"))?;
        if checked.contains(&url) {
            bail!("--hub {url:?} is given twice");
        }
        checked.push(url);
    }
    let dir = identity_dir(&config.data_dir);
    if dir.join("device.id").exists() {
        bail!(
            "this device is already enrolled ({}); remove it to enroll again",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let key_path = dir.join("device.key");
    let key = if key_path.exists() {
        // A key from an earlier, interrupted enrollment is reused rather than replaced.
        let text = String::from_utf8(fsutil::read_capped(&key_path, 256)?)
            .context("device.key is not text")?;
        let mut seed = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut seed).context("device.key is malformed")?;
        SecretKey::from_seed(seed)
    } else {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).context("reading randomness for the device key")?;
        fsutil::write_atomic(
            &key_path,
            format!("{}\n", hex::encode(seed)).as_bytes(),
            0o600,
        )?;
        SecretKey::from_seed(seed)
    };
    let arch = Arch::current().context("this CPU architecture is not supported")?;
    let mut enroll_config = config.clone();
    if !checked.is_empty() {
        enroll_config.hub_urls = checked;
    }
    let client = HubClient::new(&enroll_config, None)?;
    let response = client.enroll(&EnrollRequest {
        token: token.to_owned(),
        public_key: key.public(),
        arch,
        agent_version: agent_version(),
        labels: config.labels.clone(),
    })?;
    fsutil::write_atomic(
        &dir.join("device.id"),
        format!("{}\n", response.device_id).as_bytes(),
        0o644,
    )?;
    Ok(response.device_id)
}

/// Runs the agent, serving the inference API on `listener`, until `shutdown` resolves; then
/// finishes the sync cycle and saves telemetry. The caller binds the listener (the configured
/// `listen` address) and chooses the shutdown signal.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let identity = load_identity(&config.data_dir)?;
    let device_id = identity.id.to_hex();
    let notifier = Arc::new(Notifier::from_env());
    let slot = Arc::new(ModelSlot::new());
    let recorder = Arc::new(Recorder::new());
    let shadow = Arc::new(
        Shadow::start(recorder.clone(), shadow::QUEUE_CAPACITY)
            .context("starting the shadow thread")?,
    );
    let queue = Arc::new(QueueStats::default());
    let (cache, quarantine) =
        TelemetryCache::open(&config.data_dir.join("telemetry"), config.telemetry_cap)
            .context("opening the telemetry cache")?;
    let client = HubClient::new(&config, Some(identity))?;
    let limits = ApiLimits {
        max_body_bytes: 64 * 1024 * 1024,
        request_timeout: Duration::from_secs(30),
    };
    let shared = Shared {
        slot: slot.clone(),
        recorder: recorder.clone(),
        cache: Arc::new(cache),
        queue: queue.clone(),
        notifier: notifier.clone(),
        shadow: shadow.clone(),
        runtimes: Arc::new(crate::runtime::start(&config)),
    };
    let mut syncer = Syncer::start(config, client, device_id.clone(), shared)?;
    let capturer = syncer.capturer();
    if let Some(quarantine) = quarantine {
        syncer.report_event(
            crate::state::ReportKind::Failed,
            format!(
                "telemetry cache was unreadable and was quarantined to {}: {}",
                quarantine.moved_to.display(),
                quarantine.reason
            ),
        );
    }
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let sync_thread = std::thread::Builder::new()
        .name("sync".into())
        .spawn(move || syncer.run(stopped))
        .context("starting the sync thread")?;
    if let Some(interval) = Notifier::watchdog_interval() {
        let notifier = notifier.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            loop {
                ticker.tick().await;
                notifier.watchdog();
            }
        });
    }
    log::info!("agent {device_id} running");
    notifier.ready();
    let state = Arc::new(
        ApiState::new(slot, recorder, queue, limits)
            .with_shadow(shadow)
            .with_capture(capturer),
    );
    let served = api::serve(listener, state, shutdown).await;
    notifier.stopping();
    log::info!("stopping: finishing the sync cycle and saving telemetry");
    drop(stop);
    tokio::task::spawn_blocking(move || sync_thread.join())
        .await
        .context("waiting for the sync thread")?
        .map_err(|_| anyhow::anyhow!("the sync thread panicked"))?;
    served.context("serving the inference API")?;
    log::info!("agent stopped");
    Ok(())
}
