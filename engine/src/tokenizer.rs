//! Tokenizer: HF `tokenizers` for encoding; a per-token byte table for streaming decode.
//!
//! Byte-level BPE tokens stand for raw bytes, and one character may span two tokens. So the
//! stream is decoded byte-wise: each token adds its bytes to a [`Utf8Stream`], which releases
//! only complete characters (DESIGN.md section 2: incremental UTF-8-safe detokenization).
//! SentencePiece vocabularies (Llama 2 style, as `import::tokenizer` writes them) are decoded
//! the same way: a piece's `▁` is a space, a byte piece `<0xNN>` the byte itself, and the
//! space the tokenizer put before the text is dropped from an answer's start (HF's `Strip`).

use std::collections::HashMap;
use std::path::Path;

use tokenizers::Tokenizer;

use super::EngineError;

/// A tokenizer with the raw bytes of every token.
#[derive(Debug)]
pub struct TokenText {
    tokenizer: Tokenizer,
    /// Bytes each id stands for; empty for special (control) tokens, which are never printed.
    bytes: Vec<Vec<u8>>,
    special: Vec<bool>,
    special_text: Vec<String>,
    /// An answer's first space is the tokenizer's prefix, not text (SentencePiece).
    strip_first_space: bool,
}

/// How a vocabulary's pieces stand for bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pieces {
    /// GPT-2's printable characters for bytes.
    ByteLevel,
    /// SentencePiece: `▁` for a space, `<0xNN>` for a byte, other text as itself.
    SentencePiece,
}

/// The decoder of a `tokenizer.json`: byte-level, or SentencePiece's Replace + ByteFallback
/// (with whether it strips the prefix space).
fn pieces_of(json: &serde_json::Value) -> Option<(Pieces, bool)> {
    let decoder = json.get("decoder")?;
    match decoder.get("type")?.as_str()? {
        "ByteLevel" => Some((Pieces::ByteLevel, false)),
        "Sequence" => {
            let steps = decoder.get("decoders")?.as_array()?;
            let has = |t: &str| {
                steps
                    .iter()
                    .any(|d| d.get("type").and_then(|v| v.as_str()) == Some(t))
            };
            let replaces_space = steps.iter().any(|d| {
                d.get("type").and_then(|v| v.as_str()) == Some("Replace")
                    && d.pointer("/pattern/String").and_then(|v| v.as_str()) == Some("▁")
            });
            let strip = steps.iter().any(|d| {
                d.get("type").and_then(|v| v.as_str()) == Some("Strip")
                    && d.get("start").and_then(|v| v.as_u64()).unwrap_or(0) > 0
            });
            (has("ByteFallback") && replaces_space).then_some((Pieces::SentencePiece, strip))
        }
        _ => None,
    }
}

/// The bytes a SentencePiece piece stands for.
fn sentencepiece_bytes(piece: &str) -> Vec<u8> {
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>'))
        && hex.len() == 2
        && let Ok(b) = u8::from_str_radix(hex, 16)
    {
        return vec![b];
    }
    piece.replace('▁', " ").into_bytes()
}

/// GPT-2's printable-character -> byte map, the inverse of what byte-level vocabularies use.
fn unicode_to_bytes() -> HashMap<char, u8> {
    let mut bs: Vec<u32> = (u32::from('!')..=u32::from('~'))
        .chain(u32::from('¡')..=u32::from('¬'))
        .chain(u32::from('®')..=u32::from('ÿ'))
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .filter_map(|(b, c)| Some((char::from_u32(c)?, u8::try_from(b).ok()?)))
        .collect()
}

