//! The reader on files written here byte by byte: what it reads back, and each way a file can
//! be wrong, refused with a message that names it.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::path::Path;

use fieldllm_gguf::{GgmlType, GgufError, Value, read_from};
use proptest::prelude::*;

/// A GGUF file under construction.
#[derive(Clone)]
struct File {
    version: u32,
    kv: Vec<(String, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, u64)>,
    data: u64,
    alignment: u64,
}

fn s(text: &str) -> Vec<u8> {
    let mut b = (text.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(text.as_bytes());
    b
}

fn tagged(tag: u32, body: &[u8]) -> Vec<u8> {
    let mut b = tag.to_le_bytes().to_vec();
    b.extend_from_slice(body);
    b
}

impl File {
    /// A small llama-like file: a few metadata types, an F32 and a Q8_0 tensor.
    fn valid() -> File {
        let mut tokens = 8u32.to_le_bytes().to_vec();
        tokens.extend_from_slice(&3u64.to_le_bytes());
        for t in ["<s>", "a", "b"] {
            tokens.extend_from_slice(&s(t));
        }
        File {
            version: 3,
            kv: vec![
                ("general.architecture".into(), tagged(8, &s("llama"))),
                ("llama.block_count".into(), tagged(4, &2u32.to_le_bytes())),
                (
                    "llama.context_length".into(),
                    tagged(10, &4096u64.to_le_bytes()),
                ),
                (
                    "llama.rope.freq_base".into(),
                    tagged(6, &10000f32.to_le_bytes()),
                ),
                ("tokenizer.ggml.add_bos_token".into(), tagged(7, &[1])),
                ("tokenizer.ggml.tokens".into(), tagged(9, &tokens)),
            ],
            tensors: vec![
                ("output_norm.weight".into(), vec![64], 0, 0),
                ("token_embd.weight".into(), vec![64, 3], 8, 256),
            ],
            data: 256 + 3 * 2 * 34,
            alignment: 32,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            b.extend_from_slice(&s(k));
            b.extend_from_slice(v);
        }
        for (name, dims, ty, offset) in &self.tensors {
            b.extend_from_slice(&s(name));
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
        }
        b.resize(
            (b.len() as u64).next_multiple_of(self.alignment) as usize,
            0,
        );
        b.resize(b.len() + self.data as usize, 0x5a);
        b
    }
}

fn parse(b: &[u8]) -> Result<fieldllm_gguf::Gguf, GgufError> {
    read_from(b, b.len() as u64, Path::new("m.gguf"))
}

fn refused(f: &File) -> String {
    parse(&f.bytes()).unwrap_err().to_string()
}

#[test]
fn a_valid_file_reads_back() {
    let b = File::valid().bytes();
    let g = parse(&b).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(g.u32("llama.block_count").unwrap(), 2);
    assert_eq!(g.u32("llama.context_length").unwrap(), 4096);
    assert_eq!(g.f32("llama.rope.freq_base").unwrap(), 10000.0);
    assert_eq!(
        g.get("tokenizer.ggml.add_bos_token"),
        Some(&Value::Bool(true))
    );
    assert_eq!(
        g.strings("tokenizer.ggml.tokens").unwrap(),
        ["<s>", "a", "b"]
    );
    let e = g.tensor("token_embd.weight").unwrap();
    assert_eq!(
        (e.ty, e.dims.as_slice(), e.bytes),
        (GgmlType::Q8_0, &[64, 3][..], 3 * 2 * 34)
    );
    assert_eq!(e.offset, g.data_offset + 256);
    assert_eq!(g.data_offset % 32, 0);
    assert_eq!(e.offset + e.bytes, b.len() as u64);
    assert_eq!(g.tensor("output_norm.weight").unwrap().bytes, 64 * 4);
}

#[test]
fn every_truncation_is_refused_by_name() {
    let b = File::valid().bytes();
    for n in 0..b.len() {
        let e = parse(&b[..n]).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(
                e,
                GgufError::Truncated { .. }
                    | GgufError::NotGguf { .. }
                    | GgufError::BadTensor { .. }
            ),
            "{n}: {msg}"
        );
        assert!(msg.starts_with("m.gguf: "), "{msg}");
        if (4..24).contains(&n) {
            assert!(msg.contains("truncated"), "{n}: {msg}");
        }
    }
}

#[test]
fn a_wrong_magic_or_version_is_named() {
    let mut b = File::valid().bytes();
    b[..4].copy_from_slice(b"PK\x03\x04");
    let e = parse(&b).unwrap_err().to_string();
    assert!(e.contains("not a GGUF file") && e.contains("50, 4b"), "{e}");
    let f = File {
        version: 1,
        ..File::valid()
    };
    assert!(refused(&f).contains("GGUF version 1"));
}

