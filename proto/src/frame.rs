//! The framed serial protocol (DESIGN.md section 5), I/O-free: bytes in, frames out.
//!
//! On the wire each frame is COBS-encoded and ends with 0x00; decoded it is
//! `[kind u8][protobuf message][crc32 LE of kind + message]`, at most `MAX_FRAME` bytes.
//! The reader keeps one frame's bytes in a fixed-capacity buffer, after postcard's COBS
//! accumulator: a frame that grows past the limit is dropped up to its delimiter and reported
//! once, a bad one is reported, and reading goes on at the next 0x00 either way.

use crc::{CRC_32_ISO_HDLC, Crc};
use heapless::Vec as HVec;
use prost::Message as _;

use crate::{Cancel, Request, Status, v1};

/// Largest decoded frame: kind + message + CRC.
pub const MAX_FRAME: usize = 4096;
/// Largest encoded frame, without its delimiter.
pub const MAX_ENCODED: usize = cobs::max_encoding_length(MAX_FRAME);
/// The delimiter.
pub const DELIMITER: u8 = 0x00;
/// CRC-32 as zlib, Ethernet and Python's `zlib.crc32` compute it.
const CRC32: Crc<u32> = Crc::<u32>::new(&CRC_32_ISO_HDLC);

/// Frame kinds. Host to appliance below 0x80, appliance to host from 0x80.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// `Request`.
    Request = 0x01,
    /// `Cancel`.
    Cancel = 0x02,
    /// Empty body: asks for a `Status` frame.
    StatusQuery = 0x03,
    /// `Chunk`.
    Chunk = 0x81,
    /// `Done`.
    Done = 0x82,
    /// `Error`.
    Error = 0x83,
    /// `Status`.
    Status = 0x84,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            0x01 => Kind::Request,
            0x02 => Kind::Cancel,
            0x03 => Kind::StatusQuery,
            0x81 => Kind::Chunk,
            0x82 => Kind::Done,
            0x83 => Kind::Error,
            0x84 => Kind::Status,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A question.
    Request(Request),
    /// Stop an answer.
    Cancel(Cancel),
    /// Asks for status.
    StatusQuery,
    /// Part of an answer.
    Chunk(v1::Chunk),
    /// End of an answer.
    Done(v1::Done),
    /// A refusal or failure.
    Error(v1::Error),
    /// The appliance's state (boxed: with its accelerator telemetry it dwarfs the others).
    Status(Box<Status>),
}

/// Why bytes between two delimiters were not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More than `MAX_FRAME` bytes before the delimiter.
    #[error("frame longer than {MAX_FRAME} bytes")]
    Oversized,
    /// Not valid COBS.
    #[error("invalid COBS encoding")]
    Cobs,
    /// Fewer bytes than kind + CRC.
    #[error("truncated frame ({0} bytes)")]
    Truncated(usize),
    /// The CRC does not match.
    #[error("CRC mismatch: frame says {got:08x}, content gives {want:08x}")]
    Crc {
        /// CRC carried by the frame.
        got: u32,
        /// CRC of its content.
        want: u32,
    },
    /// A kind byte this protocol does not define.
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    /// The body is not the kind's protobuf message.
    #[error("undecodable {kind:?} body: {reason}")]
    Body {
        /// The frame's kind.
        kind: Kind,
        /// prost's message.
        reason: String,
    },
}

/// Why a frame could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("message of {0} bytes does not fit one frame")]
pub struct TooLarge(pub usize);

/// Parses a decoded frame (kind, body, CRC).
pub fn parse(decoded: &[u8]) -> Result<Frame, FrameError> {
    if decoded.len() < 5 {
        return Err(FrameError::Truncated(decoded.len()));
    }
    let (content, crc) = decoded.split_at(decoded.len() - 4);
    let got = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let want = CRC32.checksum(content);
    if got != want {
        return Err(FrameError::Crc { got, want });
    }
    let kind = Kind::from_u8(content[0]).ok_or(FrameError::UnknownKind(content[0]))?;
    let body = &content[1..];
    let bad = |e: prost::DecodeError| FrameError::Body {
        kind,
        reason: e.to_string(),
    };
    Ok(match kind {
        Kind::Request => Frame::Request(Request::decode(body).map_err(bad)?),
        Kind::Cancel => Frame::Cancel(Cancel::decode(body).map_err(bad)?),
        Kind::StatusQuery => Frame::StatusQuery,
        Kind::Chunk => Frame::Chunk(v1::Chunk::decode(body).map_err(bad)?),
        Kind::Done => Frame::Done(v1::Done::decode(body).map_err(bad)?),
        Kind::Error => Frame::Error(v1::Error::decode(body).map_err(bad)?),
        Kind::Status => Frame::Status(Box::new(Status::decode(body).map_err(bad)?)),
    })
}

