//! Reading the header: every count bounded by what the file can hold before anything is
//! allocated for it, every tensor's size computed from its shape and type and placed inside
//! the file.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufReader, Read};
use std::path::Path;

use crate::{
    DEFAULT_ALIGNMENT, GgmlType, Gguf, GgufError, MAX_DIMS, TensorInfo, Value, ValueType, shown,
};

/// Most metadata entries (a Llama 3 file has ~40).
const MAX_KV: u64 = 1 << 16;
/// Most tensors (a 70B Llama has ~720).
const MAX_TENSORS: u64 = 1 << 20;
/// Most values in one metadata array (Llama 3's merges are 280,147).
const MAX_ARRAY: u64 = 1 << 23;
/// Longest string (chat templates are a few KiB).
const MAX_STRING: u64 = 1 << 24;
/// Arrays nest at most this deep (the format allows it; no model uses it).
const MAX_NESTING: u32 = 2;

/// Reads the header of the GGUF file at `path`.
pub fn read(path: &Path) -> Result<Gguf, GgufError> {
    let io = |source| GgufError::Io {
        path: shown(path),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    read_from(BufReader::new(file), len, path)
}

/// Reads a GGUF header from `r`, a file of `len` bytes named `path` in messages.
pub fn read_from(r: impl Read, len: u64, path: &Path) -> Result<Gguf, GgufError> {
    let mut rd = Reader {
        inner: r,
        pos: 0,
        len,
        path,
    };
    let magic = rd.bytes(len.min(4), &|| "the magic".into())?;
    if magic != b"GGUF" {
        return Err(GgufError::NotGguf {
            path: shown(path),
            magic,
        });
    }
    let version = rd.u32(&|| "the version".into())?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version {
            path: shown(path),
            version,
        });
    }
    let n_tensors = rd.u64(&|| "the tensor count".into())?;
    let n_kv = rd.u64(&|| "the metadata count".into())?;
    // a key is at least its length and a value type tag and a byte
    rd.count(n_kv, 8 + 4 + 1, MAX_KV, "metadata entries")?;
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = rd.string(&|| format!("the key of metadata entry {i}"))?;
        if key.is_empty() {
            return Err(rd.malformed(format!("metadata entry {i} has an empty key")));
        }
        let tag = rd.u32(&|| format!("the value type of {key}"))?;
        let value = rd.value(tag, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(rd.malformed(format!("metadata key {key} appears twice")));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two() && *a <= 1 << 20)
            .ok_or_else(|| {
                rd.malformed(format!(
                    "general.alignment is {}, expected a power of two up to 1 MiB",
                    v.describe()
                ))
            })?,
    };
    // a name's length, one dimension, a type and an offset
    rd.count(n_tensors, 8 + 4 + 8 + 4 + 8, MAX_TENSORS, "tensors")?;
    let mut raw = Vec::new();
    for i in 0..n_tensors {
        raw.push(rd.tensor_info(i)?);
    }
    let data_offset = rd.pos.next_multiple_of(alignment);
    let tensors = place(raw, data_offset, alignment, len, path)?;
    Ok(Gguf {
        path: shown(path),
        version,
        metadata,
        tensors,
        data_offset,
        alignment,
        file_len: len,
    })
}

/// A tensor as the directory lists it, before its size is known.
struct Raw {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    offset: u64,
}

/// Each tensor's size from its shape and type, its data inside the file, no two overlapping.
fn place(
    raw: Vec<Raw>,
    data_offset: u64,
    alignment: u64,
    len: u64,
    path: &Path,
) -> Result<Vec<TensorInfo>, GgufError> {
    let bad = |t: &Raw, what: String| GgufError::BadTensor {
        path: shown(path),
        tensor: t.name.clone(),
        what,
    };
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for t in raw {
        if !names.insert(t.name.clone()) {
            return Err(GgufError::Malformed {
                path: shown(path),
                what: format!("tensor {} appears twice", t.name),
            });
        }
        let (per_block, block_bytes) = t.ty.block();
        if t.dims[0] % per_block != 0 {
            return Err(bad(
                &t,
                format!(
                    "its rows of {} weights are not a whole number of {} blocks ({per_block} weights each)",
                    t.dims[0], t.ty
                ),
            ));
        }
        let elements = t
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(&t, format!("its shape {:?} overflows", t.dims)))?;
        let bytes = (elements / per_block)
            .checked_mul(block_bytes)
            .ok_or_else(|| bad(&t, format!("its shape {:?} overflows", t.dims)))?;
        if t.offset % alignment != 0 {
            return Err(bad(
                &t,
                format!(
                    "its data offset {} is not a multiple of the alignment {alignment}",
                    t.offset
                ),
            ));
        }
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= len => out.push(TensorInfo {
                name: t.name,
                dims: t.dims,
                ty: t.ty,
                offset: start,
                bytes,
            }),
            _ => {
                return Err(bad(
                    &t,
                    format!(
                        "its {bytes} bytes ({:?} of {}) at data offset {} run past the end of the file ({len} bytes): the file is truncated or the directory is damaged",
                        t.dims, t.ty, t.offset
                    ),
                ));
            }
        }
    }
    let mut by_place: Vec<&TensorInfo> = out.iter().collect();
    by_place.sort_by_key(|t| t.offset);
    for pair in by_place.windows(2) {
        if pair[1].offset < pair[0].offset + pair[0].bytes {
            return Err(GgufError::BadTensor {
                path: shown(path),
                tensor: pair[1].name.clone(),
                what: format!("its data overlaps tensor {}'s", pair[0].name),
            });
        }
    }
    Ok(out)
}

