//! Stopping a job from outside its worker: the cancel flag the engine checks (and why it was
//! raised), the alarm that raises it at a deadline, and the pacer that holds the decode rate
//! under a thermal cap.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fieldllm_engine::batch::Presence;

/// Why a job is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum StopReason {
    None = 0,
    Cancelled = 1,
    Deadline = 2,
    /// Running at critical: ends with finish reason `thermal`.
    Thermal = 3,
    /// Still queued when the board got hot: refused with `overheated`.
    Overheated = 4,
}

/// The cancel flag the engine checks, plus why it was raised.
#[derive(Debug, Default)]
pub(super) struct Control {
    pub(super) flag: AtomicBool,
    reason: AtomicU8,
}

impl Control {
    pub(super) fn stop(&self, why: StopReason) {
        // the first reason wins: a deadline that passes during a cancel stays a cancel
        let _ = self.reason.compare_exchange(
            StopReason::None as u8,
            why as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.flag.store(true, Ordering::Release);
    }

    pub(super) fn stopped(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    pub(super) fn reason(&self) -> StopReason {
        match self.reason.load(Ordering::Acquire) {
            1 => StopReason::Cancelled,
            2 => StopReason::Deadline,
            3 => StopReason::Thermal,
            4 => StopReason::Overheated,
            _ => StopReason::None,
        }
    }
}

/// Raises `control` with `Deadline` at `at`, unless the returned guard is dropped first.
/// A sleeping thread per job that has a deadline: no polling, gone when the job ends. The
/// token callback checks deadlines too, but only once decoding starts: a long prefill needs
/// this alarm.
pub(super) fn deadline_alarm(
    control: std::sync::Arc<Control>,
    at: Instant,
) -> Option<mpsc::Sender<()>> {
    let (guard, done) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("deadline".into())
        .spawn(move || {
            let wait = at.saturating_duration_since(Instant::now());
            if let Err(mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(wait) {
                control.stop(StopReason::Deadline);
            }
        })
        .ok()
        .map(|_| guard)
}

/// Holds each token back until `1 / cap` after the previous one, so the answer's decode rate
/// stays under the thermal cap (read per token: a cap lifted mid-answer applies at once).
/// Sleeps in short slices so a cancel or a critical state still ends the answer promptly.
pub(super) struct Pacer<'a> {
    pub(super) cap: &'a AtomicU32,
    pub(super) next: Option<Instant>,
}

impl Pacer<'_> {
    /// Sleeps until this answer's next token is due (or `stop`), stepped away from the answers
    /// decoded with it meanwhile, so their steps do not wait for it.
    pub(super) fn wait(&mut self, stop: &AtomicBool, presence: &Presence) {
        let cap = f32::from_bits(self.cap.load(Ordering::Acquire));
        if cap <= 0.0 {
            self.next = None;
            return;
        }
        if let Some(at) = self.next.filter(|at| *at > Instant::now()) {
            presence.away(|| {
                loop {
                    let now = Instant::now();
                    if now >= at || stop.load(Ordering::Acquire) {
                        break;
                    }
                    std::thread::sleep((at - now).min(Duration::from_millis(50)));
                }
            });
        }
        self.next = Some(Instant::now() + Duration::from_secs_f32(1.0 / cap));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_wins() {
        let c = Control::default();
        assert!(!c.stopped());
        c.stop(StopReason::Cancelled);
        c.stop(StopReason::Deadline);
        assert!(c.stopped());
        assert_eq!(c.reason(), StopReason::Cancelled);
    }

    #[test]
    fn an_alarm_raises_the_flag_unless_its_guard_goes_first() {
        let c = std::sync::Arc::new(Control::default());
        let guard = deadline_alarm(c.clone(), Instant::now() + Duration::from_secs(3600));
        drop(guard);
        assert!(!c.stopped());
        let _guard = deadline_alarm(c.clone(), Instant::now());
        // the alarm thread raises it; wait for that, not for a time
        while !c.stopped() {
            std::thread::yield_now();
        }
        assert_eq!(c.reason(), StopReason::Deadline);
    }
}
