//! Tests of runtime reports (`/device/v3/runtimes`), from the device API to what operators see:
//! what the handler accepts and refuses, which report it keeps, and the report in the admin API's
//! device JSON, on the dashboard's device page and in `/metrics`.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use axum::body::Body;
use axum::http::{header, Request};
use outpost_protocol::auth::HEADER_SIGNATURE;
use outpost_protocol::device::{ModelRuntime, RuntimeKind, MAX_DEVICE_MODELS, MAX_RUNTIME_NOTE};
use outpost_protocol::Message;
use tower::ServiceExt;

use super::*;
use crate::api::{DeviceDetail, DeviceSummary, ModelRuntimeJson, Role};
use crate::server::device::testing::{entry, error_message, Fixture};
use crate::server::{new_admin_token, router};
use crate::store::DeviceRecord;

const PATH: &str = "/device/v3/runtimes";

/// A fixture whose device runs `demo@3` and `kws@3`, as its check-in said.
async fn running_demo_and_kws() -> Fixture {
    let fixture = Fixture::new().await;
    fixture
        .models_check_in(vec![
            entry("demo", Some(3), None),
            entry("kws", Some(3), None),
        ])
        .await;
    fixture
}

fn onnxruntime(name: &str, version: u64) -> ModelRuntime {
    ModelRuntime {
        name: name.to_owned(),
        version,
        runtime: RuntimeKind::OnnxRuntime,
        runtime_version: "1.22.0".to_owned(),
        providers: vec!["CPUExecutionProvider".to_owned()],
        fallback: None,
    }
}

/// `kws@3` on tract after ONNX Runtime failed, its reason written to break out of HTML.
fn tract_fallback() -> ModelRuntime {
    ModelRuntime {
        name: "kws".to_owned(),
        version: 3,
        runtime: RuntimeKind::Tract,
        runtime_version: "0.23.9".to_owned(),
        providers: Vec::new(),
        fallback: Some("onnxruntime: <script>alert(1)</script> & \"x\" not found".to_owned()),
    }
}

fn report(at: u64, models: Vec<ModelRuntime>) -> RuntimeReport {
    RuntimeReport { models, at }
}

