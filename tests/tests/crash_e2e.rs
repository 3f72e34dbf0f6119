//! Crash safety over real processes: SIGKILL the agent at seeded random moments across download,
//! install, probation and commit, and the hub during a publish and during a rollout with real
//! agents. After every restart the agent serves the old or the new model, never neither, every
//! file it or the hub keeps still hashes to its signed value, nothing half-written is promoted,
//! and nothing crash-loops.
//!
//! Kill moments come from a SplitMix64 stream seeded by `OUTPOST_CRASH_SEED` (a fixed default
//! otherwise). Each test prints its seed at the start and again when it fails; setting the
//! variable replays the same schedule of aims and delays. The processes' own timing still varies,
//! so a replay kills at the same offsets, not at the same instruction: each kill's phase is read
//! back from the disk afterwards and is in every assertion message.
//!
//! `OUTPOST_SLOW_TESTS=1`, which `.ci/run` sets, runs the long variants: 50 agent kills instead
//! of 8, and more hub kills.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use outpost_agent::state::{DeviceState, StateFiles};
use outpost_agent::versions::artifact_file;
use outpost_hub::api::{
    AuditVerdict, DeviceSummary, ModelDetail, ModelSummary, ModelVersionInfo, RolloutState,
};
use outpost_model::example::SplitMix64;
use outpost_protocol::trust::{ManifestBody, Signed};
use outpost_tests::agent::{http, TestAgent, AGENT_WAIT};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::{poll_until, wait_until};
use serde_json::json;

const SEED_VAR: &str = "OUTPOST_CRASH_SEED";
/// The schedule run when `OUTPOST_CRASH_SEED` is not set.
const DEFAULT_SEED: u64 = 20_261_126;

/// Whether the long variants run (`OUTPOST_SLOW_TESTS=1`).
fn slow() -> bool {
    std::env::var("OUTPOST_SLOW_TESTS").is_ok_and(|value| value == "1")
}

/// A test's kill schedule: its draws, from SplitMix64.
struct Schedule(SplitMix64);

impl Schedule {
    /// A value in `0..bound`.
    fn below(&mut self, bound: u64) -> u64 {
        self.0.next_u64() % bound.max(1)
    }

    /// A duration in `0..=max`, to the microsecond.
    fn delay_up_to(&mut self, max: Duration) -> Duration {
        let micros = u64::try_from(max.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(self.below(micros.saturating_add(1)))
    }
}

/// A test's seed: printed when the test starts and again, with how to replay it, if it fails.
struct Seed {
    test: &'static str,
    value: u64,
}

impl Seed {
    fn from_env(test: &'static str) -> Seed {
        let value = match std::env::var(SEED_VAR) {
            Ok(text) => text
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{SEED_VAR}={text:?} is not an unsigned integer")),
            Err(_) => DEFAULT_SEED,
        };
        eprintln!("{test}: {SEED_VAR}={value}");
        Seed { test, value }
    }

    /// The test's own schedule, so that one test's draws never shift another's.
    fn schedule(&self, stream: u64) -> Schedule {
        let mut mixer = SplitMix64::new(self.value ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03));
        Schedule(SplitMix64::new(mixer.next_u64()))
    }
}

impl std::fmt::Display for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SEED_VAR}={}", self.value)
    }
}

impl Drop for Seed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- {} failed with {self}; set it to replay the same kill schedule ----",
                self.test
            );
        }
    }
}

/// Polls `check` every millisecond (see [`poll_until`]), to catch the agent or the hub in a
/// phase that lasts a few milliseconds.
fn poll_fast<T>(timeout: Duration, what: &str, check: impl FnMut() -> Option<T>) -> T {
    poll_until(timeout, Duration::from_millis(1), what, check)
}

/// Writes an `example-model` into `hub.dir()/NAME`. A wide `hidden` layer makes the model
/// megabytes, so that moving, hashing and loading it takes a measurable moment, and more `cases`
/// make probation last.
fn write_example(hub: &TestHub, name: &str, seed: u64, hidden: usize, cases: usize) -> PathBuf {
    let dir = hub.dir().join(name);
    hub.cli(&[
        "example-model",
        "--out",
        &dir.to_string_lossy(),
        "--seed",
        &seed.to_string(),
        "--hidden",
        &hidden.to_string(),
        "--cases",
        &cases.to_string(),
    ])
    .ok();
    dir
}

fn sha256_hex(bytes: &[u8]) -> String {
    outpost_protocol::sha256(bytes).to_hex()
}

/// The names in `dir`, or none when it does not exist (yet).
fn file_names(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => panic!("listing {}: {error}", dir.display()),
    }
}

/// The agent's durable state, as it would read it at its next start.
fn agent_state(data: &Path) -> DeviceState {
    StateFiles::new(data).unwrap().load().unwrap()
}

