//! A real agent that knows several replicas of one hub (`hub_urls`): two `outpost-hub serve`
//! processes on one real PostgreSQL database, as a deployment past one machine runs them. The
//! agent sends each request to the replica that answered last, and on to the next when that one
//! is unreachable or answers 502, 503 or 504, signing every attempt afresh: the replicas share
//! their record of nonces, so a request one of them saw is a replay to the other.
//!
//! Every verdict waits on an event (the agent's status, a version served, the agent's log),
//! never on elapsed time.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use outpost_hub::api::RolloutState;
use outpost_tests::agent::{http, TestAgent, AGENT_WAIT};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::postgres::Postgres;
use outpost_tests::proxy::{Proxy, Response, Verdict};
use outpost_tests::{wait_until, RefusedPort};
use serde_json::{json, Value};

/// A PostgreSQL server with one database, and two hub replicas on it. The server is returned
/// first, so that it is dropped after both hubs.
fn replicas() -> (Postgres, TestHub, TestHub) {
    let postgres = Postgres::start().unwrap_or_else(|error| panic!("{error}"));
    let database = postgres.database("fleet").unwrap();
    let first = TestHub::start_on_database(&database);
    let second = first.replica();
    (postgres, first, second)
}

/// Asserts the agent's inference API answers with demo@`version`.
fn assert_serves(agent: &TestAgent, version: u64) {
    let (code, body) = agent.infer(&http(), [1.0, 2.0, 3.0, 4.0]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["model_version"], version.to_string(), "{body}");
}

/// The agent side: "agents take several hub URLs and fail over". The agent enrolls past
/// a URL nobody answers, runs demo@1 through the first replica, and once that one is SIGKILLed
/// gets demo@2 from a rollout created on the second. With every hub down it keeps serving what
/// it runs, and says which URLs it tried.
#[test]
fn an_agent_moves_to_the_surviving_replica_and_keeps_rolling_out_and_serving() {
    let (_postgres, mut first, mut second) = replicas();
    let fleet = Fleet::new(&first);
    fleet.publish_example(&first, "demo", 1, 1);
    fleet.first_rollout(&first, "demo", 1);
    let nobody = RefusedPort::bind();
    let dead = nobody.url();
    let (first_url, second_url) = (first.url(), second.url());
    // Enrollment fails over like any request: the token reaches the first replica.
    let mut agent = TestAgent::enroll_at_all(
        &[&dead, &first_url, &second_url],
        &first,
        &fleet,
        "site=lab",
        "",
    );
    agent.start();
    let status = agent.wait_status("active", json!("demo@1"));
    assert_eq!(status["hub_url"], first_url, "{status:#}");
    assert_serves(&agent, 1);
    let moved_on = format!("hub {dead} unreachable (");
    assert!(
        agent.log().contains(&format!("; using {first_url}")) && agent.log().contains(&moved_on),
        "the agent did not say it passed over {dead}:\n{}",
        agent.log()
    );

    first.kill9();
    fleet.publish_example(&second, "demo", 2, 2);
    let created = fleet.create_rollout(&second, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);
    let status = agent.wait_status("active", json!("demo@2"));
    assert_eq!(status["hub_url"], second_url, "{status:#}");
    assert_serves(&agent, 2);
    let log = agent.log();
    assert!(
        log.contains(&format!("hub {first_url} unreachable (")),
        "the agent did not say {first_url} was unreachable:\n{log}"
    );
    assert!(
        log.contains(&format!("; using {second_url}")),
        "the agent did not say it uses {second_url}:\n{log}"
    );
    // The device's reports reached the surviving replica: the rollout completes there.
    wait_until(
        AGENT_WAIT,
        "the rollout to complete on the survivor",
        || (second.rollout(created.sequence).state == RolloutState::Completed).then_some(()),
    );

    // Every hub down: the agent keeps its model and serves it, and its error names each URL.
    second.kill9();
    let status = wait_until(AGENT_WAIT, "a cycle failing on every hub", || {
        let status = agent.status();
        let error = status["last_error"].as_str().unwrap_or_default();
        error.contains("no hub answered").then_some(status)
    });
    let error = status["last_error"].as_str().unwrap();
    for url in [&dead, &first_url, &second_url] {
        assert!(
            error.contains(&format!("{url} (")),
            "{url} not named: {error}"
        );
    }
    assert_eq!(status["active"], "demo@2", "{status:#}");
    assert_serves(&agent, 2);
}

/// A replica behind a load balancer that handles each request and then answers 503 (the proxy
/// forwards every request to the first replica, which accepts it and records its nonce, and
/// replaces the answer): the agent passes it over for the second, which would refuse a request
/// signed with the same nonce as a replay. No cycle fails, so every attempt was signed afresh.
#[test]
fn a_replica_answering_503_is_passed_over_with_every_attempt_signed_afresh() {
    let (_postgres, first, second) = replicas();
    let fleet = Fleet::new(&first);
    fleet.publish_example(&first, "demo", 1, 1);
    fleet.first_rollout(&first, "demo", 1);
    let balancer = Proxy::start(&first.url());
    let (balancer_url, second_url) = (balancer.url(), second.url());
    let mut agent = TestAgent::enroll_at_all(
        &[&balancer_url, &second_url],
        &first,
        &fleet,
        "site=lab",
        "",
    );
    agent.start();
    let status = agent.wait_status("active", json!("demo@1"));
    assert_eq!(status["hub_url"], balancer_url, "{status:#}");

    let log_before = agent.log().len();
    let exchanges_before = balancer.log().len();
    balancer.set_hook(|_, _| {
        Verdict::Forward(Response {
            status: 503,
            reason: "Service Unavailable".to_owned(),
            headers: Vec::new(),
            body: b"replica draining".to_vec(),
        })
    });
    let status = agent.wait_fresh_status("hub_url", json!(second_url));
    assert_eq!(status["last_error"], Value::Null, "{status:#}");
    // From here on nothing should reach the first replica: the agent keeps to the second.
    let late = Arc::new(Mutex::new(Vec::new()));
    {
        let late = late.clone();
        balancer.set_intercept(move |request| {
            late.lock().unwrap().push(request.path.clone());
            None
        });
    }
    // The first replica accepted what it was sent before the 503 replaced its answer.
    let handled = wait_until(AGENT_WAIT, "the passed-over request in the log", || {
        let exchanges = balancer.log();
        (exchanges.len() > exchanges_before).then_some(exchanges)
    });
    for exchange in &handled[exchanges_before..] {
        assert!(
            (200..300).contains(&exchange.status),
            "the first replica did not accept {} {}: {}",
            exchange.request.method,
            exchange.request.path,
            exchange.status
        );
    }
    let log = agent.log();
    let since = &log[log_before..];
    assert!(
        since.contains(&format!(
            "hub {balancer_url} unreachable (answered 503: replica draining); using {second_url}"
        )),
        "{since}"
    );
    assert!(
        !since.contains(" failed, retrying in "),
        "a cycle failed:\n{since}"
    );

    // The work goes on through the second replica.
    fleet.publish_example(&second, "demo", 2, 2);
    fleet.create_rollout(&second, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);
    let status = agent.wait_status("active", json!("demo@2"));
    assert_eq!(status["hub_url"], second_url, "{status:#}");
    assert_serves(&agent, 2);
    assert_eq!(
        *late.lock().unwrap(),
        Vec::<String>::new(),
        "requests went back to the replica passed over"
    );
}
