//! The drift page: for one model version with a profile, every feature and class output, worst
//! first, each with its reference histogram against the current one and its PSI (JS distance for a
//! class output) window by window.
//!
//! The figures are the hub's own: summaries merged by [`drift::history`] and judged by the
//! protocol's [`assess`], the code behind `drift report`, `/metrics` and the drift gate. The time
//! range is bounded ([`MAX_HOURS`]): the stored summaries of a model version are keyed by window
//! end, so a page reads one range of them.

use std::fmt::Write;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use outpost_protocol::drift::{assess, DriftSummary, FeatureDrift, Profile, NUMERIC_KIND};
use serde::Deserialize;

use super::svg::{histogram, line_chart};
use super::{badge, internal, problem, query_value, utc, viewer_and_query, Esc};
use crate::server::drift::{self, quality_text, status_name, ProfileLookup, Scope};
use crate::server::SharedHub;
use crate::unix_now;

const TITLE: &str = "Drift";
/// Hours looked back when the page is not told: every stored summary in range is read and merged
/// per request, so the default stays short (see `docs/BENCHMARKS.md`); 24 h and a week are links.
const DEFAULT_HOURS: u64 = 6;
/// The longest range the page reads: a week of hourly windows.
pub const MAX_HOURS: u64 = 168;

#[derive(Debug, Deserialize)]
pub struct DriftQuery {
    model: Option<String>,
    version: Option<u64>,
    hours: Option<u64>,
}

pub async fn page(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    query: Result<Query<DriftQuery>, QueryRejection>,
) -> Response {
    let (viewer, query) = match viewer_and_query(&hub, &headers, query, TITLE).await {
        Ok(pair) => pair,
        Err(response) => return *response,
    };
    let hours = query.hours.unwrap_or(DEFAULT_HOURS).clamp(1, MAX_HOURS);
    // Every published version with a profile, newest first per model.
    let mut profiled: Vec<(String, u64)> = Vec::new();
    let manifests = match hub.store.manifests().await {
        Ok(manifests) => manifests,
        Err(error) => return internal(&viewer, TITLE, error),
    };
    for (name, version, _) in manifests {
        match drift::profile(&hub, &name, version).await {
            Ok(ProfileLookup::Found(_)) => profiled.push((name, version)),
            Ok(_) => {}
            Err(error) => return internal(&viewer, TITLE, format!("{error:#}")),
        }
    }
    profiled.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let chosen = match (&query.model, query.version) {
        (Some(model), Some(version)) => Some((model.clone(), version)),
        (Some(model), None) => profiled.iter().find(|(name, _)| name == model).cloned(),
        (None, _) => profiled.first().cloned(),
    };
    let mut body = String::from("<h1>Drift</h1>");
    body.push_str("<nav class=\"versions\" id=\"versions\">");
    for (name, version) in &profiled {
        let current = chosen.as_ref() == Some(&(name.clone(), *version));
        let _ = write!(
            body,
            "<a{} href=\"/dashboard/drift?model={}&amp;version={version}&amp;hours={hours}\">{}@{version}</a>",
            if current { " class=\"current\"" } else { "" },
            Esc(&query_value(name)),
            Esc(name)
        );
    }
    body.push_str("</nav>");
    let Some((model, version)) = chosen else {
        body.push_str(
            "<p class=\"empty\">No published model version has a drift profile. Publish one with \
             <code>outpost-hub model publish --profile</code>.</p>",
        );
        return super::page(TITLE, TITLE, &viewer, &body);
    };
    let loaded = match drift::profile(&hub, &model, version).await {
        Ok(ProfileLookup::Found(loaded)) => loaded,
        Ok(_) => {
            return problem(
                StatusCode::NOT_FOUND,
                &viewer,
                TITLE,
                &format!("{model}@{version} is not published with a drift profile"),
            )
        }
        Err(error) => return internal(&viewer, TITLE, format!("{error:#}")),
    };
    let now = unix_now();
    let scope = Scope {
        since: now.saturating_sub(hours * 3600),
        ..Scope::default()
    };
    let history = match drift::history(&hub, &model, version, &scope).await {
        Ok(history) => history,
        Err(error) => return internal(&viewer, TITLE, format!("{error:#}")),
    };
    let _ = write!(
        body,
        "<h2 id=\"drift-model\">{}@{version}</h2><p class=\"sub\">last {hours} h: {} summaries in \
         {} windows. Ranges: ",
        Esc(&model),
        history.summaries,
        history.windows.len()
    );
    for range in [6, 24, MAX_HOURS] {
        let _ = write!(
            body,
            "<a href=\"/dashboard/drift?model={}&amp;version={version}&amp;hours={range}\">{range} h</a> ",
            Esc(&query_value(&model))
        );
    }
    body.push_str("</p>");
    let Some(merged) = &history.merged else {
        body.push_str("<p class=\"empty\">No drift summaries in this range.</p>");
        return super::page(TITLE, TITLE, &viewer, &body);
    };
    let profile = &loaded.profile;
    let judged = assess(profile, merged);
    // Each window judged once; a feature's series picks its own value from each.
    let windows: Vec<(u64, Vec<FeatureDrift>)> = history
        .windows
        .iter()
        .map(|window| (window.window_end, assess(profile, window)))
        .collect();
    body.push_str("<ol class=\"features\" id=\"features\">");
    for feature in &judged {
        feature_card(&mut body, profile, merged, feature, &windows);
    }
    body.push_str("</ol>");
    super::page(TITLE, TITLE, &viewer, &body)
}

