//! Converting tensors between the protocol's bytes and tract's values, and cutting and
//! stacking them along a batch axis.

use outpost_protocol::device::Tensor;
use outpost_protocol::trust::{DType, TensorSpec};
use tract_onnx::prelude::{DatumType, TValue};

use super::error::InferenceError;

/// The element types Outpost moves between protocol tensors and tract tensors.
pub(super) trait Element: tract_onnx::prelude::Datum + Copy {
    const SIZE: usize;
    fn from_le(bytes: &[u8]) -> Self;
    fn to_f64(self) -> f64;
    /// Appends the element's little-endian bytes.
    #[cfg_attr(not(feature = "onnxruntime"), allow(dead_code))]
    fn extend_le(self, out: &mut Vec<u8>);
}

macro_rules! element {
    ($t:ty, $to_f64:expr) => {
        impl Element for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn from_le(bytes: &[u8]) -> Self {
                let mut array = [0u8; std::mem::size_of::<$t>()];
                array.copy_from_slice(bytes);
                <$t>::from_le_bytes(array)
            }
            fn to_f64(self) -> f64 {
                $to_f64(self)
            }
            fn extend_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    };
}

element!(f32, f64::from);
element!(f64, std::convert::identity);
element!(i32, f64::from);
// Exact up to 2^53, which is as close as a tolerance in f64 can compare anyway.
element!(i64, |value: i64| value as f64);
element!(u8, f64::from);

pub(super) fn datum_type(dtype: DType) -> DatumType {
    match dtype {
        DType::F32 => DatumType::F32,
        DType::F64 => DatumType::F64,
        DType::I32 => DatumType::I32,
        DType::I64 => DatumType::I64,
        DType::U8 => DatumType::U8,
    }
}

pub(super) fn dtype_of(datum: DatumType) -> Option<DType> {
    match datum {
        DatumType::F32 => Some(DType::F32),
        DatumType::F64 => Some(DType::F64),
        DatumType::I32 => Some(DType::I32),
        DatumType::I64 => Some(DType::I64),
        DatumType::U8 => Some(DType::U8),
        _ => None,
    }
}

/// As [`dtype_of`], for a model output. tract-onnx turns ONNX int64 arithmetic (a `Cast` to int64,
/// for one) into its symbolic-integer type `TDim`; its values are plain integers by the time they
/// are outputs and convert to i64.
pub(super) fn output_dtype_of(datum: DatumType) -> Option<DType> {
    if datum == DatumType::TDim {
        Some(DType::I64)
    } else {
        dtype_of(datum)
    }
}

/// For a tensor and one of its axes: the product of the sizes before the axis, the axis's size,
/// and the bytes of one step along the axis. The tensor has passed [`Tensor::check`], so its sizes
/// multiply to its data length and fit in memory.
pub(super) fn around_axis(tensor: &Tensor, axis: usize) -> (usize, usize, usize) {
    let product = |dims: &[u64]| dims.iter().product::<u64>() as usize;
    (
        product(&tensor.shape[..axis]),
        tensor.shape[axis] as usize,
        product(&tensor.shape[axis + 1..]) * tensor.dtype.size(),
    )
}

/// Row `row` of a checked input along its batch axis, as a tensor with a batch of 1.
pub(super) fn take_row(tensor: &Tensor, axis: usize, row: u64) -> Tensor {
    let (outer, rows, step) = around_axis(tensor, axis);
    let mut data = Vec::with_capacity(outer * step);
    if step > 0 {
        for block in tensor.data.chunks_exact(rows * step) {
            let start = row as usize * step;
            data.extend_from_slice(&block[start..start + step]);
        }
    }
    let mut shape = tensor.shape.clone();
    shape[axis] = 1;
    Tensor {
        name: tensor.name.clone(),
        dtype: tensor.dtype,
        shape,
        data,
    }
}

/// Stacks the batch-1 outputs of each row along `axis` into one output.
pub(super) fn stack_rows(rows: Vec<Tensor>, axis: usize) -> Result<Tensor, InferenceError> {
    let Some(first) = rows.first() else {
        return Err(InferenceError::Run(anyhow::anyhow!("a batch with no rows")));
    };
    if first.shape.get(axis) != Some(&1) || rows.iter().any(|row| row.shape != first.shape) {
        return Err(InferenceError::Run(anyhow::anyhow!(
            "output {:?} came back with shapes that do not stack along batch axis {axis}",
            first.name
        )));
    }
    let (outer, _, step) = around_axis(first, axis);
    let mut data = Vec::with_capacity(outer * step * rows.len());
    for block in 0..outer {
        for row in &rows {
            data.extend_from_slice(&row.data[block * step..(block + 1) * step]);
        }
    }
    let mut shape = first.shape.clone();
    shape[axis] = rows.len() as u64;
    Ok(Tensor {
        name: first.name.clone(),
        dtype: first.dtype,
        shape,
        data,
    })
}

