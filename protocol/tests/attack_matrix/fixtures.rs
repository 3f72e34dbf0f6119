//! Builds every attack-matrix fixture in memory, deterministically.
//!
//! The fixtures under `protocol/tests/data/` are committed as files so that a reviewer can see the
//! exact bytes a device is asked to refuse, and so that a change to the encoding shows up as a diff
//! rather than passing unnoticed. This generator is the only way those files are made: keys come
//! from fixed seeds, times are fixed constants, and ed25519 signing is deterministic, so running it
//! twice gives identical bytes. `fixtures_match_generator` holds the files and this code together.

use outpost_protocol::envelope::{self, Message};
use outpost_protocol::keys::{sha256, SecretKey};
use outpost_protocol::trust::{
    AgentVersion, Arch, Artifact, ArtifactRole, BreachAction, DType, Dim, GatePolicy, ManifestBody,
    ManifestRef, PlanBody, RootBody, ShadowStage, Signed, SignedBody, TensorSpec,
};
use outpost_protocol::TimeFloor;

/// When every fixture document was created, unless a scenario says otherwise.
pub const CREATED: u64 = 1_700_000_000;
/// An expiry far beyond any floor the tests use.
pub const GOOD_EXPIRY: u64 = 4_000_000_000;
/// An expiry shortly after [`CREATED`] and long before [`NOW`].
pub const EXPIRED: u64 = 1_700_000_100;
/// The wall-clock time the tests run "at".
pub const NOW: u64 = 1_750_000_000;
/// The floor most tests verify against: a device whose clock reads [`NOW`].
pub const FLOOR: TimeFloor = TimeFloor {
    wall_clock: NOW,
    newest_signed: 0,
    hub_time: 0,
};
/// When the `time_floor` scenario's plan was created: after its target manifest expired.
pub const LATE_PLAN_CREATED: u64 = 1_700_000_500;

/// The model most scenarios ship.
pub const MODEL: &str = "kws";
/// A second, unrelated model, for artifacts and manifests that belong elsewhere.
pub const OTHER_MODEL: &str = "face-detect";
/// A name that would escape the model directory if it were ever used as a path.
pub const TRAVERSAL_NAME: &str = "../escape";

/// Release keys of the usual root, version 1: seeds 1, 2 and 3, any 2 of which must sign.
const ROOT_KEYS: &[u8] = &[1, 2, 3];
const ROOT_THRESHOLD: u32 = 2;
/// The pair of root keys that signs manifests and plans in every scenario that is not about
/// signatures.
const SIGNERS: &[u8] = &[1, 2];
/// A key no root lists.
const STRANGER: u8 = 9;

