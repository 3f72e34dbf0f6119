//! A real S3-compatible object store of a test's own: a single-node Garage server in a temporary
//! directory.
//!
//! The hub keeps artifacts in S3-compatible object storage, so its object-store suites run
//! against a real server speaking the real protocol (signatures, multipart uploads, error
//! bodies), not a stand-in. [`S3::start`] writes a configuration for one node on free ports of
//! 127.0.0.1, with its metadata (SQLite) and data in the same directory, and starts
//! `garage server --single-node --default-bucket`: the server itself lays out the one-node
//! cluster, imports the access key this module generated and creates the bucket
//! [`BUCKET`] with read, write and owner rights for that key, each only if it does not exist yet,
//! so a restart on the same directory finds them again. It answers S3 requests when this returns.
//!
//! Garage is an AGPL program, run only as a separate test server and never linked. Nothing here
//! skips: a machine without it gets an error naming `cargo xtask install`, which builds Garage
//! 2.5.0 from crates.io into `target/garage`. Garage runs as root without complaint.
//!
//! Dropping an [`S3`] kills its server and removes the directory. A test process killed outright
//! leaves its server running: nothing in the process outlives it to stop it.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The bucket every server starts with.
pub const BUCKET: &str = "outpost-artifacts";

/// The region the server signs for; S3 clients must sign requests for the same one.
const REGION: &str = "garage";

/// Where `cargo xtask install` puts the binary, under the workspace's root.
const INSTALLED: &str = "target/garage/bin/garage";

/// The error when no Garage binary is found.
const NOT_FOUND: &str = "Garage (the S3-compatible test server) not found at \
                         target/garage/bin/garage or on PATH: `cargo xtask install` builds \
                         garage 2.5.0 from crates.io";

/// How many sets of free ports a start tries: another process may take a port between our probe
/// and the server's bind.
const START_ATTEMPTS: usize = 5;

/// How the kernel's EADDRINUSE reads in Garage's log and errors.
const ADDRESS_IN_USE: &str = "Address already in use";

/// How long a start waits for the server to answer, and a stop for it to exit.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a start or a stop looks again.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// How many of the server log's last lines an error carries.
const LOG_TAIL_LINES: usize = 30;

/// What the server logs: its default, spelled out so the caller's `RUST_LOG` cannot silence it.
const SERVER_LOG_FILTER: &str = "netapp=info,garage=info";

/// The path of the Garage binary: `target/garage/bin/garage` in the workspace, where
/// `cargo xtask install` puts it, else the first `garage` on `PATH`.
pub fn binary() -> Result<PathBuf, String> {
    let installed = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|workspace| workspace.join(INSTALLED));
    installed
        .filter(|path| path.is_file())
        .or_else(|| on_path("garage"))
        .ok_or_else(|| NOT_FOUND.to_owned())
}

