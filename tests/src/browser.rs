//! A real headless Chromium driven over the W3C WebDriver protocol, for the dashboard's tests.
//!
//! [`Browser::start`] runs Debian's `chromedriver` on a free loopback port and opens one session
//! of `chromium` in it, headless, at 1280x800, accepting the test hub's own CA-signed certificate.
//! The client is a few JSON calls over `ureq`: navigate, find by CSS, click, type, read text, page
//! source, cookies and screenshots. Dropping the browser ends the session and kills the driver.
//! Without `chromium` or `chromedriver` on the machine it panics naming the command that installs
//! them (`cargo xtask install`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use outpost_testkit::ports::free_port;
use serde_json::{json, Value};

use crate::wait_until;

/// The start of the key under which WebDriver answers carry an element's reference. The spec names
/// `element-6066-11e4-a5a4-4ac4df2e1b7b`; Debian's chromedriver answers with another suffix.
const ELEMENT_KEY_PREFIX: &str = "element-6066-11e4-";
/// Where Debian installs the browser `chromedriver` drives.
const CHROMIUM: &str = "/usr/bin/chromium";

/// One cookie, as WebDriver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cookie {
    pub name: String,
    pub value: String,
    pub path: String,
    pub secure: bool,
    pub http_only: bool,
    pub same_site: String,
}

/// A chromedriver process with one headless Chromium session.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: ureq::Agent,
    /// Chromium's profile directory, removed on drop.
    _profile: tempfile::TempDir,
}

