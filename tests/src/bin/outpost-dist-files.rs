//! `outpost-dist-files DIR`: writes the shell completions and man pages of `outpost-agent` and
//! `outpost-hub`, generated from their clap definitions, into `DIR` for the Debian packages.
//!
//! It is a binary of its own, not a subcommand of the shipped ones, so `clap_complete` and
//! `clap_mangen` stay out of the agent's binary, whose size is a tracked goal.
//! `dist/build-packages` runs it; the packages' `assets` name the files it writes:
//!
//! - `DIR/completions/{bash,zsh,fish}/` one file per binary, named as each shell looks it up;
//! - `DIR/man/` `outpost-agent.1`, `outpost-hub.1`, and one page per subcommand
//!   (`outpost-hub-rollout-create.1`).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: outpost-dist-files DIR");
        return ExitCode::FAILURE;
    };
    match write_all(Path::new(&dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn write_all(dir: &Path) -> anyhow::Result<()> {
    for command in [
        outpost_agent::cli::Cli::command(),
        outpost_hub::cli::Cli::command(),
    ] {
        write_completions(command.clone(), dir)?;
        write_man_pages(command, &dir.join("man"))?;
    }
    Ok(())
}

/// Where each shell loads a completion from, relative to its directory under `completions/`:
/// bash-completion by the command's name, zsh by `_name` on `$fpath`, fish by `name.fish`.
fn completion_file(shell: Shell, name: &str) -> String {
    match shell {
        Shell::Zsh => format!("_{name}"),
        Shell::Fish => format!("{name}.fish"),
        _ => name.to_owned(),
    }
}

fn write_completions(mut command: clap::Command, dir: &Path) -> anyhow::Result<()> {
    let name = command.get_name().to_owned();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let shell_dir = dir.join("completions").join(shell.to_string());
        std::fs::create_dir_all(&shell_dir)
            .with_context(|| format!("creating {}", shell_dir.display()))?;
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command, &name, &mut script);
        let path = shell_dir.join(completion_file(shell, &name));
        std::fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// One page for `command` and one per visible subcommand, all levels, named `parent-sub.1` as
/// git and cargo name theirs; hidden ones (the hub's `agent` alias) get none.
fn write_man_pages(command: clap::Command, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = command.get_name().to_owned();
    clap_mangen::generate_to(command, dir)
        .with_context(|| format!("writing the man pages of {name} into {}", dir.display()))
}
