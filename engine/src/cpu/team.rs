//! A fixed team of helper threads that split one op (a matrix product's rows, attention's
//! heads) with the calling thread.
//!
//! Why not rayon (tract's pool): a decode step makes ~150 small products of 0.1-0.9 M
//! multiply-adds, 10-40 µs each; waking a pool through its injector queue costs a good part of
//! that. Helpers here spin on a generation counter for a short while after each job, so the
//! next product of the same token starts them in well under a microsecond, and park on a
//! condition variable when the model goes quiet, so an idle daemon burns no CPU.
//!
//! One caller at a time: a second model run that finds the team busy does all of its work on
//! its own thread (two answers at once already keep two cores busy).

// the job pointer handed to helper threads (it was under ggml's allowance before it moved here)
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks.
const SPIN: Duration = Duration::from_micros(200);

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// Bumped once per job; helpers watch it.
    generation: AtomicU64,
    /// Helpers still working on the current job.
    pending: AtomicUsize,
    /// The current job, valid while `pending > 0` (a fat pointer to the caller's closure, which
    /// outlives the job: `run` returns only once `pending` is back to 0).
    job: Mutex<Option<JobPtr>>,
    /// Parked helpers wait here.
    sleep: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
}

#[derive(Clone, Copy)]
struct JobPtr(*const Job);
// Safety: the pointee is Sync and outlives every use (see `Shared::job`).
unsafe impl Send for JobPtr {}

/// The team: `threads - 1` helpers plus whoever calls [`Team::run`].
pub struct Team {
    shared: Arc<Shared>,
    busy: Mutex<()>,
    helpers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Team({} threads)", self.threads())
    }
}

impl Team {
    /// A team of `threads` (the caller included; 1 means no helper).
    pub fn new(threads: usize) -> Team {
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            job: Mutex::new(None),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let helpers = (1..threads.max(1))
            .map(|part| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("matmul-{part}"))
                    .spawn(move || helper(&shared, part))
                    .expect("spawning a matmul helper thread")
            })
            .collect();
        Team {
            shared,
            busy: Mutex::new(()),
            helpers,
        }
    }

    /// Threads a job is split across.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `job(part)` for every part in `0..threads()`, part 0 on this thread, and returns
    /// when all are done. If another caller holds the team, runs every part here.
    pub fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        let guard = match self.busy.try_lock() {
            Ok(g) if !self.helpers.is_empty() => g,
            _ => {
                (0..self.threads()).for_each(job);
                return;
            }
        };
        let s = &*self.shared;
        // Safety of the erased lifetime: we wait below until every helper is done with it.
        let ptr: *const (dyn Fn(usize) + Sync + '_) = job;
        let ptr =
            unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const Job>(ptr) };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(JobPtr(ptr));
        s.pending.store(self.helpers.len(), Ordering::Release);
        s.generation.fetch_add(1, Ordering::AcqRel);
        {
            // taking the lock orders this notify after a helper's last check before waiting
            let _g = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        job(0);
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < 1 << 16 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        drop(guard);
    }
}

fn helper(s: &Shared, part: usize) {
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        let mut n = 0u32;
        loop {
            if s.generation.load(Ordering::Acquire) != seen || s.stop.load(Ordering::Acquire) {
                break;
            }
            n += 1;
            if n.is_multiple_of(256) && start.elapsed() > SPIN {
                let g = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
                let _g = s
                    .wake
                    .wait_while(g, |_| {
                        s.generation.load(Ordering::Acquire) == seen
                            && !s.stop.load(Ordering::Acquire)
                    })
                    .unwrap_or_else(|e| e.into_inner());
                break;
            }
            std::hint::spin_loop();
        }
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        seen = s.generation.load(Ordering::Acquire);
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(JobPtr(ptr)) = job {
            // Safety: the caller keeps the closure alive until `pending` reaches 0.
            let f = unsafe { &*ptr };
            // a panicking kernel must not leave the caller spinning forever
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(part)));
        }
        s.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _g = self.shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Part `p` of `n` rows split into `parts` contiguous ranges, each but the last a multiple of
/// `align`.
pub fn part_of(n: usize, parts: usize, align: usize, p: usize) -> std::ops::Range<usize> {
    let per = n.div_ceil(parts.max(1)).div_ceil(align) * align;
    (p * per).min(n)..((p + 1) * per).min(n)
}

/// Every part of [`part_of`], in order.
pub fn split_rows(
    n: usize,
    parts: usize,
    align: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..parts.max(1)).map(move |p| part_of(n, parts, align, p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_part_runs_once_per_job_and_the_team_can_be_reused() {
        let team = Team::new(3);
        for round in 0..1000 {
            let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            team.run(&|p| {
                hits[p].fetch_add(round + 1, Ordering::Relaxed);
            });
            for h in &hits {
                assert_eq!(h.load(Ordering::Relaxed), round + 1);
            }
        }
        // after the helpers have parked
        std::thread::sleep(Duration::from_millis(5));
        let hits = AtomicUsize::new(0);
        team.run(&|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn two_callers_at_once_both_finish() {
        let team = Arc::new(Team::new(2));
        let total = Arc::new(AtomicUsize::new(0));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let (team, total) = (team.clone(), total.clone());
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        team.run(&|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(total.load(Ordering::Relaxed), 4 * 500 * 2);
    }

    #[test]
    fn split_rows_covers_everything_once() {
        for n in [0, 1, 3, 4, 5, 17, 576, 49152] {
            for parts in 1..5 {
                let r: Vec<_> = split_rows(n, parts, 4).collect();
                assert_eq!(r.len(), parts);
                assert_eq!(r.iter().map(|r| r.len()).sum::<usize>(), n);
                for w in r.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
            }
        }
    }
}
