//! Jetson power modes through NVIDIA's `nvpmodel` binary (there is no sysfs file for them).
//! Run only at probe time and on a state change, never per tick: it is a process spawn.

use std::path::Path;
use std::process::{Command, Stdio};

/// A power mode as `nvpmodel -q` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PowerMode {
    /// Its name (`15W`, `MAXN`).
    pub name: String,
    /// Its number, as `nvpmodel -m` takes it.
    pub id: u32,
}

/// Parses `nvpmodel -q` output: `NV Power Mode: 15W` then the number on the next line.
pub fn parse_query(out: &str) -> Option<PowerMode> {
    let mut lines = out.lines().map(str::trim).filter(|l| !l.is_empty());
    let name = lines
        .find_map(|l| l.strip_prefix("NV Power Mode:"))?
        .trim()
        .to_string();
    let id = lines.next()?.parse().ok()?;
    Some(PowerMode { name, id })
}

/// The current mode, or `None` when the binary is missing or says something else.
pub fn query(bin: &Path) -> Option<PowerMode> {
    let out = Command::new(bin)
        .arg("-q")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_query(&String::from_utf8_lossy(&out.stdout))
}

/// Sets mode `id` (`nvpmodel -m ID`). Stdin is closed, so a mode that needs a reboot is
/// refused by nvpmodel rather than waiting on a prompt.
pub fn set(bin: &Path, id: u32) -> Result<(), String> {
    let out = Command::new(bin)
        .arg("-m")
        .arg(id.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} -m {id} failed ({}): {}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_output_is_parsed() {
        assert_eq!(
            parse_query("NV Power Mode: 15W\n0\n"),
            Some(PowerMode {
                name: "15W".into(),
                id: 0
            })
        );
        assert_eq!(
            parse_query("NVPM WARN: fan mode is not set!\nNV Power Mode: MAXN\n2\n").map(|m| m.id),
            Some(2)
        );
        assert_eq!(parse_query("garbage"), None);
        assert_eq!(parse_query("NV Power Mode: 7W\nx\n"), None);
    }
}