/// Encodes a frame, COBS and delimiter included, ready to write.
pub fn encode(frame: &Frame) -> Result<HVec<u8, { MAX_ENCODED + 1 }>, TooLarge> {
    let (kind, body) = match frame {
        Frame::Request(m) => (Kind::Request, m.encode_to_vec()),
        Frame::Cancel(m) => (Kind::Cancel, m.encode_to_vec()),
        Frame::StatusQuery => (Kind::StatusQuery, Vec::new()),
        Frame::Chunk(m) => (Kind::Chunk, m.encode_to_vec()),
        Frame::Done(m) => (Kind::Done, m.encode_to_vec()),
        Frame::Error(m) => (Kind::Error, m.encode_to_vec()),
        Frame::Status(m) => (Kind::Status, m.encode_to_vec()),
    };
    encode_raw(kind as u8, &body)
}

/// Encodes any kind byte and body as a frame (CRC, COBS, delimiter): what [`encode`] does for
/// the schema's frames, open to tools and tests that must write frames the schema never makes
/// (an unknown kind, a body that is not its kind's message).
pub fn encode_raw(kind: u8, body: &[u8]) -> Result<HVec<u8, { MAX_ENCODED + 1 }>, TooLarge> {
    let len = 1 + body.len() + 4;
    let mut raw: HVec<u8, MAX_FRAME> = HVec::new();
    raw.push(kind).map_err(|_| TooLarge(len))?;
    raw.extend_from_slice(body).map_err(|_| TooLarge(len))?;
    let crc = CRC32.checksum(&raw);
    raw.extend_from_slice(&crc.to_le_bytes())
        .map_err(|_| TooLarge(len))?;
    let mut out: HVec<u8, { MAX_ENCODED + 1 }> = HVec::new();
    out.resize(MAX_ENCODED + 1, 0).map_err(|_| TooLarge(len))?;
    let n = cobs::encode(&raw, &mut out);
    out.truncate(n);
    out.push(DELIMITER).map_err(|_| TooLarge(len))?;
    Ok(out)
}

/// What `Reader::feed` found.
#[derive(Debug, PartialEq)]
pub enum Feed {
    /// A frame.
    Frame(Frame),
    /// Bytes up to a delimiter that were not a frame.
    Error(FrameError),
}

/// The accumulating reader; one per port.
#[derive(Debug, Default)]
pub struct Reader {
    buf: HVec<u8, MAX_ENCODED>,
    overflowed: bool,
}

impl Reader {
    /// A reader with nothing buffered.
    pub fn new() -> Reader {
        Reader::default()
    }

