//! Drift on the device: reading each profile feature's values out of a request and its answer,
//! and building a reference profile from a dataset.
//!
//! One [`Extractor`] serves both ends, so the bins a device fills are exactly the ones the profile
//! was made with: `outpost-hub profile` runs a model over a reference dataset and
//! [`build_profile`] summarises what the extractor reads; on the device, every served request's
//! values go into the window's [`DriftSummary`]: read on the request's path
//! ([`Extractor::extract`]) and added later, off it ([`fold`]), or both at once
//! ([`Extractor::observe`]).
//!
//! What a feature is (see [`FeatureSource`]):
//! - a tabular tensor `[N, F]` (or `[N]`) gives one feature per column;
//! - an image-like tensor `[N, C, ...]` gives two per channel: the mean and the standard
//!   deviation of that channel in each sample;
//! - a wide tensor (over [`MAX_COLUMN_FEATURES`] columns, or [`MAX_CHANNELS`] channels) gives two
//!   per span of columns or channels, [`WIDE_SPANS`] spans at most: so a profile, the summaries a
//!   device sends and the hub's report stay bounded whatever the width;
//! - a class output gives class counts and a top-1 confidence histogram ([`ClassSource`]).

use std::collections::BTreeSet;

use outpost_protocol::device::Tensor;
use outpost_protocol::drift::{
    ClassProfile, ClassSource, ClassSummary, DriftSummary, FeatureSource, FeatureSummary,
    NumericProfile, Profile, TensorSide, Thresholds,
};
use outpost_protocol::trust::{DType, TensorSpec};

use crate::inference::{InferenceError, LoadedModel};
use crate::samples::{Layout, Samples};

/// Most distinct labels a label output may have in a profile.
pub const MAX_CLASSES: usize = 1024;

/// Widest `[N, F]` tensor whose columns are each a feature; a wider one is summarised as
/// [`WIDE_SPANS`] spans of columns.
pub const MAX_COLUMN_FEATURES: usize = 32;

/// Most channels of a `[N, C, ...]` tensor that are each summarised (a mean and a standard
/// deviation each); with more, the tensor is summarised as [`WIDE_SPANS`] spans of channels.
pub const MAX_CHANNELS: usize = 16;

/// Spans a wide tensor is cut into, each summarised by its mean and standard deviation per
/// sample: so no tensor gives a profile more than 32 numeric features, whatever its width.
pub const WIDE_SPANS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("profile feature {feature:?}: {reason}")]
    Feature { feature: String, reason: String },
    #[error("profile does not fit the model: {0}")]
    Mismatch(String),
    #[error("reference data: {0}")]
    Data(String),
    #[error(transparent)]
    Inference(#[from] InferenceError),
}

/// One thing to read out of a tensor, for a numeric feature or a class output.
#[derive(Debug, Clone)]
enum Read {
    /// Column `index` of rows `width` wide.
    Column { index: usize, width: usize },
    /// The `len` elements from `start` of each sample `sample` elements long: one channel, or a
    /// span of columns or channels; their mean, or their standard deviation when `std`.
    Span {
        start: usize,
        len: usize,
        sample: usize,
        std: bool,
    },
    /// argmax over rows `width` wide.
    Argmax { width: usize },
    /// One integer label per row.
    Label,
}

/// Where each profile entry is read from, resolved against the model's specs once.
#[derive(Debug, Clone)]
struct Binding {
    side: TensorSide,
    tensor: String,
    read: Read,
}

/// Reads a profile's features out of requests and answers of one model.
#[derive(Debug, Clone)]
pub struct Extractor {
    features: Vec<Binding>,
    classes: Vec<Binding>,
    /// The distinct tensors the bindings read; `slots[i]` is the index here of the tensor of
    /// binding `i` (features, then classes), so that consecutive bindings of one tensor share a
    /// lookup by name.
    tensors: Vec<(TensorSide, String)>,
    slots: Vec<usize>,
}

/// What one value read out of a request or answer is for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Observation {
    Feature {
        index: usize,
        value: f64,
    },
    Class {
        index: usize,
        class: i64,
        confidence: Option<f32>,
    },
}

fn spec_of<'a>(
    specs: &'a [TensorSpec],
    side: TensorSide,
    name: &str,
) -> Result<&'a TensorSpec, String> {
    let side_name = match side {
        TensorSide::Input => "input",
        TensorSide::Output => "output",
    };
    specs
        .iter()
        .find(|spec| spec.name == name)
        .ok_or_else(|| format!("the model has no {side_name} {name:?}"))
}

/// The shape of one sample of a tensor (see [`Samples`]): the axes after a batch axis or a fixed
/// batch of 1, or the whole tensor when it has no batch axis.
fn row_shape(spec: &TensorSpec) -> Result<Vec<usize>, String> {
    Samples::of(spec)?
        .sample
        .iter()
        .map(|size| {
            usize::try_from(*size)
                .map_err(|_| format!("tensor {:?} has an axis too large", spec.name))
        })
        .collect()
}

