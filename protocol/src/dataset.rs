//! Reference datasets for drift profiles: CSV tables and `.npy` tensors, parsed from bytes.
//!
//! A profile is built by running a model over a reference dataset (see `outpost-hub profile`).
//! Both readers take the whole file's bytes, cap what they accept, and answer a malformed file
//! with an error naming the line (CSV) or byte offset (`.npy`) and what was wrong there.

use std::fmt;

/// Most values one dataset may hold: 256 Mi values, 2 GiB as f64.
pub const MAX_VALUES: usize = 256 * 1024 * 1024;
/// Most columns of a CSV table.
pub const MAX_COLUMNS: usize = 65_536;
/// Longest `.npy` header.
const MAX_NPY_HEADER: usize = 64 * 1024;
/// Most axes of an `.npy` array.
const MAX_NPY_RANK: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatasetError {
    #[error("CSV line {line}: {reason}")]
    Csv { line: usize, reason: String },
    #[error(".npy at byte {offset}: {reason}")]
    Npy { offset: usize, reason: String },
}

fn csv_error(line: usize, reason: impl Into<String>) -> DatasetError {
    DatasetError::Csv {
        line,
        reason: reason.into(),
    }
}

fn npy_error(offset: usize, reason: impl Into<String>) -> DatasetError {
    DatasetError::Npy {
        offset,
        reason: reason.into(),
    }
}

/// A numeric CSV table: one row per sample, one column per feature. `None` is a missing value.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Column names from the header row, when the file has one.
    pub names: Option<Vec<String>>,
    pub columns: usize,
    /// Row-major values, `rows() * columns` of them.
    pub values: Vec<Option<f64>>,
}

impl Table {
    pub fn rows(&self) -> usize {
        self.values.len().checked_div(self.columns).unwrap_or(0)
    }
}

/// One CSV field: a number, a missing value, or text (only allowed in a header).
enum Field<'a> {
    Number(f64),
    Missing,
    Text(&'a str),
}

fn parse_field(raw: &str) -> Field<'_> {
    let field = raw.trim();
    let field = field
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(field)
        .trim();
    match field {
        "" | "NA" | "N/A" | "null" | "NULL" | "None" => Field::Missing,
        _ => match field.to_ascii_lowercase().as_str() {
            "nan" => Field::Number(f64::NAN),
            "inf" | "+inf" | "infinity" | "+infinity" => Field::Number(f64::INFINITY),
            "-inf" | "-infinity" => Field::Number(f64::NEG_INFINITY),
            _ => field
                .parse::<f64>()
                .map_or(Field::Text(field), Field::Number),
        },
    }
}

/// Parses a comma-separated numeric table.
///
/// The first line is a header when any of its fields is not a number. Every other line must have
/// as many fields as the first. Empty fields and `NA`, `null`, `None` are missing values; `nan`,
/// `inf` and `-inf` are read as such. Blank lines are skipped. Fields may be wrapped in double
/// quotes, but quoted commas are not supported.
pub fn parse_csv(bytes: &[u8]) -> Result<Table, DatasetError> {
    let text = std::str::from_utf8(bytes).map_err(|error| {
        let line = 1 + bytes
            .get(..error.valid_up_to())
            .map_or(0, |valid| valid.iter().filter(|&&b| b == b'\n').count());
        csv_error(line, "not UTF-8 text")
    })?;
    let mut names = None;
    let mut columns = 0;
    let mut values = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        if columns == 0 {
            if fields.len() > MAX_COLUMNS {
                return Err(csv_error(
                    number,
                    format!("{} columns, at most {MAX_COLUMNS}", fields.len()),
                ));
            }
            columns = fields.len();
            let parsed: Vec<Field> = fields.iter().map(|raw| parse_field(raw)).collect();
            if parsed.iter().any(|field| matches!(field, Field::Text(_))) {
                names = Some(fields.iter().map(|raw| header_name(raw)).collect());
                continue;
            }
        } else if fields.len() != columns {
            return Err(csv_error(
                number,
                format!("{} fields, the first line has {columns}", fields.len()),
            ));
        }
        if values.len() + columns > MAX_VALUES {
            return Err(csv_error(number, format!("more than {MAX_VALUES} values")));
        }
        for (column, raw) in fields.iter().enumerate() {
            values.push(match parse_field(raw) {
                Field::Number(value) => Some(value),
                Field::Missing => None,
                Field::Text(text) => {
                    return Err(csv_error(
                        number,
                        format!("column {}: {text:?} is not a number", column + 1),
                    ))
                }
            });
        }
    }
    if values.is_empty() {
        return Err(csv_error(text.lines().count().max(1), "no data rows"));
    }
    Ok(Table {
        names,
        columns,
        values,
    })
}