/// How far an agent got with installing `target`, read from its disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Nothing of the target yet: between check-ins, or checking in.
    Idle,
    /// Part or all of an artifact in `downloads/`, streamed and hashed, not yet installed.
    Download,
    /// The version directory under assembly, or in place with no probation marker yet.
    Install,
    /// The probation marker names the target: it is loading and running its validation set.
    Probation,
    /// The target is the active version: the commit and what follows it (the swap, removal of
    /// old versions, the report to the hub).
    Committed,
}

fn phase_on_disk(data: &Path, target: &ModelVersionInfo) -> Phase {
    let state = agent_state(data);
    let model = state.model("demo").cloned().unwrap_or_default();
    let is_target = |digest: &[u8; 32]| hex::encode(digest) == target.manifest_sha256;
    if model
        .active
        .as_ref()
        .is_some_and(|active| is_target(&active.manifest_sha256))
    {
        return Phase::Committed;
    }
    if model
        .pending
        .as_ref()
        .is_some_and(|pending| is_target(&pending.candidate.manifest_sha256))
    {
        return Phase::Probation;
    }
    let versions = file_names(&data.join("versions"));
    let staging = format!(".staging-{}", target.manifest_sha256);
    if versions
        .iter()
        .any(|name| *name == target.manifest_sha256 || *name == staging)
    {
        return Phase::Install;
    }
    let downloads = file_names(&data.join("downloads"));
    if target.artifacts.iter().any(|artifact| {
        downloads
            .iter()
            .any(|name| *name == format!("{}.partial", artifact.sha256))
    }) {
        return Phase::Download;
    }
    Phase::Idle
}

/// The versions published in a test, and the local files their artifacts came from.
#[derive(Default)]
struct Catalogue {
    /// By manifest SHA-256 (hex).
    versions: BTreeMap<String, ModelVersionInfo>,
    /// Local artifact files by SHA-256 (hex).
    files: BTreeMap<String, PathBuf>,
}

impl Catalogue {
    /// Publishes the example model in `dir` as demo `version` and records it.
    fn publish(
        &mut self,
        hub: &TestHub,
        fleet: &Fleet,
        dir: &Path,
        version: u64,
    ) -> ModelVersionInfo {
        let info = fleet.publish_dir(hub, dir, "demo", version);
        self.record(dir, info.clone());
        info
    }

    /// Records a version the hub holds, checking its artifacts are the files in `dir`.
    fn record(&mut self, dir: &Path, info: ModelVersionInfo) {
        for artifact in &info.artifacts {
            let file = dir.join(match artifact.role.as_str() {
                "model" => "model.onnx",
                "validation" => "validation.bin",
                "profile" => "profile.bin",
                other => panic!("unknown artifact role {other}"),
            });
            let bytes = std::fs::read(&file).unwrap();
            assert_eq!(
                (sha256_hex(&bytes), bytes.len() as u64),
                (artifact.sha256.clone(), artifact.length),
                "the hub lists {} of demo@{} with another hash or length than {}",
                artifact.role,
                info.version,
                file.display()
            );
            self.files.insert(artifact.sha256.clone(), file);
        }
        self.versions.insert(info.manifest_sha256.clone(), info);
    }