fn resolve_feature(
    source: &FeatureSource,
    side: TensorSide,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
) -> Result<Binding, String> {
    let specs = match side {
        TensorSide::Input => inputs,
        TensorSide::Output => outputs,
    };
    let (tensor, read) = match source {
        FeatureSource::Column { tensor, index } => {
            let row = row_shape(spec_of(specs, side, tensor)?)?;
            let width = match row.as_slice() {
                [] => 1,
                [width] => *width,
                _ => {
                    return Err(format!(
                        "column features need a [N] or [N, F] tensor, {tensor:?} has rank {}",
                        row.len() + 1
                    ))
                }
            };
            let index = *index as usize;
            if index >= width {
                return Err(format!(
                    "column {index} is past the {width} columns of {tensor:?}"
                ));
            }
            (tensor, Read::Column { index, width })
        }
        FeatureSource::ChannelMean { tensor, channel }
        | FeatureSource::ChannelStd { tensor, channel } => {
            let row = row_shape(spec_of(specs, side, tensor)?)?;
            let [channels, rest @ ..] = row.as_slice() else {
                return Err(format!(
                    "channel features need a [N, C, ...] tensor, {tensor:?} is [N]"
                ));
            };
            if rest.is_empty() {
                return Err(format!(
                    "channel features need a [N, C, ...] tensor, {tensor:?} is [N, C]"
                ));
            }
            let plane = rest.iter().product::<usize>();
            let channel = *channel as usize;
            if channel >= *channels {
                return Err(format!(
                    "channel {channel} is past the {channels} channels of {tensor:?}"
                ));
            }
            let read = Read::Span {
                start: channel * plane,
                len: plane,
                sample: channels * plane,
                std: matches!(source, FeatureSource::ChannelStd { .. }),
            };
            (tensor, read)
        }
        FeatureSource::SpanMean { tensor, start, len }
        | FeatureSource::SpanStd { tensor, start, len } => {
            let row = row_shape(spec_of(specs, side, tensor)?)?;
            let sample = row.iter().product::<usize>();
            let (start, len) = (*start as usize, *len as usize);
            if len == 0 || start.saturating_add(len) > sample {
                return Err(format!(
                    "span {start}..{} is not within the {sample} elements of each sample of {tensor:?}",
                    start.saturating_add(len)
                ));
            }
            let read = Read::Span {
                start,
                len,
                sample,
                std: matches!(source, FeatureSource::SpanStd { .. }),
            };
            (tensor, read)
        }
    };
    Ok(Binding {
        side,
        tensor: tensor.clone(),
        read,
    })
}

fn resolve_class(source: &ClassSource, outputs: &[TensorSpec]) -> Result<Binding, String> {
    let (tensor, read) = match source {
        ClassSource::Argmax { tensor } => {
            let row = row_shape(spec_of(outputs, TensorSide::Output, tensor)?)?;
            match row.as_slice() {
                [width] if *width >= 1 => (tensor, Read::Argmax { width: *width }),
                _ => {
                    return Err(format!(
                        "argmax classes need a [N, K] output, {tensor:?} has another shape"
                    ))
                }
            }
        }
        ClassSource::Label { tensor } => {
            let row = row_shape(spec_of(outputs, TensorSide::Output, tensor)?)?;
            match row.as_slice() {
                [] | [1] => (tensor, Read::Label),
                _ => {
                    return Err(format!(
                        "label classes need a [N] or [N, 1] output, {tensor:?} has another shape"
                    ))
                }
            }
        }
    };
    Ok(Binding {
        side: TensorSide::Output,
        tensor: tensor.clone(),
        read,
    })
}

impl Extractor {
    /// Resolves every feature and class of `profile` against the model's input and output specs.
    pub fn new(
        profile: &Profile,
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
    ) -> Result<Extractor, ProfileError> {
        let features: Vec<Binding> = profile
            .features
            .iter()
            .map(|feature| {
                resolve_feature(&feature.source, feature.side, inputs, outputs).map_err(|reason| {
                    ProfileError::Feature {
                        feature: feature.name.clone(),
                        reason,
                    }
                })
            })
            .collect::<Result<_, _>>()?;
        let classes: Vec<Binding> = profile
            .classes
            .iter()
            .map(|class| {
                resolve_class(&class.source, outputs).map_err(|reason| ProfileError::Feature {
                    feature: class.name.clone(),
                    reason,
                })
            })
            .collect::<Result<_, _>>()?;
        let mut tensors: Vec<(TensorSide, String)> = Vec::new();
        let slots = features
            .iter()
            .chain(&classes)
            .map(|binding| {
                let tensor = (binding.side, binding.tensor.clone());
                tensors
                    .iter()
                    .position(|known| *known == tensor)
                    .unwrap_or_else(|| {
                        tensors.push(tensor);
                        tensors.len() - 1
                    })
            })
            .collect();
        Ok(Extractor {
            features,
            classes,
            tensors,
            slots,
        })
    }

