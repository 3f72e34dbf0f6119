//! The caps of a runtime report: what `RuntimeReport::validate` refuses, naming the entry, and
//! that a report at every cap at once still fits its frame, so an agent never builds a valid
//! report it cannot send.

mod samples;

use outpost_protocol::device::{
    ModelRuntime, RuntimeKind, RuntimeReport, RuntimeReportError, MAX_DEVICE_MODELS,
    MAX_RUNTIME_NOTE, MAX_RUNTIME_PROVIDERS, MAX_RUNTIME_TEXT,
};
use outpost_protocol::name::MAX_MODEL_NAME;
use outpost_protocol::{decode, encode, Message, NameError};

use samples::*;

/// The sample report with its second entry (`keyword-spotter`) changed by `change`.
fn with_second(change: impl FnOnce(&mut ModelRuntime)) -> RuntimeReport {
    let mut report = runtime_report();
    change(&mut report.models[1]);
    report
}

/// An entry with every field at its cap: the `index`-th of a full report, its name padded to
/// the longest model name.
fn maximal_entry(index: usize) -> ModelRuntime {
    let name = format!("{index:0>width$}", width = MAX_MODEL_NAME);
    ModelRuntime {
        name,
        version: u64::MAX,
        runtime: RuntimeKind::OnnxRuntime,
        runtime_version: "v".repeat(MAX_RUNTIME_TEXT),
        providers: vec!["p".repeat(MAX_RUNTIME_TEXT); MAX_RUNTIME_PROVIDERS],
        fallback: Some("f".repeat(MAX_RUNTIME_NOTE)),
    }
}

#[test]
fn a_report_at_every_cap_fits_its_frame() {
    let report = RuntimeReport {
        models: (0..MAX_DEVICE_MODELS).map(maximal_entry).collect(),
        at: u64::MAX,
    };
    assert_eq!(report.validate(), Ok(()));
    let frame = encode(&report).expect("a report at every cap encodes");
    assert!(
        frame.len() <= RuntimeReport::MAX_FRAME,
        "{} bytes, the cap is {}",
        frame.len(),
        RuntimeReport::MAX_FRAME
    );
    assert_eq!(decode::<RuntimeReport>(&frame), Ok(report));
}

#[test]
fn the_sample_and_an_empty_report_are_valid() {
    assert_eq!(runtime_report().validate(), Ok(()));
    let empty = RuntimeReport {
        models: Vec::new(),
        at: NOW,
    };
    assert_eq!(empty.validate(), Ok(()));
    // Exactly at each cap is still allowed.
    assert_eq!(
        with_second(|entry| *entry = maximal_entry(1)).validate(),
        Ok(())
    );
}

#[test]
fn every_broken_cap_is_refused_naming_its_entry() {
    let over_text = "x".repeat(MAX_RUNTIME_TEXT + 1);
    let cases: Vec<(RuntimeReport, RuntimeReportError, &str)> = vec![
        (
            RuntimeReport {
                models: (0..=MAX_DEVICE_MODELS).map(maximal_entry).collect(),
                at: NOW,
            },
            RuntimeReportError::TooManyModels { count: 17 },
            "17 models, at most 16",
        ),
        (
            with_second(|entry| entry.name = String::new()),
            RuntimeReportError::Name {
                index: 1,
                source: NameError::Empty,
            },
            "model entry 1: name: name is empty",
        ),
        (
            with_second(|entry| entry.name = "m".repeat(MAX_MODEL_NAME + 1)),
            RuntimeReportError::Name {
                index: 1,
                source: NameError::TooLong { len: 129, max: 128 },
            },
            "model entry 1: name: name is 129 bytes, over the 128-byte limit",
        ),
        (
            with_second(|entry| entry.name = "../detector".to_owned()),
            RuntimeReportError::Name {
                index: 1,
                source: NameError::PathSeparator,
            },
            "model entry 1: name: name contains a path separator",
        ),
        (
            with_second(|entry| entry.name = "detector".to_owned()),
            RuntimeReportError::Duplicate {
                model: "detector".to_owned(),
            },
            "model \"detector\" has two entries: one entry per model",
        ),
        (
            with_second(|entry| entry.runtime_version = over_text.clone()),
            RuntimeReportError::RuntimeVersionTooLong {
                model: "keyword-spotter".to_owned(),
                len: 65,
            },
            "model \"keyword-spotter\": runtime version is 65 bytes, over the 64-byte limit",
        ),
        (
            with_second(|entry| {
                entry.providers = vec!["CPUExecutionProvider".to_owned(); MAX_RUNTIME_PROVIDERS + 1]
            }),
            RuntimeReportError::TooManyProviders {
                model: "keyword-spotter".to_owned(),
                count: 9,
            },
            "model \"keyword-spotter\": 9 execution providers, at most 8",
        ),
        (
            with_second(|entry| {
                entry.providers = vec!["CPUExecutionProvider".to_owned(), over_text.clone()]
            }),
            RuntimeReportError::ProviderTooLong {
                model: "keyword-spotter".to_owned(),
                index: 1,
                len: 65,
            },
            "model \"keyword-spotter\": execution provider 1 is 65 bytes, over the 64-byte limit",
        ),
        (
            with_second(|entry| entry.fallback = Some("y".repeat(MAX_RUNTIME_NOTE + 1))),
            RuntimeReportError::FallbackTooLong {
                model: "keyword-spotter".to_owned(),
                len: 513,
            },
            "model \"keyword-spotter\": fallback reason is 513 bytes, over the 512-byte limit",
        ),
    ];
    for (report, error, message) in cases {
        assert_eq!(report.validate(), Err(error.clone()), "{message}");
        assert_eq!(error.to_string(), message);
        // Each of them still travels: the frame cap is not what refuses it.
        let frame = encode(&report).expect("a refused report still fits its frame");
        assert_eq!(decode::<RuntimeReport>(&frame).as_ref(), Ok(&report));
    }
}
