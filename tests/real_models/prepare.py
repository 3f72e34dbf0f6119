"""Prepares two real published models for tests/tests/real_models.rs.

Usage: prepare.py WHEELS REPO OUT

From the wheels `cargo xtask install` downloaded from PyPI into WHEELS, takes:
- Magika 1.0.3's content-type model (int32 bytes [N, 2048] -> 214 class scores), fed files of
  the repository REPO (and a gzip and a zip made from them), turned into the model's input the way
  the magika package does;
- Silero VAD 6.2.3's 16 kHz sequence model (576 audio samples and an LSTM state in, a speech
  probability and the next state out), fed a synthetic signal of silence, voiced sound and noise,
  streamed as the silero_vad package streams audio, one row per step with the state going in.

Checks each model file's SHA-256, then writes into OUT, per model, the model, its inputs (one
row per sample, as .npy) and what ONNX Runtime computes for each row on its own: the reference
the agent's answers are compared with.
"""

import gzip
import hashlib
import io
import json
import pathlib
import sys
import zipfile

import numpy as np
import onnxruntime as ort

WHEELS, REPO, OUT = map(pathlib.Path, sys.argv[1:4])

MAGIKA = ("magika-1.0.3-*.whl", "magika/models/standard_v3_3/",
          "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c")
SILERO = ("silero_vad-6.2.3-*.whl", "silero_vad/data/silero_vad_16k_sequence.onnx",
          "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85")

# Files of the repository of many kinds: Markdown, TOML, Rust, shell, CSS, PNG, ONNX...
MAGIKA_FILES = [
    "README.md", "ARCHITECTURE.md", "Cargo.toml", "Cargo.lock", "cross.toml", ".ci/run",
    "protocol/src/lib.rs", "hub/src/main.rs", "agent/src/main.rs",
    "hub/src/server/dashboard/style.css", "dist/build-packages",
    "docs/operations.md", "docs/dashboard/fleet.png", "docs/dashboard/drift.png",
]


def wheel_file(pattern, inside):
    wheels = sorted(WHEELS.glob(pattern))
    if not wheels:
        sys.exit(f"no wheel {pattern} in {WHEELS}: run `cargo xtask install`")
    return zipfile.ZipFile(wheels[0]), inside


def checked(data, sha256, name):
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        sys.exit(f"{name} has SHA-256 {digest}, not the published {sha256}")
    return data


def magika():
    wheel, inside = wheel_file(MAGIKA[0], MAGIKA[1])
    out = OUT / "magika"
    out.mkdir(parents=True)
    model = checked(wheel.read(inside + "model.onnx"), MAGIKA[2], "magika's model.onnx")
    (out / "model.onnx").write_bytes(model)
    config = json.loads(wheel.read(inside + "config.min.json"))
    contents = [(name, (REPO / name).read_bytes()) for name in MAGIKA_FILES]
    readme = (REPO / "README.md").read_bytes()
    contents.append(("README.md.gz", gzip.compress(readme, mtime=0)))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as made:
        made.writestr(zipfile.ZipInfo("README.md", (2020, 1, 1, 0, 0, 0)), readme)
    contents.append(("README.md.zip", archive.getvalue()))
    contents.append(("model.onnx", model))

    def features(data):
        # As magika's own feature extraction: the first and last block_size bytes, stripped of
        # surrounding whitespace, 1024 of each kept, padded with 256.
        block = min(config["block_size"], len(data))
        head = list(data[:block].lstrip()[:1024])
        tail = list(data[len(data) - block:].rstrip()[-1024:])
        return head + [256] * (1024 - len(head)) + [256] * (1024 - len(tail)) + tail

    rows = np.array([features(data) for _, data in contents], dtype=np.int32)
    np.save(out / "bytes.npy", rows)
    session = ort.InferenceSession(str(out / "model.onnx"))
    scores = np.concatenate([session.run(None, {"bytes": rows[i:i + 1]})[0] for i in range(len(rows))])
    np.save(out / "target_label.npy", scores.astype(np.float32))
    labels = config["target_labels_space"]
    with open(out / "labels.txt", "w") as listing:
        for (name, _), row in zip(contents, scores):
            listing.write(f"{name}\t{labels[int(row.argmax())]}\n")


def silero():
    wheel, inside = wheel_file(SILERO[0], SILERO[1])
    out = OUT / "silero"
    out.mkdir(parents=True)
    model = checked(wheel.read(inside), SILERO[2], "silero's sequence model")
    (out / "model.onnx").write_bytes(model)
    rate = 16000
    rng = np.random.default_rng(7)
    t = np.arange(int(1.5 * rate)) / rate
    # A voiced sound: harmonics of a gliding 140 Hz fundamental under a 4 Hz syllable envelope.
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    voiced *= 0.25 * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)) ** 2
    signal = np.concatenate([
        np.zeros(rate // 2),
        voiced + rng.normal(0, 0.002, len(t)),
        rng.normal(0, 0.02, rate // 2),
        voiced[: rate] * 0.6,
    ]).astype(np.float32)
    steps = len(signal) // 512
    session = ort.InferenceSession(str(out / "model.onnx"))
    context = np.zeros((1, 64), np.float32)
    h = np.zeros((1, 1, 128), np.float32)
    c = np.zeros((1, 1, 128), np.float32)
    inputs, hs, cs, probs, hns, cns = [], [], [], [], [], []
    for step in range(steps):
        window = np.concatenate([context, signal[None, step * 512:(step + 1) * 512]], axis=1)
        prob, hn, cn = session.run(None, {"input": window, "h": h, "c": c})
        inputs.append(window[0])
        hs.append(h[0])
        cs.append(c[0])
        probs.append(prob[0])
        hns.append(hn[0])
        cns.append(cn[0])
        context, h, c = window[:, -64:], hn, cn
    chosen = np.linspace(0, steps - 1, 32).round().astype(int)
    for name, rows in [("input", inputs), ("h", hs), ("c", cs), ("speech_probs", probs),
                       ("hn", hns), ("cn", cns)]:
        np.save(out / f"{name}.npy", np.array(rows, np.float32)[chosen])


magika()
silero()