    /// The tensors the profile's features and classes read, each once: their side and name.
    pub fn tensors(&self) -> impl ExactSizeIterator<Item = (TensorSide, &str)> + '_ {
        self.tensors
            .iter()
            .map(|(side, name)| (*side, name.as_str()))
    }

    /// The tensors of one request and its answer that [`Extractor::for_each`] reads, in the order
    /// of [`Extractor::tensors`], `None` where the request has no such tensor. Copies of these
    /// alone, with their names, give `for_each` the same values as the whole request: a caller
    /// may keep them to read the values later.
    pub fn tensors_in<'a>(
        &'a self,
        inputs: &'a [Tensor],
        outputs: &'a [Tensor],
    ) -> impl Iterator<Item = Option<&'a Tensor>> + 'a {
        self.tensors
            .iter()
            .map(move |(side, name)| find(*side, name, inputs, outputs))
    }

    /// Calls `sink` with every value of every feature and class in one request and its answer.
    /// Tensors the model did not see (a wrong name) are skipped; the caller passes only requests
    /// that ran.
    pub fn for_each(
        &self,
        inputs: &[Tensor],
        outputs: &[Tensor],
        mut sink: impl FnMut(Observation),
    ) {
        // Bindings of one tensor mostly follow each other, so a tensor is looked up by name again
        // only when a binding reads another tensor than the one before it; nothing is allocated
        // per request.
        let mut last: Option<(usize, Option<&Tensor>)> = None;
        let mut tensor_of = |binding: usize| {
            let slot = *self.slots.get(binding)?;
            match last {
                Some((known, tensor)) if known == slot => tensor,
                _ => {
                    let (side, name) = self.tensors.get(slot)?;
                    let tensor = find(*side, name, inputs, outputs);
                    last = Some((slot, tensor));
                    tensor
                }
            }
        };
        for (index, binding) in self.features.iter().enumerate() {
            let Some(tensor) = tensor_of(index) else {
                continue;
            };
            read_numeric(&binding.read, tensor, |value| {
                sink(Observation::Feature { index, value });
            });
        }
        for (index, binding) in self.classes.iter().enumerate() {
            let Some(tensor) = tensor_of(self.features.len() + index) else {
                continue;
            };
            read_classes(&binding.read, tensor, |class, confidence| {
                sink(Observation::Class {
                    index,
                    class,
                    confidence,
                });
            });
        }
    }

    /// Appends every value of one request and its answer to `values`, in [`Extractor::for_each`]'s
    /// order: the cheap half of [`Extractor::observe`], for a caller that adds them to the summary
    /// later, off the request's path, with [`fold`].
    pub fn extract(&self, inputs: &[Tensor], outputs: &[Tensor], values: &mut Vec<Observation>) {
        self.for_each(inputs, outputs, |observation| values.push(observation));
    }

    /// Adds one served request to `summary`, whose features and classes follow `profile`.
    pub fn observe(
        &self,
        profile: &Profile,
        summary: &mut DriftSummary,
        inputs: &[Tensor],
        outputs: &[Tensor],
    ) {
        self.for_each(inputs, outputs, |observation| {
            observation.add_to(profile, summary);
        });
    }
}

impl Observation {
    /// Adds this value to `summary`, whose features and classes follow `profile`; a value of a
    /// feature or class the profile lacks is ignored.
    #[inline]
    pub fn add_to(self, profile: &Profile, summary: &mut DriftSummary) {
        match self {
            Observation::Feature { index, value } => {
                if let (Some(feature), Some(summary)) =
                    (profile.features.get(index), summary.features.get_mut(index))
                {
                    summary.observe(value, &feature.edges);
                }
            }
            Observation::Class {
                index,
                class,
                confidence,
            } => {
                if let (Some(profile), Some(summary)) =
                    (profile.classes.get(index), summary.classes.get_mut(index))
                {
                    summary.observe(class, confidence, &profile.classes);
                }
            }
        }
    }
}

/// Adds values [`Extractor::extract`] read to `summary`, whose features and classes follow
/// `profile`, one by one in order: the summary comes out bit for bit as [`Extractor::observe`]
/// makes it on the same requests in the same order (each value takes the same Welford step).
pub fn fold(profile: &Profile, summary: &mut DriftSummary, values: &[Observation]) {
    for observation in values {
        observation.add_to(profile, summary);
    }
}

fn find<'a>(
    side: TensorSide,
    name: &str,
    inputs: &'a [Tensor],
    outputs: &'a [Tensor],
) -> Option<&'a Tensor> {
    let tensors = match side {
        TensorSide::Input => inputs,
        TensorSide::Output => outputs,
    };
    tensors.iter().find(|tensor| tensor.name == name)
}

/// Element `index` of `tensor` as f64, or None past its end.
fn element(tensor: &Tensor, index: usize) -> Option<f64> {
    let size = tensor.dtype.size();
    let start = index.checked_mul(size)?;
    let bytes = tensor.data.get(start..start.checked_add(size)?)?;
    Some(match tensor.dtype {
        DType::F32 => f64::from(f32::from_le_bytes(bytes.try_into().ok()?)),
        DType::F64 => f64::from_le_bytes(bytes.try_into().ok()?),
        DType::I32 => f64::from(i32::from_le_bytes(bytes.try_into().ok()?)),
        DType::I64 => i64::from_le_bytes(bytes.try_into().ok()?) as f64,
        DType::U8 => f64::from(*bytes.first()?),
    })
}

fn element_count(tensor: &Tensor) -> usize {
    tensor.data.len() / tensor.dtype.size().max(1)
}

fn read_numeric(read: &Read, tensor: &Tensor, mut sink: impl FnMut(f64)) {
    let total = element_count(tensor);
    match *read {
        Read::Column { index, width } => {
            let mut at = index;
            while at < total {
                if let Some(value) = element(tensor, at) {
                    sink(value);
                }
                at += width;
            }
        }
        Read::Span {
            start,
            len,
            sample,
            std,
        } => {
            if sample == 0 {
                return;
            }
            for row in 0..total / sample {
                let (mean, deviation) = plane_moments(tensor, row * sample + start, len, std);
                sink(if std { deviation } else { mean });
            }
        }
        Read::Argmax { .. } | Read::Label => {}
    }
}

/// Independent running sums in [`lane_sum`]: they break the chain of dependent additions, and
/// the compiler turns them into vector code.
const LANES: usize = 8;

