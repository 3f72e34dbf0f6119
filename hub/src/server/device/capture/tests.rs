//! Tests of the device API's capture paths: the latest allowance of each model asked about, and
//! which uploads of sealed samples the hub stores and which it refuses, naming the sample.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use axum::http::StatusCode;
use outpost_protocol::capture::{
    CaptureAck, CaptureAllowances, CaptureRequest, CaptureUpload, SealedSample,
};

use crate::server::device::testing::{entry, error_message, Fixture};
use crate::store::{CaptureAllowanceRecord, CaptureFilter};

/// A device running `demo@3`, and allowances 1 and 2 of `demo` stored.
async fn fixture() -> Fixture {
    let fixture = Fixture::new().await;
    fixture
        .models_check_in(vec![entry("demo", Some(3), None)])
        .await;
    for sequence in [1, 2] {
        fixture
            .hub
            .store
            .put_capture_allowance(&CaptureAllowanceRecord {
                model: "demo".into(),
                sequence,
                signed: vec![sequence as u8; 10],
                stored_at: 1,
                by: "ops".into(),
            })
            .await
            .unwrap();
    }
    fixture
}

fn sample(id: u8, version: u64, allowance: u64, sealed: usize) -> SealedSample {
    SealedSample {
        id: [id; 16],
        model: "demo".into(),
        version,
        allowance,
        captured_at: 5,
        sealed: vec![id; sealed],
    }
}

async fn stored(fixture: &Fixture) -> usize {
    fixture
        .hub
        .store
        .captures(&CaptureFilter {
            limit: 100,
            ..CaptureFilter::default()
        })
        .await
        .unwrap()
        .len()
}

#[tokio::test]
async fn the_latest_allowance_of_each_model_asked_about_is_served_as_stored() {
    let fixture = fixture().await;
    let (status, body) = fixture
        .post(
            "/device/v3/capture",
            &CaptureRequest {
                models: vec!["demo".into(), "kws".into()],
            },
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let answer: CaptureAllowances = outpost_protocol::decode(&body).unwrap();
    assert_eq!(answer.allowances.len(), 1);
    assert_eq!(answer.allowances[0].as_ref(), [2u8; 10]);
}

/// Issue 26: each sample must be of a model version the device record runs, under an allowance
/// the hub holds, and of a sealed sample's size, or the whole upload is refused with 400 naming
/// it; a sample sent again is stored once.
#[tokio::test]
async fn uploads_store_samples_once_and_refuse_what_the_device_may_not_send() {
    let fixture = fixture().await;
    let upload = |samples: Vec<SealedSample>| CaptureUpload {
        samples,
        dropped: 0,
    };
    let (status, body) = fixture
        .post(
            "/device/v3/captures",
            &upload(vec![sample(1, 3, 1, 60), sample(2, 3, 2, 60)]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{:?}", error_message(&body));
    let ack: CaptureAck = outpost_protocol::decode(&body).unwrap();
    assert_eq!(ack.stored, 2);
    let (status, _) = fixture
        .post("/device/v3/captures", &upload(vec![sample(1, 3, 1, 60)]))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        stored(&fixture).await,
        2,
        "a sample sent again is stored once"
    );

    let refusals = [
        (
            sample(3, 4, 1, 60),
            "sample 1 (demo@4) is not of a model version the hub knows the device runs",
        ),
        (
            sample(3, 3, 9, 60),
            "sample 1 (demo@3) names allowance 9, which this hub does not hold",
        ),
        (sample(3, 3, 1, 47), "sample 1 (demo@3) is 47 sealed bytes"),
    ];
    for (bad, expected) in refusals {
        let (status, body) = fixture
            .post(
                "/device/v3/captures",
                &upload(vec![sample(4, 3, 1, 60), bad]),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let message = error_message(&body).unwrap();
        assert!(message.contains(expected), "{message:?} lacks {expected:?}");
    }
    assert_eq!(stored(&fixture).await, 2, "a refused upload stores nothing");
}