    /// Checks everything the agent keeps of model versions, returning the versions installed:
    ///
    /// - each `versions/<digest>/` holds a `manifest.bin` hashing to `<digest>`, of a version
    ///   published here, and every artifact that manifest signs, at its signed length and hash;
    /// - each `downloads/*.partial` is a prefix of the artifact it is named after;
    /// - with `quiescent`, no version is half assembled or half removed (`.staging-*`,
    ///   `.removing-*`), as after a restart and a finished cycle.
    fn verify_agent_files(&self, data: &Path, quiescent: bool, context: &str) -> Vec<u64> {
        let mut installed = Vec::new();
        let versions = data.join("versions");
        for name in file_names(&versions) {
            let dir = versions.join(&name);
            if name.starts_with('.') {
                // `.staging-` or `.removing-`: a version half assembled or half removed.
                assert!(
                    !quiescent,
                    "{context}: {} is left after a restart and a finished cycle",
                    dir.display()
                );
                continue;
            }
            let manifest_bytes = std::fs::read(dir.join("manifest.bin")).unwrap_or_else(|error| {
                panic!(
                    "{context}: {} has no readable manifest ({error}); it holds {:?}",
                    dir.display(),
                    file_names(&dir)
                )
            });
            assert_eq!(
                sha256_hex(&manifest_bytes),
                name,
                "{context}: {}/manifest.bin does not hash to its directory's name",
                dir.display()
            );
            let info = self.versions.get(&name).unwrap_or_else(|| {
                panic!("{context}: {} is no version published here", dir.display())
            });
            let manifest: ManifestBody =
                outpost_protocol::decode::<Signed<ManifestBody>>(&manifest_bytes)
                    .unwrap()
                    .decode_unverified()
                    .unwrap();
            assert_eq!(manifest.version, info.version, "{context}");
            for artifact in &manifest.artifacts {
                let path = dir.join(artifact_file(artifact.role));
                let bytes = std::fs::read(&path).unwrap_or_else(|error| {
                    panic!(
                        "{context}: {} is missing ({error}); the directory holds {:?}",
                        path.display(),
                        file_names(&dir)
                    )
                });
                assert_eq!(
                    (sha256_hex(&bytes), bytes.len() as u64),
                    (artifact.sha256.to_hex(), artifact.length),
                    "{context}: {} does not match its signed hash and length",
                    path.display()
                );
            }
            installed.push(info.version);
        }
        let downloads = data.join("downloads");
        for name in file_names(&downloads) {
            let path = downloads.join(&name);
            let digest = name
                .strip_suffix(".partial")
                .unwrap_or_else(|| panic!("{context}: {} is no partial download", path.display()));
            let source = self
                .files
                .get(digest)
                .unwrap_or_else(|| panic!("{context}: {} is no artifact of ours", path.display()));
            let partial = std::fs::read(&path).unwrap();
            let whole = std::fs::read(source).unwrap();
            assert!(
                whole.starts_with(&partial),
                "{context}: {} ({} bytes) is not a prefix of the artifact ({} bytes)",
                path.display(),
                partial.len(),
                whole.len()
            );
        }
        installed.sort_unstable();
        installed
    }

    /// Checks that no write the agent began before `pid` (its running process) left a temporary
    /// file next to its state, trust root or status file.
    fn verify_no_stale_temporaries(data: &Path, pid: u32, context: &str) {
        let own = format!(".tmp-{pid}");
        for dir in [data.to_owned(), data.join("trust")] {
            let stale: Vec<String> = file_names(&dir)
                .into_iter()
                .filter(|name| name.contains(".tmp-") && !name.ends_with(&own))
                .collect();
            assert!(
                stale.is_empty(),
                "{context}: interrupted writes left {stale:?} in {}",
                dir.display()
            );
        }
    }
}

/// Where a kill of the agent is aimed: anywhere in a whole update cycle, or a random moment
/// shortly after the agent entered a phase (or a later one).
#[derive(Debug, Clone, Copy)]
enum Aim {
    Anywhere,
    After(Phase),
}

const AGENT_AIMS: [Aim; 5] = [
    Aim::Anywhere,
    Aim::After(Phase::Download),
    Aim::After(Phase::Install),
    Aim::After(Phase::Probation),
    Aim::After(Phase::Committed),
];

/// When each phase was first seen on the agent's disk during an update to `target`, from the
/// moment of the call, polled until it committed. Phases too short to be seen are absent.
fn phase_timeline(agent: &TestAgent, target: &ModelVersionInfo) -> BTreeMap<Phase, Duration> {
    let started = Instant::now();
    let mut seen = BTreeMap::new();
    poll_fast(AGENT_WAIT, "the undisturbed update to commit", || {
        let phase = phase_on_disk(&agent.data(), target);
        seen.entry(phase).or_insert_with(|| started.elapsed());
        (phase == Phase::Committed).then_some(())
    });
    seen
}

/// How long each phase lasted in `timeline` (until the next phase seen); the committed phase,
/// which has no end, is given what removing old versions and reporting take.
fn phase_lengths(timeline: &BTreeMap<Phase, Duration>) -> BTreeMap<Phase, Duration> {
    let mut lengths: BTreeMap<Phase, Duration> = timeline
        .iter()
        .zip(timeline.iter().skip(1))
        .map(|((phase, began), (_, next))| (*phase, *next - *began))
        .collect();
    lengths.insert(Phase::Committed, Duration::from_millis(100));
    lengths
}

/// Hidden width and validation cases of the agent test's models: about 2 MB each, with a
/// validation set that keeps probation busy for a few hundred milliseconds.
const AGENT_MODEL_HIDDEN: usize = 65_536;
const AGENT_MODEL_CASES: usize = 64;

