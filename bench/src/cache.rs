//! The harness's downloads and generated models, kept under `target/bench-cache/`.
//!
//! Nothing large is committed: the ONNX Runtime library, Silero VAD and the `onnx` package that
//! builds the CNNs all come from PyPI with pinned versions into one virtual environment, made once
//! with `python3 -m venv`; the CNNs are written by the committed `python/cnn_models.py` from fixed
//! seeds. A second run finds everything in place and downloads nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

/// The ONNX Runtime wheel whose library `ort` 2.0.0-rc.13 is written against (its API 27 and up;
/// 1.28 is the release that crate wraps).
const ONNXRUNTIME: &str = "onnxruntime==1.28.0";
const SILERO_VAD: &str = "silero-vad==6.2.3";
/// What `python/cnn_models.py` needs, with its dependencies pinned so the models' bytes repeat.
const ONNX_PACKAGES: [&str; 5] = [
    "onnx==1.23.2",
    "numpy==2.3.5",
    "protobuf==7.36.2",
    "ml_dtypes==0.6.0",
    "typing_extensions==4.16.0",
];

/// The prepared cache directory.
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    python: PathBuf,
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{command:?}");
    let status = command
        .status()
        .with_context(|| format!("running {shown}"))?;
    anyhow::ensure!(status.success(), "{shown} failed ({status})");
    Ok(())
}

impl Cache {
    /// Makes `dir` and its virtual environment with the pinned packages, unless already there.
    pub fn prepare(dir: &Path) -> anyhow::Result<Cache> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let venv = dir.join("venv");
        let python = venv.join("bin/python3");
        // Written last, so an interrupted install is redone rather than half used.
        let done = venv.join("outpost-bench-packages");
        let wanted = format!("{ONNXRUNTIME} {SILERO_VAD} {}", ONNX_PACKAGES.join(" "));
        if std::fs::read_to_string(&done).ok().as_deref() != Some(wanted.as_str()) {
            eprintln!("preparing {} (pip, once)", venv.display());
            run(Command::new("python3")
                .args(["-m", "venv", "--clear"])
                .arg(&venv))
            .context(
                "making the benchmark's Python virtual environment (needs python3 with venv: \
                 Debian's python3-venv)",
            )?;
            run(Command::new(&python)
                .args(["-m", "pip", "install", "--quiet", "--no-deps"])
                .args(ONNX_PACKAGES)
                .args([ONNXRUNTIME, SILERO_VAD]))?;
            std::fs::write(&done, &wanted)?;
        }
        Ok(Cache {
            dir: dir.to_owned(),
            python,
        })
    }

    fn site_packages(&self) -> anyhow::Result<PathBuf> {
        let lib = self.dir.join("venv/lib");
        for entry in
            std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))?
        {
            let path = entry?.path().join("site-packages");
            if path.is_dir() {
                return Ok(path);
            }
        }
        anyhow::bail!("no site-packages under {}", lib.display())
    }

    /// `libonnxruntime.so.*` from the wheel.
    pub fn onnxruntime_library(&self) -> anyhow::Result<PathBuf> {
        let capi = self.site_packages()?.join("onnxruntime/capi");
        for entry in
            std::fs::read_dir(&capi).with_context(|| format!("reading {}", capi.display()))?
        {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned());
            if name.is_some_and(|name| name.starts_with("libonnxruntime.so")) {
                return Ok(path);
            }
        }
        anyhow::bail!(
            "the onnxruntime wheel has no libonnxruntime.so in {}",
            capi.display()
        )
    }

    /// A model file of the `silero-vad` wheel, such as `silero_vad_16k_sequence.onnx`.
    pub fn silero(&self, file: &str) -> anyhow::Result<Vec<u8>> {
        let path = self.site_packages()?.join("silero_vad/data").join(file);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// A CNN written by `python/cnn_models.py` (`squeezenet` or `mobilenetv2`), built on first use.
    pub fn cnn(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        let out = self.dir.join("cnn");
        let path = out.join(format!("{name}.onnx"));
        if !path.is_file() {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/cnn_models.py");
            run(Command::new(&self.python).arg(script).arg(&out))?;
        }
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }
}