#[test]
fn bad_metadata_is_named() {
    let with = |key: &str, value: Vec<u8>| {
        let mut f = File::valid();
        f.kv.push((key.into(), value));
        refused(&f)
    };
    let e = with("x.bad_tag", tagged(13, &[]));
    assert!(
        e.contains("x.bad_tag") && e.contains("unknown value type 13"),
        "{e}"
    );
    let e = with("x.bool", tagged(7, &[2]));
    assert!(e.contains("bool of byte 2"), "{e}");
    // an array claiming more values than the file holds is refused before any allocation
    let mut huge = 4u32.to_le_bytes().to_vec();
    huge.extend_from_slice(&(u64::MAX / 8).to_le_bytes());
    let e = with("x.huge", tagged(9, &huge));
    assert!(e.contains("x.huge") && e.contains("at most"), "{e}");
    let mut long = (u64::MAX - 1).to_le_bytes().to_vec();
    long.push(b'a');
    let e = with("x.long", tagged(8, &long));
    assert!(e.contains("x.long"), "{e}");
    let e = with("x.utf8", tagged(8, &[2, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe]));
    assert!(e.contains("not UTF-8"), "{e}");
    let e = with("general.architecture", tagged(8, &s("llama")));
    assert!(e.contains("appears twice"), "{e}");
    let e = with("general.alignment", tagged(4, &48u32.to_le_bytes()));
    assert!(e.contains("power of two"), "{e}");
    // nested arrays past the limit
    let mut nested = 9u32.to_le_bytes().to_vec();
    nested.extend_from_slice(&1u64.to_le_bytes());
    nested.extend_from_slice(&9u32.to_le_bytes());
    nested.extend_from_slice(&1u64.to_le_bytes());
    nested.extend_from_slice(&4u32.to_le_bytes());
    nested.extend_from_slice(&0u64.to_le_bytes());
    let e = with("x.nested", tagged(9, &nested));
    assert!(e.contains("nests arrays"), "{e}");
    // a metadata count past what the file holds
    let mut b = File::valid().bytes();
    b[16..24].copy_from_slice(&1_000_000u64.to_le_bytes());
    let e = parse(&b).unwrap_err().to_string();
    assert!(e.contains("metadata entries"), "{e}");
}

#[test]
fn typed_reads_name_the_key_and_what_it_is() {
    let g = parse(&File::valid().bytes()).unwrap();
    let e = g.u32("general.architecture").unwrap_err().to_string();
    assert!(
        e.contains("general.architecture is a string (\"llama\")"),
        "{e}"
    );
    let e = g.str("llama.block_count").unwrap_err().to_string();
    assert!(
        e.contains("u32 2") && e.contains("expected a string"),
        "{e}"
    );
    let e = g.u32("llama.head_count").unwrap_err().to_string();
    assert!(e.contains("llama.head_count is missing"), "{e}");
}

#[test]
fn bad_tensors_are_named() {
    let with = |t: (&str, Vec<u64>, u32, u64)| {
        let mut f = File::valid();
        f.tensors.push((t.0.into(), t.1, t.2, t.3));
        refused(&f)
    };
    // a type fieldllm does not run: named, at read time
    let e = with(("blk.0.attn_q.weight", vec![64, 2], 20, 512));
    assert!(
        e.contains("blk.0.attn_q.weight") && e.contains("IQ4_NL"),
        "{e}"
    );
    let e = with(("t", vec![64], 77, 512));
    assert!(e.contains("id 77"), "{e}");
    // K-quant rows must be whole blocks of 256: SmolLM2's 576-wide rows are not
    let e = with(("blk.0.ffn_up.weight", vec![576, 2], 12, 512));
    assert!(e.contains("576 weights") && e.contains("Q4_K"), "{e}");
    let e = with(("t", vec![64, 0], 0, 512));
    assert!(e.contains("zero dimension"), "{e}");
    let e = with(("t", vec![1, 1, 1, 1, 1], 0, 512));
    assert!(e.contains("5 dimensions"), "{e}");
    let e = with(("t", vec![u64::MAX, 2], 0, 512));
    assert!(e.contains("overflows"), "{e}");
    let e = with(("t", vec![64], 0, 100));
    assert!(e.contains("not a multiple of the alignment"), "{e}");
    // its data past the end of the file: truncated data, or a size that does not match
    let e = with(("t", vec![64, 1000], 0, 512));
    assert!(e.contains("run past the end of the file"), "{e}");
    let e = with(("t", vec![16], 0, 256));
    assert!(e.contains("overlaps tensor token_embd.weight"), "{e}");
    let e = with(("output_norm.weight", vec![64], 0, 256 + 224));
    assert!(e.contains("appears twice"), "{e}");
}

proptest! {
    /// Whatever bytes follow a valid start, the reader returns; it never panics or
    /// allocates past the file.
    #[test]
    fn any_bytes_are_read_or_refused(cut in 0usize..400, tail in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut b = File::valid().bytes();
        b.truncate(cut.min(b.len()));
        b.extend_from_slice(&tail);
        let _ = parse(&b);
    }

    /// Any one byte of a valid file changed: read or refused, never a panic.
    #[test]
    fn any_flipped_byte_is_read_or_refused(at in 0usize..500, to in any::<u8>()) {
        let mut b = File::valid().bytes();
        let at = at % b.len();
        b[at] = to;
        let _ = parse(&b);
    }
}
