//! A GGUF tensor's bytes read from the file and put in the form the graph holds: quantized
//! blocks value for value in their run-time form (`ggml::convert`; rows reordered only),
//! floats widened exactly to f32.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use tract_core::prelude::f16;

use super::gguf::{GgmlType, TensorInfo};
use super::{Gguf, ImportError};
use crate::ggml::OwnedWeights;
use crate::ggml::convert::{self, form_of};

/// Reads tensors' data from the file the directory came from.
pub(crate) struct TensorReader {
    file: File,
    path: PathBuf,
}

/// A weight matrix `[n out, k in]` as the graph will hold it.
pub(crate) enum Matrix {
    /// The file's quantized blocks, for the project's kernels.
    Blocks(Arc<OwnedWeights>),
    /// Float weights (F32, F16, BF16 in the file), widened exactly, row-major `[n, k]`.
    Dense {
        /// Rows.
        n: usize,
        /// Values per row.
        k: usize,
        /// `n * k` values.
        values: Vec<f32>,
    },
}

/// The tensor types a matrix may have, for messages.
pub(crate) const RUN_TYPES: &str =
    "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F32, F16 and BF16";

impl TensorReader {
    pub(crate) fn open(g: &Gguf) -> Result<TensorReader, ImportError> {
        let file = File::open(&g.path).map_err(|source| {
            ImportError::Gguf(super::GgufError::Io {
                path: g.path.clone(),
                source,
            })
        })?;
        Ok(TensorReader {
            file,
            path: g.path.clone(),
        })
    }

    /// The tensor's bytes (the reader checked that they lie inside the file).
    pub(crate) fn bytes(&mut self, t: &TensorInfo) -> Result<Vec<u8>, ImportError> {
        let io = |source| {
            ImportError::Gguf(super::GgufError::Io {
                path: self.path.clone(),
                source,
            })
        };
        let len = usize::try_from(t.bytes).map_err(|_| self.invalid(&t.name, "too large"))?;
        let mut buf = vec![0u8; len];
        self.file
            .seek(SeekFrom::Start(t.offset))
            .and_then(|_| self.file.read_exact(&mut buf))
            .map_err(io)?;
        Ok(buf)
    }

    fn invalid(&self, tensor: &str, what: &str) -> ImportError {
        ImportError::Invalid {
            path: self.path.clone(),
            what: format!("tensor {tensor}: {what}"),
        }
    }

    /// The 2-D tensor `name`, `[n, k]`. With `heads`, its rows are taken back from llama.cpp's
    /// rotary layout (each head's pairs adjacent) to the half-split one the graph's rotary
    /// embedding uses: a permutation of whole rows, so quantized blocks move unchanged.
    pub(crate) fn matrix(
        &mut self,
        g: &Gguf,
        name: &str,
        shape: [usize; 2],
        heads: Option<usize>,
    ) -> Result<Matrix, ImportError> {
        let t = tensor(g, name)?;
        let [n, k] = shape;
        check_dims(g, t, &[k, n])?;
        let mut bytes = self.bytes(t)?;
        if let Some(heads) = heads {
            if n % heads != 0 || (n / heads) % 2 != 0 {
                return Err(
                    self.invalid(name, &format!("{n} rows do not split into {heads} heads"))
                );
            }
            bytes = unpermute_rows(&bytes, n, heads);
        }
        if form_of(t.ty).is_some() {
            let w = convert::from_gguf(t.ty, n, k, &bytes)
                .map_err(|e| self.invalid(name, &e.to_string()))?;
            return Ok(Matrix::Blocks(Arc::new(w)));
        }
        match floats(t.ty, &bytes) {
            Some(values) => Ok(Matrix::Dense { n, k, values }),
            None => Err(ImportError::Unsupported {
                path: g.path.clone(),
                what: format!(
                    "tensor {name} is {}, which fieldllm's kernels do not run yet ({RUN_TYPES} do)",
                    t.ty
                ),
            }),
        }
    }