fn header_name(raw: &str) -> String {
    let field = raw.trim();
    field
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(field)
        .trim()
        .to_owned()
}

/// Element type of an `.npy` array (little-endian or byte-sized only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyType {
    F32,
    F64,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    Bool,
}

impl NpyType {
    pub fn size(self) -> usize {
        match self {
            NpyType::I8 | NpyType::U8 | NpyType::Bool => 1,
            NpyType::I16 | NpyType::U16 => 2,
            NpyType::F32 | NpyType::I32 | NpyType::U32 => 4,
            NpyType::F64 | NpyType::I64 | NpyType::U64 => 8,
        }
    }

    fn parse(descr: &str) -> Option<NpyType> {
        let (order, code) = descr.split_at_checked(1)?;
        let little = match order {
            "<" | "|" | "=" => true,
            ">" => false,
            _ => return None,
        };
        let kind = match code {
            "f4" => NpyType::F32,
            "f8" => NpyType::F64,
            "i1" => NpyType::I8,
            "i2" => NpyType::I16,
            "i4" => NpyType::I32,
            "i8" => NpyType::I64,
            "u1" => NpyType::U8,
            "u2" => NpyType::U16,
            "u4" => NpyType::U32,
            "u8" => NpyType::U64,
            "b1" => NpyType::Bool,
            _ => return None,
        };
        // Big-endian is fine for single bytes, where order means nothing.
        (little || kind.size() == 1).then_some(kind)
    }
}

impl fmt::Display for NpyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            NpyType::F32 => "float32",
            NpyType::F64 => "float64",
            NpyType::I8 => "int8",
            NpyType::I16 => "int16",
            NpyType::I32 => "int32",
            NpyType::I64 => "int64",
            NpyType::U8 => "uint8",
            NpyType::U16 => "uint16",
            NpyType::U32 => "uint32",
            NpyType::U64 => "uint64",
            NpyType::Bool => "bool",
        };
        f.write_str(name)
    }
}

/// A C-ordered `.npy` array: its element type, shape, and little-endian element bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NdArray {
    pub dtype: NpyType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl NdArray {
    pub fn len(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Every element as f64 (exact for all types but 64-bit integers beyond 2^53).
    pub fn to_f64(&self) -> Vec<f64> {
        let size = self.dtype.size();
        self.data
            .chunks_exact(size)
            .map(|bytes| element(self.dtype, bytes))
            .collect()
    }
}

fn element(dtype: NpyType, bytes: &[u8]) -> f64 {
    fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&bytes[..N]);
        out
    }
    match dtype {
        NpyType::F32 => f64::from(f32::from_le_bytes(array(bytes))),
        NpyType::F64 => f64::from_le_bytes(array(bytes)),
        NpyType::I8 => f64::from(i8::from_le_bytes(array(bytes))),
        NpyType::I16 => f64::from(i16::from_le_bytes(array(bytes))),
        NpyType::I32 => f64::from(i32::from_le_bytes(array(bytes))),
        NpyType::I64 => i64::from_le_bytes(array(bytes)) as f64,
        NpyType::U8 => f64::from(bytes[0]),
        NpyType::U16 => f64::from(u16::from_le_bytes(array(bytes))),
        NpyType::U32 => f64::from(u32::from_le_bytes(array(bytes))),
        NpyType::U64 => u64::from_le_bytes(array(bytes)) as f64,
        NpyType::Bool => f64::from(u8::from(bytes[0] != 0)),
    }
}

