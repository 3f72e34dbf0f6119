//! Tests of the three check-in paths, through the device API's routes: the answer per model and
//! for agents of one model, "unchanged" answers, retirements, the poll interval and refusals.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;

use axum::http::StatusCode;

use super::*;
use crate::server::device::testing::{
    entry, error_message, models_request, retirement, retirement_at, rollout, rollout_at, running,
    Fixture, POLL_SECS, ROLLOUT_POLL_SECS,
};
use outpost_protocol::sha256;

/// The plan of each full answer by its bytes, and the name of each unchanged one.
fn shown(answers: &[ModelAnswer]) -> Vec<String> {
    answers
        .iter()
        .map(|answer| match answer {
            ModelAnswer::Unchanged { name } => format!("unchanged {name}"),
            ModelAnswer::Full { plan, .. } => String::from_utf8(plan.to_vec()).unwrap(),
        })
        .collect()
}

/// Issue 20: each model name is answered by its own latest rollout that applies to the
/// device, side by side; an older rollout of a model, and one whose selector leaves the
/// device out, are not.
#[tokio::test]
async fn a_models_check_in_is_answered_by_the_latest_rollout_of_each_model() {
    let fixture = Fixture::new().await;
    fixture.live(vec![
        rollout(1, "iris", 1, RolloutState::Completed),
        rollout(2, "vad", 1, RolloutState::Active),
        rollout(3, "iris", 2, RolloutState::Completed),
        rollout_at("elsewhere", 4, "vad", 2, RolloutState::Active),
        rollout_at("elsewhere", 5, "kws", 1, RolloutState::Active),
    ]);
    let answer = fixture
        .models_check_in(vec![
            entry("vad", None, None),
            entry("iris", Some(1), None),
            // Runs a model no plan applies to: no entry, and the device keeps it.
            entry("kws", Some(3), None),
        ])
        .await;
    assert_eq!(shown(&answer.models), ["plan 3", "plan 2"]);
    let ModelAnswer::Full { manifest, .. } = &answer.models[0] else {
        unreachable!()
    };
    assert_eq!(
        manifest
            .as_ref()
            .map(|(slot, bytes)| (*slot, bytes.to_vec())),
        Some((Slot::Target, b"manifest iris@2".to_vec()))
    );
    // Rollout 2 of vad is active: the device comes back soon.
    assert_eq!(answer.poll_after_secs, ROLLOUT_POLL_SECS);
    assert!(answer.roots.is_empty());

    // The device record lists every model it runs, by name; `active` is the first entry's
    // that runs one.
    let device = fixture.device().await;
    let names: Vec<(&str, u64)> = device
        .models
        .iter()
        .map(|model| (model.name.as_str(), model.version))
        .collect();
    assert_eq!(names, [("iris", 1), ("kws", 3)]);
    assert_eq!(device.active.map(|active| active.name), Some("iris".into()));
    assert_eq!(device.queue_bytes, 7);
    assert!(device.last_checkin.is_some());

    // With no active or paused rollout left, the quiet interval.
    fixture.live(vec![rollout(3, "iris", 2, RolloutState::Completed)]);
    let answer = fixture
        .models_check_in(vec![entry("iris", Some(2), None)])
        .await;
    assert_eq!(shown(&answer.models), ["plan 3"]);
    assert_eq!(answer.poll_after_secs, POLL_SECS);
}

/// Each model is "unchanged" on its own, when the device holds exactly that model's
/// documents, and in full otherwise; a newer root sends every model in full.
#[tokio::test]
async fn each_model_is_unchanged_only_when_the_device_holds_its_documents() {
    let fixture = Fixture::new().await;
    fixture.live(vec![
        rollout(1, "iris", 1, RolloutState::Active),
        rollout(2, "vad", 1, RolloutState::Completed),
    ]);
    let first = fixture
        .models_check_in(vec![entry("iris", None, None), entry("vad", None, None)])
        .await;
    assert_eq!(shown(&first.models), ["plan 1", "plan 2"]);
    let held: Vec<Sha256> = first
        .models
        .iter()
        .map(|answer| answer.held_digest().unwrap())
        .collect();
    let unchanged_before = fixture
        .hub
        .metrics
        .check_ins_unchanged
        .load(Ordering::Relaxed);

    let both = vec![
        entry("iris", Some(1), Some(held[0])),
        entry("vad", Some(1), Some(held[1])),
    ];
    let answer = fixture.models_check_in(both.clone()).await;
    assert_eq!(shown(&answer.models), ["unchanged iris", "unchanged vad"]);
    assert_eq!(answer.poll_after_secs, ROLLOUT_POLL_SECS);
    assert_eq!(
        fixture
            .hub
            .metrics
            .check_ins_unchanged
            .load(Ordering::Relaxed),
        unchanged_before + 1
    );

    // vad holds iris's documents: only iris is unchanged, and the check-in is not.
    let answer = fixture
        .models_check_in(vec![
            entry("iris", Some(1), Some(held[0])),
            entry("vad", Some(1), Some(held[0])),
        ])
        .await;
    assert_eq!(shown(&answer.models), ["unchanged iris", "plan 2"]);
    assert_eq!(
        fixture
            .hub
            .metrics
            .check_ins_unchanged
            .load(Ordering::Relaxed),
        unchanged_before + 1
    );

    // A newer rollout of vad: vad's documents changed, iris's did not.
    fixture.live(vec![
        rollout(1, "iris", 1, RolloutState::Active),
        rollout(2, "vad", 1, RolloutState::Superseded),
        rollout(3, "vad", 2, RolloutState::Active),
    ]);
    let answer = fixture.models_check_in(both.clone()).await;
    assert_eq!(shown(&answer.models), ["unchanged iris", "plan 3"]);

    // A root newer than the device's comes with every model's documents.
    fixture.hub.store.put_root(2, b"root 2").await.unwrap();
    let answer = fixture.models_check_in(both).await;
    assert_eq!(shown(&answer.models), ["plan 1", "plan 3"]);
    assert_eq!(answer.roots, [ByteBuf::from(b"root 2".to_vec())]);
}