/// [`running_demo_and_kws`], once its device reported at 100 that ONNX Runtime serves `demo@3`
/// and tract `kws@3` ([`tract_fallback`]).
async fn reported_demo_and_kws() -> Fixture {
    let fixture = running_demo_and_kws().await;
    let models = vec![onnxruntime("demo", 3), tract_fallback()];
    let (status, body) = fixture.post(PATH, &report(100, models)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{:?}", error_message(&body));
    fixture
}

/// A new viewer's admin token.
async fn viewer(hub: &SharedHub) -> String {
    new_admin_token(&hub.store, "watcher", Role::Viewer, None)
        .await
        .unwrap()
        .token
}

/// GETs `path` from the whole hub as `viewer` (a bearer token, or the dashboard's cookie).
async fn read(hub: &SharedHub, path: &str, viewer: &str) -> (StatusCode, String) {
    let request = Request::get(path)
        .header(header::AUTHORIZATION, format!("Bearer {viewer}"))
        .header(header::COOKIE, format!("outpost_token={viewer}"))
        .body(Body::empty())
        .unwrap();
    let response = router(hub.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn a_runtime_report_is_kept_and_shown_to_operators() {
    let fixture = reported_demo_and_kws().await;
    let device = fixture.device().await;
    let stored = fixture
        .hub
        .store
        .runtimes(&device.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.at, 100);
    let runtimes: Vec<(&str, &str)> = stored
        .models
        .iter()
        .map(|model| (model.name.as_str(), model.runtime.as_str()))
        .collect();
    assert_eq!(runtimes, [("demo", "onnxruntime"), ("kws", "tract")]);

    // The admin API's device JSON, shown and listed.
    let viewer = viewer(&fixture.hub).await;
    let id = hex::encode(device.id);
    let (status, body) = read(&fixture.hub, &format!("/admin/v1/devices/{id}"), &viewer).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let detail: DeviceDetail = serde_json::from_str(&body).unwrap();
    assert_eq!(
        detail.device.runtimes,
        [
            ModelRuntimeJson {
                name: "demo".into(),
                version: 3,
                runtime: "onnxruntime".into(),
                runtime_version: "1.22.0".into(),
                providers: vec!["CPUExecutionProvider".into()],
                fallback: None,
            },
            ModelRuntimeJson {
                name: "kws".into(),
                version: 3,
                runtime: "tract".into(),
                runtime_version: "0.23.9".into(),
                providers: Vec::new(),
                fallback: tract_fallback().fallback,
            },
        ]
    );
    let (_, body) = read(&fixture.hub, "/admin/v1/devices", &viewer).await;
    let listed: Vec<DeviceSummary> = serde_json::from_str(&body).unwrap();
    assert_eq!(listed[0].runtimes, detail.device.runtimes);

    // The dashboard's device page: each model's runtime, the fallback reason escaped.
    let (status, page) = read(&fixture.hub, &format!("/dashboard/devices/{id}"), &viewer).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains(
            "<li>demo@3 <span class=\"sub runtime\">onnxruntime 1.22.0 \
             [CPUExecutionProvider]</span></li>"
        ),
        "{page}"
    );
    assert!(
        page.contains(
            "<li>kws@3 <span class=\"sub runtime\">tract 0.23.9</span> <span class=\"fallback\">\
             fallback: onnxruntime: &lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;x&quot; \
             not found</span></li>"
        ),
        "{page}"
    );
    assert!(!page.contains("<script>"), "{page}");
}

/// A device runs only what its check-ins and committed status reports said: a report naming
/// another model, or another version of one it runs, is refused naming it, and nothing is kept.
#[tokio::test]
async fn a_model_the_device_does_not_run_is_refused_naming_it() {
    let fixture = running_demo_and_kws().await;
    let cases = [
        (
            onnxruntime("iris", 1),
            "runtime report: model iris@1 is not one the hub knows the device runs (it runs \
             demo@3, kws@3)",
        ),
        (
            onnxruntime("demo", 4),
            "runtime report: model demo@4 is not one the hub knows the device runs (it runs \
             demo@3, kws@3)",
        ),
    ];
    for (stray, message) in cases {
        let (status, body) = fixture
            .post(PATH, &report(100, vec![onnxruntime("kws", 3), stray]))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let refusal = error_message(&body).unwrap();
        assert!(refusal.starts_with(message), "{refusal}");
    }
    assert_eq!(
        fixture
            .hub
            .store
            .runtimes(&fixture.device().await.id)
            .await
            .unwrap(),
        None
    );

    // A device the hub knows no model of yet may report none, and nothing else.
    let fresh = Fixture::new().await;
    let (status, _) = fresh.post(PATH, &report(100, Vec::new())).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = fresh
        .post(PATH, &report(101, vec![onnxruntime("demo", 3)]))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error_message(&body).unwrap().contains("(it runs none)"),
        "{:?}",
        error_message(&body)
    );
}

#[tokio::test]
async fn a_malformed_or_oversized_report_is_refused() {
    let fixture = running_demo_and_kws().await;
    // Not a runtime report at all.
    let garbage = fixture.signed(PATH, b"OP\x01\x1bnot postcard".to_vec(), [1; 16]);
    let (status, body) = fixture.send(garbage).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error_message(&body)
            .unwrap()
            .starts_with("cannot decode runtime report: "),
        "{:?}",
        error_message(&body)
    );
    // Within its frame, over a cap the report documents.
    let long_reason = ModelRuntime {
        fallback: Some("x".repeat(MAX_RUNTIME_NOTE + 1)),
        ..tract_fallback()
    };
    let too_many = (0..=MAX_DEVICE_MODELS)
        .map(|index| onnxruntime(&format!("model-{index}"), 1))
        .collect();
    let duplicated = vec![onnxruntime("demo", 3), onnxruntime("demo", 3)];
    let cases = [
        (
            vec![long_reason],
            "runtime report: model \"kws\": fallback reason is 513 bytes, over the 512-byte limit",
        ),
        (too_many, "runtime report: 17 models, at most 16"),
        (
            duplicated,
            "runtime report: model \"demo\" has two entries: one entry per model",
        ),
    ];
    for (models, message) in cases {
        let (status, body) = fixture.post(PATH, &report(100, models)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(error_message(&body).as_deref(), Some(message));
    }
    // Over its frame cap: refused by the route's body limit before anything is read.
    let oversized = vec![0; RuntimeReport::MAX_FRAME + 1];
    let (status, _) = fixture.send(fixture.signed(PATH, oversized, [2; 16])).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        fixture
            .hub
            .store
            .runtimes(&fixture.device().await.id)
            .await
            .unwrap(),
        None
    );
}