#[test]
fn an_agent_killed_at_random_moments_serves_the_old_or_the_new_model() {
    let seed = Seed::from_env("agent kills");
    let mut schedule = seed.schedule(1);
    let iterations = if slow() { 50 } else { 8 };
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    // Versions alternate between two models, so every update moves other files than the last.
    let models = [
        write_example(&hub, "a", 1, AGENT_MODEL_HIDDEN, AGENT_MODEL_CASES),
        write_example(&hub, "b", 2, AGENT_MODEL_HIDDEN, AGENT_MODEL_CASES),
    ];
    let model_for = |version: u64| &models[usize::from(version.is_multiple_of(2))];
    let mut catalogue = Catalogue::default();
    catalogue.publish(&hub, &fleet, model_for(1), 1);
    fleet.first_rollout(&hub, "demo", 1);
    let mut agent = TestAgent::enroll(&hub, &fleet, "site=lab", "");
    agent.start();
    agent.wait_status("active", json!("demo@1"));

    // One update left alone measures a whole cycle (the wait for the next check-in, download,
    // install, probation, commit), the span the unanchored kills are spread over, and how long
    // each phase lasts here, the span the anchored ones are spread over.
    let info = catalogue.publish(&hub, &fleet, model_for(2), 2);
    fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);
    let timeline = phase_timeline(&agent, &info);
    let cycle = timeline[&Phase::Committed];
    let lengths = phase_lengths(&timeline);
    eprintln!("an undisturbed update: phases first seen at {timeline:?}");
    agent.wait_status("active", json!("demo@2"));

    let client = http();
    let first_aim = schedule.below(AGENT_AIMS.len() as u64) as usize;
    let mut active = 2;
    let mut landed: BTreeMap<Phase, usize> = BTreeMap::new();
    for iteration in 0.. {
        // The schedule's kills, then, while they have not spread as the end of the test requires,
        // kills aimed at a missing phase the moment it is seen: where a delayed kill lands
        // depends on how fast this run goes next to the undisturbed update, which a busy machine
        // changes, so the schedule alone cannot promise to hit every phase.
        let (aim, at_once) = if iteration < iterations {
            (
                AGENT_AIMS[(first_aim + iteration) % AGENT_AIMS.len()],
                false,
            )
        } else if spread_enough(&landed) || iteration >= iterations + EXTRA_KILLS {
            break;
        } else {
            let missing = [
                Phase::Probation,
                Phase::Committed,
                Phase::Download,
                Phase::Install,
            ]
            .into_iter()
            .find(|phase| !landed.contains_key(phase))
            .expect("kills that have not spread missed one of these phases");
            (Aim::After(missing), true)
        };
        let target = iteration as u64 + 3;
        let target_info = catalogue.publish(&hub, &fleet, model_for(target), target);
        fleet.create_rollout(
            &hub,
            "demo",
            target,
            active,
            &["--stages", "100", "--bake", "1s"],
        );
        match aim {
            Aim::Anywhere => std::thread::sleep(schedule.delay_up_to(cycle * 5 / 4)),
            Aim::After(phase) => {
                poll_fast(AGENT_WAIT, &format!("the agent to reach {phase:?}"), || {
                    (phase_on_disk(&agent.data(), &target_info) >= phase).then_some(())
                });
                // Within the first half of the phase's usual length, so that the kill lands in
                // it even when it goes faster this time; a phase too short to be seen still gets
                // a millisecond. `Anywhere` covers the rest.
                if !at_once {
                    let spread = lengths.get(&phase).copied().unwrap_or_default() / 2;
                    let delay = schedule.delay_up_to(spread.max(Duration::from_millis(1)));
                    std::thread::sleep(delay);
                }
            }
        }
        agent.kill9();
        let phase = phase_on_disk(&agent.data(), &target_info);
        *landed.entry(phase).or_default() += 1;
        let context = format!(
            "{seed}, iteration {iteration}: demo@{active} -> demo@{target}, aimed {aim:?}{}, \
             killed in {phase:?}",
            if at_once { " at once" } else { "" }
        );
        eprintln!("{context}");
        // What the kill left behind, before the agent's start tidies anything.
        catalogue.verify_agent_files(&agent.data(), false, &context);

        // Only a commit the agent wrote down moves it to the new version; anything earlier
        // (probation included) starts it on the old one, which its log names as it starts. The
        // inference API's socket is bound before that, so the test waits for the line, not for
        // the socket.
        let serving = if phase == Phase::Committed {
            target
        } else {
            active
        };
        let log_before = agent.log().len();
        let restarted_at = outpost_agent::unix_now();
        agent.start();
        let started_log = wait_until(
            AGENT_WAIT,
            "the restarted agent to name what it serves",
            || {
                let log = agent.log()[log_before..].to_owned();
                log.contains("serving demo@").then_some(log)
            },
        );
        let started_with = started_log
            .lines()
            .find_map(|line| line.split_once("serving demo@"))
            .map(|(_, version)| version.trim().to_owned());
        assert_eq!(
            started_with,
            Some(serving.to_string()),
            "{context}: the restarted agent must start serving demo@{serving} (old demo@{active} \
             or new demo@{target}, never neither); its log since the restart:\n{started_log}"
        );
        if phase == Phase::Probation {
            assert!(
                started_log.contains(&format!(
                    "restarted during probation of demo@{target}; reverted to demo@{active}"
                )),
                "{context}: no revert in the log since the restart:\n{started_log}"
            );
        }
        // Its first cycle starts at once, and from a kill before probation it may already have
        // taken the update up again: the new version is then as good an answer as the old.
        let allowed = if phase >= Phase::Probation {
            vec![json!(format!("demo@{serving}"))]
        } else {
            vec![
                json!(format!("demo@{active}")),
                json!(format!("demo@{target}")),
            ]
        };
        let status = agent.status();
        assert!(
            allowed.contains(&status["active"]),
            "{context}: the restarted agent must serve one of {allowed:?}; status {status:#}"
        );
        let (code, body) = agent.infer(&client, [0.5, -1.0, 2.0, 0.25]);
        let answered = json!(format!(
            "demo@{}",
            body["model_version"].as_str().unwrap_or("?")
        ));
        assert!(
            code == 200 && allowed.contains(&answered),
            "{context}: inference right after the restart must be answered by one of \
             {allowed:?}: {code} {body}"
        );

        // Then it carries on: a kill in probation fails the target here (it is not tried again,
        // so a model that kills the agent cannot crash-loop it); any earlier kill is resumed and
        // committed. Either way it checks in again after the restart and stays up.
        let settled = if phase == Phase::Probation {
            active
        } else {
            target
        };
        let settled_digest = &catalogue
            .versions
            .values()
            .find(|info| info.version == settled)
            .unwrap()
            .manifest_sha256;
        let target_digest = &target_info.manifest_sha256;
        wait_until(
            AGENT_WAIT,
            &format!("{context}: the agent to settle on demo@{settled}"),
            || {
                if let Some(exit) = agent.exited() {
                    panic!("{context}: the agent exited with {exit} after its restart");
                }
                let state = agent_state(&agent.data());
                let failed_target = state
                    .failed
                    .iter()
                    .any(|digest| hex::encode(digest) == *target_digest);
                let model = state.model("demo").cloned().unwrap_or_default();
                (model.pending.is_none()
                    && model
                        .active
                        .as_ref()
                        .is_some_and(|a| hex::encode(a.manifest_sha256) == *settled_digest)
                    && (settled == target || failed_target)
                    && state.outbox.is_empty()
                    && state.last_checkin.is_some_and(|at| at > restarted_at))
                .then_some(())
            },
        );
        // state.bin shows the commit before the same cycle has removed the versions it no longer
        // keeps (renamed to `.removing-*`, then deleted). The status file is written by the same
        // thread, so one written after the status that shows the settled version comes from a
        // later point of the sync loop: that removal is over, and what is left is what the crash
        // left.
        agent.wait_fresh_status("active", json!(format!("demo@{settled}")));
        agent.next_status();
        let installed = catalogue.verify_agent_files(&agent.data(), true, &context);
        Catalogue::verify_no_stale_temporaries(&agent.data(), agent.pid(), &context);
        assert!(
            installed.contains(&settled),
            "{context}: demo@{settled} is active but not installed: {installed:?}"
        );
        let (code, body) = agent.infer(&client, [0.5, -1.0, 2.0, 0.25]);
        assert_eq!(
            (code, &body["model_version"]),
            (200, &json!(settled.to_string())),
            "{context}: inference once settled: {body}"
        );
        assert!(agent.exited().is_none(), "{context}: the agent exited");
        active = settled;
    }
    eprintln!("{seed}: kills landed in {landed:?}");
    // The schedule aims at every phase in turn. Where an aim lands still depends on timing, but
    // the kills must have spread, and have hit the two phases a crash could lose a model in.
    assert!(
        spread_enough(&landed),
        "{seed}: the kills did not spread over the update: {landed:?}"
    );
}

