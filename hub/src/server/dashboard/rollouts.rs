//! The rollouts page: each rollout's stages with a progress bar per stage, its gate figures against
//! their signed limits, and the decisions taken with the figures that caused them — the same
//! [`RolloutInfo`] that `outpost-hub rollout status` prints, from [`engine::info`].
//!
//! Working out a rollout's live figures reads every selected device's outcome and counters, so
//! the page shows the newest [`SHOWN`] rollouts only. Below them, every model's retirements: the
//! signed word that takes a model off the devices it selects.

use std::fmt::Write;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

use super::svg::{stacked_bar, Segment};
use super::{badge, internal, time_cell, viewer, Esc};
use crate::api::{GateFigure, RetirementInfo, RolloutInfo};
use crate::server::{engine, SharedHub};
use crate::unix_now;

const TITLE: &str = "Rollouts";
/// Rollouts shown, newest first.
pub const SHOWN: usize = 10;

pub async fn page(State(hub): State<SharedHub>, headers: HeaderMap) -> Response {
    let viewer = match viewer(&hub, &headers).await {
        Ok(viewer) => viewer,
        Err(response) => return *response,
    };
    let mut records = match hub.store.rollouts().await {
        Ok(records) => records,
        Err(error) => return internal(&viewer, TITLE, error),
    };
    let total = records.len();
    records.sort_by_key(|record| std::cmp::Reverse(record.sequence));
    records.truncate(SHOWN);
    let now = unix_now();
    let mut body = format!("<h1>Rollouts</h1><p class=\"sub\">{total} in all");
    if total > SHOWN {
        let _ = write!(body, "; the newest {SHOWN} shown");
    }
    body.push_str("</p>");
    if records.is_empty() {
        body.push_str(
            "<p class=\"empty\">No rollout yet. Start one with <code>outpost-hub rollout create</code>.</p>",
        );
    }
    for record in &records {
        match engine::info(&hub, record).await {
            Ok(info) => rollout(&mut body, &info, now),
            Err(error) => return internal(&viewer, TITLE, format!("{error:#}")),
        }
    }
    let retirements = match hub
        .store
        .retirements()
        .await
        .map_err(anyhow::Error::from)
        .and_then(|records| {
            records
                .iter()
                .map(engine::retirement_info)
                .collect::<anyhow::Result<Vec<_>>>()
        }) {
        Ok(retirements) => retirements,
        Err(error) => return internal(&viewer, TITLE, format!("{error:#}")),
    };
    retired(&mut body, &retirements, now);
    super::page(TITLE, TITLE, &viewer, &body)
}

/// The retirements, newest first, in one table; nothing when there is none.
fn retired(body: &mut String, retirements: &[RetirementInfo], now: u64) {
    if retirements.is_empty() {
        return;
    }
    body.push_str(
        "<section class=\"card\" id=\"retirements\"><h2>Retirements</h2><table><thead><tr>\
         <th>Sequence</th><th>Model</th><th>Devices</th><th>Signed</th><th>Expires</th><th>By</th>\
         </tr></thead><tbody>",
    );
    for info in retirements.iter().rev() {
        let devices = if info.selector.is_empty() {
            "every device".to_owned()
        } else {
            info.selector.join(",")
        };
        let _ = write!(
            body,
            "<tr><td>{}</td><td class=\"model\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            info.sequence,
            Esc(&info.model),
            Esc(&devices),
            time_cell(info.created, now),
            time_cell(info.expires, now),
            Esc(&info.by)
        );
    }
    body.push_str("</tbody></table></section>");
}

fn model(reference: &crate::api::ModelRef) -> String {
    format!("{}@{}", reference.name, reference.version)
}