/// Reports can arrive out of order: one the device dated earlier than the one kept is
/// acknowledged and dropped; a later one replaces it.
#[tokio::test]
async fn an_earlier_report_does_not_replace_a_later_one() {
    let fixture = running_demo_and_kws().await;
    async fn kept(fixture: &Fixture) -> Option<(u64, String)> {
        let stored = fixture
            .hub
            .store
            .runtimes(&fixture.device().await.id)
            .await
            .unwrap();
        stored.map(|stored| (stored.at, stored.models[0].runtime.clone()))
    }
    let (status, _) = fixture
        .post(PATH, &report(200, vec![onnxruntime("demo", 3)]))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let earlier = ModelRuntime {
        runtime: RuntimeKind::Tract,
        ..onnxruntime("demo", 3)
    };
    let (status, _) = fixture
        .post(PATH, &report(150, vec![earlier.clone()]))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(kept(&fixture).await, Some((200, "onnxruntime".to_owned())));
    let (status, _) = fixture.post(PATH, &report(201, vec![earlier])).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(kept(&fixture).await, Some((201, "tract".to_owned())));
}

/// A runtime report is authenticated like a status report: unsigned, replayed and revoked
/// requests are refused before it is read.
#[tokio::test]
async fn unsigned_replayed_and_revoked_reports_are_refused() {
    let fixture = running_demo_and_kws().await;
    let body = outpost_protocol::encode(&report(100, vec![onnxruntime("demo", 3)])).unwrap();

    let unsigned = Request::post(PATH).body(Body::from(body.clone())).unwrap();
    let (status, reply) = fixture.send(unsigned).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        error_message(&reply).unwrap().starts_with("missing "),
        "{:?}",
        error_message(&reply)
    );

    // The same request again, byte for byte: its signed time and nonce too.
    let original = fixture.signed(PATH, body.clone(), [5; 16]);
    let mut replay = Request::post(PATH).body(Body::from(body.clone())).unwrap();
    *replay.headers_mut() = original.headers().clone();
    let (status, _) = fixture.send(original).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, reply) = fixture.send(replay).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        error_message(&reply).as_deref(),
        Some("replayed request: nonce already used")
    );

    // Signed by another key than the device's.
    let mut forged = fixture.signed(PATH, body.clone(), [6; 16]);
    forged
        .headers_mut()
        .insert(HEADER_SIGNATURE, hex::encode([7u8; 64]).parse().unwrap());
    let (status, reply) = fixture.send(forged).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        error_message(&reply).as_deref(),
        Some("bad request signature")
    );

    let read = fixture
        .hub
        .store
        .device_read(&fixture.device().await.id)
        .await
        .unwrap();
    fixture
        .hub
        .store
        .update_device(read.unwrap(), |device| device.revoked = true)
        .await
        .unwrap();
    let (status, reply) = fixture.send(fixture.signed(PATH, body, [8; 16])).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(error_message(&reply).as_deref(), Some("device is revoked"));
}

/// `outpost_hub_model_runtime_devices{model,runtime}` counts the devices whose latest report says
/// the runtime serves the model, revoked devices aside, as of the engine's last tick.
#[tokio::test]
async fn the_metric_counts_devices_by_model_and_runtime() {
    let fixture = reported_demo_and_kws().await;
    let store = &fixture.hub.store;
    let mut stored = store
        .runtimes(&fixture.device().await.id)
        .await
        .unwrap()
        .unwrap();
    stored.models.truncate(1);
    // Two more devices on ONNX Runtime for demo, one of them revoked, and one with no report.
    for (id, revoked) in [([4; 16], false), ([5; 16], true), ([6; 16], false)] {
        store
            .put_device(&DeviceRecord {
                id,
                revoked,
                ..fixture.device().await
            })
            .await
            .unwrap();
        if id != [6; 16] {
            assert!(store.put_runtimes(&id, &stored).await.unwrap());
        }
    }
    crate::server::metrics::refresh_fleet(&fixture.hub)
        .await
        .unwrap();
    let (status, text) = read(&fixture.hub, "/metrics", &viewer(&fixture.hub).await).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let gauge: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("outpost_hub_model_runtime_devices"))
        .collect();
    assert_eq!(
        gauge,
        [
            "outpost_hub_model_runtime_devices{model=\"demo\",runtime=\"onnxruntime\"} 2",
            "outpost_hub_model_runtime_devices{model=\"kws\",runtime=\"tract\"} 1",
        ]
    );
    assert!(text.contains("# TYPE outpost_hub_model_runtime_devices gauge\n"));
}
