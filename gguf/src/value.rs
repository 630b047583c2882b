//! Metadata values.

/// The type tag of a metadata value (gguf.md's `gguf_metadata_value_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// u8
    U8,
    /// i8
    I8,
    /// u16
    U16,
    /// i16
    I16,
    /// u32
    U32,
    /// i32
    I32,
    /// f32
    F32,
    /// bool (one byte, 0 or 1)
    Bool,
    /// string (u64 length, UTF-8 bytes)
    String,
    /// array (element type, u64 count, elements)
    Array,
    /// u64
    U64,
    /// i64
    I64,
    /// f64
    F64,
}

impl ValueType {
    /// The type with tag `tag`.
    pub fn from_tag(tag: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match tag {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Bytes one value of it takes at least (what an array's count is bounded by).
    pub fn min_bytes(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            // element type and count
            Array => 12,
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    Uint(u64, ValueType),
    /// Any signed integer type.
    Int(i64, ValueType),
    /// f32 or f64.
    Float(f64, ValueType),
    /// bool.
    Bool(bool),
    /// string.
    String(String),
    /// array (of one element type).
    Array(Vec<Value>),
}

impl Value {
    /// Its value as a non-negative integer, when it is an integer that is one.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Uint(n, _) => Some(n),
            Value::Int(n, _) => u64::try_from(n).ok(),
            _ => None,
        }
    }

    /// Its value as a float, when it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(f, _) => Some(f),
            Value::Uint(n, _) => Some(n as f64),
            Value::Int(n, _) => Some(n as f64),
            _ => None,
        }
    }

    /// What it is, for messages: `a string ("gpt2")`, `an array of 49152 values`, `u32 7`.
    pub fn describe(&self) -> String {
        match self {
            Value::Uint(n, t) => format!("{} {n}", format!("{t:?}").to_lowercase()),
            Value::Int(n, t) => format!("{} {n}", format!("{t:?}").to_lowercase()),
            Value::Float(f, t) => format!("{} {f}", format!("{t:?}").to_lowercase()),
            Value::Bool(b) => format!("bool {b}"),
            Value::String(s) => {
                let short: String = s.chars().take(40).collect();
                format!("a string ({short:?})")
            }
            Value::Array(items) => format!("an array of {} values", items.len()),
        }
    }
}
