//! Retirements: storing a signed retirement of a model, and listing them.
//!
//! A retirement shares the plans' sequence space and is the latest signed word about its model
//! for the devices it selects until a later rollout of the model, so the hub takes one only
//! above every stored plan and retirement, of a model it published, and not while a rollout of
//! that model still moves devices: it would take the model off devices a live rollout is
//! installing it on.

use super::*;
use crate::store::RetirementRecord;
use outpost_protocol::trust::RetireBody;

pub(super) async fn list_retirements(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
) -> Reply<Vec<RetirementInfo>> {
    require(&hub, &headers, Role::Viewer).await?;
    let infos = hub
        .store
        .retirements()
        .await?
        .iter()
        .map(engine::retirement_info)
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Json(infos))
}

pub(super) async fn create_retirement(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<RetirementInfo>), AdminError> {
    let actor = require(&hub, &headers, Role::Operator).await?;
    let bytes = body?;
    if bytes.len() > Signed::<RetireBody>::MAX_FRAME {
        return Err(AdminError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "retirement is larger than any signed retirement",
        ));
    }
    let root = require_root(&hub).await?;
    let _guard = hub.store.lock_rollouts().await?;
    let retire = root
        .verify_retire(&bytes, &floor(), None)
        .map_err(|error| AdminError::bad_request(format!("retirement refused: {error}")))?;
    check_sequence_is_new(&hub, "retirement", retire.sequence()).await?;
    let body = retire.body();
    if !hub.store.has_model(&body.model).await? {
        return Err(AdminError::conflict(format!(
            "model {} has never been published on this hub: there is nothing to retire",
            body.model
        )));
    }
    for record in hub.store.rollouts().await? {
        let moving = match record.state {
            RolloutStateRecord::Active => "active",
            RolloutStateRecord::Paused => "paused",
            _ => continue,
        };
        if engine::plan_of(&record)?.target.name == body.model {
            return Err(AdminError::conflict(format!(
                "rollout {} of model {} is still {moving}: let it finish or roll it back first",
                record.sequence, body.model
            )));
        }
    }
    let record = RetirementRecord {
        sequence: retire.sequence(),
        signed: bytes.to_vec(),
        stored_at: unix_now(),
        by: actor.name.clone(),
    };
    hub.store.put_retirement(&record).await?;
    let info = engine::retirement_info(&record)?;
    audit(
        &hub,
        &actor,
        "retirement create",
        &format!("retirement {}", record.sequence),
        &format!("{} selector {:?}", info.model, info.selector),
    )
    .await?;
    hub.store.flush().await?;
    engine::reload(&hub).await?;
    log::info!(
        "retirement {} of {} stored: devices it selects ({}) stop serving the model",
        record.sequence,
        info.model,
        if info.selector.is_empty() {
            "all".to_owned()
        } else {
            info.selector.join(",")
        }
    );
    Ok((StatusCode::CREATED, Json(info)))
}

#[cfg(test)]
mod tests {
    // Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
    #![allow(clippy::unwrap_used)]

    use axum::http::Request;
    use outpost_protocol::keys::SecretKey;
    use outpost_protocol::trust::{
        AgentVersion, BreachAction, GatePolicy, ManifestRef, SignedBody,
    };
    use tower::ServiceExt;

    use super::*;
    use crate::server::{Hub, ServerConfig};

    const DAY: u64 = 86_400;

    /// A hub holding a 2-of-2 root, `iris@1` published, and an operator's and a viewer's token.
    struct Fixture {
        _dir: tempfile::TempDir,
        hub: SharedHub,
        keys: [SecretKey; 2],
        operator: String,
        viewer: String,
        iris: ManifestRef,
    }

    fn signed<B: SignedBody>(body: &B, keys: &[&SecretKey]) -> Vec<u8>
    where
        Signed<B>: Message,
    {
        let mut signed = Signed::new(body).unwrap();
        for key in keys {
            signed.sign(key);
        }
        outpost_protocol::encode(&signed).unwrap()
    }

