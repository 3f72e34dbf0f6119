//! The agent's TOML configuration: [`RawConfig`] mirrors the file, [`Config`] is what the agent
//! runs on, built once by [`load`]. A bad file fails at start with an error naming the key.
//!
//! ```toml
//! hub_url = "https://hub.example.com:8443"
//! # or, for replicas of one hub (`outpost-hub serve` processes on one PostgreSQL database), all
//! # of them: a request goes to the one that last answered, and to the next in turn when it is
//! # unreachable or answers 502, 503 or 504. Give `hub_url` or `hub_urls`, not both.
//! # hub_urls = ["https://hub-a.example.com:8443", "https://hub-b.example.com:8443"]
//! ca_bundle = "/etc/outpost/ca.pem"        # optional: trust this CA for the hub
//! trust_root = "/etc/outpost/root.bin"     # the initial signed trust root
//! data_dir = "/var/lib/outpost"
//! labels = ["site=berlin", "line=3"]          # the device's own: plans' selectors bind these
//!
//! [sync]
//! poll_interval = "5m"                   # the longest wait between check-ins
//! poll_jitter = "5s"
//! max_backoff = "5m"
//! connect_timeout = "10s"
//! read_timeout = "30s"
//! download_deadline = "30m"
//! min_download_rate = "1KiB"               # per second, judged after 10 s
//! telemetry_flush = "60s"
//! capture_interval = "1h"                # how often capture allowances are asked for
//!
//! [inference]
//! listen = "127.0.0.1:8080"
//! threads = 1
//! probation_timeout = "2m"
//!
//! [storage]
//! telemetry_cap = "64MiB"
//! max_model_size = "512MiB"
//! keep_versions = 2
//!
//! [models]
//! max_models = 8                         # models served side by side, at most 16
//! max_memory = "2GiB"                    # their model files together
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_model::inference::{OnnxRuntimeSettings, Provider, ProviderKind, RuntimeChoice};
use outpost_protocol::Label;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: `{key}` {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The hub; exactly one of `hub_url` and `hub_urls` is given.
    pub hub_url: Option<String>,
    /// The hub's replicas, tried in turn.
    pub hub_urls: Option<Vec<String>>,
    pub ca_bundle: Option<PathBuf>,
    pub trust_root: PathBuf,
    pub data_dir: PathBuf,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub sync: RawSync,
    #[serde(default)]
    pub inference: RawInference,
    #[serde(default)]
    pub storage: RawStorage,
    #[serde(default)]
    pub models: RawModels,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModels {
    pub max_models: Option<usize>,
    pub max_memory: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSync {
    pub poll_interval: Option<String>,
    pub poll_jitter: Option<String>,
    pub max_backoff: Option<String>,
    pub connect_timeout: Option<String>,
    pub read_timeout: Option<String>,
    pub download_deadline: Option<String>,
    pub min_download_rate: Option<String>,
    pub telemetry_flush: Option<String>,
    pub capture_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInference {
    pub listen: Option<String>,
    pub threads: Option<usize>,
    pub probation_timeout: Option<String>,
    pub runtime: Option<String>,
    #[serde(default)]
    pub onnxruntime: RawOnnxRuntime,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOnnxRuntime {
    pub library: Option<PathBuf>,
    #[serde(default)]
    pub providers: Vec<String>,
    /// Per provider name, its options as ONNX Runtime names them.
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    pub telemetry_cap: Option<String>,
    pub max_model_size: Option<String>,
    pub keep_versions: Option<usize>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    /// The hub's URLs without trailing slashes: one (`hub_url`) or its replicas (`hub_urls`), at
    /// least one, each checked by [`check_hub_url`], none twice. The first is tried first.
    pub hub_urls: Vec<String>,
    pub ca_bundle: Option<PathBuf>,
    pub trust_root: PathBuf,
    pub data_dir: PathBuf,
    pub labels: Vec<Label>,
    /// The longest wait between check-ins: the hub names the wait in every answer (5 minutes
    /// outside a rollout by default, 30 seconds in one), and the agent waits the shorter of the two.
    pub poll_interval: Duration,
    pub poll_jitter: Duration,
    /// Longest wait after a failed cycle (the hub unreachable, a download broken off or refused);
    /// the wait doubles from one second up to it.
    pub max_backoff: Duration,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub download_deadline: Duration,
    /// Bytes per second below which a download is abandoned as too slow.
    pub min_download_rate: u64,
    pub telemetry_flush: Duration,
    /// How often the hub is asked for the capture allowances of the models served; also at
    /// start and whenever the models served change. Allowances change seldom, and asking every
    /// cycle would cost a signed request each poll (about 750 B with its HTTP heads).
    pub capture_interval: Duration,
    pub listen: SocketAddr,
    pub threads: usize,
    pub probation_timeout: Duration,
    /// `[inference] runtime`: which runtime serves the models (see `outpost_model::inference`'s
    /// `Runtimes`).
    pub runtime: RuntimeChoice,
    /// `[inference.onnxruntime]`: its library and execution providers.
    pub onnxruntime: OnnxRuntimeSettings,
    pub telemetry_cap: u64,
    pub max_model_size: u64,
    pub keep_versions: usize,
    /// Most models served side by side; a plan for one more is refused.
    pub max_models: usize,
    /// Largest sum of the model files of the versions served, one per model, the candidate's
    /// counted in place of the version it replaces: tract holds a model's weights in memory, so
    /// this bounds what the served models take. A version past it is refused.
    pub max_memory: u64,
}

/// Parses `512`, `64KiB`, `64MiB`, `1GiB`, `10MB`.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// Reads and validates the config at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let raw: RawConfig = toml::from_str(&text).map_err(|error| ConfigError::Parse {
        path: path.to_owned(),
        message: error.to_string(),
    })?;
    validate(raw, path)
}

pub fn validate(raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
    let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
        path: path.to_owned(),
        key,
        reason,
    };
    let duration = |key: &'static str, value: &Option<String>, default: &str| {
        let text = value.as_deref().unwrap_or(default);
        humantime::parse_duration(text)
            .map_err(|error| invalid(key, format!("{text:?} is not a duration: {error}")))
    };
    let size = |key: &'static str, value: &Option<String>, default: &str| {
        let text = value.as_deref().unwrap_or(default);
        parse_size(text).ok_or_else(|| {
            invalid(
                key,
                format!("{text:?} is not a size (e.g. 512, 64KiB, 64MiB, 1GiB)"),
            )
        })
    };

    let hub_urls = hub_urls(raw.hub_url.as_deref(), raw.hub_urls.as_deref(), invalid)?;
    let labels = raw
        .labels
        .iter()
        .map(|text| {
            Label::parse(text).map_err(|error| invalid("labels", format!("{text:?}: {error}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let listen_text = raw.inference.listen.as_deref().unwrap_or("127.0.0.1:8080");
    let listen: SocketAddr = listen_text.parse().map_err(|_| {
        invalid(
            "inference.listen",
            format!("{listen_text:?} is not an address like 127.0.0.1:8080"),
        )
    })?;
    let threads = raw.inference.threads.unwrap_or(1);
    if threads == 0 || threads > 256 {
        return Err(invalid(
            "inference.threads",
            format!("{threads} is not within 1..=256"),
        ));
    }
    let runtime = match &raw.inference.runtime {
        None => RuntimeChoice::default(),
        Some(text) => text
            .parse()
            .map_err(|reason| invalid("inference.runtime", reason))?,
    };
    let onnxruntime = onnxruntime_settings(&raw.inference.onnxruntime, invalid)?;
    let keep_versions = raw.storage.keep_versions.unwrap_or(2);
    if keep_versions > 32 {
        return Err(invalid(
            "storage.keep_versions",
            format!("{keep_versions} is more than 32"),
        ));
    }
    let max_models = raw.models.max_models.unwrap_or(8);
    let most = outpost_protocol::device::MAX_DEVICE_MODELS;
    if !(1..=most).contains(&max_models) {
        return Err(invalid(
            "models.max_models",
            format!("{max_models} is not within 1..={most}"),
        ));
    }
    let poll_interval = duration("sync.poll_interval", &raw.sync.poll_interval, "5m")?;
    if poll_interval.is_zero() {
        return Err(invalid("sync.poll_interval", "must be positive".into()));
    }
    let telemetry_cap = size("storage.telemetry_cap", &raw.storage.telemetry_cap, "64MiB")?;
    if telemetry_cap < 4 * 1024 {
        return Err(invalid(
            "storage.telemetry_cap",
            "must be at least 4KiB".into(),
        ));
    }
    let relative = |key: &'static str, path: &PathBuf| {
        if path.as_os_str().is_empty() {
            return Err(invalid(key, "is empty".into()));
        }
        Ok(path.clone())
    };
    Ok(Config {
        path: path.to_owned(),
        hub_urls,
        ca_bundle: raw
            .ca_bundle
            .as_ref()
            .map(|ca| relative("ca_bundle", ca))
            .transpose()?,
        trust_root: relative("trust_root", &raw.trust_root)?,
        data_dir: relative("data_dir", &raw.data_dir)?,
        labels,
        poll_interval,
        poll_jitter: duration("sync.poll_jitter", &raw.sync.poll_jitter, "5s")?,
        max_backoff: duration("sync.max_backoff", &raw.sync.max_backoff, "5m")?,
        connect_timeout: duration("sync.connect_timeout", &raw.sync.connect_timeout, "10s")?,
        read_timeout: duration("sync.read_timeout", &raw.sync.read_timeout, "30s")?,
        download_deadline: duration("sync.download_deadline", &raw.sync.download_deadline, "30m")?,
        min_download_rate: size(
            "sync.min_download_rate",
            &raw.sync.min_download_rate,
            "1KiB",
        )?,
        telemetry_flush: duration("sync.telemetry_flush", &raw.sync.telemetry_flush, "60s")?,
        capture_interval: duration("sync.capture_interval", &raw.sync.capture_interval, "1h")?,
        listen,
        threads,
        probation_timeout: duration(
            "inference.probation_timeout",
            &raw.inference.probation_timeout,
            "2m",
        )?,
        runtime,
        onnxruntime,
        telemetry_cap,
        max_model_size: size(
            "storage.max_model_size",
            &raw.storage.max_model_size,
            "512MiB",
        )?,
        keep_versions,
        max_models,
        max_memory: size("models.max_memory", &raw.models.max_memory, "2GiB")?,
    })
}

/// `hub_url` or `hub_urls`, exactly one of them, checked: each URL by [`check_hub_url`], none
/// twice, the list not empty.
fn hub_urls(
    hub_url: Option<&str>,
    hub_urls: Option<&[String]>,
    invalid: impl Fn(&'static str, String) -> ConfigError,
) -> Result<Vec<String>, ConfigError> {
    match (hub_url, hub_urls) {
        (Some(_), Some(_)) => Err(invalid(
            "hub_urls",
            "is set beside `hub_url`: give one of the two (`hub_urls` for several hubs)".into(),
        )),
        (None, None) => Err(invalid(
            "hub_url",
            "is missing: give `hub_url` (one hub) or `hub_urls` (several)".into(),
        )),
        (Some(text), None) => Ok(vec![
            check_hub_url(text).map_err(|reason| invalid("hub_url", reason))?
        ]),
        (None, Some([])) => Err(invalid(
            "hub_urls",
            "is empty: give at least one URL".into(),
        )),
        (None, Some(texts)) => {
            let mut urls: Vec<String> = Vec::with_capacity(texts.len());
            for text in texts {
                let url = check_hub_url(text).map_err(|reason| invalid("hub_urls", reason))?;
                if urls.contains(&url) {
                    return Err(invalid("hub_urls", format!("{url:?} is listed twice")));
                }
                urls.push(url);
            }
            Ok(urls)
        }
    }
}

/// A hub URL without its trailing slashes, if the device may talk to it: https, or plain http to
/// a loopback address only (device traffic, enrollment tokens included, must not travel in the
/// clear). The error says why not.
pub fn check_hub_url(text: &str) -> Result<String, String> {
    let hub_url = text.trim_end_matches('/').to_owned();
    check_transport(&hub_url, &format!("{hub_url:?}"))?;
    Ok(hub_url)
}

/// The rule of [`check_hub_url`] for a URL taken as it is (the one a hub redirects a download
/// to, whose query must not change): https, or plain http to a loopback host only. The error
/// names the URL as `shown`, so a caller can leave out what must not be shown (the signature in
/// a presigned URL's query).
pub fn check_transport(url: &str, shown: &str) -> Result<(), String> {
    let authority = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{shown} must start with https:// or http://"))?;
    if url.starts_with("http://") && !is_loopback_authority(authority) {
        return Err(format!(
            "{shown} uses plain http to a non-loopback host; device traffic must use https"
        ));
    }
    Ok(())
}

/// True for `localhost`, `127.x.y.z` and `[::1]`, with or without a port, followed by anything
/// after a `/`, `?` or `#`. An authority with user information is never loopback:
/// `127.0.0.1:80@example.com` is a connection to example.com.
fn is_loopback_authority(authority: &str) -> bool {
    let host = authority.split(['/', '?', '#']).next().unwrap_or_default();
    if host.contains('@') {
        return false;
    }
    let host = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(host, _)| host)
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `[inference.onnxruntime]` checked: known providers, each once, options only for listed ones.
fn onnxruntime_settings(
    raw: &RawOnnxRuntime,
    invalid: impl Fn(&'static str, String) -> ConfigError,
) -> Result<OnnxRuntimeSettings, ConfigError> {
    let mut providers: Vec<Provider> = Vec::with_capacity(raw.providers.len());
    for name in &raw.providers {
        let kind: ProviderKind = name
            .parse()
            .map_err(|reason| invalid("inference.onnxruntime.providers", reason))?;
        if providers.iter().any(|provider| provider.kind == kind) {
            return Err(invalid(
                "inference.onnxruntime.providers",
                format!("{name:?} is listed twice"),
            ));
        }
        let options = raw
            .options
            .get(name)
            .map(|options| options.clone().into_iter().collect())
            .unwrap_or_default();
        providers.push(Provider { kind, options });
    }
    if let Some(name) = raw
        .options
        .keys()
        .find(|name| !raw.providers.contains(name))
    {
        return Err(invalid(
            "inference.onnxruntime.options",
            format!("{name:?} has options but is not in inference.onnxruntime.providers"),
        ));
    }
    if let Some(library) = &raw.library {
        if library.as_os_str().is_empty() {
            return Err(invalid("inference.onnxruntime.library", "is empty".into()));
        }
    }
    Ok(OnnxRuntimeSettings {
        library: raw.library.clone(),
        providers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: "t.toml".into(),
            message: error.to_string(),
        })?;
        validate(raw, Path::new("t.toml"))
    }

    const BASE: &str =
        "hub_url = \"https://hub:8443\"\ntrust_root = \"root.bin\"\ndata_dir = \"data\"\n";

    #[test]
    fn defaults_apply() {
        let config = parse(BASE).unwrap();
        assert_eq!(config.poll_interval, Duration::from_secs(300));
        assert_eq!(config.keep_versions, 2);
        assert_eq!(config.telemetry_cap, 64 << 20);
        assert!(config.listen.ip().is_loopback());
    }

    #[test]
    fn errors_name_the_key() {
        let error = parse(&format!("{BASE}[sync]\npoll_interval = \"soon\"\n")).unwrap_err();
        assert!(
            error.to_string().contains("`sync.poll_interval`"),
            "{error}"
        );
        let error = parse(&format!("{BASE}[storage]\ntelemetry_cap = \"lots\"\n")).unwrap_err();
        assert!(
            error.to_string().contains("`storage.telemetry_cap`"),
            "{error}"
        );
        let error = parse(&format!("{BASE}labels = [\"a b\"]\n")).unwrap_err();
        assert!(error.to_string().contains("`labels`"), "{error}");
        let error = parse(&format!("{BASE}[inference]\nthreads = 0\n")).unwrap_err();
        assert!(error.to_string().contains("`inference.threads`"), "{error}");
        let error = parse(&format!("{BASE}colour = \"blue\"\n")).unwrap_err();
        assert!(error.to_string().contains("colour"), "{error}");
        let error =
            parse("hub_url = \"http://hub.example.com\"\ntrust_root = \"r\"\ndata_dir = \"d\"\n")
                .unwrap_err();
        assert!(error.to_string().contains("`hub_url`"), "{error}");
        assert!(
            parse("hub_url = \"http://127.0.0.1:9\"\ntrust_root = \"r\"\ndata_dir = \"d\"\n")
                .is_ok()
        );
    }

    const REST: &str = "trust_root = \"r\"\ndata_dir = \"d\"\n";

    #[test]
    fn one_hub_url_or_several_hub_urls() {
        let config = parse(BASE).unwrap();
        assert_eq!(config.hub_urls, ["https://hub:8443"]);
        let config = parse(&format!(
            "hub_urls = [\"https://a:8443/\", \"https://b:8443\", \"http://127.0.0.1:9\"]\n{REST}"
        ))
        .unwrap();
        assert_eq!(
            config.hub_urls,
            ["https://a:8443", "https://b:8443", "http://127.0.0.1:9"],
            "in the order given, without trailing slashes"
        );
        let config = parse(&format!("hub_urls = [\"https://a:8443\"]\n{REST}")).unwrap();
        assert_eq!(config.hub_urls, ["https://a:8443"]);
    }

    #[test]
    fn hub_urls_errors_name_the_key() {
        for (text, key, says) in [
            (
                "hub_url = \"https://a\"\nhub_urls = [\"https://b\"]\n",
                "`hub_urls`",
                "beside `hub_url`",
            ),
            ("", "`hub_url`", "give `hub_url` (one hub) or `hub_urls`"),
            ("hub_urls = []\n", "`hub_urls`", "is empty"),
            (
                "hub_urls = [\"https://a:8443\", \"https://a:8443/\"]\n",
                "`hub_urls`",
                "\"https://a:8443\" is listed twice",
            ),
            (
                "hub_urls = [\"https://a:8443\", \"http://hub.example.com\"]\n",
                "`hub_urls`",
                "uses plain http to a non-loopback host",
            ),
            (
                "hub_urls = [\"ftp://a\"]\n",
                "`hub_urls`",
                "must start with https:// or http://",
            ),
        ] {
            let error = parse(&format!("{text}{REST}")).unwrap_err().to_string();
            assert!(error.contains(key), "{text}: {error}");
            assert!(error.contains(says), "{text}: {error}");
        }
    }

    /// `127.0.0.1:80@example.com` is user information in front of example.com: plain http to it
    /// is not loopback traffic.
    #[test]
    fn user_information_does_not_make_a_host_loopback() {
        for url in [
            "http://127.0.0.1:80@example.com",
            "http://localhost@example.com/",
            "http://127.0.0.1@[::1]",
        ] {
            let error = check_hub_url(url).unwrap_err();
            assert!(error.contains("non-loopback"), "{url}: {error}");
        }
        assert!(check_hub_url("http://[::1]:8443").is_ok());
        assert!(check_hub_url("http://localhost/hub").is_ok());
    }

    #[test]
    fn the_transport_rule_names_the_url_as_shown() {
        assert!(check_transport("https://s3.example.com/b/k?X-Amz-Signature=abc", "s").is_ok());
        assert!(check_transport("http://127.0.0.1:9000/b/k?X-Amz-Signature=abc", "s").is_ok());
        let error = check_transport(
            "http://s3.example.com/b/k?X-Amz-Signature=abc",
            "http://s3.example.com/b/k",
        )
        .unwrap_err();
        assert_eq!(
            error,
            "http://s3.example.com/b/k uses plain http to a non-loopback host; device traffic \
             must use https"
        );
        // A query right after a loopback host does not hide it, nor one after another host.
        assert!(check_transport("http://127.0.0.1?a=b", "s").is_ok());
        assert!(check_transport("http://example.com?127.0.0.1", "s").is_err());
        let error = check_transport("s3://bucket/key?sig", "s3://bucket/key").unwrap_err();
        assert_eq!(error, "s3://bucket/key must start with https:// or http://");
    }

    #[test]
    fn runtime_settings_are_checked_naming_the_key() {
        let config = parse(&format!(
            "{BASE}[inference]\nruntime = \"onnxruntime\"\n[inference.onnxruntime]\n\
             library = \"/opt/ort/libonnxruntime.so\"\nproviders = [\"cuda\", \"cpu\"]\n\
             [inference.onnxruntime.options.cuda]\ndevice_id = \"1\"\n"
        ))
        .unwrap();
        assert_eq!(config.runtime, RuntimeChoice::OnnxRuntime);
        let kinds: Vec<ProviderKind> = config
            .onnxruntime
            .providers
            .iter()
            .map(|provider| provider.kind)
            .collect();
        assert_eq!(kinds, [ProviderKind::Cuda, ProviderKind::Cpu]);
        assert_eq!(
            config.onnxruntime.providers[0].options,
            [("device_id".to_owned(), "1".to_owned())]
        );
        // The default is auto, with no library named.
        let config = parse(BASE).unwrap();
        assert_eq!(config.runtime, RuntimeChoice::Auto);
        assert_eq!(config.onnxruntime, OnnxRuntimeSettings::default());

        for (table, key) in [
            ("[inference]\nruntime = \"fast\"\n", "`inference.runtime`"),
            (
                "[inference.onnxruntime]\nproviders = [\"gpu\"]\n",
                "`inference.onnxruntime.providers`",
            ),
            (
                "[inference.onnxruntime]\nproviders = [\"cuda\", \"cuda\"]\n",
                "`inference.onnxruntime.providers`",
            ),
            (
                "[inference.onnxruntime.options.tensorrt]\nfp16 = \"1\"\n",
                "`inference.onnxruntime.options`",
            ),
            (
                "[inference.onnxruntime]\nlibrary = \"\"\n",
                "`inference.onnxruntime.library`",
            ),
        ] {
            let error = parse(&format!("{BASE}{table}")).unwrap_err();
            assert!(error.to_string().contains(key), "{table}: {error}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("2 MB"), Some(2_000_000));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("99999999999999GiB"), None);
    }
}

#[cfg(test)]
mod shipped_example {
    /// The example config shipped for packages must stay valid.
    #[test]
    fn example_config_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/agent.toml");
        let config = super::load(&path).unwrap();
        assert_eq!(config.keep_versions, 2);
        assert_eq!(config.labels.len(), 1);
    }
}