fn rollout(body: &mut String, info: &RolloutInfo, now: u64) {
    let _ = write!(
        body,
        "<section class=\"card rollout\" id=\"rollout-{}\"><h2>Rollout {} <span class=\"model\">{}</span>",
        info.sequence,
        info.sequence,
        Esc(&model(&info.target))
    );
    if let Some(fallback) = &info.fallback {
        let _ = write!(
            body,
            " <span class=\"sub\">from {}</span>",
            Esc(&model(fallback))
        );
    }
    let _ = write!(
        body,
        " {}</h2><p class=\"sub\">created {}; stage {} since {}; devices {}</p>",
        badge(info.state.as_str()),
        time_cell(info.created, now),
        info.stage_index,
        time_cell(info.stage_started_at, now),
        if info.selector.is_empty() {
            "all".to_owned()
        } else {
            Esc(&info.selector.join(",")).to_string()
        }
    );

    body.push_str("<table class=\"stages\"><thead><tr><th>Stage</th><th>Devices</th><th class=\"wide\">Progress</th><th>Done</th><th>Failed</th><th>Silent</th><th>Pending</th><th title=\"agent older than the target's min_agent_version: not offered it\">Skipped</th></tr></thead><tbody>");
    for (index, stage) in info.stages.iter().enumerate() {
        let current = if index == info.stage_index {
            " class=\"current\""
        } else {
            ""
        };
        let name = if stage.shadow {
            format!("{index}: shadow {}%", stage.percent)
        } else {
            format!("{index}: {}%", stage.percent)
        };
        let bar = stacked_bar(
            &[
                Segment {
                    count: stage.succeeded,
                    class: "ok",
                    name: "succeeded",
                },
                Segment {
                    count: stage.failed,
                    class: "failed",
                    name: "failed",
                },
                Segment {
                    count: stage.silent,
                    class: "silent",
                    name: "silent",
                },
                Segment {
                    count: stage.pending,
                    class: "pending",
                    name: "pending",
                },
                Segment {
                    count: stage.skipped,
                    class: "skipped",
                    name: "skipped (agent too old)",
                },
            ],
            stage.devices,
        );
        let _ =
            write!(
            body,
            "<tr{current}><td>{name}</td><td class=\"num\">{}</td><td class=\"wide\">{bar}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            stage.devices, stage.succeeded, stage.failed, stage.silent, stage.pending, stage.skipped
        );
    }
    body.push_str("</tbody></table>");

    if !info.gates.is_empty() {
        body.push_str("<h3>Gates</h3>");
        figures(body, &info.gates, "gates");
    }
    let _ = write!(body, "<h3>Decisions</h3>");
    if info.decisions.is_empty() {
        body.push_str("<p class=\"empty\">None yet.</p>");
    } else {
        body.push_str(
            "<table class=\"decisions\"><thead><tr><th>When</th><th>Action</th><th>By</th>\
             <th>Stage</th><th>Reason</th><th>Figures</th></tr></thead><tbody>",
        );
        for decision in info.decisions.iter().rev() {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td>\
                 <td class=\"reason\">{}</td><td>",
                time_cell(decision.at, now),
                badge(&decision.action),
                Esc(&decision.by),
                decision.stage_index,
                Esc(&decision.reason)
            );
            for figure in &decision.figures {
                let _ = write!(
                    body,
                    "<span class=\"chip{}\">{} {} / {}</span>",
                    if figure.breached { " breached" } else { "" },
                    Esc(&figure.gate),
                    value(figure.value),
                    figure.limit
                );
            }
            body.push_str("</td></tr>");
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("</section>");
}

fn value(value: Option<f64>) -> String {
    value.map_or_else(|| "—".to_owned(), |value| format!("{value:.3}"))
}

/// A table of gate figures against their limits.
fn figures(body: &mut String, gates: &[GateFigure], class: &str) {
    let _ = write!(
        body,
        "<table class=\"{class}\"><thead><tr><th>Gate</th><th>Value</th><th>Limit</th>\
         <th></th><th>From</th></tr></thead><tbody>"
    );
    for gate in gates {
        let verdict = match (gate.value, gate.breached) {
            (_, true) => badge("breached"),
            (None, false) => "<span class=\"badge plain\">no data</span>".to_owned(),
            (Some(_), false) => badge("ok"),
        };
        let _ = write!(
            body,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{verdict}</td>\
             <td>{}</td></tr>",
            Esc(&gate.gate),
            value(gate.value),
            gate.limit,
            Esc(&gate.detail)
        );
    }
    body.push_str("</tbody></table>");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(sequence: u64, model: &str, selector: &[&str]) -> RetirementInfo {
        RetirementInfo {
            sequence,
            model: model.to_owned(),
            selector: selector.iter().map(|label| (*label).to_owned()).collect(),
            created: 1_000,
            expires: 2_000,
            stored_at: 1_001,
            by: "ops".to_owned(),
        }
    }

    #[test]
    fn retirements_are_listed_newest_first_with_whom_they_take_a_model_from() {
        let mut body = String::new();
        retired(&mut body, &[], 1_500);
        assert!(body.is_empty(), "no section without a retirement");

        retired(
            &mut body,
            &[
                info(4, "spotter", &[]),
                info(7, "<b>vad</b>", &["site=lab", "line=3"]),
            ],
            1_500,
        );
        assert!(body.contains("id=\"retirements\""), "{body}");
        let newest = body.find("<td>7</td>").unwrap();
        let oldest = body.find("<td>4</td>").unwrap();
        assert!(newest < oldest, "{body}");
        assert!(body.contains("<td>every device</td>"), "{body}");
        assert!(body.contains("<td>site=lab,line=3</td>"), "{body}");
        assert!(body.contains("&lt;b&gt;vad&lt;/b&gt;"), "escaped: {body}");
    }
}
