//! Splitting a document into chunks that follow its structure (DESIGN.md section 10):
//! Markdown headings, numbered sections ("4.1 Main relief valve"), pages; each chunk bounded
//! in size, with overlap, and labelled with its section's title path and page.
//!
//! Written here rather than taken from `text-splitter`: that crate cuts Markdown well but
//! returns bare strings, and a citation needs each chunk's section path and page, and plain
//! text and PDF pages need numbered-section headings, which it does not know.

/// Size bounds of a chunk, in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most characters of text in one chunk.
    pub max_chars: usize,
    /// Characters of the previous chunk's end repeated at the start of the next one of the
    /// same section, so a sentence cut at a boundary is whole in one of them.
    pub overlap: usize,
}

impl Default for Limits {
    /// open-webui's default size (1000 characters) with 150 of overlap: RETRIEVAL.md.
    fn default() -> Self {
        Limits {
            max_chars: 1000,
            overlap: 150,
        }
    }
}

/// How a document's text marks its structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `#` headings (outside fenced code) and numbered section lines.
    Markdown,
    /// Numbered section lines only (plain text, a PDF page's text).
    Text,
}

/// One piece of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Its section's title path, outermost first, joined by " › " (empty before any heading).
    pub section: String,
    /// The page it is on (PDF), counting from 1.
    pub page: Option<u32>,
    /// The text.
    pub text: String,
}

/// Splits one document, page by page: the heading path carries across pages, a chunk never
/// does.
#[derive(Debug)]
pub struct Splitter {
    format: Format,
    limits: Limits,
    /// Open headings: (level, title).
    path: Vec<(usize, String)>,
    chunks: Vec<Chunk>,
}

impl Splitter {
    /// A splitter for a document in `format`. Limits are clamped to sane values (overlap
    /// below half the size).
    pub fn new(format: Format, limits: Limits) -> Splitter {
        let max_chars = limits.max_chars.max(100);
        let limits = Limits {
            max_chars,
            overlap: limits.overlap.min(max_chars / 2),
        };
        Splitter {
            format,
            limits,
            path: Vec::new(),
            chunks: Vec::new(),
        }
    }

    /// Splits the whole of a one-page document.
    pub fn split(format: Format, limits: Limits, text: &str) -> Vec<Chunk> {
        let mut s = Splitter::new(format, limits);
        s.page(text, None);
        s.finish()
    }

    /// Adds a page (or the whole text when `page` is `None`).
    pub fn page(&mut self, text: &str, page: Option<u32>) {
        let mut body = String::new();
        let mut fenced = false;
        for line in text.lines() {
            let trimmed = line.trim_start();
            if self.format == Format::Markdown && trimmed.starts_with("```") {
                fenced = !fenced;
            }
            let heading = if fenced { None } else { self.heading(line) };
            match heading {
                Some((level, title)) => {
                    self.flush(&mut body, page);
                    self.path.retain(|(l, _)| *l < level);
                    self.path.push((level, title));
                }
                None => {
                    body.push_str(line.trim_end());
                    body.push('\n');
                }
            }
        }
        self.flush(&mut body, page);
    }

    /// The chunks, in document order.
    pub fn finish(self) -> Vec<Chunk> {
        self.chunks
    }

    fn heading(&self, line: &str) -> Option<(usize, String)> {
        if self.format == Format::Markdown
            && let Some(h) = markdown_heading(line)
        {
            return Some(h);
        }
        numbered_heading(line)
    }

    fn section(&self) -> String {
        let titles: Vec<&str> = self.path.iter().map(|(_, t)| t.as_str()).collect();
        titles.join(" › ")
    }

    /// Cuts the text gathered under the current heading into chunks.
    fn flush(&mut self, body: &mut String, page: Option<u32>) {
        let text = std::mem::take(body);
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        let section = self.section();
        for piece in pieces(text, self.limits) {
            self.chunks.push(Chunk {
                section: section.clone(),
                page,
                text: piece,
            });
        }
    }
}

