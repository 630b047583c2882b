//! The console's line editor, I/O-free: terminal bytes in, events and echo bytes out.
//!
//! Terminal programs (picocom, minicom, screen) send raw keystrokes and show what comes back,
//! so the appliance echoes. It handles what such a terminal sends: printable UTF-8, backspace
//! (BS or DEL), Ctrl-U (erase the line), Ctrl-W (erase a word), Ctrl-C, Ctrl-D, and CR, LF or
//! CRLF as the line end. Escape sequences (arrow keys) are swallowed, never inserted; the echo
//! uses only BS, space and CR LF, no ANSI sequences.

/// Longest line accepted, in bytes.
pub const MAX_LINE: usize = 4096;

/// What a byte (or bytes) meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineEvent {
    /// A complete line (may be empty).
    Line(String),
    /// Ctrl-C.
    Interrupt,
    /// Ctrl-D on an empty line.
    EndOfInput,
    /// The line grew past `MAX_LINE`; it is discarded up to its end.
    TooLong,
    /// The line was not valid UTF-8.
    NotText,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    /// After ESC.
    Start,
    /// Inside `ESC [ ...` until a final byte.
    Csi,
}

/// One terminal's line state.
#[derive(Debug)]
pub struct LineEditor {
    buf: Vec<u8>,
    escape: Escape,
    last_was_cr: bool,
    overflow: bool,
}

impl Default for LineEditor {
    fn default() -> Self {
        LineEditor {
            buf: Vec::with_capacity(256),
            escape: Escape::None,
            last_was_cr: false,
            overflow: false,
        }
    }
}

impl LineEditor {
    /// An empty editor.
    pub fn new() -> LineEditor {
        LineEditor::default()
    }

    /// Whether nothing has been typed on the current line.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty() && !self.overflow
    }

    /// Drops the current line (after Ctrl-C, say).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.overflow = false;
        self.escape = Escape::None;
    }

    /// Takes one byte; appends what to echo to `echo`; returns an event when one completes.
    pub fn push(&mut self, b: u8, echo: &mut Vec<u8>) -> Option<LineEvent> {
        let after_cr = std::mem::replace(&mut self.last_was_cr, false);
        match self.escape {
            Escape::Start => {
                self.escape = if b == b'[' || b == b'O' {
                    Escape::Csi
                } else {
                    Escape::None
                };
                return None;
            }
            Escape::Csi => {
                // parameters and intermediates are 0x20..=0x3f; a final byte ends it
                if !(0x20..=0x3f).contains(&b) {
                    self.escape = Escape::None;
                }
                return None;
            }
            Escape::None => {}
        }
        match b {
            b'\n' if after_cr => None, // the LF of a CRLF
            b'\r' | b'\n' => {
                self.last_was_cr = b == b'\r';
                echo.extend_from_slice(b"\r\n");
                Some(self.take_line())
            }
            0x03 => {
                echo.extend_from_slice(b"^C\r\n");
                self.clear();
                Some(LineEvent::Interrupt)
            }
            0x04 if self.buf.is_empty() => Some(LineEvent::EndOfInput),
            0x08 | 0x7f => {
                if self.overflow {
                    return None;
                }
                // erase one character: its UTF-8 continuation bytes too
                while let Some(last) = self.buf.pop() {
                    if last & 0xc0 != 0x80 {
                        echo.extend_from_slice(b"\x08 \x08");
                        break;
                    }
                }
                None
            }
            0x15 => {
                self.erase_chars(self.buf.len(), echo);
                None
            }
            0x17 => {
                let text = &self.buf;
                let end = text.len();
                let mut start = end;
                while start > 0 && text[start - 1] == b' ' {
                    start -= 1;
                }
                while start > 0 && text[start - 1] != b' ' {
                    start -= 1;
                }
                self.erase_chars(end - start, echo);
                None
            }
            0x1b => {
                self.escape = Escape::Start;
                None
            }
            b'\t' => self.insert(b' ', echo),
            0x00..=0x1f => None, // other controls: ignored
            _ => self.insert(b, echo),
        }
    }

    fn insert(&mut self, b: u8, echo: &mut Vec<u8>) -> Option<LineEvent> {
        if self.overflow {
            return None;
        }
        if self.buf.len() >= MAX_LINE {
            self.overflow = true;
            self.buf.clear();
            return None;
        }
        self.buf.push(b);
        echo.push(b);
        None
    }

    /// Erases `n` bytes' worth of characters from the end, echoing one BS-space-BS per
    /// character.
    fn erase_chars(&mut self, n: usize, echo: &mut Vec<u8>) {
        let keep = self.buf.len() - n;
        let chars = String::from_utf8_lossy(&self.buf[keep..]).chars().count();
        self.buf.truncate(keep);
        for _ in 0..chars {
            echo.extend_from_slice(b"\x08 \x08");
        }
    }

    fn take_line(&mut self) -> LineEvent {
        if std::mem::replace(&mut self.overflow, false) {
            self.buf.clear();
            return LineEvent::TooLong;
        }
        let bytes = std::mem::take(&mut self.buf);
        match String::from_utf8(bytes) {
            Ok(s) => LineEvent::Line(s),
            Err(_) => LineEvent::NotText,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> (Vec<LineEvent>, Vec<u8>) {
        let mut ed = LineEditor::new();
        let mut echo = Vec::new();
        let ev = bytes
            .iter()
            .filter_map(|&b| ed.push(b, &mut echo))
            .collect();
        (ev, echo)
    }

    fn line(s: &str) -> LineEvent {
        LineEvent::Line(s.into())
    }

    #[test]
    fn every_line_end_style_gives_one_line() {
        for ending in ["\r", "\n", "\r\n"] {
            let text = format!("one{ending}two{ending}");
            assert_eq!(
                run(text.as_bytes()).0,
                vec![line("one"), line("two")],
                "{ending:?}"
            );
        }
        // an empty line between two CRLFs is still a line
        assert_eq!(run(b"a\r\n\r\nb\r").0, vec![line("a"), line(""), line("b")]);
    }

    #[test]
    fn backspace_erases_characters_not_bytes() {
        let (ev, echo) = run("pumq\x7fp é\x08e\r".as_bytes());
        assert_eq!(ev, vec![line("pump e")]);
        assert!(!echo.contains(&0x1b), "no escape sequences in the echo");
        let (ev, _) = run(b"drain the tank\x17\x17valve\r");
        assert_eq!(ev, vec![line("drain valve")]);
        let (ev, _) = run(b"garbage\x15ok\r");
        assert_eq!(ev, vec![line("ok")]);
    }

    #[test]
    fn arrows_and_controls_are_swallowed() {
        let (ev, echo) = run(b"a\x1b[A\x1b[1;5Cb\x07\x1bOPc\r");
        assert_eq!(ev, vec![line("abc")]);
        assert_eq!(echo, b"abc\r\n");
    }

    #[test]
    fn ctrl_c_ctrl_d_long_lines_and_binary() {
        assert_eq!(run(b"half\x03").0, vec![LineEvent::Interrupt]);
        assert_eq!(run(b"\x04").0, vec![LineEvent::EndOfInput]);
        let mut long = vec![b'x'; MAX_LINE + 10];
        long.extend_from_slice(b"\rnext\r");
        assert_eq!(run(&long).0, vec![LineEvent::TooLong, line("next")]);
        assert_eq!(run(b"\xff\xfe\x80\r").0, vec![LineEvent::NotText]);
    }
}
