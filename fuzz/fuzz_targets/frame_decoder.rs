//! Any bytes, split anywhere, into the framed-serial reader: it must never panic, and every
//! frame it yields must re-encode to bytes whose CRC checks and that parse back to itself.
#![no_main]

use fieldllm_proto::frame::{self, Feed, Reader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let mut reader = Reader::new();
    for part in [&data[..split], &data[split..]] {
        let mut input = part;
        while let (Some(found), rest) = reader.feed(input) {
            input = rest;
            if let Feed::Frame(f) = found {
                let wire = frame::encode(&f).expect("a decoded frame fits a frame");
                let mut again = Reader::new();
                match again.feed(&wire) {
                    (Some(Feed::Frame(g)), _) => assert_eq!(f, g),
                    other => panic!("re-encoded frame does not read back: {other:?}"),
                }
            }
        }
    }
});
