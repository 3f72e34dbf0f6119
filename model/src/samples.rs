//! How a tensor holds samples, for everything that reads a model's inputs and outputs one sample
//! at a time: reference data for `profile` and `validation make` (one row per sample), and drift
//! features on the device.
//!
//! Exported models declare their batch in three ways, and all three are read the same way:
//! - a batch axis first (`[N, 2048]`): any number of samples per request;
//! - a fixed first axis of 1 (`[1, 2048]`, a model exported with batch 1): one sample per
//!   request, held by that axis;
//! - no batch axis at all (`[512]`, or a scalar `[]`): the whole tensor is one sample.
//!
//! A batch axis anywhere but first (`[2, N, 128]`, a recurrent state) has no rows to read here.

use outpost_protocol::trust::{Dim, TensorSpec};

/// How a tensor's samples lie in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A batch axis first: a request holds any number of samples.
    Rows,
    /// A fixed first axis of 1: a request holds one sample, in that axis.
    Single,
    /// No batch axis: the whole tensor is one sample.
    Whole,
}

/// A tensor's [`Layout`] and the shape of one of its samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Samples {
    pub layout: Layout,
    /// The fixed sizes of one sample's axes.
    pub sample: Vec<u64>,
}

impl Samples {
    /// How `spec` holds samples, or why it cannot be read one sample at a time.
    pub fn of(spec: &TensorSpec) -> Result<Samples, String> {
        let batch_axes: Vec<usize> = spec
            .shape
            .iter()
            .enumerate()
            .filter(|(_, dim)| matches!(dim, Dim::Batch))
            .map(|(axis, _)| axis)
            .collect();
        let fixed = |dims: &[Dim]| {
            dims.iter()
                .filter_map(|dim| match dim {
                    Dim::Fixed(size) => Some(*size),
                    Dim::Batch => None,
                })
                .collect::<Vec<u64>>()
        };
        match (batch_axes.as_slice(), spec.shape.first()) {
            ([0], _) => Ok(Samples {
                layout: Layout::Rows,
                sample: fixed(&spec.shape[1..]),
            }),
            ([], Some(Dim::Fixed(1))) => Ok(Samples {
                layout: Layout::Single,
                sample: fixed(&spec.shape[1..]),
            }),
            ([], _) => Ok(Samples {
                layout: Layout::Whole,
                sample: fixed(&spec.shape),
            }),
            ([axis], _) => Err(format!(
                "tensor {:?} has its batch axis at position {axis}, not first, so its samples \
                 are not rows",
                spec.name
            )),
            _ => Err(format!(
                "tensor {:?} has {} batch axes; at most one, first, holds samples",
                spec.name,
                batch_axes.len()
            )),
        }
    }

    /// Samples a request may hold: any number, or exactly one.
    pub fn per_request(&self) -> Option<u64> {
        match self.layout {
            Layout::Rows => None,
            Layout::Single | Layout::Whole => Some(1),
        }
    }

    /// The shape of a request tensor of `rows` samples; `None` when this tensor holds one sample
    /// a request and `rows` is not 1.
    pub fn request_shape(&self, rows: u64) -> Option<Vec<u64>> {
        let lead = match self.layout {
            Layout::Rows => Some(rows),
            Layout::Single if rows == 1 => Some(1),
            Layout::Whole if rows == 1 => None,
            Layout::Single | Layout::Whole => return None,
        };
        Some(
            lead.into_iter()
                .chain(self.sample.iter().copied())
                .collect(),
        )
    }

    /// The sample's shape as the spec would write it, for messages: `[N, 2048]`, `[1, 2048]`,
    /// `[512]`.
    pub fn describe(&self) -> String {
        let lead = match self.layout {
            Layout::Rows => Some("N".to_owned()),
            Layout::Single => Some("1".to_owned()),
            Layout::Whole => None,
        };
        let dims: Vec<String> = lead
            .into_iter()
            .chain(self.sample.iter().map(u64::to_string))
            .collect();
        format!("[{}]", dims.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use outpost_protocol::trust::DType;

    use super::*;

    fn spec(shape: Vec<Dim>) -> TensorSpec {
        TensorSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape,
        }
    }

    #[test]
    fn every_way_a_model_declares_its_batch() {
        use Dim::{Batch, Fixed};
        let rows = Samples::of(&spec(vec![Batch, Fixed(2048)])).unwrap();
        assert_eq!(
            (rows.layout, rows.sample.as_slice()),
            (Layout::Rows, &[2048][..])
        );
        assert_eq!(rows.request_shape(3), Some(vec![3, 2048]));
        assert_eq!(rows.per_request(), None);
        let single = Samples::of(&spec(vec![Fixed(1), Fixed(2048)])).unwrap();
        assert_eq!(single.layout, Layout::Single);
        assert_eq!(single.request_shape(1), Some(vec![1, 2048]));
        assert_eq!(single.request_shape(2), None);
        assert_eq!(single.describe(), "[1, 2048]");
        let whole = Samples::of(&spec(vec![Fixed(512)])).unwrap();
        assert_eq!(whole.layout, Layout::Whole);
        assert_eq!(whole.request_shape(1), Some(vec![512]));
        let scalar = Samples::of(&spec(vec![])).unwrap();
        assert_eq!(scalar.request_shape(1), Some(vec![]));
        assert_eq!(scalar.describe(), "[]");
        let error = Samples::of(&spec(vec![Fixed(2), Batch, Fixed(128)])).unwrap_err();
        assert!(error.contains("batch axis at position 1"), "{error}");
        let error = Samples::of(&spec(vec![Batch, Batch])).unwrap_err();
        assert!(error.contains("2 batch axes"), "{error}");
    }
}
