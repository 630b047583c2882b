//! Process memory figures from `/proc/self/status` (Linux).

/// Peak resident set size of this process in bytes (`VmHWM`), if the kernel reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kb("VmHWM:").map(|kb| kb * 1024)
}

/// Current resident set size in bytes (`VmRSS`).
pub fn rss_bytes() -> Option<u64> {
    status_kb("VmRSS:").map(|kb| kb * 1024)
}

/// Resident anonymous memory in bytes (`RssAnon`: the heap, stacks; not the mapped weights).
pub fn anon_rss_bytes() -> Option<u64> {
    status_kb("RssAnon:").map(|kb| kb * 1024)
}

/// Resident file-backed memory in bytes (`RssFile`: the binary, and the weights mapped from
/// the artifact, pages the kernel may drop and read again).
pub fn file_rss_bytes() -> Option<u64> {
    status_kb("RssFile:").map(|kb| kb * 1024)
}

/// Hands the heap's free pages back to the kernel (glibc keeps what a large load freed, the
/// parse buffers of a model file, as resident memory of the process); a no-op where the C
/// library has no `malloc_trim`.
#[allow(unsafe_code)] // one FFI call: no crate wraps malloc_trim
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims glibc's own arenas under their locks; it takes
    // no pointer from us and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_rss() {
        // current first: the peak read after it can only be at least as high
        let now = super::rss_bytes().expect("VmRSS on Linux");
        let peak = super::peak_rss_bytes().expect("VmHWM on Linux");
        assert!(now > 0 && peak >= now);
    }
}