    /// The 1-D float tensor `name` of `len` values (norm weights, rotary factors).
    pub(crate) fn vector(
        &mut self,
        g: &Gguf,
        name: &str,
        len: usize,
    ) -> Result<Vec<f32>, ImportError> {
        let t = tensor(g, name)?;
        check_dims(g, t, &[len])?;
        let bytes = self.bytes(t)?;
        floats(t.ty, &bytes).ok_or_else(|| {
            self.invalid(
                name,
                &format!("is {}; a vector must be F32, F16 or BF16", t.ty),
            )
        })
    }
}

/// Checks, without reading its data, that the tensor `name` exists with the dims `want`
/// (innermost first) and a type the graph can hold: a matrix's blocks or floats, a vector's
/// floats.
pub(crate) fn check(g: &Gguf, name: &str, want: &[usize], matrix: bool) -> Result<(), ImportError> {
    let t = tensor(g, name)?;
    check_dims(g, t, want)?;
    let float = matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
    if float || (matrix && form_of(t.ty).is_some()) {
        return Ok(());
    }
    Err(ImportError::Unsupported {
        path: g.path.clone(),
        what: if matrix {
            format!(
                "tensor {name} is {}, which fieldllm's kernels do not run yet ({RUN_TYPES} do)",
                t.ty
            )
        } else {
            format!(
                "tensor {name} is {}; a vector must be F32, F16 or BF16",
                t.ty
            )
        },
    })
}

/// The tensor `name`, or an error naming it.
pub(crate) fn tensor<'g>(g: &'g Gguf, name: &str) -> Result<&'g TensorInfo, ImportError> {
    g.tensor(name).ok_or_else(|| ImportError::Invalid {
        path: g.path.clone(),
        what: format!("tensor {name} is missing"),
    })
}

/// `t`'s ggml dims (innermost first) must be `want`, trailing 1s allowed.
fn check_dims(g: &Gguf, t: &TensorInfo, want: &[usize]) -> Result<(), ImportError> {
    let mut dims: Vec<u64> = t.dims.clone();
    while dims.len() > want.len() && dims.last() == Some(&1) {
        dims.pop();
    }
    let want64: Vec<u64> = want.iter().map(|&d| d as u64).collect();
    if dims != want64 {
        return Err(ImportError::Invalid {
            path: g.path.clone(),
            what: format!(
                "tensor {} has shape {:?}, the model's metadata makes it {:?}",
                t.name, t.dims, want64
            ),
        });
    }
    Ok(())
}

/// Floats of an F32, F16 or BF16 tensor, widened exactly.
fn floats(ty: GgmlType, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match ty {
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        _ => return None,
    })
}

/// Rows `(head, i, pair)` of llama.cpp's layout to `(head, pair, i)`: the inverse of its
/// converter's `w.reshape(heads, 2, hd / 2, k).swapaxes(1, 2)` (and of the Python converter's
/// `unpermute_qk`). `bytes` holds `n` rows of equal length.
fn unpermute_rows(bytes: &[u8], n: usize, heads: usize) -> Vec<u8> {
    let row = bytes.len() / n;
    let hd = n / heads;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for pair in 0..2 {
            for i in 0..hd / 2 {
                let to = h * hd + pair * (hd / 2) + i;
                let from = h * hd + i * 2 + pair;
                out[to * row..(to + 1) * row].copy_from_slice(&bytes[from * row..(from + 1) * row]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_takes_pairs_apart_per_head() {
        // 2 heads of 4 rows, 1 byte per row: llama.cpp's order is (head, i, pair)
        let bytes: Vec<u8> = (0..8).collect();
        // head 0: rows 0 (i0 p0), 1 (i0 p1), 2 (i1 p0), 3 (i1 p1) -> p0: 0, 2; p1: 1, 3
        assert_eq!(unpermute_rows(&bytes, 8, 2), vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn floats_widen_exactly() {
        let bf = (1.5f32.to_bits() >> 16) as u16;
        assert_eq!(floats(GgmlType::BF16, &bf.to_le_bytes()), Some(vec![1.5]));
        let h = f16::from_f32(-0.25).to_le_bytes();
        assert_eq!(floats(GgmlType::F16, &h), Some(vec![-0.25]));
        assert_eq!(floats(GgmlType::Q4_K, &[0; 144]), None);
    }
}