/// The first file called `name` in a directory of `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// `bytes` random bytes from the kernel, as lower-case hex: the std library has no generator.
fn random_hex(bytes: usize) -> Result<String, String> {
    let mut buffer = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut urandom| urandom.read_exact(&mut buffer))
        .map_err(|error| format!("reading /dev/urandom: {error}"))?;
    Ok(buffer.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// Whether an HTTP server answers on `port` of 127.0.0.1: a request gets any status line back.
fn answers_http(port: u16) -> bool {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut start = [0u8; 8];
    stream.read_exact(&mut start).is_ok() && start.starts_with(b"HTTP/1.")
}

/// The integer after `"field":` in `json`, as Garage's admin API prints it: the crate has no
/// JSON parser, and the counters are plain top-level numbers.
fn json_integer(json: &str, field: &str) -> Result<u64, String> {
    let key = format!("\"{field}\":");
    let start = json
        .find(&key)
        .ok_or_else(|| format!("no {field:?} in Garage's answer: {json}"))?
        + key.len();
    let digits: String = json[start..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .map_err(|_| format!("{field:?} is not a count in Garage's answer: {json}"))
}

/// A single-node Garage server of its own in a temporary directory, killed and removed on drop.
#[derive(Debug)]
pub struct S3 {
    /// Holds `garage.toml`, `meta/` (SQLite), `data/` (the objects' blocks) and `log`.
    dir: tempfile::TempDir,
    /// The Garage binary, from [`binary`].
    garage: PathBuf,
    /// The running server; `None` between [`S3::stop`] and [`S3::start_again`].
    server: Option<Child>,
    /// The S3 API's port on 127.0.0.1; kept across [`S3::start_again`].
    s3_port: u16,
    /// The port of Garage's own RPC, which its command line speaks to the server.
    rpc_port: u16,
    /// The key the server imports at start: `GK` and 24 hex digits, as Garage makes its own.
    access_key_id: String,
    /// 64 hex digits.
    secret_access_key: String,
}

impl S3 {
    /// Starts one: a fresh single-node Garage in a new temporary directory, on free ports of
    /// 127.0.0.1, with the bucket [`BUCKET`] and a key allowed to read, write and own it. It
    /// answers S3 requests when this returns.
    pub fn start() -> Result<S3, String> {
        let garage = binary()?;
        let dir = tempfile::Builder::new()
            .prefix("outpost-s3-")
            .tempdir()
            .map_err(|error| format!("creating a directory for Garage: {error}"))?;
        if dir.path().to_string_lossy().contains(['"', '\\']) {
            // The paths go into garage.toml as basic strings.
            return Err(format!(
                "Garage's directory {} holds a quote or a backslash: set TMPDIR to a plainer path",
                dir.path().display()
            ));
        }
        let mut server = S3 {
            dir,
            garage,
            server: None,
            s3_port: 0,
            rpc_port: 0,
            access_key_id: format!("GK{}", random_hex(12)?),
            secret_access_key: random_hex(32)?,
        };
        let rpc_secret = random_hex(32)?;
        let mut attempt = 1;
        loop {
            server.s3_port = crate::ports::free_port()?;
            server.rpc_port = crate::ports::free_port()?;
            server.write_config(&rpc_secret)?;
            match server.run_server() {
                Ok(()) => return Ok(server),
                Err(error) if attempt < START_ATTEMPTS && error.contains(ADDRESS_IN_USE) => {
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// The S3 API's URL, `http://127.0.0.1:PORT`; buckets are addressed by path.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// The bucket the server started with, [`BUCKET`].
    pub fn bucket(&self) -> &str {
        BUCKET
    }

    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    pub fn secret_access_key(&self) -> &str {
        &self.secret_access_key
    }

    /// The region requests are signed for.
    pub fn region(&self) -> &str {
        REGION
    }

    /// How many keys of the bucket hold a complete object: an upload in progress, single or
    /// multipart, makes none. Garage updates its counters a moment after a write (a queue it
    /// drains in the background), so a test waiting for a number polls.
    pub fn object_count(&self) -> Result<u64, String> {
        json_integer(&self.bucket_info()?, "objects")
    }

    /// How many uploads into the bucket have begun and neither finished nor been aborted: single
    /// uploads still streaming and multipart uploads alike. Updated a moment late, as
    /// [`S3::object_count`].
    pub fn unfinished_uploads(&self) -> Result<u64, String> {
        json_integer(&self.bucket_info()?, "unfinishedUploads")
    }

    /// Of [`S3::unfinished_uploads`], the multipart ones.
    pub fn unfinished_multipart_uploads(&self) -> Result<u64, String> {
        json_integer(&self.bucket_info()?, "unfinishedMultipartUploads")
    }

    /// Stops the server cleanly (SIGTERM, which Garage answers by closing its APIs and
    /// databases), for a test of what a client does without it; [`S3::start_again`] brings it
    /// back. A server still running after 30 seconds is killed, and the stop is an error.
    pub fn stop(&mut self) -> Result<(), String> {
        let Some(mut child) = self.server.take() else {
            return Ok(());
        };
        // A server that died on its own would still take the signal (it is a zombie until
        // reaped), and the stop would look clean.
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "Garage had already exited with {status}; its log ends:\n{}",
                self.log_tail(0)
            ));
        }
        // The std library sends only SIGKILL, and this crate has no libc: procps' `kill` sends
        // SIGTERM, as the end-to-end suites' helpers do for the hub and the agent.
        let terminated = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .output();
        let problem = match terminated {
            Ok(output) if output.status.success() => {
                let deadline = Instant::now() + STOP_TIMEOUT;
                loop {
                    match child.try_wait() {
                        Ok(Some(_)) => return Ok(()),
                        Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL_EVERY),
                        Ok(None) => break format!("it did not stop within {STOP_TIMEOUT:?}"),
                        Err(error) => break format!("waiting for it to stop: {error}"),
                    }
                }
            }
            Ok(output) => format!(
                "`kill -TERM` failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(error) => format!("running kill: {error}"),
        };
        let _ = child.kill();
        let _ = child.wait();
        Err(format!(
            "stopping Garage with SIGTERM: {problem}; it was killed. Its log ends:\n{}",
            self.log_tail(0)
        ))
    }

    /// Starts the stopped server again on the same directory, configuration and ports: the
    /// bucket, the key and the objects are still there. It answers S3 requests when this returns.
    pub fn start_again(&mut self) -> Result<(), String> {
        if self.server.is_some() {
            return Err("Garage is running: stop it before starting it again".to_owned());
        }
        self.run_server()
    }

    /// The server's log so far, for a test's failure message.
    pub fn log(&self) -> String {
        fs::read(self.log_path())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("garage.toml")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    fn write_config(&self, rpc_secret: &str) -> Result<(), String> {
        let dir = self.dir.path().display();
        let config = format!(
            r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "sqlite"
replication_factor = 1

rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{rpc_secret}"

[s3_api]
api_bind_addr = "127.0.0.1:{s3_port}"
s3_region = "{REGION}"
root_domain = ".s3.garage.localhost"
"#,
            rpc_port = self.rpc_port,
            s3_port = self.s3_port,
        );
        fs::write(self.config_path(), config)
            .map_err(|error| format!("writing {}: {error}", self.config_path().display()))
    }

    /// A Garage command on this server's configuration, with none of the caller's `GARAGE_*`
    /// variables (which would override the file) nor its `RUST_LOG`.
    fn garage(&self) -> Command {
        let mut command = Command::new(&self.garage);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("GARAGE_") {
                command.env_remove(key);
            }
        }
        command
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .arg("-c")
            .arg(self.config_path());
        command
    }

    /// Starts `garage server` and waits until its S3 API answers and its command line sees the
    /// bucket; on failure, the server is killed and the error carries what it logged meanwhile.
    fn run_server(&mut self) -> Result<(), String> {
        let logged_before = fs::metadata(self.log_path()).map_or(0, |meta| meta.len() as usize);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|error| format!("opening {}: {error}", self.log_path().display()))?;
        let log_too = log
            .try_clone()
            .map_err(|error| format!("opening {}: {error}", self.log_path().display()))?;
        let child = self
            .garage()
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &self.access_key_id)
            .env("GARAGE_DEFAULT_SECRET_KEY", &self.secret_access_key)
            .env("GARAGE_DEFAULT_BUCKET", BUCKET)
            .env("RUST_LOG", SERVER_LOG_FILTER)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_too)
            .spawn()
            .map_err(|error| format!("running {}: {error}", self.garage.display()))?;
        self.server = Some(child);
        self.wait_ready(logged_before).map_err(|error| {
            if let Some(mut child) = self.server.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            format!(
                "starting Garage on 127.0.0.1:{} (S3) and :{} (RPC): {error}\nits log ends:\n{}",
                self.s3_port,
                self.rpc_port,
                self.log_tail(logged_before)
            )
        })
    }

    /// Polls until the S3 API answers and the bucket is there, the server exits or logs (after
    /// byte `logged_before` of its log) that a port was taken, or [`READY_TIMEOUT`] passes. The
    /// server sets up its layout, key and bucket before it opens the S3 API, so an answer there
    /// means they exist; asking for the bucket also proves the command line
    /// [`S3::object_count`] runs reaches the server.
    fn wait_ready(&mut self, logged_before: usize) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_error = "the S3 API did not answer".to_owned();
        loop {
            let child = self.server.as_mut().ok_or("Garage is not running")?;
            let exited = child
                .try_wait()
                .map_err(|error| format!("waiting for the server: {error}"))?;
            // Looked for after the exit, whose log is then complete: a server that cannot bind
            // its RPC port panics (its log ends with a backtrace), one that cannot bind its S3
            // port keeps running without it.
            if self.log_since(logged_before).contains(ADDRESS_IN_USE) {
                return Err(format!("a port was taken: {ADDRESS_IN_USE}"));
            }
            if let Some(status) = exited {
                return Err(format!("the server exited with {status}"));
            }
            if answers_http(self.s3_port) {
                match self.bucket_info() {
                    Ok(_) => return Ok(()),
                    Err(error) => last_error = error,
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("not ready within {READY_TIMEOUT:?}: {last_error}"));
            }
            std::thread::sleep(POLL_EVERY);
        }
    }

    /// The bucket's description from Garage's admin API (through its command line), as JSON.
    fn bucket_info(&self) -> Result<String, String> {
        let mut command = self.garage();
        command.args([
            "json-api",
            "GetBucketInfo",
            &format!(r#"{{"globalAlias":"{BUCKET}"}}"#),
        ]);
        let output = command
            .output()
            .map_err(|error| format!("running {command:?}: {error}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "asking Garage about bucket {BUCKET} failed with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    /// What the server logged after byte `from` of its log.
    fn log_since(&self, from: usize) -> String {
        let log = self.log();
        log.get(from..).map_or(log.clone(), str::to_owned)
    }

    /// The last lines the server logged after byte `from` of its log.
    fn log_tail(&self, from: usize) -> String {
        let new = self.log_since(from);
        let lines: Vec<&str> = new.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
