//! Which hub the online commands talk to, and as whom: `--hub`, `--token` and `--ca`, each from a
//! flag, the environment or the CLI config file, in that order of precedence.
//!
//! The config file (`$XDG_CONFIG_HOME/outpost/cli.toml`, else `~/.config/outpost/cli.toml`) lets
//! an operator name a hub once. It may hold an admin token, so like a release key it must not be
//! readable by group or others.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::client::{self, AdminClient};
use outpost_model::fsutil;

/// A CLI config file is a few lines; anything larger is not one.
const MAX_CONFIG_FILE: u64 = 64 * 1024;
/// Largest CA bundle read.
const MAX_CA_FILE: u64 = 1024 * 1024;

/// Connection flags shared by every command that talks to a hub.
#[derive(Debug, Clone, clap::Args)]
pub struct HubArgs {
    /// Hub base URL, e.g. https://hub.example:8443 (plain http only to loopback).
    #[arg(long = "hub", env = "OUTPOST_HUB", value_name = "URL")]
    pub hub: Option<String>,
    /// Admin token. Prefer OUTPOST_TOKEN or the config file: other users can see flags in `ps`.
    #[arg(
        long = "token",
        env = "OUTPOST_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// PEM file of the CA (or self-signed certificate) to trust for the hub's TLS certificate.
    #[arg(long = "ca", env = "OUTPOST_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// TOML file with defaults for `hub`, `token` and `ca` [default: $XDG_CONFIG_HOME/outpost/cli.toml
    /// or ~/.config/outpost/cli.toml, when it exists].
    #[arg(long = "cli-config", env = "OUTPOST_CLI_CONFIG", value_name = "FILE")]
    pub cli_config: Option<PathBuf>,
}

/// The config file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCliConfig {
    hub: Option<String>,
    token: Option<String>,
    ca: Option<PathBuf>,
}

/// The config file, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliConfig {
    pub path: PathBuf,
    pub hub: Option<String>,
    pub token: Option<String>,
    /// Resolved against the config file's directory when relative.
    pub ca: Option<PathBuf>,
}

/// Where and as whom to connect, after precedence is applied.
#[derive(Clone, PartialEq, Eq)]
pub struct HubConnection {
    /// Checked by [`client::check_base_url`], without a trailing slash.
    pub url: String,
    pub token: String,
    pub ca: Option<PathBuf>,
}

impl std::fmt::Debug for HubConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConnection")
            .field("url", &self.url)
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl HubArgs {
    /// Resolves the connection settings and builds a client.
    pub fn connect(&self) -> anyhow::Result<AdminClient> {
        let default_config = default_config_path(
            std::env::var_os("XDG_CONFIG_HOME"),
            std::env::var_os("HOME"),
        );
        self.resolve(default_config.as_deref())?.client()
    }

    /// Applies precedence: a flag or environment variable (clap has already preferred the flag)
    /// wins over the config file. `default_config` is read only if it exists; a file named with
    /// `--cli-config` must exist.
    pub fn resolve(&self, default_config: Option<&Path>) -> anyhow::Result<HubConnection> {
        let file = match (&self.cli_config, default_config) {
            (Some(path), _) => Some(load_config(path)?),
            (None, Some(path)) if path.exists() => Some(load_config(path)?),
            (None, _) => None,
        };
        let file_hint = match (&file, default_config) {
            (Some(file), _) => format!("in {}", file.path.display()),
            (None, Some(path)) => format!("in {}", path.display()),
            (None, None) => "in a file given with --cli-config".to_owned(),
        };
        let url = match (&self.hub, file.as_ref().and_then(|file| file.hub.as_ref())) {
            (Some(hub), _) => client::check_base_url(hub).context("--hub (or OUTPOST_HUB)")?,
            (None, Some(hub)) => client::check_base_url(hub)
                .with_context(|| format!("{}: key `hub`", file_path(&file).display()))?,
            (None, None) => bail!(
                "no hub given: pass --hub URL, set OUTPOST_HUB, or put `hub = \"https://...\"` \
                 {file_hint}"
            ),
        };
        let token = match (
            &self.token,
            file.as_ref().and_then(|file| file.token.as_ref()),
        ) {
            (Some(token), _) => token.clone(),
            (None, Some(token)) => token.clone(),
            (None, None) => bail!(
                "no admin token given: set OUTPOST_TOKEN, pass --token TOKEN, or put \
                 `token = \"...\"` {file_hint} (mode 600)"
            ),
        };
        let ca = self
            .ca
            .clone()
            .or_else(|| file.as_ref().and_then(|file| file.ca.clone()));
        Ok(HubConnection { url, token, ca })
    }
}