/// More models with a rollout for the device than an answer carries: the models the device
/// named come first, then the others by name.
#[test]
fn an_answer_carries_the_models_the_device_named_first() {
    let live = Live {
        rollouts: (0..MAX_DEVICE_MODELS as u64 + 2)
            .map(|n| rollout(n + 1, &format!("model-{n:02}"), 1, RolloutState::Active))
            .collect(),
        retirements: Vec::new(),
    };
    let labels = [Label::new("site", "lab").unwrap()];
    let names = |reported: &[&str]| -> Vec<String> {
        latest_per_model(&live, &labels, reported)
            .iter()
            .map(|word| word.model().to_owned())
            .collect()
    };
    let all = names(&[]);
    assert_eq!(all.len(), MAX_DEVICE_MODELS);
    assert_eq!(all.last().map(String::as_str), Some("model-15"));
    let with_named = names(&["model-17", "model-03"]);
    assert_eq!(with_named.len(), MAX_DEVICE_MODELS);
    assert!(with_named.contains(&"model-17".to_owned()));
    assert!(!with_named.contains(&"model-15".to_owned()));
    assert_eq!(with_named.first().map(String::as_str), Some("model-00"));
}

/// The hub refuses a models check-in that does not add up, naming what is wrong, before it
/// records anything of it.
#[tokio::test]
async fn a_models_check_in_that_does_not_add_up_is_refused() {
    let fixture = Fixture::new().await;
    let too_many = (0..=MAX_DEVICE_MODELS)
        .map(|n| entry(&format!("model-{n}"), Some(1), None))
        .collect();
    let mismatched = ModelCheckIn {
        active: Some(running("vad", 1)),
        ..entry("iris", None, None)
    };
    let cases: [(Vec<ModelCheckIn>, &str); 4] = [
        (
            too_many,
            "check-in names 17 models, at most 16 are accepted",
        ),
        (
            vec![
                entry("iris", Some(1), None),
                entry("vad", None, None),
                entry("iris", Some(2), None),
            ],
            "model \"iris\" has two entries: one entry per model",
        ),
        (
            vec![entry("vad", None, None), mismatched],
            "the entry of model \"iris\" runs model \"vad\"",
        ),
        (
            vec![entry("../x", None, None)],
            "model entry 0: name \"../x\"",
        ),
    ];
    for (models, expected) in cases {
        let (status, body) = fixture
            .post("/device/v3/checkin", &models_request(models))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let message = error_message(&body).unwrap();
        assert!(message.contains(expected), "{message:?} lacks {expected:?}");
    }
    assert_eq!(fixture.device().await.last_checkin, None);
    assert_eq!(fixture.hub.metrics.check_ins.load(Ordering::Relaxed), 0);
}

/// Issue 20: an agent that runs one model (`/device/v1` and `/device/v2`) follows only the
/// rollouts of that model, however much newer another model's rollout is; one running
/// nothing yet follows the latest rollout that applies, of any model.
#[tokio::test]
async fn an_agent_running_one_model_keeps_it_whatever_other_models_roll_out() {
    let fixture = Fixture::new().await;
    fixture.live(vec![
        rollout(1, "iris", 2, RolloutState::Completed),
        rollout(2, "vad", 1, RolloutState::Active),
    ]);
    assert_eq!(
        fixture.one_model_check_in(Some(running("iris", 1))).await,
        (Some(ByteBuf::from(b"plan 1".to_vec())), POLL_SECS)
    );
    let device = fixture.device().await;
    assert_eq!(device.active.as_ref().map(|active| active.version), Some(1));
    assert_eq!(device.models, device.active.into_iter().collect::<Vec<_>>());

    assert_eq!(
        fixture.one_model_check_in(None).await,
        (Some(ByteBuf::from(b"plan 2".to_vec())), ROLLOUT_POLL_SECS)
    );
    assert!(fixture.device().await.models.is_empty());

    // A model no rollout moves: no plan, and the quiet interval.
    assert_eq!(
        fixture.one_model_check_in(Some(running("kws", 1))).await,
        (None, POLL_SECS)
    );
}

