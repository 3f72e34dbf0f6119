//! `cargo xtask`: the project's commands that are more than one cargo call.
//!
//! `cargo xtask test` is the README's test command: it installs what the tests need (saying what
//! and why) and runs every test `.ci/run` runs, the same way, so the two cannot drift apart.
//! `cargo xtask install` only installs; a test whose prerequisite is missing names it.

mod install;
mod test;

use std::process::{Command, ExitCode};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  test [--host-only]      install what the tests need, then run them all: the workspace's tests
                          with their slow variants, and (unless --host-only) the protocol and
                          agent suites for aarch64 and armv7 under qemu-user and the aarch64
                          agent against the host's hub
  install [--host-only]   only install what the tests need (Debian packages, Rust targets,
                          ONNX Runtime and two published models' wheels from PyPI, and the
                          Garage S3 server built from crates.io)
";

/// A command running `program` (cargo) without the variables cargo set for running xtask itself
/// (`CARGO_PKG_NAME=xtask`, `CARGO_MANIFEST_DIR`, ...). Build scripts that rerun when those change
/// (ring's does, and with it rustls and everything above) would otherwise see xtask's values in
/// the builds xtask starts and none in the builds the tests start themselves
/// (`outpost_tests::bin`), and each build would redo them for the other: 18 crates and about two
/// minutes in each later step of `cargo xtask test`.
fn cargo(program: &str) -> Command {
    let mut command = Command::new(program);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || key.starts_with("CARGO_BIN_")
            || ["CARGO_CRATE_NAME", "CARGO_PRIMARY_PACKAGE"].contains(&key.as_ref())
        {
            command.env_remove(key.as_ref());
        }
    }
    command
}

/// What the test run covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The workspace's tests on this machine's own architecture.
    Host,
    /// The host's tests and the ARM suites under qemu-user.
    All,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, flags) = match args.split_first() {
        Some((command, flags)) => (command.as_str(), flags),
        None => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let scope = match flags {
        [] => Scope::All,
        [flag] if flag == "--host-only" => Scope::Host,
        _ => {
            eprintln!("xtask: unexpected arguments {flags:?}\n");
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match command {
        "test" => test::run(scope),
        "install" => install::run(scope),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(())
        }
        other => {
            eprintln!("xtask: unknown command {other:?}\n");
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    /// Cargo runs this test with its package's variables set, as it runs xtask: the commands
    /// [`super::cargo`] makes start without them.
    #[test]
    fn cargo_commands_start_without_the_variables_cargo_set_for_xtask() {
        assert!(
            std::env::var_os("CARGO_PKG_NAME").is_some(),
            "run under cargo"
        );
        let output = super::cargo("env").output().unwrap();
        let printed = String::from_utf8(output.stdout).unwrap();
        let left: Vec<&str> = printed
            .lines()
            .filter(|line| {
                ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_NAME="]
                    .iter()
                    .any(|prefix| line.starts_with(prefix))
            })
            .collect();
        assert!(left.is_empty(), "still set: {left:?}");
        assert!(printed.lines().any(|line| line.starts_with("PATH=")));
    }
}