/// The reference's and the current metric bins of `feature`, with a name for each bin.
fn bins(
    profile: &Profile,
    merged: &DriftSummary,
    feature: &FeatureDrift,
) -> Option<(Vec<u64>, Vec<u64>, Vec<String>)> {
    if feature.kind == NUMERIC_KIND {
        let index = profile
            .features
            .iter()
            .position(|f| f.name == feature.name)?;
        let numeric = &profile.features[index];
        let current = merged.features.get(index)?;
        let edges = &numeric.edges;
        let mut labels = Vec::with_capacity(edges.len() + 1);
        labels.push(format!(
            "below {:.3}",
            edges.first().copied().unwrap_or(0.0)
        ));
        labels.extend(
            edges
                .windows(2)
                .map(|pair| format!("{:.3} to {:.3}", pair[0], pair[1])),
        );
        labels.push(format!("above {:.3}", edges.last().copied().unwrap_or(0.0)));
        Some((
            numeric.reference.metric_bins(),
            current.metric_bins(),
            labels,
        ))
    } else {
        let index = profile
            .classes
            .iter()
            .position(|c| c.name == feature.name)?;
        let class = &profile.classes[index];
        let current = merged.classes.get(index)?;
        let mut labels: Vec<String> = class.classes.iter().map(|c| format!("class {c}")).collect();
        labels.push("unseen".to_owned());
        Some((class.reference.metric_bins(), current.metric_bins(), labels))
    }
}

fn feature_card(
    body: &mut String,
    profile: &Profile,
    merged: &DriftSummary,
    feature: &FeatureDrift,
    windows: &[(u64, Vec<FeatureDrift>)],
) {
    let status = status_name(feature.status);
    let _ = write!(
        body,
        "<li class=\"card feature {status}\" data-feature=\"{}\"><h3><span class=\"name\">{}</span> \
         {} <span class=\"sub\">{} {:.4} (flag at {:.4}), n = {}</span></h3>",
        Esc(&feature.name),
        Esc(&feature.name),
        badge(status),
        Esc(&feature.metric),
        feature.value,
        feature.threshold,
        feature.n
    );
    for issue in &feature.quality {
        let _ = write!(
            body,
            "<p class=\"quality\">{}</p>",
            Esc(&quality_text(issue))
        );
    }
    body.push_str("<div class=\"charts\"><figure>");
    match bins(profile, merged, feature) {
        Some((reference, current, labels)) => {
            body.push_str(&histogram(&reference, &current, &labels));
        }
        None => body.push_str("<p class=\"empty\">not in the profile</p>"),
    }
    body.push_str(
        "<figcaption><span class=\"key ref\"></span>reference <span class=\"key cur\"></span>\
         current</figcaption></figure><figure>",
    );
    let series: Vec<(u64, f64)> = windows
        .iter()
        .filter_map(|(end, judged)| {
            judged
                .iter()
                .find(|other| other.name == feature.name)
                .map(|drift| (*end, drift.value))
        })
        .collect();
    body.push_str(&line_chart(&series, feature.threshold, utc));
    let _ = write!(
        body,
        "<figcaption>{} per window</figcaption></figure></div></li>",
        Esc(&feature.metric)
    );
}