/// The files of one scenario: name within its directory, and contents.
pub type Files = Vec<(&'static str, Vec<u8>)>;

/// Makes one scenario's files.
type BuildFn = fn() -> Files;

/// One scenario: a directory of files and the one line the README says about it.
#[derive(Debug)]
pub struct Scenario {
    pub dir: &'static str,
    pub summary: &'static str,
    pub files: Files,
}

/// Every scenario, in the order the README lists them.
const TABLE: &[(&str, &str, BuildFn)] = &[
    (
        "valid_chain",
        "a good root, plan, target and fallback manifest and model artifact: all accepted",
        valid_chain,
    ),
    (
        "under_threshold",
        "a manifest signed by 1 key where 2 are required: `ThresholdNotMet { valid: 1, threshold: 2 }`",
        under_threshold,
    ),
    (
        "duplicate_signatures",
        "manifest signed twice by the same key, counted once: `ThresholdNotMet { duplicates: 1 }`",
        duplicate_signatures,
    ),
    (
        "unknown_key",
        "manifest signed by one root key and one key the root does not list: `ThresholdNotMet { unknown_keys: 1 }`",
        unknown_key,
    ),
    (
        "expired_root",
        "expired root: refused initially and as the root of a manifest or plan, but may rotate to a fresh root",
        expired_root,
    ),
    (
        "expired_root_update",
        "a rotation whose new root has expired: `update` refuses it with `Expired { role: Root }`",
        expired_root_update,
    ),
    (
        "expired_manifest",
        "a manifest past its expiry: `Expired { role: Manifest }`",
        expired_manifest,
    ),
    (
        "expired_plan",
        "a plan past its expiry: `Expired { role: Plan }`",
        expired_plan,
    ),
    (
        "time_floor",
        "clock reset to 0, but a plan already accepted was created after the manifest expired: `Expired { role: Manifest }`",
        time_floor,
    ),
    (
        "manifest_rollback",
        "manifest version 1 after version 2 was seen: `ManifestRollback`",
        manifest_rollback,
    ),
    (
        "plan_rollback",
        "plan sequence 4 after sequence 5 was seen: `PlanRollback`",
        plan_rollback,
    ),
    (
        "rotation_new_keys_only",
        "root rotation signed only by the new keys: `ThresholdNotMet { role: Root }`",
        rotation_new_keys_only,
    ),
    (
        "rotation_cross_signed",
        "root rotation signed by thresholds of both old and new keys: accepted, and the new keys then sign",
        rotation_cross_signed,
    ),
    (
        "rotation_skips_version",
        "root rotation from version 1 straight to 3: `RootVersion`",
        rotation_skips_version,
    ),
    (
        "threshold_raised",
        "2-of-3 rotated to 3-of-4: 2 new signatures refused, 3 accepted",
        threshold_raised,
    ),
    (
        "threshold_lowered",
        "3-of-3 rotated to 1-of-2: 2 old signatures refused, all 3 accepted",
        threshold_lowered,
    ),
    (
        "artifact_from_other_manifest",
        "the model bytes of version 1 served for version 2, same length: `ArtifactHash`",
        artifact_from_other_manifest,
    ),
    (
        "artifact_wrong_length",
        "another model's bytes, of another length, served for this manifest: `ArtifactLength`",
        artifact_wrong_length,
    ),
    (
        "tampered_artifact_entry",
        "a signed manifest whose artifact entry was edited after signing: `ThresholdNotMet { invalid: 2 }`",
        tampered_artifact_entry,
    ),
    (
        "manifest_not_in_plan",
        "validly signed manifests that are neither target nor fallback of the plan: `ManifestNotInPlan`",
        manifest_not_in_plan,
    ),
    (
        "shadow_not_authorised",
        "a shadow manifest under a plan without a shadow stage: `NoShadowStage`; the fallback or a stray manifest under one with: `ShadowNotTarget`",
        shadow_not_authorised,
    ),
    (
        "fallback_below_highest",
        "a plan's signed fallback below the highest version seen is accepted; the same bytes without the plan are a `ManifestRollback`",
        fallback_below_highest,
    ),
    (
        "invalid_model_name",
        "validly signed manifest and plan naming `../escape`: `InvalidModelName { source: PathSeparator }`",
        invalid_model_name,
    ),
    (
        "wrong_arch",
        "a manifest for aarch64 only, offered to an x86_64 device: `IncompatibleArch`",
        wrong_arch,
    ),
    (
        "agent_too_old",
        "a manifest needing agent 2.1.0, offered to agent 2.0.9: `AgentTooOld`",
        agent_too_old,
    ),
    (
        "wrong_kind",
        "documents presented as another kind, framed or inside a signature: `Decode` with `WrongKind`",
        wrong_kind,
    ),
    (
        "root_under_threshold",
        "an initial root signed by 1 of its own keys where 2 are required: `ThresholdNotMet { role: Root }`",
        root_under_threshold,
    ),
];

/// Builds every scenario's files.
pub fn scenarios() -> Vec<Scenario> {
    TABLE
        .iter()
        .map(|(dir, summary, build)| Scenario {
            dir,
            summary,
            files: build(),
        })
        .collect()
}

/// The README that sits beside the scenario directories, generated so it cannot fall out of step.
pub fn readme(scenarios: &[Scenario]) -> String {
    let mut text = format!(
        "# Chain-of-trust attack fixtures\n\
         \n\
         Each directory is one scenario of `protocol/tests/attack_matrix/main.rs`, which reads these\n\
         files and asserts the exact `VerifyError` a device answers with. They are generated by\n\
         `protocol/tests/attack_matrix/fixtures.rs`; do not edit them by hand. After changing the\n\
         generator, run `OUTPOST_BLESS=1 cargo test -p outpost-protocol --test attack_matrix` and\n\
         commit the result: `fixtures_match_generator` fails while files and generator disagree.\n\
         \n\
         Release keys are ed25519 keys from seeds `[n; 32]`. Unless a scenario says otherwise, the\n\
         root is version 1 with keys 1, 2, 3 and threshold 2, keys 1 and 2 sign, documents are\n\
         created at {CREATED} and expire at {GOOD_EXPIRY} (expired ones at {EXPIRED}), and the tests\n\
         judge expiry at {NOW}.\n\
         \n",
    );
    for scenario in scenarios {
        text.push_str(&format!("- `{}/`: {}\n", scenario.dir, scenario.summary));
    }
    text
}

/// The release key with seed `[seed; 32]`.
fn key(seed: u8) -> SecretKey {
    SecretKey::from_seed([seed; 32])
}

fn root_body(version: u64, expires: u64, threshold: u32, seeds: &[u8]) -> RootBody {
    RootBody {
        version,
        created: CREATED,
        expires,
        threshold,
        keys: seeds.iter().map(|seed| key(*seed).public()).collect(),
    }
}

/// The usual root: version 1, keys 1, 2 and 3, threshold 2, signed by keys 1 and 2.
fn good_root() -> Vec<u8> {
    sign(
        &root_body(1, GOOD_EXPIRY, ROOT_THRESHOLD, ROOT_KEYS),
        SIGNERS,
    )
}

/// The bytes a fake model artifact of `name` at `version` consists of.
fn model_bytes(name: &str, version: u64) -> Vec<u8> {
    format!("{name} model v{version}\n").into_bytes()
}

fn manifest_body(name: &str, version: u64, expires: u64) -> ManifestBody {
    let model = model_bytes(name, version);
    ManifestBody {
        name: name.to_owned(),
        version,
        created: CREATED,
        expires,
        artifacts: vec![Artifact {
            role: ArtifactRole::Model,
            sha256: sha256(&model),
            length: model.len() as u64,
        }],
        inputs: vec![TensorSpec {
            name: "audio".to_owned(),
            dtype: DType::F32,
            shape: vec![Dim::Batch, Dim::Fixed(16)],
        }],
        outputs: vec![TensorSpec {
            name: "scores".to_owned(),
            dtype: DType::F32,
            shape: vec![Dim::Batch, Dim::Fixed(4)],
        }],
        archs: vec![Arch::X86_64, Arch::Aarch64],
        min_agent_version: AgentVersion {
            major: 1,
            minor: 0,
            patch: 0,
        },
    }
}

/// A good manifest of `name` at `version`, signed by the usual signers.
fn manifest(name: &str, version: u64) -> Vec<u8> {
    sign(&manifest_body(name, version, GOOD_EXPIRY), SIGNERS)
}

/// Points at a signed manifest by its exact bytes, as the release tooling does.
fn reference(signed_manifest: &[u8]) -> ManifestRef {
    let signed: Signed<ManifestBody> = envelope::decode(signed_manifest).expect("fixture manifest");
    let body = signed.decode_unverified().expect("fixture manifest body");
    ManifestRef {
        name: body.name,
        version: body.version,
        manifest_sha256: sha256(signed_manifest),
    }
}

fn plan_body(sequence: u64, expires: u64, target: &[u8], fallback: Option<&[u8]>) -> PlanBody {
    PlanBody {
        sequence,
        created: CREATED,
        expires,
        target: reference(target),
        fallback: fallback.map(reference),
        stages: vec![10, 50, 100],
        selector: Vec::new(),
        gates: GatePolicy {
            bake_secs: 3600,
            device_timeout_secs: 900,
            max_failure_pct: 5.0,
            max_error_rate: 0.01,
            max_p95_regression_pct: 20.0,
            max_drift_psi: Some(0.2),
            on_breach: BreachAction::Rollback,
            auto_advance: false,
        },
        shadow: None,
    }
}

/// Signs `body` with the keys of `seeds`, in that order, and frames the result.
fn sign<B: SignedBody>(body: &B, seeds: &[u8]) -> Vec<u8>
where
    Signed<B>: Message,
{
    let mut signed = Signed::new(body).expect("fixture body fits its frame");
    for seed in seeds {
        signed.sign(&key(*seed));
    }
    frame(&signed)
}

fn frame<B>(signed: &Signed<B>) -> Vec<u8>
where
    Signed<B>: Message,
{
    envelope::encode(signed).expect("fixture document fits its frame")
}

fn valid_chain() -> Files {
    let target = manifest(MODEL, 2);
    let fallback = manifest(MODEL, 1);
    let plan = sign(
        &plan_body(5, GOOD_EXPIRY, &target, Some(&fallback)),
        SIGNERS,
    );
    vec![
        ("root.bin", good_root()),
        ("plan.bin", plan),
        ("manifest.bin", target),
        ("fallback_manifest.bin", fallback),
        ("artifact.bin", model_bytes(MODEL, 2)),
    ]
}

fn under_threshold() -> Files {
    vec![
        ("root.bin", good_root()),
        (
            "manifest.bin",
            sign(&manifest_body(MODEL, 2, GOOD_EXPIRY), &[1]),
        ),
    ]
}

fn duplicate_signatures() -> Files {
    let mut signed = Signed::new(&manifest_body(MODEL, 2, GOOD_EXPIRY)).expect("fits");
    signed.sign(&key(1));
    // `Signed::sign` replaces an earlier signature by the same key, so an attacker's copy is
    // appended by hand, exactly as a hostile mirror would.
    let copy = signed.signatures[0].clone();
    signed.signatures.push(copy);
    vec![("root.bin", good_root()), ("manifest.bin", frame(&signed))]
}

fn unknown_key() -> Files {
    vec![
        ("root.bin", good_root()),
        (
            "manifest.bin",
            sign(&manifest_body(MODEL, 2, GOOD_EXPIRY), &[1, STRANGER]),
        ),
    ]
}

fn expired_root() -> Files {
    let expired = sign(&root_body(1, EXPIRED, ROOT_THRESHOLD, ROOT_KEYS), SIGNERS);
    let fresh = sign(
        &root_body(2, GOOD_EXPIRY, ROOT_THRESHOLD, ROOT_KEYS),
        SIGNERS,
    );
    let manifest = manifest(MODEL, 2);
    let plan = sign(&plan_body(5, GOOD_EXPIRY, &manifest, None), SIGNERS);
    vec![
        ("root.bin", expired),
        ("rotation.bin", fresh),
        ("manifest.bin", manifest),
        ("plan.bin", plan),
    ]
}

fn expired_root_update() -> Files {
    vec![
        ("root.bin", good_root()),
        (
            "rotation.bin",
            sign(&root_body(2, EXPIRED, ROOT_THRESHOLD, ROOT_KEYS), SIGNERS),
        ),
    ]
}

fn expired_manifest() -> Files {
    vec![
        ("root.bin", good_root()),
        (
            "manifest.bin",
            sign(&manifest_body(MODEL, 2, EXPIRED), SIGNERS),
        ),
    ]
}

fn expired_plan() -> Files {
    let manifest = manifest(MODEL, 2);
    vec![
        ("root.bin", good_root()),
        (
            "plan.bin",
            sign(&plan_body(5, EXPIRED, &manifest, None), SIGNERS),
        ),
    ]
}

fn time_floor() -> Files {
    let manifest = sign(&manifest_body(MODEL, 2, EXPIRED), SIGNERS);
    let mut plan = plan_body(5, GOOD_EXPIRY, &manifest, None);
    plan.created = LATE_PLAN_CREATED;
    vec![
        ("root.bin", good_root()),
        ("plan.bin", sign(&plan, SIGNERS)),
        ("manifest.bin", manifest),
    ]
}

fn manifest_rollback() -> Files {
    vec![
        ("root.bin", good_root()),
        ("manifest.bin", manifest(MODEL, 1)),
    ]
}

fn plan_rollback() -> Files {
    let manifest = manifest(MODEL, 2);
    vec![
        ("root.bin", good_root()),
        (
            "plan.bin",
            sign(&plan_body(4, GOOD_EXPIRY, &manifest, None), SIGNERS),
        ),
    ]
}

fn rotation_new_keys_only() -> Files {
    vec![
        ("root.bin", good_root()),
        (
            "rotation.bin",
            sign(&root_body(2, GOOD_EXPIRY, 2, &[4, 5, 6]), &[4, 5]),
        ),
    ]
}

fn rotation_cross_signed() -> Files {
    vec![
        ("root.bin", good_root()),
        (
            "rotation.bin",
            sign(&root_body(2, GOOD_EXPIRY, 2, &[4, 5, 6]), &[1, 2, 4, 5]),
        ),
        (
            "manifest.bin",
            sign(&manifest_body(MODEL, 2, GOOD_EXPIRY), &[4, 5]),
        ),
    ]
}

fn rotation_skips_version() -> Files {
    vec![
        ("root.bin", good_root()),
        (
            "rotation.bin",
            sign(&root_body(3, GOOD_EXPIRY, 2, &[4, 5, 6]), &[1, 2, 4, 5]),
        ),
    ]
}

fn threshold_raised() -> Files {
    let raised = root_body(2, GOOD_EXPIRY, 3, &[4, 5, 6, 7]);
    vec![
        ("root.bin", good_root()),
        ("rotation_two_new.bin", sign(&raised, &[1, 2, 4, 5])),
        ("rotation_three_new.bin", sign(&raised, &[1, 2, 4, 5, 6])),
    ]
}

fn threshold_lowered() -> Files {
    let lowered = root_body(2, GOOD_EXPIRY, 1, &[4, 5]);
    vec![
        (
            "root.bin",
            sign(&root_body(1, GOOD_EXPIRY, 3, ROOT_KEYS), ROOT_KEYS),
        ),
        ("rotation_two_old.bin", sign(&lowered, &[1, 2, 4])),
        ("rotation_three_old.bin", sign(&lowered, &[1, 2, 3, 4])),
    ]
}

fn artifact_from_other_manifest() -> Files {
    vec![
        ("root.bin", good_root()),
        ("manifest.bin", manifest(MODEL, 2)),
        ("artifact.bin", model_bytes(MODEL, 2)),
        ("other_manifest.bin", manifest(MODEL, 1)),
        ("other_artifact.bin", model_bytes(MODEL, 1)),
    ]
}

fn artifact_wrong_length() -> Files {
    vec![
        ("root.bin", good_root()),
        ("manifest.bin", manifest(MODEL, 2)),
        ("other_manifest.bin", manifest(OTHER_MODEL, 1)),
        ("other_artifact.bin", model_bytes(OTHER_MODEL, 1)),
    ]
}

fn tampered_artifact_entry() -> Files {
    let good = manifest(MODEL, 2);
    let mut signed: Signed<ManifestBody> = envelope::decode(&good).expect("fixture manifest");
    let mut body = signed.decode_unverified().expect("fixture manifest body");
    // The attacker points the signed model entry at their own bytes and keeps the signatures,
    // hoping the device checks them against something other than the exact payload.
    let evil = b"evil model\n".to_vec();
    body.artifacts[0].sha256 = sha256(&evil);
    body.artifacts[0].length = evil.len() as u64;
    signed.payload = envelope::encode(&body).expect("fits");
    vec![
        ("root.bin", good_root()),
        ("manifest.bin", frame(&signed)),
        ("artifact.bin", evil),
    ]
}

fn manifest_not_in_plan() -> Files {
    let target = manifest(MODEL, 2);
    let fallback = manifest(MODEL, 1);
    let plan = sign(
        &plan_body(5, GOOD_EXPIRY, &target, Some(&fallback)),
        SIGNERS,
    );
    vec![
        ("root.bin", good_root()),
        ("plan.bin", plan),
        ("stray_manifest.bin", manifest(MODEL, 3)),
        ("other_model_manifest.bin", manifest(OTHER_MODEL, 2)),
    ]
}

fn shadow_not_authorised() -> Files {
    let target = manifest(MODEL, 2);
    let fallback = manifest(MODEL, 1);
    let plain = sign(
        &plan_body(5, GOOD_EXPIRY, &target, Some(&fallback)),
        SIGNERS,
    );
    let mut body = plan_body(6, GOOD_EXPIRY, &target, Some(&fallback));
    body.shadow = Some(ShadowStage {
        percent: 5,
        min_comparisons: 500,
        min_top1_agreement: 0.95,
        max_mean_abs_diff: 0.05,
    });
    vec![
        ("root.bin", good_root()),
        ("plan_without_shadow.bin", plain),
        ("plan_with_shadow.bin", sign(&body, SIGNERS)),
        ("manifest.bin", target),
        ("fallback_manifest.bin", fallback),
        ("stray_manifest.bin", manifest(MODEL, 3)),
    ]
}

fn fallback_below_highest() -> Files {
    let target = manifest(MODEL, 2);
    let fallback = manifest(MODEL, 1);
    let plan = sign(
        &plan_body(5, GOOD_EXPIRY, &target, Some(&fallback)),
        SIGNERS,
    );
    vec![
        ("root.bin", good_root()),
        ("plan.bin", plan),
        ("manifest.bin", target),
        ("fallback_manifest.bin", fallback),
    ]
}

fn invalid_model_name() -> Files {
    let manifest = manifest(TRAVERSAL_NAME, 2);
    let plan = sign(&plan_body(5, GOOD_EXPIRY, &manifest, None), SIGNERS);
    vec![
        ("root.bin", good_root()),
        ("manifest.bin", manifest),
        ("plan.bin", plan),
    ]
}

fn wrong_arch() -> Files {
    let mut body = manifest_body(MODEL, 2, GOOD_EXPIRY);
    body.archs = vec![Arch::Aarch64];
    vec![
        ("root.bin", good_root()),
        ("manifest.bin", sign(&body, SIGNERS)),
    ]
}

fn agent_too_old() -> Files {
    let mut body = manifest_body(MODEL, 2, GOOD_EXPIRY);
    body.min_agent_version = AgentVersion {
        major: 2,
        minor: 1,
        patch: 0,
    };
    vec![
        ("root.bin", good_root()),
        ("manifest.bin", sign(&body, SIGNERS)),
    ]
}

fn wrong_kind() -> Files {
    let manifest = manifest(MODEL, 2);
    let plan = sign(&plan_body(5, GOOD_EXPIRY, &manifest, None), SIGNERS);
    // A signed plan's payload and signatures rewrapped in a signed-manifest frame: the signatures
    // are genuine, so only the kind byte inside the signed payload can give the game away.
    let signed_plan: Signed<PlanBody> = envelope::decode(&plan).expect("fixture plan");
    let mut disguised = Signed::new(&manifest_body(MODEL, 2, GOOD_EXPIRY)).expect("fits");
    disguised.payload = signed_plan.payload;
    disguised.signatures = signed_plan.signatures;
    vec![
        ("root.bin", good_root()),
        ("manifest.bin", manifest),
        ("plan.bin", plan),
        ("plan_payload_as_manifest.bin", frame(&disguised)),
    ]
}

fn root_under_threshold() -> Files {
    vec![(
        "root.bin",
        sign(&root_body(1, GOOD_EXPIRY, ROOT_THRESHOLD, ROOT_KEYS), &[1]),
    )]
}