/// Issue 20: a retirement is the latest signed word about its model for the devices it
/// selects, sent alone where the plan goes, and touches no other model; held, it is
/// "unchanged"; and it never shortens the poll interval.
#[tokio::test]
async fn a_retirement_answers_for_its_model_only_and_unchanged_when_held() {
    let fixture = Fixture::new().await;
    fixture.live_with(
        vec![
            rollout(1, "iris", 1, RolloutState::Completed),
            rollout(2, "vad", 1, RolloutState::Completed),
            rollout(5, "kws", 1, RolloutState::Completed),
        ],
        vec![
            retirement(3, "iris"),
            // Older than kws's rollout: the rollout is the latest word.
            retirement(4, "kws"),
            // Leaves this device out.
            retirement_at("elsewhere", 6, "vad"),
        ],
    );
    let models = vec![
        entry("iris", Some(1), None),
        entry("vad", Some(1), None),
        entry("kws", Some(1), None),
    ];
    let answer = fixture.models_check_in(models).await;
    assert_eq!(shown(&answer.models), ["retire 3", "plan 5", "plan 2"]);
    let ModelAnswer::Full {
        manifest, shadow, ..
    } = &answer.models[0]
    else {
        unreachable!()
    };
    assert_eq!((manifest, shadow), (&None, &None));
    assert_eq!(answer.poll_after_secs, POLL_SECS);

    // The device holds the retirement: "unchanged", by the digest of its bytes alone.
    let held = answer.models[0].held_digest().unwrap();
    assert_eq!(held, held_digest(&sha256(b"retire 3"), None, None));
    let holding = vec![entry("iris", None, Some(held)), entry("vad", Some(1), None)];
    let answer = fixture.models_check_in(holding.clone()).await;
    assert_eq!(
        shown(&answer.models),
        ["unchanged iris", "plan 5", "plan 2"]
    );

    // A device the retirement leaves out is still answered by the model's rollout.
    fixture.live_with(
        vec![rollout(1, "iris", 1, RolloutState::Completed)],
        vec![retirement_at("elsewhere", 3, "iris")],
    );
    let answer = fixture.models_check_in(holding).await;
    assert_eq!(shown(&answer.models), ["plan 1"]);
}

/// Issue 20: a rollout of a retired model signed after its retirement is the latest word
/// again: the model comes back, and the device follows the rollout's stages.
#[tokio::test]
async fn a_rollout_after_a_retirement_brings_the_model_back() {
    let fixture = Fixture::new().await;
    let held = held_digest(&sha256(b"retire 3"), None, None);
    fixture.live_with(
        vec![
            rollout(1, "iris", 1, RolloutState::Superseded),
            rollout(5, "iris", 2, RolloutState::Active),
        ],
        vec![retirement(3, "iris")],
    );
    let answer = fixture
        .models_check_in(vec![entry("iris", None, Some(held))])
        .await;
    assert_eq!(shown(&answer.models), ["plan 5"]);
    assert_eq!(answer.poll_after_secs, ROLLOUT_POLL_SECS);
}

/// Issue 20: agents of one model (`/device/v1`, `/device/v2`) cannot read a retirement and
/// are never sent one: one running the retired model keeps it under its latest plan, and one
/// running none is not handed a model retired for it.
#[tokio::test]
async fn an_agent_of_one_model_is_never_sent_a_retirement() {
    let fixture = Fixture::new().await;
    fixture.live_with(
        vec![
            rollout(1, "vad", 1, RolloutState::Completed),
            rollout(2, "iris", 1, RolloutState::Completed),
        ],
        vec![retirement(3, "iris")],
    );
    assert_eq!(
        fixture.one_model_check_in(Some(running("iris", 1))).await,
        (Some(ByteBuf::from(b"plan 2".to_vec())), POLL_SECS)
    );
    assert_eq!(
        fixture.one_model_check_in(None).await,
        (Some(ByteBuf::from(b"plan 1".to_vec())), POLL_SECS)
    );
    fixture.live_with(
        vec![rollout(2, "iris", 1, RolloutState::Completed)],
        vec![retirement(3, "iris")],
    );
    assert_eq!(fixture.one_model_check_in(None).await, (None, POLL_SECS));
}

/// Retired models count toward the answer's cap like models under a rollout.
#[test]
fn retired_models_count_toward_the_cap() {
    let live = Live {
        rollouts: (0..MAX_DEVICE_MODELS as u64)
            .map(|n| rollout(n + 1, &format!("model-{n:02}"), 1, RolloutState::Active))
            .collect(),
        retirements: vec![retirement(100, "model-16"), retirement(101, "model-17")],
    };
    let labels = [Label::new("site", "lab").unwrap()];
    let latest = latest_per_model(&live, &labels, &["model-17"]);
    assert_eq!(latest.len(), MAX_DEVICE_MODELS);
    let names: Vec<(&str, u64)> = latest
        .iter()
        .map(|word| (word.model(), word.sequence()))
        .collect();
    assert!(names.contains(&("model-17", 101)), "{names:?}");
    assert!(
        !names.iter().any(|(name, _)| *name == "model-16"),
        "{names:?}"
    );
}