/// Most kills added to a test's schedule to reach the phases its delayed kills missed.
const EXTRA_KILLS: usize = 10;

/// Whether the agent kills landed in enough phases: at least three, among them the two a crash
/// could lose a model in.
fn spread_enough(landed: &BTreeMap<Phase, usize>) -> bool {
    landed.len() >= 3
        && landed.contains_key(&Phase::Probation)
        && landed.contains_key(&Phase::Committed)
}

/// Checks the hub's stored models: no temporary upload file is left, every artifact file hashes
/// to its name, every version `model show` lists has each of its artifacts stored whole,
/// `model list` agrees with `model show`, and the audit log is intact. Returns the versions
/// listed.
fn verify_hub_files(hub: &TestHub, context: &str) -> Vec<u64> {
    // The CLI first: `serve` writes its address before it opens its data directory (and clears
    // what an interrupted upload left there), and an answer means that is done.
    let detail: ModelDetail = hub.cli_json(&["model", "show", "demo"]);
    let mut versions: Vec<u64> = detail.versions.iter().map(|v| v.version).collect();
    versions.sort_unstable();
    let list: Vec<ModelSummary> = hub.cli_json(&["model", "list"]);
    assert_eq!(
        list.iter()
            .map(|model| (model.name.as_str(), model.versions, model.latest_version))
            .collect::<Vec<_>>(),
        [("demo", versions.len(), *versions.last().unwrap())],
        "{context}: model list disagrees with model show"
    );
    let verdict: AuditVerdict = hub.cli_json(&["audit", "verify"]);
    assert!(verdict.intact, "{context}: {verdict:?}");
    // An upload is staged in `uploads/` while it is hashed, then written under `artifacts/` as a
    // staging file (`NAME#N`) renamed to its hash; a restart clears what a kill left of either.
    let staged = file_names(&hub.data().join("uploads"));
    assert!(
        staged.is_empty(),
        "{context}: staged uploads were left behind: {staged:?}"
    );
    let dir = hub.data().join("artifacts");
    for name in file_names(&dir) {
        let path = dir.join(&name);
        assert!(
            !name.ends_with(".partial") && !name.contains('#'),
            "{context}: {} was left behind",
            path.display()
        );
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            sha256_hex(&bytes),
            name,
            "{context}: {} does not hash to its name",
            path.display()
        );
    }
    for version in &detail.versions {
        for artifact in &version.artifacts {
            let path = dir.join(&artifact.sha256);
            let length = std::fs::metadata(&path).map_or(0, |meta| meta.len());
            assert_eq!(
                length, artifact.length,
                "{context}: demo@{} lists its {} {}, which is not stored whole",
                version.version, artifact.role, artifact.sha256
            );
        }
    }
    versions
}

