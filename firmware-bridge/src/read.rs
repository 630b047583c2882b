//! Reading one sysfs value without allocating: the file goes into a stack buffer and is parsed
//! there. Anything wrong with it is a reading marked unavailable, with the reason.

use std::io::Read;
use std::path::Path;

/// Why a value could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The file is not there (never was, or the device vanished).
    Missing,
    /// The file is empty.
    Empty,
    /// Not a number.
    Garbage,
    /// Permission denied.
    Denied,
    /// Any other I/O error (a driver returning EIO, a directory where a file should be).
    Io,
}

/// A value or why there is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading<T> {
    /// Read and parsed.
    Value(T),
    /// Not available this time.
    Unavailable(Why),
}

impl<T: Copy> Reading<T> {
    /// The value, if any.
    pub fn value(self) -> Option<T> {
        match self {
            Reading::Value(v) => Some(v),
            Reading::Unavailable(_) => None,
        }
    }
}

fn why(e: &std::io::Error) -> Why {
    match e.kind() {
        std::io::ErrorKind::NotFound => Why::Missing,
        std::io::ErrorKind::PermissionDenied => Why::Denied,
        _ => Why::Io,
    }
}

/// Reads up to 128 bytes of a file into `buf`; returns the trimmed text.
fn read_small<'a>(path: &Path, buf: &'a mut [u8; 128]) -> Result<&'a str, Why> {
    let mut f = std::fs::File::open(path).map_err(|e| why(&e))?;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(why(&e)),
        }
    }
    let text = std::str::from_utf8(&buf[..n]).map_err(|_| Why::Garbage)?;
    let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    if text.is_empty() {
        return Err(Why::Empty);
    }
    Ok(text)
}

/// Reads a decimal integer (the kernel's unit: m°C, mV, mA, Hz, counts).
pub fn int(path: &Path) -> Reading<i64> {
    let mut buf = [0u8; 128];
    match read_small(path, &mut buf) {
        Ok(t) => match t.parse::<i64>() {
            Ok(v) => Reading::Value(v),
            Err(_) => Reading::Unavailable(Why::Garbage),
        },
        Err(w) => Reading::Unavailable(w),
    }
}

/// Reads a short text value (a zone type, a governor) into a fixed-capacity string.
pub fn text(path: &Path) -> Result<heapless::String<64>, Why> {
    let mut buf = [0u8; 128];
    let t = read_small(path, &mut buf)?;
    let mut s = heapless::String::new();
    for c in t.chars().take_while(|c| *c != '\0') {
        if s.push(c).is_err() {
            break;
        }
    }
    Ok(s)
}

/// Reads a whole small file (probe time only: lists like `available_frequencies`).
pub fn list(path: &Path) -> Result<Vec<i64>, Why> {
    let s = std::fs::read_to_string(path).map_err(|e| why(&e))?;
    let v: Result<Vec<i64>, _> = s.split_whitespace().map(str::parse).collect();
    match v {
        Ok(v) if v.is_empty() => Err(Why::Empty),
        Ok(v) => Ok(v),
        Err(_) => Err(Why::Garbage),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_empty_missing_and_directories_are_unavailable() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        std::fs::write(p("ok"), "48250\n").unwrap();
        std::fs::write(p("neg"), "-5000").unwrap();
        std::fs::write(p("empty"), "").unwrap();
        std::fs::write(p("blank"), " \n").unwrap();
        std::fs::write(p("garbage"), "hot\n").unwrap();
        std::fs::write(p("binary"), [0xff, 0xfe, 0x00]).unwrap();
        std::fs::create_dir(p("dir")).unwrap();
        assert_eq!(int(&p("ok")), Reading::Value(48250));
        assert_eq!(int(&p("neg")), Reading::Value(-5000));
        assert_eq!(int(&p("empty")), Reading::Unavailable(Why::Empty));
        assert_eq!(int(&p("blank")), Reading::Unavailable(Why::Empty));
        assert_eq!(int(&p("garbage")), Reading::Unavailable(Why::Garbage));
        assert_eq!(int(&p("binary")), Reading::Unavailable(Why::Garbage));
        assert_eq!(int(&p("gone")), Reading::Unavailable(Why::Missing));
        assert_eq!(int(&p("dir")), Reading::Unavailable(Why::Io));
        assert_eq!(
            why(&std::io::Error::from(std::io::ErrorKind::PermissionDenied)),
            Why::Denied
        );
        assert_eq!(list(&p("garbage")), Err(Why::Garbage));
    }
}