/// `# Title` .. `###### Title` (level 1-6).
fn markdown_heading(line: &str) -> Option<(usize, String)> {
    let level = line.bytes().take_while(|b| *b == b'#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    let rest = &line[level..];
    if !rest.starts_with([' ', '\t']) {
        return None;
    }
    let title = rest.trim().trim_end_matches('#').trim();
    (!title.is_empty()).then(|| (level, title.to_string()))
}

/// A numbered section line: "4 Hydraulics", "4.1 Main relief valve", "4.1.2. Setting":
/// numbers, then a title starting with a capital letter, short, without a closing period
/// (which tells it from a numbered step of a procedure). Level = how many numbers.
fn numbered_heading(line: &str) -> Option<(usize, String)> {
    let line = line.trim();
    if line.chars().count() > 80 || line.ends_with(['.', ':', ';', ',']) {
        return None;
    }
    let (number, title) = line.split_once([' ', '\t'])?;
    let number = number.trim_end_matches('.');
    let parts: Vec<&str> = number.split('.').collect();
    let numeric = parts
        .iter()
        .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
    let title = title.trim();
    let capital = title.chars().next().is_some_and(char::is_uppercase);
    // a bare "1 Remove the cover" is as likely a step as a heading: one number needs words
    // that are mostly capitalised or a short title
    if !numeric || !capital || parts.len() > 6 {
        return None;
    }
    if parts.len() == 1 && title.split_whitespace().count() > 6 {
        return None;
    }
    Some((parts.len(), format!("{number} {title}")))
}

/// Cuts a section's text into pieces of at most `max_chars` characters, at the last paragraph
/// break, else sentence end, else space before the limit; each piece after the first starts
/// with up to `overlap` characters of the previous one's end (from a word boundary).
fn pieces(text: &str, limits: Limits) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut start = 0;
    while start < chars.len() {
        let end = if chars.len() - start <= limits.max_chars {
            chars.len()
        } else {
            cut(&chars, start, start + limits.max_chars)
        };
        let piece: String = chars[start..end].iter().collect();
        let piece = piece.trim();
        if !piece.is_empty() {
            out.push(piece.to_string());
        }
        if end == chars.len() {
            break;
        }
        // the next piece starts `overlap` back, at a word start, but always moves forward
        let mut next = end.saturating_sub(limits.overlap).max(start + 1);
        while next < end && !chars[next - 1].is_whitespace() {
            next += 1;
        }
        start = next;
    }
    out
}

