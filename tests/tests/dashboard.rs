//! The hub's web dashboard in a real headless Chromium, driven over WebDriver, against a real hub
//! serving TLS and holding a seeded fleet: simulated devices enrolled through the device API, a
//! published model with a drift profile, a completed rollout and a paused one with the engine's
//! decision, drift telemetry in which one feature drifts, and a device whose refusal reason holds
//! markup.
//!
//! The browser signs in through the form (after a wrong token is refused), clicks from the fleet to
//! a device, to the rollouts and to drift through the page's own links, applies a filter, checks
//! what each page says, reads the cookie's flags, and logs out.
//!
//! `OUTPOST_SCREENSHOTS=docs/dashboard cargo test --workspace --test dashboard` also writes a
//! 1280x800 PNG of each page into that directory (relative to the workspace root): the pictures
//! in `docs/dashboard/`.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use outpost_hub::api::RolloutState;
use outpost_protocol::device::Status;
use outpost_protocol::drift::Profile;
use outpost_protocol::sha256;
use outpost_tests::browser::Browser;
use outpost_tests::device_sim::{drift_window, http_agent, unix_now, Behaviour, SimDevice};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::workspace_root;

/// A refusal reason as hostile as a device can make one.
const HOSTILE_REASON: &str = "<script>document.title='pwned'</script><b>refused</b>";
/// The input column whose values the drifting devices shift, and the feature that reads it.
const DRIFTING_COLUMN: usize = 2;
const DRIFTING_FEATURE: &str = "x2";