/// The mean and (when `want_std`) the population standard deviation of the `len` elements from
/// `start`: a sum, then the squared deviations from the mean, in two passes that each make one
/// straight run over the bytes. An element that is missing or NaN makes both NaN.
fn plane_moments(tensor: &Tensor, start: usize, len: usize, want_std: bool) -> (f64, f64) {
    let count = len as f64;
    if tensor.dtype == DType::F32 {
        let span = start
            .checked_add(len)
            .and_then(|end| Some(start.checked_mul(4)?..end.checked_mul(4)?));
        let Some(bytes) = span.and_then(|span| tensor.data.get(span)) else {
            return (f64::NAN, f64::NAN);
        };
        let value = |b: &[u8]| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let mean = lane_sum(bytes, value) / count;
        if !want_std {
            return (mean, f64::NAN);
        }
        let m2 = lane_sum(bytes, |b| (value(b) - mean).powi(2));
        return (mean, (m2 / count).sqrt());
    }
    let value = |at: usize| element(tensor, at).unwrap_or(f64::NAN);
    let mean = (start..start + len).map(value).sum::<f64>() / count;
    if !want_std {
        return (mean, f64::NAN);
    }
    let m2 = (start..start + len)
        .map(|at| (value(at) - mean).powi(2))
        .sum::<f64>();
    (mean, (m2 / count).sqrt())
}

/// The sum of `f` over the little-endian f32 elements of `bytes`.
fn lane_sum(bytes: &[u8], f: impl Fn(&[u8]) -> f64) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let mut blocks = bytes.chunks_exact(4 * LANES);
    for block in &mut blocks {
        for (lane, element) in lanes.iter_mut().zip(block.chunks_exact(4)) {
            *lane += f(element);
        }
    }
    let tail: f64 = blocks.remainder().chunks_exact(4).map(f).sum();
    lanes.iter().sum::<f64>() + tail
}

fn read_classes(read: &Read, tensor: &Tensor, mut sink: impl FnMut(i64, Option<f32>)) {
    let total = element_count(tensor);
    match *read {
        Read::Argmax { width } => {
            for row in 0..total / width.max(1) {
                let mut best: Option<(usize, f64)> = None;
                for class in 0..width {
                    let Some(value) = element(tensor, row * width + class) else {
                        continue;
                    };
                    if value.is_nan() {
                        continue;
                    }
                    if best.is_none_or(|(_, top)| value > top) {
                        best = Some((class, value));
                    }
                }
                // A row of NaN has no top class: it counts as unseen.
                match best {
                    Some((class, top)) => sink(class as i64, Some(top.clamp(0.0, 1.0) as f32)),
                    None => sink(-1, None),
                }
            }
        }
        Read::Label => {
            for at in 0..total {
                if let Some(value) = element(tensor, at) {
                    // Non-integral labels cannot be a reference class.
                    let class = if value.fract() == 0.0 && value.abs() < 9.0e15 {
                        value as i64
                    } else {
                        i64::MIN
                    };
                    sink(class, None);
                }
            }
        }
        _ => {}
    }
}

/// Choices for [`build_profile`].
#[derive(Debug, Clone, Default)]
pub struct ProfileOptions {
    /// Outputs to treat as classes (argmax of a `[N, K]` output, or a `[N]` label). Integer
    /// outputs of shape `[N]` or `[N, 1]` are labels without being named.
    pub class_outputs: Vec<String>,
    /// Display names of the columns of each input, in order (from a CSV header).
    pub column_names: Vec<(String, Vec<String>)>,
    /// Null (missing) counts per column of each input; those entries are NaN in the data.
    pub null_counts: Vec<(String, Vec<u64>)>,
    pub thresholds: Thresholds,
    /// Rows per model run; 0 means 256.
    pub batch_rows: usize,
}

/// A profile's entries before any data is seen: names and sources of its numeric features, and
/// of its class outputs.
type ProfilePlan = (
    Vec<(String, TensorSide, FeatureSource)>,
    Vec<(String, ClassSource)>,
);

/// The features and classes a profile of this model has, before any data is seen.
fn plan_profile(
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
    options: &ProfileOptions,
) -> Result<ProfilePlan, ProfileError> {
    let mut features = Vec::new();
    let mut classes = Vec::new();
    let mismatch = ProfileError::Mismatch;
    for (side, specs) in [(TensorSide::Input, inputs), (TensorSide::Output, outputs)] {
        for spec in specs {
            let row = match row_shape(spec) {
                Ok(row) => row,
                // An output with its batch axis elsewhere (a recurrent state, say) has no samples
                // to summarise; `unsummarised` names it.
                Err(_)
                    if side == TensorSide::Output
                        && !options.class_outputs.contains(&spec.name) =>
                {
                    continue
                }
                Err(reason) => return Err(mismatch(reason)),
            };
            let is_output = side == TensorSide::Output;
            let integer = !matches!(spec.dtype, DType::F32 | DType::F64);
            let named_class = is_output && options.class_outputs.contains(&spec.name);
            if named_class || (is_output && integer && matches!(row.as_slice(), [] | [1])) {
                let source = match row.as_slice() {
                    [] | [1] => ClassSource::Label {
                        tensor: spec.name.clone(),
                    },
                    _ => ClassSource::Argmax {
                        tensor: spec.name.clone(),
                    },
                };
                classes.push((spec.name.clone(), source));
                continue;
            }
            let names = options
                .column_names
                .iter()
                .find(|(tensor, _)| tensor == &spec.name)
                .map(|(_, names)| names.as_slice());
            match row.as_slice() {
                [] => features.push((
                    spec.name.clone(),
                    side,
                    FeatureSource::Column {
                        tensor: spec.name.clone(),
                        index: 0,
                    },
                )),
                [width] if *width <= MAX_COLUMN_FEATURES => {
                    for index in 0..*width {
                        let name = names
                            .and_then(|names| names.get(index))
                            .filter(|name| !name.is_empty())
                            .cloned()
                            .unwrap_or_else(|| format!("{}[{index}]", spec.name));
                        features.push((
                            name,
                            side,
                            FeatureSource::Column {
                                tensor: spec.name.clone(),
                                index: index as u32,
                            },
                        ));
                    }
                }
                [width] => features.extend(span_features(&spec.name, side, *width, 1)),
                [channels, ..] if *channels <= MAX_CHANNELS => {
                    for channel in 0..*channels as u32 {
                        let tensor = spec.name.clone();
                        features.push((
                            format!("{}.mean[{channel}]", spec.name),
                            side,
                            FeatureSource::ChannelMean {
                                tensor: tensor.clone(),
                                channel,
                            },
                        ));
                        features.push((
                            format!("{}.std[{channel}]", spec.name),
                            side,
                            FeatureSource::ChannelStd { tensor, channel },
                        ));
                    }
                }
                [channels, rest @ ..] => features.extend(span_features(
                    &spec.name,
                    side,
                    *channels,
                    rest.iter().product(),
                )),
            }
        }
    }
    if let Some(missing) = options
        .class_outputs
        .iter()
        .find(|name| !outputs.iter().any(|spec| &spec.name == *name))
    {
        return Err(ProfileError::Mismatch(format!(
            "--classes names {missing:?}, which is not an output of the model"
        )));
    }
    Ok((features, classes))
}

