//! Helpers for end-to-end tests that drive the real `outpost-hub` and `outpost-agent` binaries.
//!
//! The binaries belong to other packages, so Cargo does not hand their paths to this crate's
//! tests. [`bin`] builds them once per test process with the same cargo and profile, then runs
//! them from the shared target directory.
//!
//! - [`hub`]: a real `outpost-hub serve` in a child process, driven through the real CLI.
//! - [`device_sim`]: simulated devices speaking the device API, built on `outpost-protocol`.
//! - [`agent`]: a real `outpost-agent run` with its config and data in a temp dir.
//! - [`proxy`]: a man in the middle between an agent and a hub that can replay, alter or cut
//!   answers.
//! - [`postgres`]: a real PostgreSQL server of a test's own, for the hub's SQL store.

pub mod agent;
pub mod bench;
pub mod browser;
pub mod device_sim;
pub mod hub;
pub use outpost_testkit::postgres;
pub use outpost_testkit::s3;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where [`bin`] takes the binaries from, when a bench chose it with [`use_binaries_from`].
static BIN_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Makes [`bin`] run the binaries in `dir` (a bench's release build) instead of building the
/// test profile's. Call it before the first [`bin`]; later calls are ignored.
pub fn use_binaries_from(dir: PathBuf) {
    let _ = BIN_DIR.set(dir);
}

/// Path to a workspace binary (`outpost-hub`, `outpost-agent`), built on first use.
pub fn bin(name: &str) -> PathBuf {
    let dir = BIN_DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        // The same build `cargo test --workspace` (the README's test command) does, so under it
        // this is a no-op. `cargo build -p ...` would resolve features differently and rebuild
        // tract, rustls and the rest once per run, then overwrite the binaries.
        let mut command = Command::new(cargo);
        command
            .args(["test", "--workspace", "--no-run", "--quiet"])
            .current_dir(workspace_root());
        // Cargo gives this test process the variables it gives a crate (CARGO_MANIFEST_DIR,
        // CARGO_PKG_NAME, ...). Build scripts that rerun when those change (ring's does) would see
        // them here and not under the outer `cargo test`, so each of the two builds would redo
        // ring, rustls and everything above them for the other.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_MANIFEST_")
                || key.starts_with("CARGO_BIN_")
                || [
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                ]
                .contains(&key.as_ref())
            {
                command.env_remove(key.as_ref());
            }
        }
        let status = command
            .status()
            .expect("running cargo to build the binaries under test");
        assert!(
            status.success(),
            "building outpost-hub and outpost-agent failed"
        );
        // Test executables live in target/<profile>/deps; the binaries one level up.
        let exe = std::env::current_exe().expect("locating the test executable");
        exe.parent()
            .and_then(Path::parent)
            .expect("test executable is inside target/<profile>/deps")
            .to_path_buf()
    });
    let path = dir.join(name);
    // `cargo test` builds a package's binaries only for that package's own integration tests, so
    // `hub/tests` and `agent/tests` must exist for the paths above to be filled.
    assert!(
        path.is_file(),
        "{} was not built by `cargo test --workspace --no-run`",
        path.display()
    );
    path
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate sits in the workspace root")
        .to_path_buf()
}

/// `target/real-models`, where `cargo xtask install` makes a Python virtual environment
/// (`venv/`: ONNX Runtime, numpy and PyNaCl, pinned) and downloads the real models' wheels
/// (`wheels/`).
pub fn real_models_dir() -> PathBuf {
    workspace_root().join("target/real-models")
}

/// The Python of [`real_models_dir`]'s virtual environment. Panics naming `cargo xtask install`
/// when it is missing: a test that needs it fails rather than skips.
pub fn venv_python() -> PathBuf {
    let python = real_models_dir().join("venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: `cargo xtask install` makes the virtual environment the tests run \
         ONNX Runtime and PyNaCl from",
        python.display()
    );
    python
}

/// A finished command, with its output as text for assertions.
#[derive(Debug)]
pub struct Run {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Runs `command` to its end.
    pub fn of(command: &mut Command) -> Run {
        let output = command
            .output()
            .unwrap_or_else(|error| panic!("running {command:?}: {error}"));
        Run::from_output(output)
    }

    fn from_output(output: Output) -> Run {
        Run {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Panics with both streams unless the command succeeded.
    pub fn ok(self) -> Run {
        assert!(
            self.success,
            "command failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Panics unless the command failed with `needle` in its error output.
    pub fn fails_with(self, needle: &str) -> Run {
        assert!(
            !self.success,
            "command succeeded, expected failure\nstdout:\n{}",
            self.stdout
        );
        assert!(
            self.stderr.contains(needle),
            "stderr does not mention {needle:?}:\n{}",
            self.stderr
        );
        self
    }
}

/// Runs a workspace binary with `args` in `dir`.
pub fn run(name: &str, dir: &Path, args: &[&str]) -> Run {
    let output = Command::new(bin(name))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap_or_else(|error| panic!("running {name}: {error}"));
    Run::from_output(output)
}

/// Polls `check` every 50 ms until it returns a value; panics naming `what` after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, check: impl FnMut() -> Option<T>) -> T {
    poll_until(timeout, Duration::from_millis(50), what, check)
}

/// [`wait_until`], polling `every` so often: a test that must catch a process in a phase of a
/// few milliseconds polls every millisecond.
pub fn poll_until<T>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(every);
    }
}

/// A loopback port nothing answers on for as long as this lives: bound but never listening, so
/// every connection to it is refused, and no other test's server can take it meanwhile (a port
/// merely bound and let go can be handed to the next server that binds port 0).
#[derive(Debug)]
pub struct RefusedPort {
    _socket: socket2::Socket,
    /// The port.
    pub port: u16,
}

impl RefusedPort {
    /// Binds a fresh loopback port without listening on it.
    pub fn bind() -> RefusedPort {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("creating a TCP socket");
        socket
            .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("binding a loopback port");
        let port = socket
            .local_addr()
            .ok()
            .and_then(|address| address.as_socket())
            .expect("reading the bound port")
            .port();
        RefusedPort {
            _socket: socket,
            port,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
