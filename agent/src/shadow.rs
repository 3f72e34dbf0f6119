//! Shadow runs: the target of a plan's shadow stage, run beside the active model on copies of
//! live inputs, never serving a request.
//!
//! The request path only offers work: when a shadow model is set and the bounded queue has room,
//! a request's inputs and the active model's answers are copied onto it; when it is full the input
//! is dropped and counted. Nothing on the request path waits for the shadow model. One background
//! thread runs the shadow model on each queued input, compares its answers with the active
//! model's ([`compare`]) and adds the comparison to the telemetry [`Recorder`], which reports it
//! in its own window beside the active model's counters.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, RwLock};

use outpost_protocol::device::{ShadowCounts, Tensor};
use outpost_protocol::trust::{DType, Dim, ManifestRef};

use crate::slot::ActiveModel;
use crate::telemetry::Recorder;

/// Inputs waiting for the shadow model at most; more are dropped and counted.
pub const QUEUE_CAPACITY: usize = 64;

/// What shadowing one input, or dropping it, added up to.
pub type Comparison = ShadowCounts;

/// A comparison of `rows` rows the shadow model failed on.
fn failed(rows: u64) -> Comparison {
    Comparison {
        errors: rows,
        ..Comparison::default()
    }
}

/// One input to shadow, with the active model's answers to it.
struct Job {
    shadow: Arc<ActiveModel>,
    active_name: String,
    active_version: u64,
    first_output_batched: bool,
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
}

/// The shadow models, at most one per model name, and the queue to their worker. Shared by the
/// request handlers (which offer inputs) and the sync loop (which sets and clears the models).
#[derive(Debug)]
pub struct Shadow {
    current: RwLock<Vec<Arc<ActiveModel>>>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
    sender: Sender<Job>,
    recorder: Arc<Recorder>,
}

/// The plan's name for a loaded model.
pub fn reference(model: &ActiveModel) -> ManifestRef {
    ManifestRef {
        name: model.name.clone(),
        version: model.version,
        manifest_sha256: model.manifest_sha256,
    }
}

