//! When an alert fires and resolves: one step of an alert's state for each evaluation of its
//! rule, given whether the condition holds now. Pure, so the hold and the order of events are
//! tested on numbers rather than clocks.
//!
//! An alert (one rule, one key: a model version) is inactive, pending (the condition holds, not
//! yet for the rule's hold) or firing. Becoming firing sends a `firing` event; leaving firing
//! sends a `resolved` event. Both carry the time the alert started firing, which with the rule,
//! the key and the kind makes the event's idempotency key: an evaluation repeated (after a
//! restart, on another replica) proposes the same event under the same key.

/// Where an alert stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Inactive,
    Pending,
    Firing,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Inactive => "inactive",
            Phase::Pending => "pending",
            Phase::Firing => "firing",
        }
    }

    pub fn parse(text: &str) -> Option<Phase> {
        match text {
            "inactive" => Some(Phase::Inactive),
            "pending" => Some(Phase::Pending),
            "firing" => Some(Phase::Firing),
            _ => None,
        }
    }
}

/// An alert's state, as kept between evaluations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertState {
    pub phase: Phase,
    /// When the phase began.
    pub since: u64,
    /// Since when the condition has held without a break (pending and firing).
    pub held_since: Option<u64>,
    /// When the alert started firing; kept once inactive again, as the last firing's start.
    pub firing_since: Option<u64>,
}

/// What an evaluation tells the receivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Firing,
    Resolved,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Firing => "firing",
            EventKind::Resolved => "resolved",
        }
    }
}

/// An event to send: its kind, when the alert started firing, and (resolved) when it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub starts_at: u64,
    pub ends_at: Option<u64>,
}

/// The outcome of one evaluation: the state to keep (None: unchanged) and the event to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub next: Option<AlertState>,
    pub event: Option<Event>,
}

/// One evaluation at `now`: `holds` is whether the condition holds, `hold_secs` how long it must
/// before the alert fires. `previous` is None for an alert never evaluated.
pub fn step(previous: Option<&AlertState>, holds: bool, hold_secs: u64, now: u64) -> Step {
    let unchanged = Step {
        next: None,
        event: None,
    };
    let phase = previous.map_or(Phase::Inactive, |state| state.phase);
    let last_firing = previous.and_then(|state| state.firing_since);
    match (phase, holds) {
        (Phase::Inactive, false) | (Phase::Firing, true) => unchanged,
        (Phase::Inactive, true) if hold_secs == 0 => fire(now, now),
        (Phase::Inactive, true) => Step {
            next: Some(AlertState {
                phase: Phase::Pending,
                since: now,
                held_since: Some(now),
                firing_since: last_firing,
            }),
            event: None,
        },
        (Phase::Pending, true) => {
            let held_since = previous.and_then(|state| state.held_since).unwrap_or(now);
            if now.saturating_sub(held_since) >= hold_secs {
                fire(held_since, now)
            } else {
                unchanged
            }
        }
        (Phase::Pending, false) => Step {
            next: Some(AlertState {
                phase: Phase::Inactive,
                since: now,
                held_since: None,
                firing_since: last_firing,
            }),
            event: None,
        },
        (Phase::Firing, false) => {
            let starts_at = last_firing.unwrap_or(now);
            Step {
                next: Some(AlertState {
                    phase: Phase::Inactive,
                    since: now,
                    held_since: None,
                    firing_since: Some(starts_at),
                }),
                event: Some(Event {
                    kind: EventKind::Resolved,
                    starts_at,
                    ends_at: Some(now),
                }),
            }
        }
    }
}

fn fire(held_since: u64, now: u64) -> Step {
    Step {
        next: Some(AlertState {
            phase: Phase::Firing,
            since: now,
            held_since: Some(held_since),
            firing_since: Some(now),
        }),
        event: Some(Event {
            kind: EventKind::Firing,
            starts_at: now,
            ends_at: None,
        }),
    }
}

/// The idempotency key of an event: the same rule, alert key, firing start and kind always
/// give the same key, and any two events differ in one of them.
pub fn idempotency_key(rule: &str, alert_key: &str, event: &Event) -> String {
    format!(
        "outpost-{rule}-{}-{}-{}",
        alert_key.replace('@', "-v"),
        event.starts_at,
        event.kind.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `holds` at the given times through `step` and returns the events with their times.
    fn run(hold_secs: u64, evaluations: &[(u64, bool)]) -> Vec<(u64, Event)> {
        let mut state = None;
        let mut events = Vec::new();
        for &(now, holds) in evaluations {
            let step = step(state.as_ref(), holds, hold_secs, now);
            if let Some(next) = step.next {
                state = Some(next);
            }
            if let Some(event) = step.event {
                events.push((now, event));
            }
        }
        events
    }

    #[test]
    fn without_a_hold_an_alert_fires_at_once_and_resolves_once() {
        let events = run(
            0,
            &[
                (10, false),
                (20, true),
                (30, true),
                (40, false),
                (50, false),
            ],
        );
        assert_eq!(
            events,
            vec![
                (
                    20,
                    Event {
                        kind: EventKind::Firing,
                        starts_at: 20,
                        ends_at: None
                    }
                ),
                (
                    40,
                    Event {
                        kind: EventKind::Resolved,
                        starts_at: 20,
                        ends_at: Some(40)
                    }
                ),
            ]
        );
    }

    #[test]
    fn a_hold_fires_only_once_the_condition_held_that_long() {
        // Held 100..160 (breaks before 300 s), then from 200 on: fires at 500.
        let events = run(
            300,
            &[
                (100, true),
                (160, true),
                (170, false),
                (200, true),
                (499, true),
                (500, true),
            ],
        );
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].0, 500);
        assert_eq!(events[0].1.kind, EventKind::Firing);
    }

    #[test]
    fn a_pending_alert_that_stops_holding_sends_nothing() {
        assert!(run(60, &[(0, true), (30, false), (100, false)]).is_empty());
    }

    #[test]
    fn repeating_an_evaluation_proposes_the_same_event_key() {
        let firing = step(None, true, 0, 77).event.unwrap();
        let again = step(None, true, 0, 77).event.unwrap();
        assert_eq!(
            idempotency_key("r", "demo@1", &firing),
            idempotency_key("r", "demo@1", &again)
        );
        assert_eq!(
            idempotency_key("r", "demo@1", &firing),
            "outpost-r-demo-v1-77-firing"
        );
        let state = step(None, true, 0, 77).next.unwrap();
        let resolved = step(Some(&state), false, 0, 90).event.unwrap();
        assert_eq!(
            idempotency_key("r", "demo@1", &resolved),
            "outpost-r-demo-v1-77-resolved"
        );
    }
}
