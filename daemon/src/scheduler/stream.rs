//! An answer's text as chunks: one per token event when streaming, the whole text in one chunk
//! at the end otherwise; `seq` counts the chunks sent, which `Done` then carries.

use super::event::{Chunk, TokenLogprobs};

/// Turns token events into [`Chunk`]s.
#[derive(Debug)]
pub(super) struct ChunkStream {
    id: String,
    stream: bool,
    seq: u32,
    text: String,
    logprobs: Vec<TokenLogprobs>,
}

impl ChunkStream {
    pub(super) fn new(id: &str, stream: bool) -> ChunkStream {
        ChunkStream {
            id: id.to_string(),
            stream,
            seq: 0,
            text: String::new(),
            logprobs: Vec::new(),
        }
    }

    /// Adds a token's text (and its log-probabilities); returns a chunk when streaming and
    /// there is something to send.
    pub(super) fn push(&mut self, text: &str, logprobs: Option<TokenLogprobs>) -> Option<Chunk> {
        self.text.push_str(text);
        self.logprobs.extend(logprobs);
        if self.stream { self.take() } else { None }
    }

    /// Whatever is still held, as a last chunk (the whole answer when not streaming).
    pub(super) fn flush(&mut self) -> Option<Chunk> {
        self.take()
    }

    /// Chunks sent so far: the `seq` of `Done`.
    pub(super) fn seq(&self) -> u32 {
        self.seq
    }

    fn take(&mut self) -> Option<Chunk> {
        if self.text.is_empty() && self.logprobs.is_empty() {
            return None;
        }
        let chunk = Chunk {
            id: self.id.clone(),
            seq: self.seq,
            text: std::mem::take(&mut self.text),
            logprobs: std::mem::take(&mut self.logprobs),
        };
        self.seq += 1;
        Some(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(id: u32) -> TokenLogprobs {
        TokenLogprobs {
            token_id: id,
            token: format!("t{id}"),
            logprob: -0.5,
            top: Vec::new(),
        }
    }

    #[test]
    fn streaming_sends_each_piece_in_order() {
        let mut s = ChunkStream::new("a", true);
        let c = s.push("Hel", None).expect("a chunk");
        assert_eq!((c.id.as_str(), c.seq, c.text.as_str()), ("a", 0, "Hel"));
        // a token whose text is held back (a partial stop string) sends nothing
        assert_eq!(s.push("", None), None);
        assert_eq!(s.push("lo", None).map(|c| c.seq), Some(1));
        assert_eq!(s.flush(), None);
        assert_eq!(s.seq(), 2);
    }

    #[test]
    fn a_token_with_no_text_still_carries_its_logprobs() {
        let mut s = ChunkStream::new("a", true);
        let c = s.push("", Some(lp(7))).expect("a chunk");
        assert_eq!((c.text.as_str(), c.logprobs.len()), ("", 1));
    }

    #[test]
    fn not_streaming_sends_one_chunk_at_the_end() {
        let mut s = ChunkStream::new("b", false);
        assert_eq!(s.push("Hel", Some(lp(1))), None);
        assert_eq!(s.push("lo", Some(lp(2))), None);
        let c = s.flush().expect("the whole answer");
        assert_eq!((c.seq, c.text.as_str(), c.logprobs.len()), (0, "Hello", 2));
        assert_eq!(s.seq(), 1);
        assert_eq!(s.flush(), None);
    }

    #[test]
    fn an_empty_answer_sends_no_chunk() {
        let mut s = ChunkStream::new("c", false);
        assert_eq!(s.flush(), None);
        assert_eq!(s.seq(), 0);
    }
}