/// Steps every device with `behaviour` until `done` holds for rollout `sequence` (bounded).
fn drive(
    hub: &TestHub,
    devices: &mut [SimDevice],
    behaviour: Behaviour,
    sequence: u64,
    done: impl Fn(RolloutState) -> bool,
) {
    let started = Instant::now();
    while !done(hub.rollout(sequence).state) {
        for device in devices.iter_mut() {
            device.step(behaviour);
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "rollout {sequence} did not get there: {:#?}",
            hub.rollout(sequence)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Writes `png` as `name.png` into `$OUTPOST_SCREENSHOTS`, when that is set.
fn keep_screenshot(browser: &Browser, name: &str) {
    let png = browser.screenshot();
    assert!(png.starts_with(b"\x89PNG"), "a screenshot is a PNG");
    if let Some(dir) = std::env::var_os("OUTPOST_SCREENSHOTS") {
        let dir = workspace_root().join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), &png).unwrap();
    }
}

#[test]
fn an_operator_clicks_through_the_dashboard_in_chromium() {
    let hub = TestHub::start_tls();
    let fleet = Fleet::new(&hub);
    let model_dir = fleet.publish_example_with_profile(&hub, "demo", 1, 1);
    fleet.publish_example(&hub, "demo", 2, 2);
    let viewer = hub.admin_token("dash-viewer", "viewer");

    // Eight devices: all take demo@1, then fail demo@2, which pauses its rollout.
    // A device gets its token's labels: one token per ring.
    let canary = hub.enroll_token("site=lab,ring=canary", 4);
    let main = hub.enroll_token("site=lab,ring=main", 4);
    let mut devices: Vec<SimDevice> = (0..8)
        .map(|index| {
            let (token, ring) = if index < 4 {
                (&canary, "ring=canary")
            } else {
                (&main, "ring=main")
            };
            SimDevice::enroll(&hub.url(), token, &[ring], &fleet.root)
        })
        .collect();
    fleet.first_rollout(&hub, "demo", 1);
    drive(&hub, &mut devices, Behaviour::Commit, 1, |state| {
        state == RolloutState::Completed
    });
    let second = fleet.create_rollout(
        &hub,
        "demo",
        2,
        1,
        &[
            "--stages",
            "50,100",
            "--bake",
            "1s",
            "--device-timeout",
            "30s",
            "--max-failure-pct",
            "5",
        ],
    );
    drive(
        &hub,
        &mut devices,
        Behaviour::FailTarget,
        second.sequence,
        |state| state != RolloutState::Active,
    );
    let paused = hub.rollout(second.sequence);
    assert_eq!(paused.state, RolloutState::Paused, "{paused:#?}");
    let pause_reason = paused.decisions.last().unwrap().reason.clone();

    // A device refuses something with a reason full of markup.
    let hostile = &devices[7];
    hostile.report(
        None,
        None,
        Status::Refused {
            reason: HOSTILE_REASON.to_owned(),
        },
    );

    // Three hours of drift telemetry of demo@1: the canary ring's x2 moved by two deviations.
    let profile_bytes = std::fs::read(model_dir.join("profile.bin")).unwrap();
    let profile: Profile = outpost_protocol::decode(&profile_bytes).unwrap();
    let profile_sha256 = sha256(&profile_bytes);
    let this_hour = unix_now() / 3600 * 3600;
    for (index, device) in devices.iter().enumerate() {
        let shift: &[(usize, f32)] = if index < 4 {
            &[(DRIFTING_COLUMN, 2.0)]
        } else {
            &[]
        };
        let windows = (1..=3)
            .map(|hours_ago| {
                drift_window(
                    "demo",
                    1,
                    (&profile, profile_sha256),
                    this_hour - hours_ago * 3600,
                    300,
                    index as u64 * 10 + hours_ago,
                    shift,
                )
            })
            .collect();
        device.telemetry(1, windows);
    }

    // Without a cookie, and with a token the hub does not know, a page sends the browser to sign
    // in; a wrong token at the form is a 401.
    let http = http_agent();
    let bare = http
        .get(format!("{}/dashboard/fleet", hub.url()))
        .call()
        .unwrap();
    assert_eq!(bare.status().as_u16(), 303);
    assert_eq!(
        bare.headers()["location"],
        "/dashboard/login?why=signin",
        "{bare:?}"
    );
    let forged = http
        .get(format!("{}/dashboard/fleet", hub.url()))
        .header("cookie", "outpost_token=opa_00000000")
        .call()
        .unwrap();
    assert_eq!(forged.status().as_u16(), 303);
    assert_eq!(forged.headers()["location"], "/dashboard/login?why=expired");
    let cleared = forged.headers()["set-cookie"].to_str().unwrap();
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    let refused = http
        .post(format!("{}/dashboard/login", hub.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .send("token=opa_wrong".as_bytes())
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    assert!(refused.headers().get("set-cookie").is_none());
    // Another site's page cannot sign a browser in, even with a good token.
    let cross_site = http
        .post(format!("{}/dashboard/login", hub.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", "https://evil.example")
        .send(format!("token={}", viewer.token).as_bytes())
        .unwrap();
    assert_eq!(cross_site.status().as_u16(), 403);
    assert!(cross_site.headers().get("set-cookie").is_none());

    let browser = Browser::start();
    browser.goto(&format!("{}/dashboard/fleet", hub.url()));
    assert!(
        browser.url().contains("/dashboard/login"),
        "{}",
        browser.url()
    );
    assert!(browser.find("#message").text().contains("Sign in"));
    keep_screenshot(&browser, "login");

    // A wrong token is refused with a clear message, and no cookie is set.
    browser.find("#token").send_keys("opa_not_a_token");
    browser.click_to_navigate("#signin");
    assert!(
        browser.url().ends_with("/dashboard/login"),
        "{}",
        browser.url()
    );
    assert_eq!(
        browser.find("#message").text(),
        "That token is not known to this hub."
    );
    assert!(browser.cookies().is_empty(), "{:?}", browser.cookies());

    // The viewer token signs in, into a cookie scripts cannot read, sent over TLS only.
    browser.find("#token").send_keys(&viewer.token);
    browser.click_to_navigate("#signin");
    assert!(
        browser.url().ends_with("/dashboard/fleet"),
        "{}",
        browser.url()
    );
    let cookies = browser.cookies();
    let cookie = cookies
        .iter()
        .find(|cookie| cookie.name == "outpost_token")
        .unwrap_or_else(|| panic!("no session cookie among {cookies:?}"));
    assert_eq!(cookie.value, viewer.token);
    assert!(cookie.http_only, "{cookie:?}");
    assert!(cookie.secure, "{cookie:?}");
    assert_eq!(cookie.same_site, "Strict", "{cookie:?}");
    assert_eq!(cookie.path, "/dashboard", "{cookie:?}");
    assert!(browser.find(".who").text().contains("dash-viewer"));

    // Fleet: every device, its state and model, and the counts by state.
    let listed: Vec<String> = browser
        .find_all("#devices a.id")
        .iter()
        .map(|link| link.text())
        .collect();
    let mut ids: Vec<String> = devices.iter().map(|device| device.id.to_hex()).collect();
    ids.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, ids);
    assert_eq!(browser.find("#matching").text(), "8 matching; page 1 of 1");
    let counts = browser.find("#state-counts").text();
    assert!(
        counts.contains('8') && counts.contains("steady"),
        "{counts}"
    );
    let agents = browser.find("#agent-versions").text();
    assert_eq!(
        agents,
        format!("agents: {} × 8", outpost_tests::device_sim::agent_version())
    );
    let table = browser.find("#devices").text();
    assert!(
        table.contains("demo@1") && table.contains("ring=canary"),
        "{table}"
    );
    keep_screenshot(&browser, "fleet");

    // A filter on part of an id, applied through the form, leaves that device alone.
    let hostile_id = hostile.id.to_hex();
    browser.find("#filter-q").send_keys(&hostile_id[..10]);
    browser.click_to_navigate("#apply");
    assert!(browser.url().contains("q="), "{}", browser.url());
    assert_eq!(browser.find("#matching").text(), "1 matching; page 1 of 1");
    let filtered = browser.find_all("#devices a.id");
    assert_eq!(filtered.len(), 1);
    assert_eq!(filtered[0].text(), hostile_id);
    // A label filter through the URL: the canary ring is four devices.
    browser.goto(&format!(
        "{}/dashboard/fleet?label=ring%3Dcanary",
        hub.url()
    ));
    assert_eq!(browser.find("#matching").text(), "4 matching; page 1 of 1");
    browser.find("#filter-q").send_keys(&hostile_id[..10]);
    browser.click_to_navigate("#apply");
    assert_eq!(browser.find("#matching").text(), "0 matching; page 1 of 1");
    browser.goto(&format!(
        "{}/dashboard/fleet?q={}",
        hub.url(),
        &hostile_id[..10]
    ));

    // A device: its history of activations, failures and the refusal, reason shown as text.
    browser.click_to_navigate("#devices a.id");
    assert!(browser
        .url()
        .ends_with(&format!("/dashboard/devices/{hostile_id}")));
    assert_eq!(browser.find("#device-id").text(), hostile_id);
    let events = browser.find("#events").text();
    for kind in ["enrolled", "activating", "committed", "refused"] {
        assert!(events.contains(kind), "no {kind} event in:\n{events}");
    }
    assert!(
        events.contains(HOSTILE_REASON),
        "the refusal reason is shown as text:\n{events}"
    );
    let source = browser.source();
    assert!(
        source.contains("&lt;script&gt;document.title="),
        "the reason is escaped"
    );
    assert!(
        browser.find_all("script").is_empty(),
        "no script ran into the page"
    );
    assert!(
        browser.find_all("main b").is_empty(),
        "no markup from a device"
    );
    keep_screenshot(&browser, "device");

    // Rollouts: the paused one with its stages, gates and the engine's decision.
    browser.click_to_navigate("header nav a[href='/dashboard/rollouts']");
    assert!(browser.url().ends_with("/dashboard/rollouts"));
    let rollout = browser.find(&format!("#rollout-{}", second.sequence));
    let text = rollout.text();
    assert!(text.contains("paused"), "{text}");
    assert!(text.contains("failure_pct"), "{text}");
    assert!(text.contains(&pause_reason), "{text} lacks {pause_reason}");
    assert!(!browser.find_all("#rollout-1 svg.bar rect").is_empty());
    // The first rollout completed, then the second superseded it: both decisions are listed.
    let first = browser.find("#rollout-1").text();
    assert!(
        first.contains("superseded") && first.contains("complete"),
        "{first}"
    );
    keep_screenshot(&browser, "rollouts");

    // Drift: demo@1, the shifted feature first, with its histograms and PSI over time.
    browser.click_to_navigate("header nav a[href='/dashboard/drift']");
    assert!(browser.url().ends_with("/dashboard/drift"));
    assert_eq!(browser.find("#drift-model").text(), "demo@1");
    let features = browser.find_all("#features > li");
    assert!(features.len() >= 4, "{} features", features.len());
    assert_eq!(
        features[0].attribute("data-feature").as_deref(),
        Some(DRIFTING_FEATURE)
    );
    assert!(
        features[0].text().contains("alert"),
        "{}",
        features[0].text()
    );
    assert_eq!(
        browser
            .find_all("#features > li:first-child svg.hist")
            .len(),
        1
    );
    assert_eq!(
        browser
            .find_all("#features > li:first-child svg.line circle")
            .len(),
        3,
        "one PSI point per window"
    );
    keep_screenshot(&browser, "drift");

    // Logging out clears the cookie; the pages ask to sign in again.
    browser.click_to_navigate("#logout");
    assert!(browser.url().contains("why=loggedout"), "{}", browser.url());
    assert!(
        browser
            .cookies()
            .iter()
            .all(|cookie| cookie.name != "outpost_token"),
        "{:?}",
        browser.cookies()
    );
    browser.goto(&format!("{}/dashboard/rollouts", hub.url()));
    assert!(browser.url().contains("/dashboard/login?why=signin"));
}