const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// Parses a NumPy `.npy` file (format versions 1 to 3), C order, little-endian or byte types.
pub fn parse_npy(bytes: &[u8]) -> Result<NdArray, DatasetError> {
    if bytes.get(..NPY_MAGIC.len()) != Some(NPY_MAGIC) {
        return Err(npy_error(0, "not an .npy file (no \\x93NUMPY magic)"));
    }
    let major = *bytes
        .get(6)
        .ok_or_else(|| npy_error(6, "file ends inside the preamble"))?;
    let (header_len, header_start) = match major {
        1 => {
            let len = bytes
                .get(8..10)
                .ok_or_else(|| npy_error(8, "file ends inside the preamble"))?;
            (usize::from(u16::from_le_bytes([len[0], len[1]])), 10)
        }
        2 | 3 => {
            let len = bytes
                .get(8..12)
                .ok_or_else(|| npy_error(8, "file ends inside the preamble"))?;
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
            (usize::try_from(len).unwrap_or(usize::MAX), 12)
        }
        other => {
            return Err(npy_error(
                6,
                format!("format version {other} is not supported"),
            ))
        }
    };
    if header_len > MAX_NPY_HEADER {
        return Err(npy_error(
            8,
            format!("header of {header_len} bytes, at most {MAX_NPY_HEADER}"),
        ));
    }
    let data_start = header_start + header_len;
    let header = bytes
        .get(header_start..data_start)
        .ok_or_else(|| npy_error(header_start, "file ends inside the header"))?;
    let header =
        std::str::from_utf8(header).map_err(|_| npy_error(header_start, "header is not text"))?;
    let (dtype, fortran, shape) = parse_header(header)
        .map_err(|reason| npy_error(header_start, format!("header {header:?}: {reason}")))?;
    if fortran {
        return Err(npy_error(
            header_start,
            "Fortran-ordered arrays are not supported; save with np.ascontiguousarray",
        ));
    }
    // Sizes stay u64 until capped, so a 32-bit device refuses an oversized shape by the same cap
    // and message as a 64-bit one, not as a number it cannot parse.
    shape
        .iter()
        .try_fold(1u64, |acc, &dim| acc.checked_mul(dim))
        .filter(|&count| count <= MAX_VALUES as u64)
        .ok_or_else(|| {
            npy_error(
                header_start,
                format!("shape {shape:?} holds more than {MAX_VALUES} values"),
            )
        })?;
    // Under the cap, only an axis of an empty array can still be beyond usize.
    let shape = shape
        .iter()
        .map(|&dim| usize::try_from(dim))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| {
            npy_error(
                header_start,
                format!("shape {shape:?} has an axis longer than this device can address"),
            )
        })?;
    let count: usize = shape.iter().product();
    let data = bytes.get(data_start..).unwrap_or_default();
    let expected = count * dtype.size();
    if data.len() != expected {
        return Err(npy_error(
            data_start,
            format!(
                "shape {shape:?} of {dtype} needs {expected} data bytes, the file has {}",
                data.len()
            ),
        ));
    }
    Ok(NdArray {
        dtype,
        shape,
        data: data.to_vec(),
    })
}