/// Copies a checked protocol tensor into a tract tensor: one copy of the little-endian bytes
/// straight into the tensor's buffer, with no intermediate vector (every request pays this).
pub(super) fn to_tract(tensor: &Tensor) -> Result<tract_onnx::prelude::Tensor, InferenceError> {
    let bad = |reason: String| InferenceError::BadData {
        name: tensor.name.clone(),
        reason,
    };
    let shape = tensor
        .shape
        .iter()
        .map(|&dim| usize::try_from(dim))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| bad("an axis does not fit this machine's address space".to_owned()))?;
    let dtype = datum_type(tensor.dtype);
    let mut out = tract_onnx::prelude::Tensor::zero_dt(dtype, &shape)
        .map_err(|error| bad(format!("{error:#}")))?;
    let mut view = out
        .try_as_plain_ram_mut()
        .map_err(|error| bad(format!("{error:#}")))?;
    let bytes = view.as_bytes_mut();
    if bytes.len() != tensor.data.len() {
        return Err(bad(format!(
            "{} bytes of data for {} bytes of tensor",
            tensor.data.len(),
            bytes.len()
        )));
    }
    bytes.copy_from_slice(&tensor.data);
    to_native_order(bytes, dtype.size_of());
    Ok(out)
}

/// Turns little-endian elements of `size` bytes into this machine's order, and back (the same
/// swap both ways): nothing to do on little-endian machines.
pub(super) fn to_native_order(bytes: &mut [u8], size: usize) {
    if cfg!(target_endian = "big") {
        for element in bytes.chunks_exact_mut(size) {
            element.reverse();
        }
    }
}

/// Copies a tract output into a protocol tensor named and typed by its spec.
pub(super) fn from_tract(spec: &TensorSpec, value: &TValue) -> Result<Tensor, InferenceError> {
    if output_dtype_of(value.datum_type()) != Some(spec.dtype) {
        return Err(InferenceError::OutputDType {
            name: spec.name.clone(),
            expected: spec.dtype,
            got: format!("{:?}", value.datum_type()),
        });
    }
    let tensor: &tract_onnx::prelude::Tensor = value;
    let tensor = if tensor.datum_type() == DatumType::TDim {
        tensor.cast_to::<i64>().map_err(InferenceError::Run)?
    } else {
        std::borrow::Cow::Borrowed(tensor)
    };
    // A tract tensor is dense and row-major, so its bytes are the elements in logical order.
    let size = tensor.datum_type().size_of();
    let mut data = tensor
        .try_as_plain_ram()
        .map_err(InferenceError::Run)?
        .as_bytes()
        .to_vec();
    if data.len() != tensor.len() * size {
        return Err(InferenceError::Run(anyhow::anyhow!(
            "output {:?} has {} bytes for {} elements",
            spec.name,
            data.len(),
            tensor.len()
        )));
    }
    to_native_order(&mut data, size);
    Ok(Tensor {
        name: spec.name.clone(),
        dtype: spec.dtype,
        shape: tensor.shape().iter().map(|&dim| dim as u64).collect(),
        data,
    })
}

/// A protocol tensor's elements as `f64`, for comparison. The caller has checked the tensor.
pub(super) fn to_f64s(tensor: &Tensor) -> Vec<f64> {
    fn widen<T: Element>(data: &[u8]) -> Vec<f64> {
        data.chunks_exact(T::SIZE)
            .map(|bytes| T::from_le(bytes).to_f64())
            .collect()
    }
    match tensor.dtype {
        DType::F32 => widen::<f32>(&tensor.data),
        DType::F64 => widen::<f64>(&tensor.data),
        DType::I32 => widen::<i32>(&tensor.data),
        DType::I64 => widen::<i64>(&tensor.data),
        DType::U8 => widen::<u8>(&tensor.data),
    }
}

/// One input of one call of a runtime.
pub(super) enum Input<'a, V> {
    /// A checked request tensor, as it is.
    Whole(&'a Tensor),
    /// Row `row` of a checked request tensor along its batch axis `axis`: the tensor with a batch
    /// of 1 (`run.rs`'s `take_row`).
    Row {
        tensor: &'a Tensor,
        axis: usize,
        row: u64,
    },
    /// An input without a batch axis, converted once for every row of a batch.
    Value(&'a V),
}