/// The features of a wide tensor: at most [`WIDE_SPANS`] spans of `units` columns or channels, each
/// `unit` elements of a sample, cut as evenly as whole units allow, each read as its mean and its
/// standard deviation. Named by the units they cover: `bytes.mean[0..128]`.
fn span_features(
    tensor: &str,
    side: TensorSide,
    units: usize,
    unit: usize,
) -> Vec<(String, TensorSide, FeatureSource)> {
    let per_span = units.div_ceil(WIDE_SPANS).max(1);
    let mut features = Vec::with_capacity(2 * WIDE_SPANS);
    let mut first = 0;
    while first < units {
        let end = (first + per_span).min(units);
        // A sample of more than u32::MAX elements cannot be planned; row_shape's caller refuses it
        // long before here, so saturating keeps the type honest without a panic path.
        let start = u32::try_from(first * unit).unwrap_or(u32::MAX);
        let len = u32::try_from((end - first) * unit).unwrap_or(u32::MAX);
        let source = |std| {
            let tensor = tensor.to_owned();
            if std {
                FeatureSource::SpanStd { tensor, start, len }
            } else {
                FeatureSource::SpanMean { tensor, start, len }
            }
        };
        features.push((
            format!("{tensor}.mean[{first}..{end}]"),
            side,
            source(false),
        ));
        features.push((format!("{tensor}.std[{first}..{end}]"), side, source(true)));
        first = end;
    }
    features
}

/// The outputs a profile leaves out, each with why: those whose batch axis is not first.
pub fn unsummarised(outputs: &[TensorSpec]) -> Vec<(String, String)> {
    outputs
        .iter()
        .filter_map(|spec| {
            Samples::of(spec)
                .err()
                .map(|reason| (spec.name.clone(), reason))
        })
        .collect()
}