fn find_program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session in it.
    pub fn start() -> Browser {
        let driver_path = find_program("chromedriver").unwrap_or_else(|| {
            panic!(
                "chromedriver is not on PATH: `cargo xtask install` installs it (Debian's \
                 `chromium` and `chromium-driver`)"
            )
        });
        assert!(
            Path::new(CHROMIUM).is_file(),
            "{CHROMIUM} is missing: `cargo xtask install` installs it (Debian's `chromium` \
             and `chromium-driver`)"
        );
        let port = free_port().unwrap_or_else(|error| panic!("{error}"));
        let driver = Command::new(driver_path)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .new_agent();
        let base = format!("http://127.0.0.1:{port}");
        let profile = tempfile::tempdir().expect("creating Chromium's profile directory");
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
            http,
            _profile: profile,
        };
        wait_until(Duration::from_secs(20), "chromedriver to listen", || {
            browser
                .http
                .get(format!("{}/status", browser.base))
                .call()
                .ok()
                .filter(|response| response.status().is_success())
        });
        let profile_arg = format!("--user-data-dir={}", browser._profile.path().display());
        let created = browser.call(
            "POST",
            &format!("{}/session", browser.base),
            Some(json!({
                "capabilities": {"alwaysMatch": {
                    "acceptInsecureCerts": true,
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": [
                            "--headless=new", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--window-size=1280,800",
                            "--ignore-certificate-errors", "--no-first-run",
                            profile_arg,
                        ],
                    },
                }}
            })),
        );
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromedriver created no session: {created}"))
            .to_owned();
        browser
    }

    /// Sends one WebDriver command and returns its `value`; panics on a WebDriver error.
    fn call(&self, method: &str, url: &str, body: Option<Value>) -> Value {
        let result = match (method, body) {
            ("GET", _) => self.http.get(url).call(),
            ("DELETE", _) => self.http.delete(url).call(),
            (_, body) => self
                .http
                .post(url)
                .header("content-type", "application/json")
                .send(body.unwrap_or_else(|| json!({})).to_string().as_bytes()),
        };
        let mut response =
            result.unwrap_or_else(|error| panic!("WebDriver {method} {url} failed: {error}"));
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .unwrap_or_else(|error| panic!("reading WebDriver's answer to {url}: {error}"));
        let answer: Value = serde_json::from_str(&text).unwrap_or_else(|error| {
            panic!("WebDriver answered {url} with no JSON ({error}): {text}")
        });
        assert!(
            status == 200,
            "WebDriver {method} {url} answered {status}: {}",
            answer["value"]
        );
        answer["value"].clone()
    }

    fn session_url(&self, path: &str) -> String {
        format!("{}/session/{}{path}", self.base, self.session)
    }

    /// Loads `url` and waits for the page.
    pub fn goto(&self, url: &str) {
        self.call(
            "POST",
            &self.session_url("/url"),
            Some(json!({ "url": url })),
        );
    }

    /// The address of the page shown.
    pub fn url(&self) -> String {
        self.call("GET", &self.session_url("/url"), None)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The page's HTML as the browser holds it.
    pub fn source(&self) -> String {
        self.call("GET", &self.session_url("/source"), None)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Every element matching the CSS `selector`.
    pub fn find_all(&self, selector: &str) -> Vec<Element<'_>> {
        let found = self.call(
            "POST",
            &self.session_url("/elements"),
            Some(json!({"using": "css selector", "value": selector})),
        );
        found
            .as_array()
            .map(|elements| {
                elements
                    .iter()
                    .filter_map(|element| {
                        element.as_object()?.iter().find_map(|(key, id)| {
                            key.starts_with(ELEMENT_KEY_PREFIX).then(|| id.as_str())?
                        })
                    })
                    .map(|id| Element {
                        browser: self,
                        id: id.to_owned(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The first element matching the CSS `selector`; panics, with the page, when there is none.
    pub fn find(&self, selector: &str) -> Element<'_> {
        self.find_all(selector)
            .into_iter()
            .next()
            .unwrap_or_else(|| {
                panic!(
                    "no element matches {selector:?} on {}; the page:\n{}",
                    self.url(),
                    self.source()
                )
            })
    }

    /// Clicks the first element matching `selector` (a link, a submit button) and waits until the
    /// browser shows another address: a click can return before the navigation it starts.
    pub fn click_to_navigate(&self, selector: &str) {
        let before = self.url();
        self.find(selector).click();
        wait_until(
            Duration::from_secs(20),
            &format!("a click on {selector:?} to leave {before}"),
            || Some(()).filter(|()| self.url() != before),
        );
    }

    /// The cookies the browser holds for the page shown.
    pub fn cookies(&self) -> Vec<Cookie> {
        let cookies = self.call("GET", &self.session_url("/cookie"), None);
        cookies
            .as_array()
            .map(|cookies| {
                cookies
                    .iter()
                    .map(|cookie| Cookie {
                        name: cookie["name"].as_str().unwrap_or_default().to_owned(),
                        value: cookie["value"].as_str().unwrap_or_default().to_owned(),
                        path: cookie["path"].as_str().unwrap_or_default().to_owned(),
                        secure: cookie["secure"].as_bool().unwrap_or(false),
                        http_only: cookie["httpOnly"].as_bool().unwrap_or(false),
                        same_site: cookie["sameSite"].as_str().unwrap_or_default().to_owned(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A PNG of the viewport.
    pub fn screenshot(&self) -> Vec<u8> {
        let encoded = self.call("GET", &self.session_url("/screenshot"), None);
        base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().unwrap_or_default())
            .expect("WebDriver sent a screenshot that is not base64")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.http.delete(self.session_url("")).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// An element of the page a [`Browser`] shows.
#[derive(Debug)]
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

impl Element<'_> {
    fn url(&self, action: &str) -> String {
        self.browser
            .session_url(&format!("/element/{}{action}", self.id))
    }

    pub fn click(&self) {
        self.browser
            .call("POST", &self.url("/click"), Some(json!({})));
    }

    /// Types `text` into the element.
    pub fn send_keys(&self, text: &str) {
        self.browser
            .call("POST", &self.url("/value"), Some(json!({ "text": text })));
    }

    /// Clears an input.
    pub fn clear(&self) {
        self.browser
            .call("POST", &self.url("/clear"), Some(json!({})));
    }

    /// The element's rendered text.
    pub fn text(&self) -> String {
        self.browser
            .call("GET", &self.url("/text"), None)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The value of the attribute or property `name`.
    pub fn attribute(&self, name: &str) -> Option<String> {
        self.browser
            .call("GET", &self.url(&format!("/attribute/{name}")), None)
            .as_str()
            .map(str::to_owned)
    }
}
