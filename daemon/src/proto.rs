//! The wire schema, from the `fieldllm-proto` crate (shared with device-side code).

pub use fieldllm_proto::*;
