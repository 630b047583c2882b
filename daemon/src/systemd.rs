//! systemd's notify protocol (`Type=notify`, DESIGN.md section 7): `READY=1` once serving, a
//! one-line `STATUS=` kept current, `STOPPING=1` on the way out. Without `NOTIFY_SOCKET`
//! (not under systemd) every call does nothing.

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    // `false`: leave NOTIFY_SOCKET set; unsetting it is not thread-safe
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Whether the daemon runs under a service manager that listens.
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Serving: `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The watchdog period systemd asks for (`WATCHDOG_USEC`), when it is meant for this process.
/// As sd_watchdog_enabled(3): `WATCHDOG_PID`, when set, must be ours (sd-notify's own check
/// insists on it being set).
pub fn watchdog_period() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| std::time::Duration::from_micros(usec))
}

/// Keep-alive for `WatchdogSec`.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// A new status line (`systemctl status` shows it).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Stopping: `STOPPING=1` with why.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}
