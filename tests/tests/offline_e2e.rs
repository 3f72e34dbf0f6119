//! An agent cut off from its hub for longer than its telemetry cap holds: it keeps serving, drops
//! what does not fit, and the hub, once back, counts every delivered inference once and exactly
//! as many dropped records as the agent dropped. (An outage the cap absorbs through roll-ups, with
//! no drop at all, is in `agent_e2e.rs`; the cache's drop order on real files in
//! `agent/tests/cache.rs`.)

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use outpost_hub::api::DeviceDetail;
use outpost_tests::agent::{http, TestAgent, AGENT_WAIT};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::proxy::{Proxy, Verdict};
use outpost_tests::wait_until;
use serde_json::{json, Value};

/// Inputs and classes of the example model: enough that one window's drift summary takes well over
/// half of the smallest cap the agent accepts (4 KiB), so two windows never fit together. A profile
/// summarises at most 32 features of an input however wide, so the width comes from the classes,
/// whose counts a summary carries one by one.
const INPUTS: &str = "32";
const WIDE: usize = 32;
const CLASSES: &str = "3000";
const TELEMETRY: &str = "/device/v1/telemetry";

fn hub_count(detail: &DeviceDetail) -> u64 {
    detail.inferences.iter().map(|counts| counts.count).sum()
}

fn infer(agent: &TestAgent, row: &[f32]) {
    let (code, body) = agent.infer_row(&http(), "wide", row);
    assert_eq!(code, 200, "{body}");
}

fn stat(status: &Value, field: &str) -> u64 {
    status[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {status:#}"))
}

#[test]
fn an_outage_beyond_the_cap_drops_windows_and_the_hub_counts_them_exactly() {
    let mut hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example_with(
        &hub,
        "wide",
        1,
        1,
        true,
        &["--inputs", INPUTS, "--outputs", CLASSES],
    );
    fleet.first_rollout(&hub, "wide", 1);
    let proxy = Proxy::start(&hub.url());
    let mut agent = TestAgent::enroll_at(&proxy.url(), &hub, &fleet, "", "");
    // Uploads follow each other closely, so the outage's steps do not wait on the clock.
    agent.set_option("sync", "poll_interval", "\"1s\"");
    agent.start();
    agent.wait_status("active", json!("wide@1"));
    let row: Vec<f32> = (0..WIDE).map(|i| (i as f32 / 10.0).sin()).collect();

    // Online, one inference reaches the hub, and the agent takes in the hub's acknowledgement.
    // The hub counts the batch before it answers, so when the count shows, the answer may not
    // have passed the proxy yet: the hook below would turn it into a 503 and leave the first
    // window queued too. A status written after the count shows the window acknowledged (an
    // older one may say 0 from before the window was flushed).
    infer(&agent, &row);
    wait_until(AGENT_WAIT, "the first inference at the hub", || {
        (hub_count(&agent.hub_detail(&hub)) == 1).then_some(())
    });
    agent.wait_fresh_status("queued_windows", json!(0));

    // The hub starts failing: first its telemetry acknowledgements are lost (so one more window
    // waits in the agent's outbox, sent but unacknowledged), then all of it goes down.
    let uploads = || {
        proxy
            .log()
            .iter()
            .filter(|exchange| exchange.request.path == TELEMETRY)
            .count()
    };
    let before = uploads();
    proxy.set_hook(|request, mut response| {
        if request.path == TELEMETRY {
            response.status = 503;
            response.reason = "Service Unavailable".into();
            response.body = b"overloaded".to_vec();
        }
        Verdict::Forward(response)
    });
    // Nothing else is queued, so the first upload after the hook carries this window.
    infer(&agent, &row);
    wait_until(AGENT_WAIT, "a telemetry upload to fail", || {
        (uploads() > before + 1).then_some(())
    });
    assert!(hub.sigterm().success());
    // That window alone sets the cap for the rest of the outage: one and a half windows, so
    // every later window overflows (same-day windows roll up into one, which fits no better).
    assert!(agent.sigterm().success());
    let status = agent.status();
    assert_eq!(stat(&status, "queued_windows"), 1, "{status:#}");
    let one_window = stat(&status, "queue_bytes");
    let cap = one_window * 3 / 2;
    assert!(
        cap >= 4096,
        "one window is {one_window} bytes: widen the model"
    );
    agent.set_option("storage", "telemetry_cap", &format!("\"{cap}B\""));
    agent.start();

    // Offline, the agent serves every request and drops each window that does not fit. Each
    // inference waits for the drop of the one before, so each is flushed in a window of its own
    // (two inferences of one flush share a window, and would be one drop).
    const OFFLINE: u64 = 6;
    let mut status = Value::Null;
    for dropped in 1..=OFFLINE {
        infer(&agent, &row);
        status = wait_until(
            AGENT_WAIT,
            &format!("window {dropped} to be dropped"),
            || {
                let status = agent.status();
                let now = stat(&status, "dropped_records");
                assert!(now <= dropped, "more windows dropped than sent: {status:#}");
                (now == dropped).then_some(status)
            },
        );
    }
    assert!(stat(&status, "queue_bytes") <= cap, "{status:#}");
    assert_eq!(stat(&status, "queued_windows"), 1, "{status:#}");

    // The hub returns: it takes the waiting window, then a batch carrying the drop count.
    hub.restart();
    assert!(agent.sigterm().success());
    agent.point_at(&hub.url());
    agent.start();
    let detail = wait_until(AGENT_WAIT, "the drops to reach the hub", || {
        let detail = agent.hub_detail(&hub);
        (detail.dropped_records > 0 && hub_count(&detail) == 2).then_some(detail)
    });
    assert_eq!(detail.dropped_records, OFFLINE, "{detail:#?}");
    agent.wait_status("queued_windows", json!(0));
    // Resends after acknowledgements count nothing twice, and serving goes on.
    infer(&agent, &row);
    wait_until(AGENT_WAIT, "the next inference at the hub", || {
        (hub_count(&agent.hub_detail(&hub)) == 3).then_some(())
    });
    let detail = agent.hub_detail(&hub);
    assert_eq!(detail.dropped_records, OFFLINE, "{detail:#?}");
}