fn file_path(file: &Option<CliConfig>) -> &Path {
    file.as_ref()
        .map_or(Path::new("config file"), |file| &file.path)
}

impl HubConnection {
    pub fn client(&self) -> anyhow::Result<AdminClient> {
        let ca_pem = match &self.ca {
            Some(path) => Some(fsutil::read_capped(path, MAX_CA_FILE)?),
            None => None,
        };
        let client = AdminClient::new(&self.url, &self.token, ca_pem.as_deref());
        match &self.ca {
            Some(path) => client.with_context(|| format!("--ca {}", path.display())),
            None => client,
        }
    }
}

/// `$XDG_CONFIG_HOME/outpost/cli.toml`, else `$HOME/.config/outpost/cli.toml`. The XDG spec
/// says a relative or empty `XDG_CONFIG_HOME` is to be ignored.
pub fn default_config_path(
    xdg_config_home: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    let xdg = xdg_config_home
        .map(PathBuf::from)
        .filter(|path| path.is_absolute());
    let base = match xdg {
        Some(path) => path,
        None => PathBuf::from(home.filter(|home| !home.is_empty())?).join(".config"),
    };
    Some(base.join("outpost").join("cli.toml"))
}

/// Reads and checks a CLI config file.
pub fn load_config(path: &Path) -> anyhow::Result<CliConfig> {
    let bytes = fsutil::read_capped(path, MAX_CONFIG_FILE)?;
    let text =
        std::str::from_utf8(&bytes).with_context(|| format!("{} is not UTF-8", path.display()))?;
    let raw: RawCliConfig =
        toml::from_str(text).with_context(|| format!("reading {}", path.display()))?;
    let at = |key: &str| format!("{}: key `{key}`", path.display());
    if let Some(hub) = &raw.hub {
        client::check_base_url(hub).with_context(|| at("hub"))?;
    }
    if let Some(token) = &raw.token {
        if token.is_empty() || !token.bytes().all(|byte| byte.is_ascii_graphic()) {
            bail!("{}: must be printable ASCII without spaces", at("token"));
        }
        let mode = std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            bail!(
                "{} holds an admin token but has mode {:o}; it must not be readable by group or \
                 others (chmod 600)",
                path.display(),
                mode & 0o777
            );
        }
    }
    let ca = match raw.ca {
        Some(ca) if ca.as_os_str().is_empty() => bail!("{}: is empty", at("ca")),
        Some(ca) if ca.is_relative() => Some(
            path.parent()
                .filter(|dir| !dir.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .join(ca),
        ),
        other => other,
    };
    Ok(CliConfig {
        path: path.to_owned(),
        hub: raw.hub,
        token: raw.token,
        ca,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn args(hub: Option<&str>, token: Option<&str>, config: Option<&Path>) -> HubArgs {
        HubArgs {
            hub: hub.map(str::to_owned),
            token: token.map(str::to_owned),
            ca: None,
            cli_config: config.map(Path::to_owned),
        }
    }

    fn write_config(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let path = dir.join("cli.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(
            dir.path(),
            "hub = \"https://file.example\"\ntoken = \"file-token\"\nca = \"ca.pem\"\n",
            0o600,
        );
        let from_file = args(None, None, None).resolve(Some(&path)).unwrap();
        assert_eq!(from_file.url, "https://file.example");
        assert_eq!(from_file.token, "file-token");
        assert_eq!(from_file.ca, Some(dir.path().join("ca.pem")));

        let mut flags = args(Some("http://127.0.0.1:9/"), Some("flag-token"), Some(&path));
        flags.ca = Some(PathBuf::from("/etc/hub-ca.pem"));
        let resolved = flags.resolve(None).unwrap();
        assert_eq!(resolved.url, "http://127.0.0.1:9");
        assert_eq!(resolved.token, "flag-token");
        assert_eq!(resolved.ca, Some(PathBuf::from("/etc/hub-ca.pem")));

        // Each setting falls back on its own.
        let mixed = args(None, Some("flag-token"), None)
            .resolve(Some(&path))
            .unwrap();
        assert_eq!(mixed.url, "https://file.example");
        assert_eq!(mixed.token, "flag-token");
    }

    #[test]
    fn a_missing_default_file_is_fine_a_missing_named_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.toml");
        let resolved = args(Some("https://hub.example"), Some("t"), None)
            .resolve(Some(&missing))
            .unwrap();
        assert_eq!(resolved.url, "https://hub.example");

        let error = args(Some("https://hub.example"), Some("t"), Some(&missing))
            .resolve(None)
            .unwrap_err();
        assert!(format!("{error:#}").contains("absent.toml"), "{error:#}");
    }

    #[test]
    fn missing_hub_or_token_says_how_to_give_it() {
        let error = args(None, Some("t"), None).resolve(None).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("--hub URL") && text.contains("OUTPOST_HUB"),
            "{text}"
        );

        let error = args(Some("https://hub.example"), None, None)
            .resolve(Some(Path::new("/nonexistent/outpost/cli.toml")))
            .unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("OUTPOST_TOKEN") && text.contains("/nonexistent/outpost/cli.toml"),
            "{text}"
        );
    }

    #[test]
    fn bad_files_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();

        let path = write_config(dir.path(), "hubb = \"https://x.example\"\n", 0o600);
        let text = format!("{:#}", load_config(&path).unwrap_err());
        assert!(text.contains("cli.toml") && text.contains("hubb"), "{text}");

        let path = write_config(dir.path(), "hub = 5\n", 0o600);
        let text = format!("{:#}", load_config(&path).unwrap_err());
        assert!(text.contains("cli.toml") && text.contains("hub"), "{text}");

        let path = write_config(dir.path(), "hub = \"http://hub.example\"\n", 0o600);
        let text = format!("{:#}", load_config(&path).unwrap_err());
        assert!(
            text.contains("cli.toml: key `hub`") && text.contains("use https"),
            "{text}"
        );

        let path = write_config(dir.path(), "token = \"has space\"\n", 0o600);
        let text = format!("{:#}", load_config(&path).unwrap_err());
        assert!(text.contains("cli.toml: key `token`"), "{text}");

        let path = write_config(dir.path(), "hub = [\n", 0o600);
        let text = format!("{:#}", load_config(&path).unwrap_err());
        assert!(
            text.contains("reading") && text.contains("cli.toml"),
            "{text}"
        );
    }

    #[test]
    fn a_readable_file_with_a_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), "token = \"secret\"\n", 0o644);
        let text = format!("{:#}", load_config(&path).unwrap_err());
        assert!(
            text.contains("mode 644") && text.contains("chmod 600"),
            "{text}"
        );

        // Without a token, the file holds nothing secret.
        let path = write_config(dir.path(), "hub = \"https://hub.example\"\n", 0o644);
        assert!(load_config(&path).is_ok());
    }

    #[test]
    fn a_flag_wins_over_the_environment() {
        #[derive(Debug, clap::Parser)]
        struct Harness {
            #[command(flatten)]
            hub: HubArgs,
        }
        use clap::Parser;
        // Only this test reads OUTPOST_HUB, so setting it cannot disturb another test.
        std::env::set_var("OUTPOST_HUB", "https://env.example");
        let from_env = Harness::try_parse_from(["x"]).unwrap();
        let from_flag = Harness::try_parse_from(["x", "--hub", "https://flag.example"]).unwrap();
        std::env::remove_var("OUTPOST_HUB");
        assert_eq!(from_env.hub.hub.as_deref(), Some("https://env.example"));
        assert_eq!(from_flag.hub.hub.as_deref(), Some("https://flag.example"));
    }

    #[test]
    fn default_path_follows_xdg() {
        assert_eq!(
            default_config_path(Some("/xdg".into()), Some("/home/op".into())),
            Some(PathBuf::from("/xdg/outpost/cli.toml"))
        );
        assert_eq!(
            default_config_path(Some("relative".into()), Some("/home/op".into())),
            Some(PathBuf::from("/home/op/.config/outpost/cli.toml"))
        );
        assert_eq!(
            default_config_path(None, Some("/home/op".into())),
            Some(PathBuf::from("/home/op/.config/outpost/cli.toml"))
        );
        assert_eq!(default_config_path(None, None), None);
    }
}
