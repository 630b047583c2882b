//! The wire schema `fieldllm.v1` (DESIGN.md section 3): prost types with the proto3 JSON
//! mapping from pbjson, generated at build time from `proto/fieldllm/v1/fieldllm.proto`, and
//! the framed serial codec. A crate of its own so device-side Rust (and the fuzzer) can use the
//! protocol without the engine.

pub mod frame;

/// Generated types. Their docs are the comments in the .proto file.
#[allow(missing_docs, clippy::all, clippy::unwrap_used)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/fieldllm.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/fieldllm.v1.serde.rs"));
}

pub use v1::{Cancel, Chunk, Done, Error, ErrorCode, FinishReason, Request, Response, Status};

/// A response carrying a final `Error`.
pub fn error(id: &str, code: ErrorCode, message: impl Into<String>) -> Response {
    Response {
        kind: Some(v1::response::Kind::Error(Error {
            id: id.to_string(),
            code: code as i32,
            message: message.into(),
            ..Error::default()
        })),
    }
}

impl Response {
    /// Whether this is the last message of an answer (`Done` or `Error`).
    pub fn is_final(&self) -> bool {
        matches!(
            self.kind,
            Some(v1::response::Kind::Done(_) | v1::response::Kind::Error(_))
        )
    }

    /// The request id it answers.
    pub fn id(&self) -> &str {
        match &self.kind {
            Some(v1::response::Kind::Chunk(c)) => &c.id,
            Some(v1::response::Kind::Done(d)) => &d.id,
            Some(v1::response::Kind::Error(e)) => &e.id,
            None => "",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn json_uses_the_proto3_mapping_and_design_words() {
        let r: Request =
            serde_json::from_str(r#"{"id":"1","prompt":"hi","maxTokens":5,"priority":"high"}"#)
                .unwrap();
        assert_eq!(r.max_tokens, Some(5));
        assert_eq!(r.priority, v1::Priority::High as i32);
        let r: Request =
            serde_json::from_str(r#"{"id":"1","prompt":"hi","max_tokens":5}"#).unwrap();
        assert_eq!(
            r.max_tokens,
            Some(5),
            "the original field names are accepted too"
        );
        let e = error("7", ErrorCode::Busy, "queue full");
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains(r#""code":"busy""#), "{json}");
        let done = Response {
            kind: Some(v1::response::Kind::Done(Done {
                id: "7".into(),
                finish_reason: FinishReason::Stop as i32,
                ..Done::default()
            })),
        };
        assert!(
            serde_json::to_string(&done)
                .unwrap()
                .contains(r#""finishReason":"stop""#)
        );
    }

    #[test]
    fn unknown_json_fields_and_wrong_types_are_errors() {
        assert!(serde_json::from_str::<Request>(r#"{"id":"1","prompt":"hi","bogus":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"id":"1","prompt":5}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"id":"1","temperature":"hot"}"#).is_err());
    }

    #[test]
    fn protobuf_round_trips() {
        let r = Request {
            id: "a".into(),
            prompt: "q".into(),
            temperature: Some(0.5),
            ..Request::default()
        };
        let bytes = r.encode_to_vec();
        assert_eq!(Request::decode(bytes.as_slice()).unwrap(), r);
        assert!(Request::decode(&b"\xff\xff\xff"[..]).is_err());
    }
}
