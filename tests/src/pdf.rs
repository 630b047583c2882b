//! Text PDFs written by the harness: pages of lines in Helvetica (WinAnsi), the shape most
//! generated manuals have, and "scanned" PDFs whose pages hold no text.
//!
//! Written by hand (objects, cross-reference table, trailer: PDF 1.4, ISO 32000-1 §7.5) so the
//! tests need no PDF library of their own; the reader under test is the daemon's.

/// A PDF whose pages hold these lines of ASCII text, top to bottom. An empty page list makes
/// one page; a page with no lines has an empty content stream (what a scan without OCR has
/// in place of text).
pub fn text_pdf(pages: &[Vec<String>]) -> Vec<u8> {
    let pages: Vec<Vec<String>> = if pages.is_empty() {
        vec![Vec::new()]
    } else {
        pages.to_vec()
    };
    // objects 1 catalog, 2 pages, 3 font, then per page: page, contents
    let n = pages.len();
    let kids: Vec<String> = (0..n).map(|i| format!("{} 0 R", 4 + 2 * i)).collect();
    let mut objects: Vec<Vec<u8>> = vec![
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        format!("<< /Type /Pages /Kids [{}] /Count {n} >>", kids.join(" ")).into_bytes(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
            .to_vec(),
    ];
    for (i, lines) in pages.iter().enumerate() {
        objects.push(
            format!(
                "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] \
                 /Resources << /Font << /F1 3 0 R >> >> /Contents {} 0 R >>",
                5 + 2 * i
            )
            .into_bytes(),
        );
        let mut stream = String::new();
        if !lines.is_empty() {
            stream.push_str("BT /F1 10 Tf 14 TL 56 750 Td\n");
            for l in lines {
                stream.push_str(&format!("({}) Tj T*\n", escape(l)));
            }
            stream.push_str("ET\n");
        }
        let mut obj = format!("<< /Length {} >>\nstream\n", stream.len()).into_bytes();
        obj.extend_from_slice(stream.as_bytes());
        obj.extend_from_slice(b"endstream");
        objects.push(obj);
    }
    let mut out = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n".to_vec();
    let mut offsets = Vec::with_capacity(objects.len());
    for (i, body) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n", i + 1).as_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for o in offsets {
        out.extend_from_slice(format!("{o:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}

/// A PDF of the text `source`: pages split at form feeds, lines at newlines.
pub fn text_pdf_of(source: &str) -> Vec<u8> {
    let pages: Vec<Vec<String>> = source
        .split('\u{c}')
        .map(|p| p.trim_matches('\n').lines().map(str::to_string).collect())
        .collect();
    text_pdf(&pages)
}

fn escape(line: &str) -> String {
    let mut s = String::with_capacity(line.len());
    for c in line.chars() {
        match c {
            '(' | ')' | '\\' => {
                s.push('\\');
                s.push(c);
            }
            c if c.is_ascii() && !c.is_ascii_control() => s.push(c),
            _ => s.push('?'),
        }
    }
    s
}
