//! A peer of another wire version (issue 22): each side refuses the other's frames saying which
//! wire version each speaks and which to upgrade, instead of "1 unexpected bytes after the body".
//! The hub answers a device request of another version with 400 and that message; a real agent
//! whose hub answers in another version keeps serving its model, and says so in its status.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use outpost_protocol::device::AgentState;
use outpost_protocol::envelope::PROTOCOL_VERSION;
use outpost_tests::agent::{TestAgent, AGENT_WAIT};
use outpost_tests::device_sim::SimDevice;
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::proxy::{Proxy, Verdict};
use outpost_tests::wait_until;
use serde_json::json;

#[test]
fn the_hub_names_the_versions_of_a_request_it_cannot_read() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    let token = hub.enroll_token("site=lab", 1);
    let device = SimDevice::enroll(&hub.url(), &token, &[], &fleet.root);
    let mut body = device.check_in_body(AgentState::Steady);
    body[2] = PROTOCOL_VERSION + 1;
    device
        .signed_request("POST", "/device/v1/checkin", Some(&body))
        .refused(
            400,
            &format!(
                "the agent speaks wire version {}, this hub speaks {PROTOCOL_VERSION}: upgrade \
                 the hub (hubs first, then devices)",
                PROTOCOL_VERSION + 1
            ),
        );
    assert!(
        hub.log()
            .contains("refused a device request: the agent speaks wire version"),
        "{}",
        hub.log()
    );
    // The same check-in in the hub's own version is answered.
    let body = device.check_in_body(AgentState::Steady);
    assert_eq!(
        device
            .signed_request("POST", "/device/v1/checkin", Some(&body))
            .status,
        200
    );
}

#[test]
fn an_agent_names_the_versions_of_a_hub_it_cannot_read_and_keeps_serving() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    fleet.first_rollout(&hub, "demo", 1);
    let proxy = Proxy::start(&hub.url());
    let mut agent = TestAgent::enroll_at(&proxy.url(), &hub, &fleet, "", "");
    agent.set_option("sync", "poll_interval", "\"1s\"");
    agent.start();
    agent.wait_status("active", json!("demo@1"));

    // The hub is now "upgraded": its check-in answers come in the next wire version.
    proxy.set_hook(|request, mut response| {
        if request.path.ends_with("/checkin") && response.status == 200 {
            if let Some(version) = response.body.get_mut(2) {
                *version = PROTOCOL_VERSION + 1;
            }
        }
        Verdict::Forward(response)
    });
    let expected = format!(
        "the hub speaks wire version {}, this agent speaks {PROTOCOL_VERSION}: upgrade the agent",
        PROTOCOL_VERSION + 1
    );
    let status = wait_until(AGENT_WAIT, "the agent to report the hub's version", || {
        let status = agent.status();
        status["last_error"]
            .as_str()
            .is_some_and(|error| error.contains(&expected))
            .then_some(status)
    });
    assert_eq!(status["active"], json!("demo@1"), "{status:#}");
    let (code, body) = agent.infer(&outpost_tests::agent::http(), [0.5, -1.0, 2.0, 0.0]);
    assert_eq!(code, 200, "{body}");
    assert!(agent.log().contains(&expected), "{}", agent.log());
}