impl Shadow {
    /// Starts the worker thread, which ends when the returned value is dropped.
    pub fn start(recorder: Arc<Recorder>, capacity: usize) -> std::io::Result<Shadow> {
        let (sender, receiver) = channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let worker_queued = queued.clone();
        let worker_recorder = recorder.clone();
        std::thread::Builder::new()
            .name("shadow".to_owned())
            .spawn(move || work(&receiver, &worker_queued, &worker_recorder))?;
        Ok(Shadow {
            current: RwLock::new(Vec::new()),
            queued,
            capacity,
            sender,
            recorder,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<ActiveModel>>> {
        // A poisoned lock only means a writer panicked mid-swap; the value is whole either way.
        match self.current.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The version of model `name` running in shadow now. On the request path: one lookup under
    /// the read lock, no copy of the list.
    pub fn current(&self, name: &str) -> Option<Arc<ActiveModel>> {
        self.read().iter().find(|model| model.name == name).cloned()
    }

    /// Every model running in shadow now.
    pub fn all(&self) -> Vec<Arc<ActiveModel>> {
        self.read().clone()
    }

    /// Sets or clears the shadow version of model `name`, returning the one it replaces. Inputs
    /// already queued finish on the model they were queued for.
    pub fn set(&self, name: &str, model: Option<Arc<ActiveModel>>) -> Option<Arc<ActiveModel>> {
        let mut guard = match self.current.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let replaced = guard
            .iter()
            .position(|shadow| shadow.name == name)
            .map(|index| guard.remove(index));
        guard.extend(model);
        replaced
    }

    /// Called on the request path after `active` answered `inputs` with `outputs`: queues a copy
    /// for the shadow model if there is one and the queue has room, else counts a drop. Never
    /// waits.
    pub fn offer(&self, active: &ActiveModel, inputs: &[Tensor], outputs: &[Tensor], now: u64) {
        let Some(shadow) = self.current(&active.name) else {
            return;
        };
        let target = reference(&shadow);
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            let dropped = Comparison {
                dropped: 1,
                ..Comparison::default()
            };
            self.recorder
                .record_shadow(&active.name, active.version, &target, &dropped, now);
            return;
        }
        let first_output_batched = active
            .model
            .outputs()
            .first()
            .is_some_and(|spec| spec.shape.first() == Some(&Dim::Batch));
        let job = Job {
            shadow,
            active_name: active.name.clone(),
            active_version: active.version,
            first_output_batched,
            inputs: inputs.to_vec(),
            outputs: outputs.to_vec(),
        };
        if self.sender.send(job).is_err() {
            // The worker is gone (it panicked): nothing will take the input.
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The worker: shadows each queued input, in order, until the queue's sender is dropped.
fn work(receiver: &Receiver<Job>, queued: &AtomicUsize, recorder: &Recorder) {
    for job in receiver {
        let comparison = match job.shadow.model.run(&job.inputs) {
            Ok(outputs) => compare(&job.outputs, &outputs, job.first_output_batched),
            Err(_) => failed(rows(job.outputs.first(), job.first_output_batched)),
        };
        recorder.record_shadow(
            &job.active_name,
            job.active_version,
            &reference(&job.shadow),
            &comparison,
            crate::unix_now(),
        );
        queued.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Rows of the first output: the batch size when its first axis is the batch axis, else one.
fn rows(first: Option<&Tensor>, batched: bool) -> u64 {
    match first {
        Some(tensor) if batched => tensor.shape.first().copied().unwrap_or(1),
        Some(_) => 1,
        None => 0,
    }
}

/// A tensor's elements as `f64`s; `None` when its bytes do not fit its type.
fn values(tensor: &Tensor) -> Option<Vec<f64>> {
    let size = tensor.dtype.size();
    if !tensor.data.len().is_multiple_of(size) {
        return None;
    }
    let convert = |chunk: &[u8]| -> f64 {
        match tensor.dtype {
            DType::F32 => f64::from(f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])),
            DType::F64 => f64::from_le_bytes(chunk.try_into().unwrap_or([0; 8])),
            DType::I32 => f64::from(i32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])),
            DType::I64 => i64::from_le_bytes(chunk.try_into().unwrap_or([0; 8])) as f64,
            DType::U8 => f64::from(chunk[0]),
        }
    };
    Some(tensor.data.chunks_exact(size).map(convert).collect())
}

/// The index of the largest value; NaNs are never the largest.
fn argmax(row: &[f64]) -> Option<usize> {
    row.iter()
        .enumerate()
        .filter(|(_, value)| !value.is_nan())
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(index, _)| index)
}

/// Compares the shadow model's answers with the active model's, output by output (by name).
///
/// Every value pair adds its absolute difference (0 for equal values, infinities and NaNs
/// included). The rows of the first output are the comparisons: a row agrees when both argmaxes
/// are the same. When an output is missing, has another shape, or one model has a NaN or an
/// infinity where the other does not, every row counts as an error instead.
pub fn compare(active: &[Tensor], shadow: &[Tensor], first_output_batched: bool) -> Comparison {
    let rows = rows(active.first(), first_output_batched);
    let mut comparison = Comparison::default();
    let mut first_rows: Option<(Vec<f64>, Vec<f64>)> = None;
    for want in active {
        let Some(got) = shadow.iter().find(|got| got.name == want.name) else {
            return failed(rows);
        };
        let (Some(a), Some(b)) = (values(want), values(got)) else {
            return failed(rows);
        };
        if want.shape != got.shape || a.len() != b.len() {
            return failed(rows);
        }
        for (x, y) in a.iter().zip(&b) {
            let same = x == y || (x.is_nan() && y.is_nan());
            let diff = if same { 0.0 } else { (x - y).abs() };
            if !diff.is_finite() {
                return failed(rows);
            }
            comparison.abs_diff_sum += diff;
            comparison.abs_diff_values += 1;
        }
        if first_rows.is_none() {
            first_rows = Some((a, b));
        }
    }
    let Some((a, b)) = first_rows else {
        return comparison;
    };
    // A first output whose length is not a whole number of rows is judged as one row.
    let rows = match usize::try_from(rows) {
        Ok(n) if n > 0 && a.len().is_multiple_of(n) && !a.is_empty() => n,
        _ if a.is_empty() => 0,
        _ => 1,
    };
    if rows == 0 {
        return comparison;
    }
    let width = a.len() / rows;
    for (row_a, row_b) in a.chunks(width).zip(b.chunks(width)) {
        comparison.compared += 1;
        if argmax(row_a) == argmax(row_b) {
            comparison.top1_agreed += 1;
        }
    }
    comparison
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, shape: &[u64], values: &[f32]) -> Tensor {
        Tensor {
            name: name.to_owned(),
            dtype: DType::F32,
            shape: shape.to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    #[test]
    fn rows_agree_by_argmax_and_values_add_their_differences() {
        let active = [tensor("y", &[2, 3], &[0.1, 0.7, 0.2, 0.5, 0.3, 0.2])];
        let shadow = [tensor("y", &[2, 3], &[0.2, 0.6, 0.2, 0.3, 0.5, 0.2])];
        let comparison = compare(&active, &shadow, true);
        assert_eq!((comparison.compared, comparison.top1_agreed), (2, 1));
        assert_eq!(comparison.abs_diff_values, 6);
        assert!(
            (comparison.abs_diff_sum - 0.6).abs() < 1e-6,
            "{comparison:?}"
        );
        assert_eq!(comparison.errors, 0);

        // Without a batch axis the whole output is one row.
        let comparison = compare(&active, &shadow, false);
        assert_eq!((comparison.compared, comparison.top1_agreed), (1, 1));

        let same = compare(&active, &active, true);
        assert_eq!(
            (same.compared, same.top1_agreed, same.abs_diff_sum),
            (2, 2, 0.0)
        );
    }

    #[test]
    fn missing_outputs_other_shapes_and_stray_nans_are_errors() {
        let active = [tensor("y", &[2, 2], &[0.1, 0.9, 0.8, 0.2])];
        let failed = failed(2);
        assert_eq!(compare(&active, &[], true), failed);
        assert_eq!(
            compare(&active, &[tensor("z", &[2, 2], &[0.0; 4])], true),
            failed
        );
        assert_eq!(
            compare(&active, &[tensor("y", &[1, 4], &[0.0; 4])], true),
            failed
        );
        let nan = [tensor("y", &[2, 2], &[0.1, f32::NAN, 0.8, 0.2])];
        assert_eq!(compare(&active, &nan, true), failed);
        // The same NaN in both is no difference.
        let both = compare(&nan, &nan, true);
        assert_eq!((both.compared, both.abs_diff_sum, both.errors), (2, 0.0, 0));
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let recorder = Arc::new(Recorder::new());
        let shadow = Shadow::start(recorder.clone(), 0).unwrap();
        let (inputs, outputs) = outpost_model::example::mlp_specs(4, 3);
        let model = outpost_model::inference::LoadedModel::load(
            &outpost_model::example::mlp(4, 8, 3, 1),
            &inputs,
            &outputs,
            1,
        )
        .unwrap();
        let active = ActiveModel {
            name: "demo".to_owned(),
            version: 1,
            manifest_sha256: outpost_protocol::Sha256([1; 32]),
            model,
            drift: None,
            runtime_fallback: None,
        };
        // No shadow model: nothing is queued or counted.
        shadow.offer(&active, &[], &[], 7200);
        assert!(recorder.take_all().is_empty());

        let target = Arc::new(ActiveModel {
            name: "demo".to_owned(),
            version: 2,
            manifest_sha256: outpost_protocol::Sha256([2; 32]),
            model: outpost_model::inference::LoadedModel::load(
                &outpost_model::example::mlp(4, 8, 3, 2),
                &inputs,
                &outputs,
                1,
            )
            .unwrap(),
            drift: None,
            runtime_fallback: None,
        });
        assert!(shadow.set("demo", Some(target)).is_none());
        // A queue of capacity 0 is always full.
        shadow.offer(&active, &[], &[], 7200);
        shadow.offer(&active, &[], &[], 7300);
        let windows = recorder.take_all();
        assert_eq!(windows.len(), 1, "{windows:?}");
        let report = windows[0].shadow.as_ref().unwrap();
        assert_eq!((report.counts.dropped, report.counts.compared), (2, 0));
        assert_eq!(report.target.version, 2);
        assert_eq!((windows[0].model.as_str(), windows[0].version), ("demo", 1));
        assert_eq!(windows[0].count, 0);
    }
}