struct Reader<'p, R> {
    inner: R,
    pos: u64,
    len: u64,
    path: &'p Path,
}

impl<R: Read> Reader<'_, R> {
    fn malformed(&self, what: String) -> GgufError {
        GgufError::Malformed {
            path: shown(self.path),
            what,
        }
    }

    fn truncated(&self, what: String) -> GgufError {
        GgufError::Truncated {
            path: shown(self.path),
            what,
            len: self.len,
        }
    }

    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// `n` items of at least `each` bytes: no more than the rest of the file holds, nor than
    /// `max`.
    fn count(&self, n: u64, each: u64, max: u64, what: &str) -> Result<(), GgufError> {
        if n > max {
            return Err(self.malformed(format!(
                "the header claims {n} {what}; at most {max} are read"
            )));
        }
        if n > self.left() / each {
            return Err(self.truncated(format!(
                "the {n} {what} the header claims (the rest of the file holds at most {})",
                self.left() / each
            )));
        }
        Ok(())
    }

    fn bytes(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<Vec<u8>, GgufError> {
        if n > self.left() {
            return Err(self.truncated(what()));
        }
        // bounded by the file's length just above
        let mut buf = vec![0u8; n as usize];
        self.inner.read_exact(&mut buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.truncated(what())
            } else {
                GgufError::Io {
                    path: shown(self.path),
                    source: e,
                }
            }
        })?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let b = self.bytes(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&b);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        if n > MAX_STRING {
            return Err(self.malformed(format!(
                "{} is a string of {n} bytes; at most {MAX_STRING} are read",
                what()
            )));
        }
        let b = self.bytes(n, what)?;
        String::from_utf8(b).map_err(|e| {
            self.malformed(format!(
                "{} is not UTF-8 (byte {} of the string)",
                what(),
                e.utf8_error().valid_up_to()
            ))
        })
    }

    fn value(&mut self, tag: u32, key: &str, depth: u32) -> Result<Value, GgufError> {
        use ValueType as T;
        let what = || format!("the value of {key}");
        let ty = ValueType::from_tag(tag).ok_or_else(|| {
            self.malformed(format!("metadata key {key} has unknown value type {tag}"))
        })?;
        Ok(match ty {
            T::U8 => Value::Uint(u8::from_le_bytes(self.array(&what)?).into(), ty),
            T::I8 => Value::Int(i8::from_le_bytes(self.array(&what)?).into(), ty),
            T::U16 => Value::Uint(u16::from_le_bytes(self.array(&what)?).into(), ty),
            T::I16 => Value::Int(i16::from_le_bytes(self.array(&what)?).into(), ty),
            T::U32 => Value::Uint(u32::from_le_bytes(self.array(&what)?).into(), ty),
            T::I32 => Value::Int(i32::from_le_bytes(self.array(&what)?).into(), ty),
            T::U64 => Value::Uint(u64::from_le_bytes(self.array(&what)?), ty),
            T::I64 => Value::Int(i64::from_le_bytes(self.array(&what)?), ty),
            T::F32 => Value::Float(f32::from_le_bytes(self.array(&what)?).into(), ty),
            T::F64 => Value::Float(f64::from_le_bytes(self.array(&what)?), ty),
            T::Bool => match self.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(self.malformed(format!("metadata key {key} is a bool of byte {b}")));
                }
            },
            T::String => Value::String(self.string(&what)?),
            T::Array => {
                if depth >= MAX_NESTING {
                    return Err(self.malformed(format!(
                        "metadata key {key} nests arrays deeper than {MAX_NESTING}"
                    )));
                }
                let elem = self.u32(&what)?;
                let elem_ty = ValueType::from_tag(elem).ok_or_else(|| {
                    self.malformed(format!(
                        "metadata key {key} is an array of unknown type {elem}"
                    ))
                })?;
                let n = self.u64(&what)?;
                self.count(
                    n,
                    elem_ty.min_bytes(),
                    MAX_ARRAY,
                    &format!("values of {key}"),
                )?;
                // bounded by the file's length and MAX_ARRAY just above
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(items)
            }
        })
    }

    fn tensor_info(&mut self, i: u64) -> Result<Raw, GgufError> {
        let name = self.string(&|| format!("the name of tensor {i}"))?;
        if name.is_empty() {
            return Err(self.malformed(format!("tensor {i} has an empty name")));
        }
        let what = || format!("the entry of tensor {name}");
        let n_dims = self.u32(&what)?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(self.malformed(format!(
                "tensor {name} has {n_dims} dimensions; ggml's tensors have 1 to {MAX_DIMS}"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64(&what)?);
        }
        if dims.contains(&0) {
            return Err(self.malformed(format!("tensor {name} has a zero dimension: {dims:?}")));
        }
        let id = self.u32(&what)?;
        let ty = GgmlType::from_id(id).map_err(|known| GgufError::UnsupportedType {
            path: shown(self.path),
            tensor: name.clone(),
            ty: known.map_or_else(|| format!("id {id} (unknown to ggml)"), |n| n.to_string()),
        })?;
        let offset = self.u64(&what)?;
        Ok(Raw {
            name,
            dims,
            ty,
            offset,
        })
    }
}