/// Where to end a piece that starts at `start` and may run to `limit` (exclusive): the best
/// boundary in its second half, else the limit itself.
fn cut(chars: &[char], start: usize, limit: usize) -> usize {
    let floor = start + (limit - start) / 2;
    let find = |good: &dyn Fn(usize) -> bool| (floor..limit).rev().find(|&i| good(i));
    let paragraph = |i: usize| chars[i] == '\n' && chars.get(i + 1) == Some(&'\n');
    let sentence = |i: usize| {
        matches!(chars[i], '.' | '!' | '?') && chars.get(i + 1).is_some_and(|c| c.is_whitespace())
    };
    let space = |i: usize| chars[i].is_whitespace();
    find(&paragraph)
        .map(|i| i + 1)
        .or_else(|| find(&sentence).map(|i| i + 1))
        .or_else(|| find(&space).map(|i| i + 1))
        .unwrap_or(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANUAL: &str = "\
# HPU-220 Service Manual

Read the safety notes first.

## 4 Hydraulics

### 4.1 Main relief valve RV-1

The main relief valve limits system pressure to 210 bar. A grinding noise with falling
pressure points to cavitation: check the suction strainer first.

```sh
# not a heading: inside fenced code
check-pressure --port P1
```

### 4.2 Suction strainer

Clean the strainer every 500 hours.

## 5 Electrical

Motor M1 draws 12 A at full load.
";

    #[test]
    fn markdown_chunks_carry_their_heading_path() {
        let chunks = Splitter::split(Format::Markdown, Limits::default(), MANUAL);
        let got: Vec<(&str, &str)> = chunks
            .iter()
            .map(|c| (c.section.as_str(), c.text.lines().next().unwrap_or("")))
            .collect();
        assert_eq!(
            got,
            vec![
                ("HPU-220 Service Manual", "Read the safety notes first."),
                (
                    "HPU-220 Service Manual › 4 Hydraulics › 4.1 Main relief valve RV-1",
                    "The main relief valve limits system pressure to 210 bar. A grinding noise with falling"
                ),
                (
                    "HPU-220 Service Manual › 4 Hydraulics › 4.2 Suction strainer",
                    "Clean the strainer every 500 hours."
                ),
                (
                    "HPU-220 Service Manual › 5 Electrical",
                    "Motor M1 draws 12 A at full load."
                ),
            ]
        );
        // the fenced code stays in its section's text, its `#` line is not a heading
        assert!(chunks[1].text.contains("# not a heading"));
        assert!(chunks.iter().all(|c| c.page.is_none()));
    }

    #[test]
    fn numbered_sections_in_plain_text_and_steps_that_are_not() {
        let text = "\
4 Hydraulics
4.1 Main relief valve
Set it to 210 bar.
1. Remove the cover.
2 Loosen the lock nut and turn the screw clockwise to raise the pressure setting
4.1.1 Setting procedure
Turn clockwise to raise.
";
        let chunks = Splitter::split(Format::Text, Limits::default(), text);
        let sections: Vec<&str> = chunks.iter().map(|c| c.section.as_str()).collect();
        assert_eq!(
            sections,
            vec![
                "4 Hydraulics › 4.1 Main relief valve",
                "4 Hydraulics › 4.1 Main relief valve › 4.1.1 Setting procedure"
            ]
        );
        // the numbered steps stayed text
        assert!(chunks[0].text.contains("1. Remove the cover."));
        assert!(chunks[0].text.contains("2 Loosen the lock nut"));
    }

    #[test]
    fn long_sections_are_cut_at_boundaries_with_overlap() {
        let sentence = "The pump delivers 40 litres per minute at 1500 rpm under load. ";
        let text = sentence.repeat(60); // ~3800 characters
        let limits = Limits {
            max_chars: 500,
            overlap: 80,
        };
        let chunks = Splitter::split(Format::Text, limits, &text);
        assert!(chunks.len() >= 8, "{}", chunks.len());
        for (i, c) in chunks.iter().enumerate() {
            assert!(c.text.chars().count() <= 500, "chunk {i} too long");
            // cut at a sentence end, not inside a word
            if i + 1 < chunks.len() {
                assert!(c.text.ends_with('.'), "chunk {i} ends {:?}", c.text);
            }
        }
        // each next chunk repeats the end of the one before it
        for w in chunks.windows(2) {
            let head: String = w[1].text.chars().take(20).collect();
            assert!(w[0].text.contains(head.trim()), "no overlap: {head:?}");
        }
        // nothing lost: every sentence of the text is in some chunk
        let all: String = chunks.iter().map(|c| c.text.as_str()).collect();
        assert!(all.matches("litres").count() >= 60);
    }

    #[test]
    fn a_word_longer_than_a_chunk_is_cut_and_the_split_ends() {
        let text = "x".repeat(2500);
        let chunks = Splitter::split(Format::Text, Limits::default(), &text);
        assert!(chunks.iter().all(|c| c.text.chars().count() <= 1000));
        let total: usize = chunks.iter().map(|c| c.text.len()).sum();
        assert!(total >= 2500);
    }

    #[test]
    fn pages_keep_the_heading_path_and_never_share_a_chunk() {
        let mut s = Splitter::new(Format::Text, Limits::default());
        s.page(
            "4 Hydraulics\n4.1 Main relief valve\nSet it to 210 bar.\n",
            Some(3),
        );
        s.page("Check it monthly.\n4.2 Strainer\nClean it.\n", Some(4));
        let chunks = s.finish();
        let got: Vec<(Option<u32>, &str, &str)> = chunks
            .iter()
            .map(|c| (c.page, c.section.as_str(), c.text.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    Some(3),
                    "4 Hydraulics › 4.1 Main relief valve",
                    "Set it to 210 bar."
                ),
                (
                    Some(4),
                    "4 Hydraulics › 4.1 Main relief valve",
                    "Check it monthly."
                ),
                (Some(4), "4 Hydraulics › 4.2 Strainer", "Clean it."),
            ]
        );
    }

    #[test]
    fn empty_and_heading_only_documents_give_no_chunks() {
        assert!(Splitter::split(Format::Markdown, Limits::default(), "").is_empty());
        assert!(
            Splitter::split(Format::Markdown, Limits::default(), "# Title\n\n## Sub\n").is_empty()
        );
        // and odd limits are clamped, not looped on
        let tiny = Limits {
            max_chars: 0,
            overlap: 5000,
        };
        let chunks = Splitter::split(Format::Text, tiny, &"word ".repeat(100));
        assert!(!chunks.is_empty());
    }

    #[test]
    fn multibyte_text_is_cut_on_characters() {
        let text = "Überdruckventil prüfen. ".repeat(100);
        let chunks = Splitter::split(Format::Text, Limits::default(), &text);
        assert!(chunks.len() > 1);
        // every chunk starts at a word of the text, never inside one
        for c in &chunks {
            let first = c.text.split_whitespace().next().unwrap_or("");
            assert!(["Überdruckventil", "prüfen."].contains(&first), "{first:?}");
        }
    }

    proptest::proptest! {
        /// Any text of short words: every chunk within the size, and the chunks, overlaps
        /// aside, give back every word in order.
        #[test]
        fn chunks_are_bounded_and_lose_nothing(
            words in proptest::collection::vec("[a-z]{1,12}[.]?", 0..600),
            breaks in proptest::collection::vec(0u8..12, 0..600),
            max_chars in 100usize..700,
            overlap in 0usize..300,
        ) {
            let mut text = String::new();
            for (i, w) in words.iter().enumerate() {
                text.push_str(w);
                text.push_str(match breaks.get(i) { Some(0) => "\n\n", Some(1) => "\n", _ => " " });
            }
            let limits = Limits { max_chars, overlap };
            let chunks = Splitter::split(Format::Text, limits, &text);
            let input: Vec<&str> = text.split_whitespace().collect();
            let mut covered: usize = 0;
            for c in &chunks {
                proptest::prop_assert!(c.text.chars().count() <= max_chars);
                let got: Vec<&str> = c.text.split_whitespace().collect();
                let from = covered.saturating_sub(got.len());
                let start = (from..=covered)
                    .find(|&s| input.get(s..s + got.len()) == Some(&got[..]));
                proptest::prop_assert!(start.is_some(), "chunk not a run of the input at {}", covered);
                covered = covered.max(start.unwrap_or(0) + got.len());
            }
            proptest::prop_assert_eq!(covered, input.len());
        }
    }
}