/// Where a kill of the hub during `model publish` is aimed.
#[derive(Debug, Clone, Copy)]
enum PublishAim {
    /// Anywhere in the time an undisturbed publish takes, validation on the CLI's side included.
    Anywhere,
    /// Shortly after the model began streaming into the hub's temporary file.
    Upload,
    /// After the model was stored under its hash: the validation set's upload, the manifest's,
    /// and the store's flushes.
    Manifest,
}

const PUBLISH_AIMS: [PublishAim; 3] = [
    PublishAim::Anywhere,
    PublishAim::Upload,
    PublishAim::Manifest,
];

/// Hidden width of the publish test's models: about 4 MB, so an upload takes a moment.
const HUB_MODEL_HIDDEN: usize = 131_072;

/// How long a CLI command or a rollout may take once the hub is back.
const HUB_WAIT: Duration = Duration::from_secs(90);

fn model_sha256(dir: &Path) -> String {
    sha256_hex(&std::fs::read(dir.join("model.onnx")).unwrap())
}

/// Starts `model publish` of the example model in `dir` as demo `version`, in the background.
fn spawn_publish(hub: &TestHub, fleet: &Fleet, dir: &Path, version: u64) -> Child {
    let args = fleet.publish_args(dir, "demo", version);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    hub.cli_command(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (bounded) for a command started by [`spawn_publish`]; returns how it ended and what it
/// printed on stderr.
fn finish(mut command: Child) -> (ExitStatus, String) {
    let exit = wait_until(HUB_WAIT, "the publish command to end", || {
        command.try_wait().unwrap()
    });
    let mut stderr = String::new();
    command
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (exit, stderr)
}

#[test]
fn a_hub_killed_during_publish_holds_each_version_whole_or_not_at_all() {
    let seed = Seed::from_env("hub kills during publish");
    let mut schedule = seed.schedule(2);
    let attempts: u64 = if slow() { 9 } else { 3 };
    let mut hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    let mut catalogue = Catalogue::default();
    let artifacts = hub.data().join("artifacts");
    let uploads = hub.data().join("uploads");
    // Under way: staged and being hashed, or being written under its name.
    let uploading = || {
        !file_names(&uploads).is_empty()
            || file_names(&artifacts).iter().any(|name| name.contains('#'))
    };

    // An undisturbed publish measures the spans the kills are spread over: all of it, the
    // model's upload (from its temporary file appearing to its file appearing under its hash),
    // and what follows (the validation set's upload, the manifest's, the store's flushes).
    let dir = write_example(&hub, "big-1", 1, HUB_MODEL_HIDDEN, 8);
    let model_sha = model_sha256(&dir);
    let started = Instant::now();
    let mut publish = spawn_publish(&hub, &fleet, &dir, 1);
    let (mut upload_began, mut upload_ended) = (None, None);
    poll_fast(HUB_WAIT, "the undisturbed publish", || {
        if upload_began.is_none() && uploading() {
            upload_began = Some(started.elapsed());
        }
        if upload_ended.is_none() && artifacts.join(&model_sha).exists() {
            upload_ended = Some(started.elapsed());
        }
        publish.try_wait().unwrap()
    });
    let publish_time = started.elapsed();
    let (exit, stderr) = finish(publish);
    assert!(
        exit.success(),
        "{seed}: the undisturbed publish failed: {stderr}"
    );
    catalogue.record(&dir, hub.cli_json(&["model", "show", "demo@1"]));
    let upload_time = upload_began
        .zip(upload_ended)
        .map_or(Duration::ZERO, |(began, ended)| ended - began);
    let rest_time = upload_ended.map_or(Duration::ZERO, |ended| publish_time - ended);
    eprintln!(
        "an undisturbed publish took {publish_time:?}: the model's upload {upload_time:?}, what \
         follows it {rest_time:?}"
    );

    let first_aim = schedule.below(PUBLISH_AIMS.len() as u64) as usize;
    let mut landed: BTreeMap<&str, usize> = BTreeMap::new();
    let mut version = 1;
    for attempt in 0.. {
        // The schedule's kills, then, while none has found an upload under way, kills the moment
        // one is seen: whether a delayed kill finds it depends on how fast this upload goes next
        // to the undisturbed one, which a busy machine changes.
        let (aim, at_once) = if attempt < attempts {
            let aim = PUBLISH_AIMS[(first_aim + attempt as usize) % PUBLISH_AIMS.len()];
            (aim, false)
        } else if landed.contains_key("mid-upload") || attempt >= attempts + EXTRA_KILLS as u64 {
            break;
        } else {
            (PublishAim::Upload, true)
        };
        version += 1;
        // A model of its own, so that every attempt has a real upload to interrupt.
        let dir = write_example(
            &hub,
            &format!("big-{version}"),
            version,
            HUB_MODEL_HIDDEN,
            8,
        );
        let model_sha = model_sha256(&dir);
        let model_stored = || artifacts.join(&model_sha).exists();
        let publish = spawn_publish(&hub, &fleet, &dir, version);
        match aim {
            PublishAim::Anywhere => std::thread::sleep(schedule.delay_up_to(publish_time)),
            PublishAim::Upload => {
                poll_fast(HUB_WAIT, "the model's upload to begin", || {
                    (uploading() || model_stored()).then_some(())
                });
                // Within the first half of the upload's usual length, so that the kill finds
                // it under way even when this one goes faster.
                if !at_once {
                    std::thread::sleep(schedule.delay_up_to(upload_time / 2));
                }
            }
            PublishAim::Manifest => {
                poll_fast(HUB_WAIT, "the model to be stored", || {
                    model_stored().then_some(())
                });
                std::thread::sleep(schedule.delay_up_to(rest_time));
            }
        }
        hub.kill9();
        // What the kill left, before the restart tidies anything.
        let moment = if uploading() {
            "mid-upload"
        } else if model_stored() {
            "after the model's upload"
        } else {
            "before the model's upload"
        };
        let (exit, stderr) = finish(publish);
        let acknowledged = exit.success();
        let context = format!(
            "{seed}, attempt {attempt}: publishing demo@{version}, aimed {aim:?}{}, killed \
             {moment}; the command {}: {}",
            if at_once { " at once" } else { "" },
            if acknowledged { "succeeded" } else { "failed" },
            stderr.trim()
        );
        eprintln!("{context}");
        *landed.entry(moment).or_default() += 1;

        hub.restart();
        let stored = verify_hub_files(&hub, &context).contains(&version);
        assert!(
            stored || !acknowledged,
            "{context}: the hub lost a publish it had acknowledged"
        );
        // The same command again finishes the publish, or finds it finished.
        let info = fleet.publish_dir(&hub, &dir, "demo", version);
        assert_eq!(
            info.already_published, stored,
            "{context}: publishing again must say whether the version was already there"
        );
        catalogue.record(&dir, info);
        assert!(
            verify_hub_files(&hub, &context).contains(&version),
            "{context}: publishing again did not store demo@{version}"
        );
    }
    eprintln!("{seed}: kills landed {landed:?}");
    assert!(
        landed.contains_key("mid-upload"),
        "{seed}: no kill landed during an upload: {landed:?}"
    );

    // A device takes the last version from the hub that was killed under it so often.
    let mut agent = TestAgent::enroll(&hub, &fleet, "site=lab", "");
    agent.start();
    fleet.first_rollout(&hub, "demo", version);
    agent.wait_status("active", json!(format!("demo@{version}")));
    let context = format!("{seed}, the device after the publishes");
    let installed = catalogue.verify_agent_files(&agent.data(), true, &context);
    assert_eq!(installed, [version], "{context}");
    let (code, body) = agent.infer(&http(), [0.5, -1.0, 2.0, 0.25]);
    assert_eq!(
        (code, &body["model_version"]),
        (200, &json!(version.to_string())),
        "{context}: {body}"
    );
}

#[test]
fn a_hub_killed_during_a_rollout_brings_every_agent_to_the_target() {
    let seed = Seed::from_env("hub kills during a rollout");
    let mut schedule = seed.schedule(3);
    let kills = if slow() { 6 } else { 3 };
    let mut hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    let mut catalogue = Catalogue::default();
    let old = write_example(&hub, "v1", 1, 16, 8);
    let new = write_example(&hub, "v2", 2, AGENT_MODEL_HIDDEN, AGENT_MODEL_CASES);
    catalogue.publish(&hub, &fleet, &old, 1);
    let target = catalogue.publish(&hub, &fleet, &new, 2);
    fleet.first_rollout(&hub, "demo", 1);
    let mut agents: Vec<TestAgent> = (0..3)
        .map(|_| {
            let mut agent = TestAgent::enroll(&hub, &fleet, "site=lab", "");
            agent.start();
            agent
        })
        .collect();
    for agent in &agents {
        agent.wait_status("active", json!("demo@1"));
    }

    // Three stages a second's bake apart: the rollout takes several seconds, and the agents
    // are at different points of it when the hub dies.
    let created = fleet.create_rollout(
        &hub,
        "demo",
        2,
        1,
        &["--stages", "34,67,100", "--bake", "1s"],
    );
    let mut at_kills: Vec<Vec<Phase>> = Vec::new();
    for kill in 0..kills {
        if kill == 0 {
            // The first kill lands just after an agent began its update, so that at least one
            // kill is mid-update whatever the draws.
            poll_fast(HUB_WAIT, "an agent to begin downloading the target", || {
                agents
                    .iter()
                    .any(|agent| phase_on_disk(&agent.data(), &target) >= Phase::Download)
                    .then_some(())
            });
            std::thread::sleep(schedule.delay_up_to(Duration::from_millis(100)));
        } else {
            std::thread::sleep(schedule.delay_up_to(Duration::from_millis(1500)));
        }
        hub.kill9();
        let phases: Vec<Phase> = agents
            .iter()
            .map(|agent| phase_on_disk(&agent.data(), &target))
            .collect();
        let context = format!("{seed}, kill {kill}: the agents were in {phases:?}");
        eprintln!("{context}");
        at_kills.push(phases);
        // Down for a moment, as after a real crash: check-ins and downloads fail meanwhile.
        std::thread::sleep(schedule.delay_up_to(Duration::from_millis(700)));
        hub.restart_at_same_address();
        verify_hub_files(&hub, &context);
    }
    assert!(
        at_kills
            .iter()
            .any(|phases| phases.iter().any(|phase| *phase != Phase::Committed)),
        "{seed}: every kill came after every agent had committed: {at_kills:?}"
    );

    // The restarted hub carries the rollout through, and every agent ends on the target.
    let context = format!("{seed}, after the kills at {at_kills:?}");
    wait_until(HUB_WAIT, "the rollout to complete", || {
        for agent in &mut agents {
            if let Some(exit) = agent.exited() {
                panic!("{context}: an agent exited with {exit}");
            }
        }
        let status = hub.rollout(created.sequence);
        assert!(
            matches!(status.state, RolloutState::Active | RolloutState::Completed),
            "{context}: {status:#?}"
        );
        (status.state == RolloutState::Completed).then_some(())
    });
    let client = http();
    for agent in &mut agents {
        agent.wait_status("active", json!("demo@2"));
        let installed = catalogue.verify_agent_files(&agent.data(), true, &context);
        assert!(installed.contains(&2), "{context}: {installed:?}");
        let (code, body) = agent.infer(&client, [0.5, -1.0, 2.0, 0.25]);
        assert_eq!(
            (code, &body["model_version"]),
            (200, &json!("2")),
            "{context}: {body}"
        );
        assert!(agent.exited().is_none(), "{context}: an agent exited");
    }
    // And the hub knows it: every device's next check-in reports the target.
    wait_until(HUB_WAIT, "the hub to see every device on demo@2", || {
        let devices: Vec<DeviceSummary> = hub.cli_json(&["device", "list"]);
        assert_eq!(devices.len(), agents.len(), "{context}: {devices:#?}");
        devices
            .iter()
            .all(|device| device.active.as_ref().is_some_and(|m| m.version == 2))
            .then_some(())
    });
    verify_hub_files(&hub, &context);
}
