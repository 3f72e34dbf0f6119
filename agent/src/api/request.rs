//! Decoding an inference request: its JSON, and tensor data as JSON numbers or as binary
//! tensor data after the JSON header.

use std::fmt;

use outpost_protocol::device::Tensor;
use outpost_protocol::trust::DType;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use outpost_model::inference::{InferenceError, LoadedModel};

use super::error::ApiError;

/// The request body's JSON, as the protocol defines it. Unknown fields are ignored.
#[derive(Deserialize)]
pub(super) struct InferRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(borrow)]
    inputs: Vec<RequestInput<'a>>,
    #[serde(default)]
    outputs: Option<Vec<RequestOutput>>,
}

#[derive(Deserialize)]
pub(super) struct RequestInput<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    /// Left unparsed until the datatype is known, so elements go straight into typed bytes.
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
pub(super) struct RequestOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// A request checked as far as the API can without the model's help.
pub(super) struct ParsedRequest {
    pub(super) id: Option<String>,
    pub(super) inputs: Vec<Tensor>,
    /// The outputs to return, in order, each with whether to send it as binary data.
    pub(super) outputs: Vec<(usize, bool)>,
}

pub(super) fn parse_request(
    body: &[u8],
    json_length: Option<usize>,
    model: &LoadedModel,
) -> Result<ParsedRequest, ApiError> {
    let (header, mut binary) = match json_length {
        Some(length) => {
            if length > body.len() {
                return Err(ApiError::bad_request(format!(
                    "Inference-Header-Content-Length is {length} but the body has {} bytes",
                    body.len()
                )));
            }
            body.split_at(length)
        }
        None => (body, &[][..]),
    };
    let request: InferRequest<'_> = serde_json::from_slice(header)
        .map_err(|error| ApiError::bad_request(format!("malformed request JSON: {error}")))?;
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in &request.inputs {
        inputs.push(parse_input(input, model, &mut binary)?);
    }
    if !binary.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{} bytes of binary data follow the JSON but no input claims them",
            binary.len()
        )));
    }
    let binary_by_default = flag(request.parameters.as_ref(), "binary_data_output")?;
    let outputs = match &request.outputs {
        None => (0..model.outputs().len())
            .map(|ix| (ix, binary_by_default))
            .collect(),
        Some(wanted) => wanted
            .iter()
            .map(|output| {
                let ix = model
                    .outputs()
                    .iter()
                    .position(|spec| spec.name == output.name)
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "requested output {:?} is not an output of the model",
                            output.name
                        ))
                    })?;
                let binary = match output.parameters.as_ref() {
                    Some(parameters) if parameters.contains_key("binary_data") => {
                        flag(Some(parameters), "binary_data")?
                    }
                    _ => binary_by_default,
                };
                Ok((ix, binary))
            })
            .collect::<Result<_, ApiError>>()?,
    };
    Ok(ParsedRequest {
        id: request.id,
        inputs,
        outputs,
    })
}

/// A boolean parameter; absent is false.
pub(super) fn flag(parameters: Option<&Map<String, Value>>, key: &str) -> Result<bool, ApiError> {
    match parameters.and_then(|parameters| parameters.get(key)) {
        None => Ok(false),
        Some(Value::Bool(value)) => Ok(*value),
        Some(other) => Err(ApiError::bad_request(format!(
            "parameter {key:?} must be true or false, not {other}"
        ))),
    }
}

