//! Any bytes as a GGUF file: the reader returns a header or an error, never panics, and never
//! allocates past what the bytes could hold (an oversized count is refused before it is used).
//! A header it accepts is consistent: every tensor's data lies inside the file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = fieldllm_gguf::read_from(data, data.len() as u64, Path::new("fuzz.gguf")) {
        for t in &g.tensors {
            assert!(t.offset >= g.data_offset && t.offset + t.bytes <= data.len() as u64);
            let (per_block, block_bytes) = t.ty.block();
            assert_eq!(t.elements() / per_block * block_bytes, t.bytes);
        }
    }
});