    impl Fixture {
        async fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let hub = Hub::open(ServerConfig::for_tests(dir.path(), 300, 30))
                .await
                .unwrap();
            let keys = [SecretKey::from_seed([1; 32]), SecretKey::from_seed([2; 32])];
            let now = unix_now();
            let root = RootBody {
                version: 1,
                created: now - 10,
                expires: now + 365 * DAY,
                threshold: 2,
                keys: keys.iter().map(SecretKey::public).collect(),
            };
            hub.store
                .put_root(1, &signed(&root, &[&keys[0], &keys[1]]))
                .await
                .unwrap();
            let manifest = signed(
                &ManifestBody {
                    name: "iris".into(),
                    version: 1,
                    created: now - 10,
                    expires: now + 365 * DAY,
                    artifacts: Vec::new(),
                    inputs: Vec::new(),
                    outputs: Vec::new(),
                    archs: Vec::new(),
                    min_agent_version: AgentVersion::parse("0.1.0").unwrap(),
                },
                &[&keys[0], &keys[1]],
            );
            let iris = ManifestRef {
                name: "iris".into(),
                version: 1,
                manifest_sha256: sha256(&manifest),
            };
            hub.store
                .put_manifest(
                    "iris",
                    1,
                    &ManifestRecord {
                        sha256: iris.manifest_sha256.0,
                        signed: manifest,
                        published_at: now,
                    },
                )
                .await
                .unwrap();
            let operator = new_admin_token(&hub.store, "ops", Role::Operator, None)
                .await
                .unwrap()
                .token;
            let viewer = new_admin_token(&hub.store, "watcher", Role::Viewer, None)
                .await
                .unwrap()
                .token;
            Fixture {
                _dir: dir,
                hub,
                keys,
                operator,
                viewer,
                iris,
            }
        }

        /// A retirement of `model` at `sequence`, signed by both keys, valid for a day.
        fn retirement(&self, sequence: u64, model: &str, selector: &[&str]) -> Vec<u8> {
            let now = unix_now();
            signed(
                &RetireBody {
                    sequence,
                    created: now - 10,
                    expires: now + DAY,
                    model: model.to_owned(),
                    selector: selector.iter().map(|l| Label::parse(l).unwrap()).collect(),
                },
                &[&self.keys[0], &self.keys[1]],
            )
        }

        /// A plan rolling `iris@1` out at `sequence` to every device, signed by both keys.
        fn plan(&self, sequence: u64) -> Vec<u8> {
            let now = unix_now();
            signed(
                &PlanBody {
                    sequence,
                    created: now - 10,
                    expires: now + DAY,
                    target: self.iris.clone(),
                    fallback: None,
                    stages: vec![100],
                    selector: Vec::new(),
                    gates: GatePolicy {
                        bake_secs: 60,
                        device_timeout_secs: 600,
                        max_failure_pct: 5.0,
                        max_error_rate: 0.02,
                        max_p95_regression_pct: 20.0,
                        max_drift_psi: None,
                        on_breach: BreachAction::Pause,
                        auto_advance: true,
                    },
                    shadow: None,
                },
                &[&self.keys[0], &self.keys[1]],
            )
        }

        /// Stores rollout `sequence` of `iris@1` in `state`, as if created and steered so far.
        async fn stored_rollout(&self, sequence: u64, state: RolloutStateRecord) {
            self.hub
                .store
                .put_rollout(&RolloutRecord {
                    sequence,
                    signed_plan: self.plan(sequence),
                    state,
                    stage_index: 0,
                    stage_started: vec![unix_now()],
                    decisions: Vec::new(),
                    created: unix_now(),
                })
                .await
                .unwrap();
        }