impl TokenText {
    /// Loads `tokenizer.json`; refuses tokenizers that are not byte-level BPE.
    pub fn load(path: &Path) -> Result<TokenText, EngineError> {
        let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        let Some((pieces, strip_first_space)) = pieces_of(&json) else {
            return Err(EngineError::Tokenizer(format!(
                "{}: only byte-level BPE and SentencePiece (byte fallback) tokenizers are supported",
                path.display()
            )));
        };
        let tokenizer = Tokenizer::from_bytes(text.as_bytes())
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        let n = tokenizer.get_vocab_size(true);
        let table = unicode_to_bytes();
        let mut bytes = vec![Vec::new(); n];
        let mut special = vec![false; n];
        let added = tokenizer.get_added_tokens_decoder();
        for (id, slot) in bytes.iter_mut().enumerate() {
            let id32 = id as u32;
            if let Some(tok) = added.get(&id32) {
                special[id] = tok.special;
                if !tok.special {
                    *slot = tok.content.as_bytes().to_vec();
                }
                continue;
            }
            let Some(piece) = tokenizer.id_to_token(id32) else {
                return Err(EngineError::Tokenizer(format!(
                    "{}: vocabulary has a hole at id {id}",
                    path.display()
                )));
            };
            if pieces == Pieces::SentencePiece {
                *slot = sentencepiece_bytes(&piece);
                continue;
            }
            *slot = piece
                .chars()
                .map(|c| table.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                .ok_or_else(|| {
                    EngineError::Tokenizer(format!(
                        "{}: token {id} ({piece:?}) is not byte-level encoded",
                        path.display()
                    ))
                })?;
        }
        // in id order, so the first one a message is found to contain is always the same
        let mut specials: Vec<(u32, String)> = added
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, t)| (id, t.content.clone()))
            .collect();
        specials.sort();
        let special_text = specials.into_iter().map(|(_, text)| text).collect();
        Ok(TokenText {
            tokenizer,
            bytes,
            special,
            special_text,
            strip_first_space,
        })
    }

    /// A stream for one answer's tokens (dropping a SentencePiece prefix space at its start).
    pub fn answer_stream(&self) -> Utf8Stream {
        Utf8Stream {
            pending: Vec::new(),
            strip_first_space: self.strip_first_space,
        }
    }

    /// Number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    /// Encodes text; special-token text such as `<|im_start|>` becomes its id (chat templates
    /// rely on it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of every special (control) token, such as `<|im_start|>`.
    pub fn special_texts(&self) -> impl Iterator<Item = &String> {
        self.special_text.iter()
    }

    /// Raw bytes of a token (empty for special tokens).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Text of a token sequence (special tokens dropped, bad UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| self.token_bytes(id).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The token's text for display in logprobs (lossy for partial characters).
    pub fn token_display(&self, id: u32) -> String {
        if self.is_special(id) {
            return self.tokenizer.id_to_token(id).unwrap_or_default();
        }
        String::from_utf8_lossy(self.token_bytes(id)).into_owned()
    }
}

/// Turns a stream of byte chunks into complete UTF-8 text, holding back a split character.
#[derive(Debug, Default, Clone)]
pub struct Utf8Stream {
    pending: Vec<u8>,
    /// Drop one space at the start of the text (until any text has been released).
    strip_first_space: bool,
}

impl Utf8Stream {
    /// Adds bytes; returns the text that is now complete. Invalid sequences become U+FFFD.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        let out = self.push_raw(bytes);
        self.strip(out)
    }

    fn strip(&mut self, mut out: String) -> String {
        if self.strip_first_space && !out.is_empty() {
            self.strip_first_space = false;
            if out.starts_with(' ') {
                out.remove(0);
            }
        }
        out
    }

    fn push_raw(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // valid_up_to guarantees this prefix is UTF-8
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                        None => {
                            // an incomplete character at the end: wait for the next token
                            self.pending.drain(..valid);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: whatever is held back is released (as U+FFFD if incomplete).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        self.strip(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_stream_holds_split_characters() {
        let text = "é€😀a";
        let bytes = text.as_bytes();
        // every split point, byte by byte
        let mut s = Utf8Stream::default();
        let mut out = String::new();
        for b in bytes {
            let piece = s.push(std::slice::from_ref(b));
            assert!(!piece.contains(char::REPLACEMENT_CHARACTER));
            out.push_str(&piece);
        }
        out.push_str(&s.finish());
        assert_eq!(out, text);
    }

    #[test]
    fn utf8_stream_replaces_invalid_bytes_and_goes_on() {
        let mut s = Utf8Stream::default();
        assert_eq!(s.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(s.push(b"\xe2\x82"), "");
        assert_eq!(s.finish(), "\u{fffd}");
    }

    #[test]
    fn sentencepiece_pieces_are_spaces_bytes_and_text() {
        assert_eq!(sentencepiece_bytes("▁Paris"), b" Paris");
        assert_eq!(sentencepiece_bytes("<0x0A>"), b"\n");
        assert_eq!(sentencepiece_bytes("<0xE2>"), [0xe2]);
        assert_eq!(sentencepiece_bytes("<0xZZ>"), b"<0xZZ>");
        assert_eq!(sentencepiece_bytes("é▁▁"), "é  ".as_bytes());
        let mut s = Utf8Stream {
            strip_first_space: true,
            ..Default::default()
        };
        // a split character first: nothing released, so the space rule waits for text
        assert_eq!(s.push(&[0xe2]), "");
        assert_eq!(s.push(&[0x82, 0xac]), "€");
        assert_eq!(s.push(b" x"), " x", "only the answer's first space goes");
        let mut s = Utf8Stream {
            strip_first_space: true,
            ..Default::default()
        };
        assert_eq!(s.push(b" The"), "The");
        assert_eq!(s.push(b" end"), " end");
    }

    #[test]
    fn byte_table_inverts_gpt2_map() {
        let t = unicode_to_bytes();
        assert_eq!(t.len(), 256);
        assert_eq!(t[&'Ġ'], b' ');
        assert_eq!(t[&'Ċ'], b'\n');
        assert_eq!(t[&'a'], b'a');
    }
}