/// Reads `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`.
fn parse_header(header: &str) -> Result<(NpyType, bool, Vec<u64>), String> {
    let body = header
        .trim()
        .strip_prefix('{')
        .and_then(|rest| rest.trim_end().strip_suffix('}'))
        .ok_or("not a dictionary")?;
    let value_of = |key: &str| -> Result<&str, String> {
        let quoted = format!("'{key}'");
        let at = body.find(&quoted).ok_or(format!("no {quoted}"))?;
        let rest = body[at + quoted.len()..].trim_start();
        let rest = rest
            .strip_prefix(':')
            .ok_or(format!("no ':' after {quoted}"))?;
        Ok(rest.trim_start())
    };
    let descr = value_of("descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|rest| rest.split('\'').next())
        .ok_or("descr is not a quoted string")?;
    let dtype = NpyType::parse(descr).ok_or(format!("element type {descr:?} is not supported"))?;
    let fortran = value_of("fortran_order")?;
    let fortran = if fortran.starts_with("True") {
        true
    } else if fortran.starts_with("False") {
        false
    } else {
        return Err("fortran_order is neither True nor False".to_owned());
    };
    let shape = value_of("shape")?;
    let inner = shape
        .strip_prefix('(')
        .and_then(|rest| rest.split(')').next())
        .ok_or("shape is not a tuple")?;
    let mut dims = Vec::new();
    for part in inner
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        if dims.len() == MAX_NPY_RANK {
            return Err(format!("more than {MAX_NPY_RANK} axes"));
        }
        dims.push(
            part.parse::<u64>()
                .map_err(|_| format!("shape entry {part:?} is not a size"))?,
        );
    }
    Ok((dtype, fortran, dims))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        npy_ordered(descr, "False", shape, data)
    }

    fn npy_ordered(descr: &str, fortran: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}");
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn csv_with_header_missing_and_special_values() {
        let table = parse_csv(b"a, \"b\" ,c\n1,2,3\n\n4,,nan\n-inf,NA,1e3\n").unwrap();
        assert_eq!(
            table.names,
            Some(vec!["a".to_owned(), "b".to_owned(), "c".to_owned()])
        );
        assert_eq!((table.columns, table.rows()), (3, 3));
        assert_eq!(table.values[4], None);
        assert!(table.values[5].unwrap().is_nan());
        assert_eq!(table.values[6], Some(f64::NEG_INFINITY));
        assert_eq!(table.values[8], Some(1000.0));
    }

    #[test]
    fn csv_without_header() {
        let table = parse_csv(b"1,2\n3,4").unwrap();
        assert_eq!(table.names, None);
        assert_eq!(table.values, [Some(1.0), Some(2.0), Some(3.0), Some(4.0)]);
    }

    #[test]
    fn csv_errors_name_the_line() {
        assert_eq!(
            parse_csv(b"a,b\n1,2\n3\n").unwrap_err().to_string(),
            "CSV line 3: 1 fields, the first line has 2"
        );
        assert_eq!(
            parse_csv(b"a,b\n1,2\n3,x7\n").unwrap_err().to_string(),
            "CSV line 3: column 2: \"x7\" is not a number"
        );
        assert_eq!(
            parse_csv(b"1,2\n\xff,1\n").unwrap_err().to_string(),
            "CSV line 2: not UTF-8 text"
        );
        assert!(matches!(
            parse_csv(b"a,b\n"),
            Err(DatasetError::Csv { line: 1, .. })
        ));
    }

    #[test]
    fn npy_float_and_integer_arrays() {
        let data: Vec<u8> = [1.5f32, -2.0, 3.25, 0.0, 7.0, 8.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let array = parse_npy(&npy("<f4", "(2, 3)", &data)).unwrap();
        assert_eq!(
            (array.dtype, array.shape.clone()),
            (NpyType::F32, vec![2, 3])
        );
        assert_eq!(array.to_f64(), [1.5, -2.0, 3.25, 0.0, 7.0, 8.0]);
        let bytes = parse_npy(&npy("|u1", "(4,)", &[0, 1, 254, 255])).unwrap();
        assert_eq!(bytes.to_f64(), [0.0, 1.0, 254.0, 255.0]);
        let scalar = parse_npy(&npy("<i8", "()", &(-5i64).to_le_bytes())).unwrap();
        assert_eq!((scalar.shape.len(), scalar.to_f64()), (0, vec![-5.0]));
    }

    #[test]
    fn npy_errors_name_the_offset() {
        assert_eq!(
            parse_npy(b"PK\x03\x04").unwrap_err().to_string(),
            ".npy at byte 0: not an .npy file (no \\x93NUMPY magic)"
        );
        let short = npy("<f4", "(2, 3)", &[0; 20]);
        let error = parse_npy(&short).unwrap_err().to_string();
        assert!(
            error.ends_with("shape [2, 3] of float32 needs 24 data bytes, the file has 20"),
            "{error}"
        );
        let big_endian = npy(">f8", "(1,)", &[0; 8]);
        assert!(parse_npy(&big_endian)
            .unwrap_err()
            .to_string()
            .contains("element type \">f8\" is not supported"));
        let fortran = npy_ordered("<f4", "True", "(1,)", &[0; 4]);
        assert!(parse_npy(&fortran)
            .unwrap_err()
            .to_string()
            .contains("Fortran-ordered"));
        let huge = npy("<f8", "(4294967296, 4294967296)", &[]);
        assert!(parse_npy(&huge)
            .unwrap_err()
            .to_string()
            .contains("holds more than"));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_csv(&bytes);
            if let Ok(array) = parse_npy(&bytes) {
                proptest::prop_assert_eq!(array.to_f64().len(), array.len());
            }
        }

        #[test]
        fn mangled_npy_files_never_panic(
            at in 0usize..200,
            byte in proptest::num::u8::ANY,
            cut in 0usize..200,
        ) {
            let mut file = npy("<f4", "(3, 5)", &[0x3f; 60]);
            if let Some(slot) = file.get_mut(at) {
                *slot = byte;
            }
            file.truncate(file.len().saturating_sub(cut % 8));
            if let Ok(array) = parse_npy(&file) {
                proptest::prop_assert_eq!(array.to_f64().len(), array.len());
            }
        }
    }
}