/// Turns one request input into a tensor, taking binary data from the front of `binary`.
pub(super) fn parse_input(
    input: &RequestInput<'_>,
    model: &LoadedModel,
    binary: &mut &[u8],
) -> Result<Tensor, ApiError> {
    let name = &input.name;
    let bad = |reason: String| ApiError::bad_request(format!("input {name:?}: {reason}"));
    let dtype = DType::parse(&input.datatype).ok_or_else(|| {
        bad(format!(
            "datatype {:?} is not supported (use FP32, FP64, INT32, INT64 or UINT8)",
            input.datatype
        ))
    })?;
    // Checked before the data, so a wrong datatype is reported as that and not as data that does
    // not fit it. `run` checks everything else about the input against its spec.
    if let Some(spec) = model.inputs().iter().find(|spec| spec.name == *name) {
        if spec.dtype != dtype {
            let error = InferenceError::WrongDType {
                name: name.clone(),
                expected: spec.dtype,
                got: dtype,
            };
            return Err(ApiError::bad_request(error.to_string()));
        }
    }
    let shape = input
        .shape
        .iter()
        .map(|&dim| u64::try_from(dim))
        .collect::<Result<Vec<u64>, _>>()
        .map_err(|_| bad(format!("shape {:?} has a negative axis", input.shape)))?;
    let elements = shape
        .iter()
        .try_fold(1u64, |acc, &dim| acc.checked_mul(dim))
        .and_then(|elements| usize::try_from(elements).ok())
        .ok_or_else(|| bad(format!("shape {shape:?} is too large")))?;
    let binary_size = match input
        .parameters
        .as_ref()
        .and_then(|parameters| parameters.get("binary_data_size"))
    {
        None => None,
        Some(size) => Some(
            size.as_u64()
                .and_then(|size| usize::try_from(size).ok())
                .ok_or_else(|| bad(format!("binary_data_size {size} is not a byte count")))?,
        ),
    };
    let data = match (input.data, binary_size) {
        (Some(_), Some(_)) => return Err(bad("has both JSON data and binary data".to_owned())),
        (None, None) => return Err(bad("has no data".to_owned())),
        (None, Some(size)) => {
            if size > binary.len() {
                return Err(bad(format!(
                    "binary_data_size is {size} but only {} binary bytes remain",
                    binary.len()
                )));
            }
            let (data, rest) = binary.split_at(size);
            *binary = rest;
            let needed = elements.checked_mul(dtype.size());
            if needed != Some(size) {
                return Err(bad(format!(
                    "shape {shape:?} of {} needs {} bytes, binary data has {size}",
                    dtype.as_str(),
                    needed.map_or("too many".to_owned(), |n| n.to_string()),
                )));
            }
            data.to_vec()
        }
        (Some(raw), None) => {
            // Each element takes at least one byte of JSON, which caps the allocation.
            let capacity = elements.min(raw.get().len()).saturating_mul(dtype.size());
            let mut flat = FlatData {
                dtype,
                data: Vec::with_capacity(capacity),
                count: 0,
                limit: elements,
            };
            let mut deserializer = serde_json::Deserializer::from_str(raw.get());
            ElementSeed(&mut flat)
                .deserialize(&mut deserializer)
                .map_err(|error| bad(format!("bad data: {}", strip_position(&error))))?;
            if flat.count != elements {
                return Err(bad(format!(
                    "shape {shape:?} needs {elements} elements, data has {}",
                    flat.count
                )));
            }
            flat.data
        }
    };
    Ok(Tensor {
        name: name.clone(),
        dtype,
        shape,
        data,
    })
}

/// serde_json's message without its "at line 1 column 7", which points into the data field, not
/// the request.
pub(super) fn strip_position(error: &serde_json::Error) -> String {
    let message = error.to_string();
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message,
    }
}

/// Elements of one input, flattened from any nesting into little-endian bytes.
pub(super) struct FlatData {
    dtype: DType,
    data: Vec<u8>,
    count: usize,
    /// The element count the shape calls for; more is refused as soon as it is seen.
    limit: usize,
}

/// A JSON number as read, before conversion to the input's type.
#[derive(Clone, Copy)]
pub(super) enum Number {
    Signed(i64),
    Unsigned(u64),
    Float(f64),
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Signed(value) => write!(f, "{value}"),
            Number::Unsigned(value) => write!(f, "{value}"),
            Number::Float(value) => write!(f, "{value}"),
        }
    }
}

impl FlatData {
    fn push(&mut self, number: Number) -> Result<(), String> {
        if self.count == self.limit {
            return Err(format!(
                "more than the {} elements the shape needs",
                self.limit
            ));
        }
        let out = &mut self.data;
        let out_of_range = || format!("{number} is out of range for {}", self.dtype.as_str());
        let integer = || -> Result<i128, String> {
            match number {
                Number::Signed(value) => Ok(i128::from(value)),
                Number::Unsigned(value) => Ok(i128::from(value)),
                // 2^63 and 2^64 are exact in f64, so the range check is exact too.
                Number::Float(value)
                    if value.fract() == 0.0 && value.abs() < 18_446_744_073_709_551_616.0 =>
                {
                    Ok(value as i128)
                }
                Number::Float(value) => Err(format!(
                    "{value} is not an integer, as {} requires",
                    self.dtype.as_str()
                )),
            }
        };
        let float = match number {
            Number::Signed(value) => value as f64,
            Number::Unsigned(value) => value as f64,
            Number::Float(value) => value,
        };
        match self.dtype {
            DType::F32 => {
                let value = float as f32;
                if !value.is_finite() {
                    return Err(out_of_range());
                }
                out.extend_from_slice(&value.to_le_bytes());
            }
            DType::F64 => out.extend_from_slice(&float.to_le_bytes()),
            DType::I32 => {
                let value = i32::try_from(integer()?).map_err(|_| out_of_range())?;
                out.extend_from_slice(&value.to_le_bytes());
            }
            DType::I64 => {
                let value = i64::try_from(integer()?).map_err(|_| out_of_range())?;
                out.extend_from_slice(&value.to_le_bytes());
            }
            DType::U8 => {
                let value = u8::try_from(integer()?).map_err(|_| out_of_range())?;
                out.push(value);
            }
        }
        self.count += 1;
        Ok(())
    }
}

/// Reads a number or an array of (arrays of) numbers into a [`FlatData`].
pub(super) struct ElementSeed<'a>(&'a mut FlatData);

impl<'de> DeserializeSeed<'de> for ElementSeed<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ElementSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number or an array of numbers")
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<(), E> {
        self.0.push(Number::Signed(value)).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<(), E> {
        self.0.push(Number::Unsigned(value)).map_err(E::custom)
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<(), E> {
        self.0.push(Number::Float(value)).map_err(E::custom)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(ElementSeed(&mut *self.0))?.is_some() {}
        Ok(())
    }
}
