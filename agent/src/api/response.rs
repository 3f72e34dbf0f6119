//! Encoding an inference response: outputs as JSON arrays or as binary tensor data.

use axum::http::StatusCode;
use outpost_protocol::device::Tensor;
use outpost_protocol::trust::DType;
use serde::{Serialize, Serializer};

use crate::slot::ActiveModel;

use super::error::ApiError;
use super::request::*;

#[derive(Serialize)]
pub(super) struct InferResponse<'a> {
    model_name: &'a str,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    outputs: Vec<ResponseOutput<'a>>,
}

#[derive(Serialize)]
pub(super) struct ResponseOutput<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [u64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<OutputParameters>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Elements<'a>>,
}

#[derive(Serialize)]
pub(super) struct OutputParameters {
    /// Bytes of the output's binary data after the JSON, when it is sent so.
    #[serde(skip_serializing_if = "Option::is_none")]
    binary_data_size: Option<usize>,
    /// Elements that are NaN or infinite: `null` in JSON data, which cannot express them, and
    /// as they are in binary data. Absent when there are none.
    #[serde(skip_serializing_if = "Option::is_none")]
    non_finite: Option<usize>,
}

/// Elements of a float tensor that are NaN or infinite; none for other types.
fn non_finite(tensor: &Tensor) -> usize {
    match tensor.dtype {
        DType::F32 => tensor
            .data
            .chunks_exact(4)
            .filter(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
            .count(),
        DType::F64 => tensor
            .data
            .chunks_exact(8)
            .filter(|c| {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(c);
                !f64::from_le_bytes(bytes).is_finite()
            })
            .count(),
        DType::I32 | DType::I64 | DType::U8 => 0,
    }
}

/// A tensor's little-endian bytes, serialized as a flat JSON array without an intermediate `Vec`.
/// An encoded inference response; `json_length` is set when binary output data follows the JSON.
pub(super) struct Answer {
    pub(super) body: Vec<u8>,
    pub(super) json_length: Option<usize>,
}

/// Non-finite floats, which JSON cannot express, come out as `null`.
pub(super) struct Elements<'a>(&'a Tensor);

impl Serialize for Elements<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        fn array<const N: usize>(chunk: &[u8]) -> [u8; N] {
            let mut bytes = [0u8; N];
            bytes.copy_from_slice(chunk);
            bytes
        }
        let data = &self.0.data;
        match self.0.dtype {
            DType::F32 => {
                serializer.collect_seq(data.chunks_exact(4).map(|c| f32::from_le_bytes(array(c))))
            }
            DType::F64 => {
                serializer.collect_seq(data.chunks_exact(8).map(|c| f64::from_le_bytes(array(c))))
            }
            DType::I32 => {
                serializer.collect_seq(data.chunks_exact(4).map(|c| i32::from_le_bytes(array(c))))
            }
            DType::I64 => {
                serializer.collect_seq(data.chunks_exact(8).map(|c| i64::from_le_bytes(array(c))))
            }
            DType::U8 => serializer.collect_seq(data.iter()),
        }
    }
}

pub(super) fn encode_response(
    active: &ActiveModel,
    request: ParsedRequest,
    outputs: Vec<Tensor>,
) -> Result<Answer, ApiError> {
    let mut binary_parts: Vec<&[u8]> = Vec::new();
    let mut listed = Vec::with_capacity(request.outputs.len());
    for &(ix, binary) in &request.outputs {
        let tensor = outputs.get(ix).ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the model returned fewer outputs than it declares",
            )
        })?;
        if binary {
            binary_parts.push(&tensor.data);
        }
        let non_finite = Some(non_finite(tensor)).filter(|count| *count > 0);
        let binary_data_size = binary.then_some(tensor.data.len());
        listed.push(ResponseOutput {
            name: &tensor.name,
            datatype: tensor.dtype.as_str(),
            shape: &tensor.shape,
            parameters: (binary_data_size.is_some() || non_finite.is_some()).then_some(
                OutputParameters {
                    binary_data_size,
                    non_finite,
                },
            ),
            data: (!binary).then_some(Elements(tensor)),
        });
    }
    let response = InferResponse {
        model_name: &active.name,
        model_version: active.version.to_string(),
        id: request.id,
        outputs: listed,
    };
    let mut body = serde_json::to_vec(&response).map_err(|error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the response: {error}"),
        )
    })?;
    if binary_parts.is_empty() {
        return Ok(Answer {
            body,
            json_length: None,
        });
    }
    let json_length = body.len();
    for part in binary_parts {
        body.extend_from_slice(part);
    }
    Ok(Answer {
        body,
        json_length: Some(json_length),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_tensor(values: &[f32]) -> Tensor {
        Tensor {
            name: "y".to_owned(),
            dtype: DType::F32,
            shape: vec![1, values.len() as u64],
            data: values
                .iter()
                .flat_map(|value| value.to_le_bytes())
                .collect(),
        }
    }

    /// Non-finite output elements are `null` in JSON data and counted beside them; a finite
    /// output says nothing.
    #[test]
    fn non_finite_elements_are_null_and_counted() {
        let tensor = f32_tensor(&[1.5, f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
        assert_eq!(non_finite(&tensor), 3);
        assert_eq!(
            serde_json::to_string(&Elements(&tensor)).unwrap(),
            "[1.5,null,null,null]"
        );
        assert_eq!(non_finite(&f32_tensor(&[0.0, -2.0])), 0);
        let wide = Tensor {
            dtype: DType::F64,
            data: [f64::NAN, 1.0]
                .iter()
                .flat_map(|value| value.to_le_bytes())
                .collect(),
            ..f32_tensor(&[])
        };
        assert_eq!(non_finite(&wide), 1);
        let parameters = OutputParameters {
            binary_data_size: None,
            non_finite: Some(3),
        };
        assert_eq!(
            serde_json::to_string(&parameters).unwrap(),
            r#"{"non_finite":3}"#
        );
    }
}
