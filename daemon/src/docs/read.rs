//! Reading one document file into the text of its pages: Markdown and plain text as they are,
//! PDF through `pdf-extract` on a thread of its own, so its panics (and deep recursion on a
//! hostile file) end that document, never the process.

use std::io::Read as _;
use std::path::Path;

use super::chunk::Format;

/// Largest document file read (a manual of a few thousand pages is well under it; a 200 MB
/// log dump renamed `.txt` is refused rather than read into memory).
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Stack for the PDF parser's thread: its object parser recurses on nested arrays and
/// dictionaries.
const PDF_STACK_BYTES: usize = 64 << 20;

/// What kind of document a file is, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `.md`, `.markdown`.
    Markdown,
    /// `.txt`, `.text`.
    Text,
    /// `.pdf`.
    Pdf,
}

impl Kind {
    /// The kind for `path`, or `None` for a file that is not a document.
    pub fn of(path: &Path) -> Option<Kind> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "md" | "markdown" => Some(Kind::Markdown),
            "txt" | "text" => Some(Kind::Text),
            "pdf" => Some(Kind::Pdf),
            _ => None,
        }
    }

    /// How the splitter reads its text.
    pub fn format(self) -> Format {
        match self {
            Kind::Markdown => Format::Markdown,
            Kind::Text | Kind::Pdf => Format::Text,
        }
    }
}

/// Why a document could not be read. Each names what is wrong and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Open or read failed (gone, no permission, ...).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Over [`MAX_FILE_BYTES`].
    #[error("{size} bytes is over the {max} byte limit for one document; split it")]
    TooBig {
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Zero bytes, or only white space.
    #[error("empty: no text to index")]
    Empty,
    /// A NUL byte: a binary file with a text extension.
    #[error("not a text file (a NUL byte at offset {0}): a binary file with a text extension?")]
    Binary(usize),
    /// Not UTF-8.
    #[error(
        "not UTF-8 text (invalid byte at offset {0}); convert it, e.g. `iconv -f latin1 -t utf-8`"
    )]
    NotUtf8(usize),
    /// The PDF parser refused the file.
    #[error("not a readable PDF: {0}")]
    Pdf(String),
    /// The PDF parser panicked.
    #[error("the PDF parser failed on this file ({0})")]
    PdfPanic(String),
    /// A PDF whose pages hold no text (scanned images).
    #[error("no text in its {0} page(s): a scanned PDF? Run OCR on it first (e.g. ocrmypdf)")]
    NoText(usize),
}

/// A document's text and its bytes' sha256.
#[derive(Debug)]
pub struct Document {
    /// One entry per page for a PDF, one for anything else.
    pub pages: Vec<String>,
    /// sha256 of the file's bytes, lower-case hex.
    pub sha256: String,
}

/// Reads the file at `path` as a document of `kind`.
pub fn read(path: &Path, kind: Kind) -> Result<Document, ReadError> {
    let bytes = read_bounded(path)?;
    let sha256 = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    let pages = match kind {
        Kind::Markdown | Kind::Text => vec![text(&bytes)?],
        Kind::Pdf => pdf_pages(bytes)?,
    };
    Ok(Document { pages, sha256 })
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, ReadError> {
    let f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    if size > MAX_FILE_BYTES {
        return Err(ReadError::TooBig {
            size,
            max: MAX_FILE_BYTES,
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // bounded again: the file may grow while it is read
    f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ReadError::TooBig {
            size: bytes.len() as u64,
            max: MAX_FILE_BYTES,
        });
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ReadError::Empty);
    }
    Ok(bytes)
}

fn text(bytes: &[u8]) -> Result<String, ReadError> {
    if let Some(at) = bytes.iter().position(|b| *b == 0) {
        return Err(ReadError::Binary(at));
    }
    let s = std::str::from_utf8(bytes).map_err(|e| ReadError::NotUtf8(e.valid_up_to()))?;
    Ok(s.strip_prefix('\u{feff}').unwrap_or(s).to_string())
}

fn pdf_pages(bytes: Vec<u8>) -> Result<Vec<String>, ReadError> {
    let parser = std::thread::Builder::new()
        .name("pdf-extract".into())
        .stack_size(PDF_STACK_BYTES)
        .spawn(move || pdf_extract::extract_text_from_mem_by_pages(&bytes))?;
    let pages = match parser.join() {
        Ok(Ok(pages)) => pages,
        Ok(Err(e)) => return Err(ReadError::Pdf(e.to_string())),
        Err(payload) => return Err(ReadError::PdfPanic(panic_text(payload.as_ref()))),
    };
    if pages.iter().all(|p| p.trim().is_empty()) {
        return Err(ReadError::NoText(pages.len()));
    }
    Ok(pages)
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn file(bytes: &[u8], name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        (dir, p)
    }

    #[test]
    fn kinds_come_from_the_extension() {
        assert_eq!(Kind::of(Path::new("a/B.MD")), Some(Kind::Markdown));
        assert_eq!(Kind::of(Path::new("x.txt")), Some(Kind::Text));
        assert_eq!(Kind::of(Path::new("x.Pdf")), Some(Kind::Pdf));
        assert_eq!(Kind::of(Path::new("x.docx")), None);
        assert_eq!(Kind::of(Path::new("README")), None);
    }

    #[test]
    fn bad_text_files_are_named_errors() {
        let (_d, p) = file(b" \n\t\n", "e.md");
        assert!(matches!(read(&p, Kind::Markdown), Err(ReadError::Empty)));
        let (_d, p) = file(b"\x7fELF\x02\x01\x00\x00", "bin.md");
        assert!(matches!(
            read(&p, Kind::Markdown),
            Err(ReadError::Binary(6))
        ));
        let (_d, p) = file(b"caf\xe9 au lait", "latin1.txt");
        let e = read(&p, Kind::Text).unwrap_err();
        assert!(matches!(e, ReadError::NotUtf8(3)), "{e}");
        assert!(e.to_string().contains("iconv"));
    }

    #[test]
    fn text_keeps_its_hash_and_loses_a_bom() {
        let (_d, p) = file("\u{feff}# Title\nbody\n".as_bytes(), "a.md");
        let d = read(&p, Kind::Markdown).unwrap();
        assert_eq!(d.pages, vec!["# Title\nbody\n".to_string()]);
        assert_eq!(d.sha256.len(), 64);
        let (_d2, p2) = file("\u{feff}# Title\nbody!\n".as_bytes(), "a.md");
        assert_ne!(read(&p2, Kind::Markdown).unwrap().sha256, d.sha256);
    }

    #[test]
    fn a_vanished_file_is_an_io_error() {
        let e = read(Path::new("/nonexistent/x.md"), Kind::Markdown).unwrap_err();
        assert!(matches!(e, ReadError::Io(_)), "{e}");
    }

    #[test]
    fn garbage_called_pdf_is_refused_not_fatal() {
        let (_d, p) = file(
            b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 9 0 R >>\n%%EOF",
            "x.pdf",
        );
        let e = read(&p, Kind::Pdf).unwrap_err();
        assert!(
            matches!(e, ReadError::Pdf(_) | ReadError::PdfPanic(_)),
            "{e}"
        );
    }
}