    /// Consumes bytes up to and including the first complete frame (or frame error); returns
    /// what it found, if anything, and the bytes not yet consumed.
    pub fn feed<'a>(&mut self, mut input: &'a [u8]) -> (Option<Feed>, &'a [u8]) {
        while let Some((&b, rest)) = input.split_first() {
            input = rest;
            if b != DELIMITER {
                if !self.overflowed && self.buf.push(b).is_err() {
                    self.overflowed = true;
                    self.buf.clear();
                }
                continue;
            }
            if self.overflowed {
                self.overflowed = false;
                return (Some(Feed::Error(FrameError::Oversized)), input);
            }
            if self.buf.is_empty() {
                // back-to-back delimiters: senders use them to resynchronise
                continue;
            }
            let found = self.finish();
            self.buf.clear();
            return (Some(found), input);
        }
        (None, input)
    }

    fn finish(&mut self) -> Feed {
        let mut decoded = [0u8; MAX_ENCODED];
        match cobs::decode(&self.buf, &mut decoded) {
            Ok(r) if r.frame_size() > MAX_FRAME => Feed::Error(FrameError::Oversized),
            Ok(r) => match parse(&decoded[..r.frame_size()]) {
                Ok(f) => Feed::Frame(f),
                Err(e) => Feed::Error(e),
            },
            Err(_) => Feed::Error(FrameError::Cobs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(reader: &mut Reader, mut bytes: &[u8]) -> Vec<Feed> {
        let mut out = Vec::new();
        loop {
            let (f, rest) = reader.feed(bytes);
            match f {
                Some(f) => out.push(f),
                None => return out,
            }
            bytes = rest;
        }
    }

    fn req(id: &str) -> Frame {
        Frame::Request(Request {
            id: id.into(),
            prompt: "Why does the pump cavitate?".into(),
            ..Request::default()
        })
    }

    #[test]
    fn frames_round_trip_and_the_crc_is_zlibs() {
        let f = req("q1");
        let wire = encode(&f).unwrap();
        assert_eq!(*wire.last().unwrap(), 0);
        assert!(!wire[..wire.len() - 1].contains(&0));
        assert_eq!(all(&mut Reader::new(), &wire), vec![Feed::Frame(f)]);
        // zlib.crc32(b"123456789") == 0xcbf43926
        assert_eq!(CRC32.checksum(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn the_readme_example_is_byte_exact() {
        let f = Frame::Request(Request {
            id: "a".into(),
            prompt: "Hi".into(),
            ..Request::default()
        });
        let wire = encode(&f).unwrap();
        assert_eq!(
            wire.as_slice(),
            [
                0x0d, 0x01, 0x0a, 0x01, 0x61, 0x12, 0x02, 0x48, 0x69, 0x6a, 0x5a, 0xac, 0x97, 0x00
            ]
        );
    }

    #[test]
    fn a_bad_crc_is_reported_and_the_next_frame_still_read() {
        let mut bad = encode(&req("a")).unwrap();
        bad[3] ^= 0x40; // inside the COBS body, not a delimiter
        let good = encode(&req("b")).unwrap();
        let mut bytes = bad.to_vec();
        bytes.extend_from_slice(&good);
        let got = all(&mut Reader::new(), &bytes);
        assert!(
            matches!(
                got[0],
                Feed::Error(FrameError::Crc { .. }) | Feed::Error(FrameError::Cobs)
            ),
            "{got:?}"
        );
        assert_eq!(got[1], Feed::Frame(req("b")));
    }

    #[test]
    fn truncated_oversized_and_unknown_frames_are_errors() {
        let got = all(&mut Reader::new(), &[0x03, 0x01, 0x02, 0x00]);
        assert_eq!(got, vec![Feed::Error(FrameError::Truncated(2))]);
        let mut big = vec![0x55u8; MAX_ENCODED + 100];
        big.push(0);
        big.extend_from_slice(&encode(&req("after")).unwrap());
        let got = all(&mut Reader::new(), &big);
        assert_eq!(
            got,
            vec![
                Feed::Error(FrameError::Oversized),
                Feed::Frame(req("after"))
            ]
        );
        let mut raw = vec![0x7f, 1, 2];
        raw.extend_from_slice(&CRC32.checksum(&raw).to_le_bytes());
        let mut enc = vec![0u8; 16];
        let n = cobs::encode(&raw, &mut enc);
        enc.truncate(n);
        enc.push(0);
        assert_eq!(
            all(&mut Reader::new(), &enc),
            vec![Feed::Error(FrameError::UnknownKind(0x7f))]
        );
    }

    #[test]
    fn a_message_too_big_for_a_frame_is_refused() {
        let f = Frame::Chunk(v1::Chunk {
            id: "x".into(),
            seq: 0,
            text: "a".repeat(MAX_FRAME),
            logprobs: vec![],
        });
        assert!(encode(&f).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any byte stream: no panic, and every frame that comes out has a matching CRC
        /// (re-encoding it gives bytes whose CRC checks).
        #[test]
        fn any_bytes_never_panic_or_yield_a_frame_with_a_bad_crc(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..10_000),
            split in 0usize..10_000,
        ) {
            let mut r = Reader::new();
            let split = split.min(bytes.len());
            let mut frames = all(&mut r, &bytes[..split]);
            frames.extend(all(&mut r, &bytes[split..]));
            for f in frames {
                if let Feed::Frame(f) = f {
                    let wire = encode(&f).unwrap();
                    let mut decoded = [0u8; MAX_ENCODED];
                    let n = cobs::decode(&wire[..wire.len() - 1], &mut decoded).unwrap().frame_size();
                    let (content, crc) = decoded[..n].split_at(n - 4);
                    proptest::prop_assert_eq!(CRC32.checksum(content).to_le_bytes(), [crc[0], crc[1], crc[2], crc[3]]);
                }
            }
        }

        /// Valid frames with noise between them all come through.
        #[test]
        fn frames_survive_noise_between_them(
            ids in proptest::collection::vec("[a-z0-9]{1,16}", 1..8),
            noise in proptest::collection::vec(proptest::collection::vec(1u8..=255, 0..64), 8),
        ) {
            let mut bytes = Vec::new();
            for (i, id) in ids.iter().enumerate() {
                bytes.extend_from_slice(&noise[i]);
                bytes.push(0);
                bytes.extend_from_slice(&encode(&req(id)).unwrap());
            }
            let got: Vec<Frame> = all(&mut Reader::new(), &bytes)
                .into_iter()
                .filter_map(|f| match f { Feed::Frame(f) => Some(f), Feed::Error(_) => None })
                .collect();
            let want: Vec<Frame> = ids.iter().map(|id| req(id)).collect();
            proptest::prop_assert_eq!(got, want);
        }
    }
}