/// Runs `model` over the reference `data` (one tensor per model input, each with one row per
/// sample, all with the same number of rows) and summarises every feature and class it reads, with quantile edges from the data.
pub fn build_profile(
    model: &LoadedModel,
    data: &[Tensor],
    options: &ProfileOptions,
) -> Result<Profile, ProfileError> {
    let (feature_plan, class_plan) = plan_profile(model.inputs(), model.outputs(), options)?;
    let rows = check_data(model.inputs(), data)?;
    // How each data tensor's rows become a request: a model that takes one sample a request (a
    // fixed batch of 1, or no batch axis) runs row by row.
    let samples = data
        .iter()
        .map(|tensor| {
            let spec = model
                .inputs()
                .iter()
                .find(|spec| spec.name == tensor.name)
                .ok_or_else(|| {
                    ProfileError::Data(format!("the model has no input {:?}", tensor.name))
                })?;
            Samples::of(spec).map_err(ProfileError::Mismatch)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let batch_rows = if samples.iter().any(|samples| samples.layout != Layout::Rows) {
        1
    } else if options.batch_rows == 0 {
        256
    } else {
        options.batch_rows
    };

    // A provisional profile only to resolve the extractor; edges and references come later.
    let provisional = Profile {
        features: feature_plan
            .iter()
            .map(|(name, side, source)| NumericProfile {
                name: name.clone(),
                side: *side,
                source: source.clone(),
                edges: vec![0.0, 1.0],
                reference: FeatureSummary::new(&[0.0, 1.0]),
            })
            .collect(),
        classes: class_plan
            .iter()
            .map(|(name, source)| ClassProfile {
                name: name.clone(),
                source: source.clone(),
                classes: Vec::new(),
                reference: ClassSummary::new(0),
            })
            .collect(),
        thresholds: options.thresholds.clone(),
    };
    let extractor = Extractor::new(&provisional, model.inputs(), model.outputs())?;

    let mut values: Vec<Vec<f64>> = vec![Vec::new(); feature_plan.len()];
    let mut labels: Vec<Vec<(i64, Option<f32>)>> = vec![Vec::new(); class_plan.len()];
    let mut start = 0;
    while start < rows {
        let end = (start + batch_rows).min(rows);
        let batch: Vec<Tensor> = data
            .iter()
            .zip(&samples)
            .map(|(tensor, samples)| {
                let mut slice = slice_rows(tensor, rows, start, end);
                if let Some(shape) = samples.request_shape((end - start) as u64) {
                    slice.shape = shape;
                }
                slice
            })
            .collect();
        let outputs = model.run(&batch)?;
        extractor.for_each(&batch, &outputs, |observation| match observation {
            Observation::Feature { index, value } => {
                if let Some(values) = values.get_mut(index) {
                    values.push(value);
                }
            }
            Observation::Class {
                index,
                class,
                confidence,
            } => {
                if let Some(labels) = labels.get_mut(index) {
                    labels.push((class, confidence));
                }
            }
        });
        start = end;
    }

    let mut features = Vec::with_capacity(feature_plan.len());
    for ((name, side, source), values) in feature_plan.into_iter().zip(values) {
        let mut feature = NumericProfile::from_values(&name, side, source, &values)
            .map_err(|error| ProfileError::Data(error.to_string()))?;
        let reference = &mut feature.reference;
        // Missing entries were fed to the model as NaN; the profile counts them as nulls.
        if let (FeatureSource::Column { tensor, index }, TensorSide::Input) =
            (&feature.source, feature.side)
        {
            let nulls = options
                .null_counts
                .iter()
                .find(|(name, _)| name == tensor)
                .and_then(|(_, counts)| counts.get(*index as usize))
                .copied()
                .unwrap_or(0)
                .min(reference.nan);
            reference.nan -= nulls;
            reference.null += nulls;
        }
        features.push(feature);
    }

    let mut classes = Vec::with_capacity(class_plan.len());
    for ((name, source), labels) in class_plan.into_iter().zip(labels) {
        let known: Vec<i64> = match &source {
            ClassSource::Argmax { tensor } => {
                let width = model
                    .outputs()
                    .iter()
                    .find(|spec| &spec.name == tensor)
                    .and_then(|spec| row_shape(spec).ok())
                    .and_then(|row| row.first().copied())
                    .unwrap_or(0);
                (0..width as i64).collect()
            }
            ClassSource::Label { .. } => {
                let seen: BTreeSet<i64> = labels
                    .iter()
                    .map(|(class, _)| *class)
                    .filter(|class| *class != i64::MIN)
                    .collect();
                if seen.len() > MAX_CLASSES {
                    return Err(ProfileError::Data(format!(
                        "output {name:?} has {} distinct labels, at most {MAX_CLASSES}",
                        seen.len()
                    )));
                }
                seen.into_iter().collect()
            }
        };
        let mut reference = ClassSummary::new(known.len());
        for (class, confidence) in &labels {
            reference.observe(*class, *confidence, &known);
        }
        classes.push(ClassProfile {
            name,
            source,
            classes: known,
            reference,
        });
    }
    Ok(Profile {
        features,
        classes,
        thresholds: options.thresholds.clone(),
    })
}

/// Checks the reference tensors against the model's inputs; returns the row count.
fn check_data(inputs: &[TensorSpec], data: &[Tensor]) -> Result<usize, ProfileError> {
    let mut rows = None;
    for spec in inputs {
        let tensor = data
            .iter()
            .find(|tensor| tensor.name == spec.name)
            .ok_or_else(|| ProfileError::Data(format!("no data for input {:?}", spec.name)))?;
        tensor
            .check()
            .map_err(|error| ProfileError::Data(error.to_string()))?;
        let n = tensor.shape.first().copied().unwrap_or(0);
        if n == 0 {
            return Err(ProfileError::Data(format!(
                "input {:?} has no rows",
                spec.name
            )));
        }
        match rows {
            None => rows = Some(n),
            Some(rows) if rows != n => {
                return Err(ProfileError::Data(format!(
                    "input {:?} has {n} rows, another input has {rows}",
                    spec.name
                )))
            }
            Some(_) => {}
        }
    }
    let rows = rows.ok_or_else(|| ProfileError::Data("the model has no inputs".to_owned()))?;
    usize::try_from(rows).map_err(|_| ProfileError::Data("too many rows".to_owned()))
}

/// Rows `start..end` of a tensor with `rows` rows.
fn slice_rows(tensor: &Tensor, rows: usize, start: usize, end: usize) -> Tensor {
    let row_bytes = tensor.data.len() / rows.max(1);
    let mut shape = tensor.shape.clone();
    if let Some(first) = shape.first_mut() {
        *first = (end - start) as u64;
    }
    Tensor {
        name: tensor.name.clone(),
        dtype: tensor.dtype,
        shape,
        data: tensor
            .data
            .get(start * row_bytes..end * row_bytes)
            .unwrap_or_default()
            .to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use outpost_protocol::trust::Dim;

    use super::*;

    fn tensor(dtype: DType, shape: &[u64], values: &[f64]) -> Tensor {
        let data = values
            .iter()
            .flat_map(|value| match dtype {
                DType::F32 => (*value as f32).to_le_bytes().to_vec(),
                DType::F64 => value.to_le_bytes().to_vec(),
                _ => unreachable!("only float tensors here"),
            })
            .collect();
        Tensor {
            name: "x".into(),
            dtype,
            shape: shape.to_vec(),
            data,
        }
    }

    fn channel_reads(tensor: &Tensor, channels: usize, plane: usize) -> Vec<(f64, f64)> {
        (0..channels)
            .map(|channel| {
                let mut got = [Vec::new(), Vec::new()];
                let span = |std| Read::Span {
                    start: channel * plane,
                    len: plane,
                    sample: channels * plane,
                    std,
                };
                let (mean, std) = (span(false), span(true));
                read_numeric(&mean, tensor, |value| got[0].push(value));
                read_numeric(&std, tensor, |value| got[1].push(value));
                assert_eq!(got[0].len(), 2, "one mean per sample");
                assert_eq!(got[1].len(), 2, "one std per sample");
                (got[0][1], got[1][1])
            })
            .collect()
    }

    fn spec(name: &str, width: u64) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![Dim::Batch, Dim::Fixed(width)],
        }
    }

    fn named(name: &str, width: u64, values: &[f64]) -> Tensor {
        let rows = values.len() as u64 / width;
        Tensor {
            name: name.into(),
            ..tensor(DType::F32, &[rows, width], values)
        }
    }

    /// Features interleaved over two inputs and an output, and a class of the output: each value
    /// comes from its own tensor, whatever order the request lists them in.
    #[test]
    fn features_of_several_tensors_read_each_from_its_own() {
        let column = |side, tensor: &str, index| NumericProfile {
            name: format!("{tensor}{index}"),
            side,
            source: FeatureSource::Column {
                tensor: tensor.into(),
                index,
            },
            edges: vec![0.0, 1.0],
            reference: FeatureSummary::new(&[0.0, 1.0]),
        };
        let profile = Profile {
            features: vec![
                column(TensorSide::Input, "a", 0),
                column(TensorSide::Input, "b", 0),
                column(TensorSide::Output, "y", 2),
                column(TensorSide::Input, "a", 1),
            ],
            classes: vec![ClassProfile {
                name: "y".into(),
                source: ClassSource::Argmax { tensor: "y".into() },
                classes: vec![0, 1, 2],
                reference: ClassSummary::new(3),
            }],
            thresholds: Thresholds::default(),
        };
        let extractor =
            Extractor::new(&profile, &[spec("a", 2), spec("b", 1)], &[spec("y", 3)]).unwrap();
        let inputs = [
            named("b", 1, &[5.0, 6.0]),
            named("a", 2, &[1.0, 2.0, 3.0, 4.0]),
        ];
        let outputs = [named("y", 3, &[0.1, 0.7, 0.2, 0.5, 0.25, 0.25])];
        let mut seen = Vec::new();
        extractor.for_each(&inputs, &outputs, |observation| seen.push(observation));
        let feature = |index, value: f32| Observation::Feature {
            index,
            value: f64::from(value),
        };
        let class = |class, confidence| Observation::Class {
            index: 0,
            class,
            confidence: Some(confidence),
        };
        assert_eq!(
            seen,
            [
                feature(0, 1.0),
                feature(0, 3.0),
                feature(1, 5.0),
                feature(1, 6.0),
                feature(2, 0.2),
                feature(2, 0.25),
                feature(3, 2.0),
                feature(3, 4.0),
                class(1, 0.7),
                class(0, 0.5),
            ]
        );
        // A request without one of the tensors skips its features and reads the rest.
        let mut seen = Vec::new();
        extractor.for_each(&inputs[1..], &[], |observation| seen.push(observation));
        assert_eq!(
            seen,
            [
                feature(0, 1.0),
                feature(0, 3.0),
                feature(3, 2.0),
                feature(3, 4.0)
            ]
        );
    }

    /// Values read on the request's path and folded later, several requests to a batch, make the
    /// summary observing each request inline makes, bit for bit (Debug prints every float in the
    /// shortest form that reads back as the same bits).
    #[test]
    fn extracted_values_fold_into_the_summary_observe_makes() {
        let edges = vec![-1.0, 0.0, 0.5, 2.0];
        let column = |side, tensor: &str, index| NumericProfile {
            name: format!("{tensor}{index}"),
            side,
            source: FeatureSource::Column {
                tensor: tensor.into(),
                index,
            },
            edges: edges.clone(),
            reference: FeatureSummary::new(&edges),
        };
        let profile = Profile {
            features: vec![
                column(TensorSide::Input, "a", 0),
                column(TensorSide::Input, "a", 1),
                column(TensorSide::Output, "y", 2),
            ],
            classes: vec![ClassProfile {
                name: "y".into(),
                source: ClassSource::Argmax { tensor: "y".into() },
                classes: vec![0, 1, 2],
                reference: ClassSummary::new(3),
            }],
            thresholds: Thresholds::default(),
        };
        let extractor = Extractor::new(&profile, &[spec("a", 2)], &[spec("y", 3)]).unwrap();
        let requests: Vec<([Tensor; 1], [Tensor; 1])> = (0..40)
            .map(|request| {
                let value = |i: usize| ((request * 7 + i * 13) % 29) as f64 * 0.137 - 1.3;
                let mut inputs: Vec<f64> = (0..6).map(value).collect();
                if request % 9 == 4 {
                    inputs[3] = f64::NAN;
                    inputs[4] = f64::INFINITY;
                }
                let outputs: Vec<f64> = (6..15).map(|i| value(i).abs()).collect();
                ([named("a", 2, &inputs)], [named("y", 3, &outputs)])
            })
            .collect();
        let empty = DriftSummary::new("m", 1, outpost_protocol::Sha256([1; 32]), &profile, 0, 3600);
        let mut inline = empty.clone();
        for (inputs, outputs) in &requests {
            extractor.observe(&profile, &mut inline, inputs, outputs);
        }
        let mut folded = empty;
        for batch in requests.chunks(7) {
            let mut values = Vec::new();
            for (inputs, outputs) in batch {
                extractor.extract(inputs, outputs, &mut values);
            }
            fold(&profile, &mut folded, &values);
        }
        let first = &folded.features[0];
        assert_eq!((first.n, first.pos_inf), (116, 4));
        assert_eq!(format!("{folded:?}"), format!("{inline:?}"));
    }

    /// Two samples of 3 channels of 7x11 (not a multiple of the lanes), against the textbook
    /// formulas; f32 takes the byte-run path, f64 the per-element one.
    #[test]
    fn channel_mean_and_std_match_the_definition() {
        let (channels, plane) = (3, 77);
        let values: Vec<f64> = (0..2 * channels * plane)
            .map(|i| ((i * 37 % 101) as f64) * 0.25 - 3.0)
            .collect();
        for dtype in [DType::F32, DType::F64] {
            let input = tensor(dtype, &[2, 3, 7, 11], &values);
            let got = channel_reads(&input, channels, plane);
            for (channel, (mean, std)) in got.into_iter().enumerate() {
                let start = (channels + channel) * plane;
                let slice = &values[start..start + plane];
                let want_mean = slice.iter().sum::<f64>() / plane as f64;
                let want_var =
                    slice.iter().map(|v| (v - want_mean).powi(2)).sum::<f64>() / plane as f64;
                assert!(
                    (mean - want_mean).abs() < 1e-9,
                    "{dtype:?} mean {mean} vs {want_mean}"
                );
                assert!(
                    (std - want_var.sqrt()).abs() < 1e-9,
                    "{dtype:?} std {std} vs {}",
                    want_var.sqrt()
                );
            }
        }
    }

    #[test]
    fn a_nan_makes_its_channel_nan() {
        let mut values = vec![1.0; 2 * 3 * 77];
        values[3 * 77 + 5] = f64::NAN;
        let input = tensor(DType::F32, &[2, 3, 7, 11], &values);
        let (mean, std) = channel_reads(&input, 3, 77)[0];
        assert!(mean.is_nan() && std.is_nan());
        let (mean, std) = channel_reads(&input, 3, 77)[1];
        assert_eq!((mean, std), (1.0, 0.0));
    }

    /// A 2,048-wide input is 16 spans of 128 columns, each its mean and std; 64 channels are 16
    /// spans of 4 channels; 33 columns are 11 spans of 3. Each span reads its own elements.
    #[test]
    fn wide_tensors_are_a_bounded_set_of_spans() {
        let plan = |shape: Vec<Dim>| {
            let input = TensorSpec {
                name: "x".into(),
                dtype: DType::F32,
                shape,
            };
            plan_profile(&[input], &[], &ProfileOptions::default())
                .unwrap()
                .0
        };
        let wide = plan(vec![Dim::Batch, Dim::Fixed(2048)]);
        assert_eq!(wide.len(), 2 * WIDE_SPANS);
        assert_eq!(wide[0].0, "x.mean[0..128]");
        assert_eq!(wide[31].0, "x.std[1920..2048]");
        assert_eq!(
            wide[9].2,
            FeatureSource::SpanStd {
                tensor: "x".into(),
                start: 512,
                len: 128
            }
        );
        let channels = plan(vec![
            Dim::Batch,
            Dim::Fixed(64),
            Dim::Fixed(3),
            Dim::Fixed(3),
        ]);
        assert_eq!(channels.len(), 32);
        assert_eq!(channels[2].0, "x.mean[4..8]");
        assert_eq!(
            channels[2].2,
            FeatureSource::SpanMean {
                tensor: "x".into(),
                start: 36,
                len: 36
            }
        );
        let odd = plan(vec![Dim::Batch, Dim::Fixed(33)]);
        assert_eq!(odd.len(), 22);
        assert_eq!(odd[21].0, "x.std[30..33]");
        assert_eq!(plan(vec![Dim::Batch, Dim::Fixed(32)]).len(), 32);

        // Two rows of 40 columns: span 1 covers columns 3..6.
        let values: Vec<f64> = (0..80).map(f64::from).collect();
        let profile = Profile {
            features: plan(vec![Dim::Batch, Dim::Fixed(40)])
                .into_iter()
                .map(|(name, side, source)| NumericProfile {
                    name,
                    side,
                    source,
                    edges: vec![0.0, 1.0],
                    reference: FeatureSummary::new(&[0.0, 1.0]),
                })
                .collect(),
            classes: Vec::new(),
            thresholds: Thresholds::default(),
        };
        let extractor = Extractor::new(&profile, &[spec("x", 40)], &[]).unwrap();
        let mut seen = Vec::new();
        extractor.for_each(&[named("x", 40, &values)], &[], |observation| {
            if let Observation::Feature { index: 2, value } = observation {
                seen.push(value);
            }
        });
        assert_eq!(profile.features[2].name, "x.mean[3..6]");
        assert_eq!(seen, [4.0, 44.0]);
        let past = Profile {
            features: vec![NumericProfile {
                source: FeatureSource::SpanMean {
                    tensor: "x".into(),
                    start: 38,
                    len: 3,
                },
                ..profile.features[0].clone()
            }],
            ..profile
        };
        let error = Extractor::new(&past, &[spec("x", 40)], &[]).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("span 38..41 is not within the 40 elements"),
            "{error}"
        );
    }
}