        async fn request(
            &self,
            method: &str,
            path: &str,
            token: &str,
            body: Vec<u8>,
        ) -> (StatusCode, serde_json::Value) {
            let request = Request::builder()
                .method(method)
                .uri(path)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Body::from(body))
                .unwrap();
            let response = routes(self.hub.clone()).oneshot(request).await.unwrap();
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            (status, serde_json::from_slice(&body).unwrap())
        }

        async fn retire(&self, bytes: Vec<u8>) -> (StatusCode, serde_json::Value) {
            self.request("POST", "/admin/v1/retirements", &self.operator, bytes)
                .await
        }
    }

    /// Issue 20: a retirement is verified, stored, audited, listed and put in the check-in cache.
    #[tokio::test]
    async fn a_retirement_is_stored_listed_and_cached_for_check_ins() {
        let fixture = Fixture::new().await;
        fixture
            .stored_rollout(3, RolloutStateRecord::Completed)
            .await;
        let bytes = fixture.retirement(4, "iris", &["site=lab"]);
        let (status, created) = fixture.retire(bytes.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let info: RetirementInfo = serde_json::from_value(created).unwrap();
        assert_eq!(
            (info.sequence, info.model.as_str(), info.selector.clone()),
            (4, "iris", vec!["site=lab".to_owned()])
        );
        assert_eq!(info.by, "ops");
        assert!(info.expires > info.created);

        let (status, listed) = fixture
            .request("GET", "/admin/v1/retirements", &fixture.viewer, Vec::new())
            .await;
        assert_eq!(status, StatusCode::OK);
        let listed: Vec<RetirementInfo> = serde_json::from_value(listed).unwrap();
        assert_eq!(listed, [info]);

        let stored = fixture.hub.store.retirements().await.unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].signed, bytes, "kept as signed, byte for byte");
        let live = fixture.hub.live.read().unwrap().clone();
        assert_eq!(live.retirements.len(), 1);
        assert_eq!(live.retirements[0].model, "iris");
        assert_eq!(live.retirements[0].signed.sha256, sha256(&bytes));
        assert_eq!(live.rollouts.len(), 1);

        let (entries, _) = fixture.hub.store.audit_entries(0).await.unwrap();
        let last = entries.last().unwrap();
        assert_eq!(
            (
                last.actor.as_str(),
                last.action.as_str(),
                last.target.as_str()
            ),
            ("ops", "retirement create", "retirement 4")
        );
    }

    /// Each refusal of `POST /retirements` answers a 4xx naming what is wrong, and stores
    /// nothing.
    #[tokio::test]
    async fn each_refusal_of_a_retirement_names_what_is_wrong() {
        let fixture = Fixture::new().await;
        fixture
            .stored_rollout(3, RolloutStateRecord::Completed)
            .await;
        let now = unix_now();
        let one_key = signed(
            &RetireBody {
                sequence: 9,
                created: now - 10,
                expires: now + DAY,
                model: "iris".into(),
                selector: Vec::new(),
            },
            &[&fixture.keys[0]],
        );
        let cases: [(Vec<u8>, StatusCode, &str); 5] = [
            (one_key, StatusCode::BAD_REQUEST, "retirement refused: "),
            (
                b"not a retirement".to_vec(),
                StatusCode::BAD_REQUEST,
                "retirement refused: ",
            ),
            (
                fixture.retirement(3, "iris", &[]),
                StatusCode::CONFLICT,
                "retirement sequence 3 is not above the latest rollout 3",
            ),
            (
                fixture.retirement(9, "kws", &[]),
                StatusCode::CONFLICT,
                "model kws has never been published on this hub",
            ),
            (
                vec![0; Signed::<RetireBody>::MAX_FRAME + 1],
                StatusCode::PAYLOAD_TOO_LARGE,
                "retirement is larger than any signed retirement",
            ),
        ];
        for (bytes, expected_status, expected) in cases {
            let (status, body) = fixture.retire(bytes).await;
            assert_eq!(status, expected_status, "{body}");
            let message = body["error"].as_str().unwrap();
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }

        // A viewer may list retirements but not make one.
        let (status, _) = fixture
            .request(
                "POST",
                "/admin/v1/retirements",
                &fixture.viewer,
                fixture.retirement(9, "iris", &[]),
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN);

        // While a rollout of the model moves devices, active or paused, it cannot be retired.
        for (state, word) in [
            (RolloutStateRecord::Active, "active"),
            (RolloutStateRecord::Paused, "paused"),
        ] {
            fixture.stored_rollout(5, state).await;
            let (status, body) = fixture.retire(fixture.retirement(9, "iris", &[])).await;
            assert_eq!(status, StatusCode::CONFLICT, "{body}");
            assert_eq!(
                body["error"],
                format!(
                    "rollout 5 of model iris is still {word}: let it finish or roll it back first"
                )
            );
        }
        assert!(fixture.hub.store.retirements().await.unwrap().is_empty());

        // Rolled back, it can; then neither a retirement nor a plan may reuse its sequence.
        fixture
            .stored_rollout(5, RolloutStateRecord::RolledBack)
            .await;
        let (status, body) = fixture.retire(fixture.retirement(9, "iris", &[])).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, body) = fixture.retire(fixture.retirement(9, "iris", &[])).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .starts_with("retirement sequence 9 is not above the latest retirement 9"),
            "{body}"
        );
        let (status, body) = fixture
            .request(
                "POST",
                "/admin/v1/rollouts",
                &fixture.operator,
                fixture.plan(8),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .starts_with("plan sequence 8 is not above the latest retirement 9"),
            "{body}"
        );
        assert_eq!(fixture.hub.store.retirements().await.unwrap().len(), 1);
    }
}
