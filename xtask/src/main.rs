//! `cargo xtask`: the project's commands that are more than one cargo call.
//!
//! `cargo xtask test` is the README's test command: it installs what the tests need (saying what
//! and why) and runs every test `.ci/run` runs, the same way, so the two cannot drift apart.
//! `cargo xtask install` only installs; a test whose prerequisite is missing names it.

mod install;
mod test;

use std::process::ExitCode;

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
