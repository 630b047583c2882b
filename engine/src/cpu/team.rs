//! A fixed team of helper threads that splits one op (a matrix product's rows, attention's
//! heads) with the calling thread.
//!
//! Why not rayon (tract's pool): a decode step makes ~150 small products of 10-40 µs each, and
//! waking a general pool through its injector queue costs a good part of that. So the team
//! keeps `threads - 1` helpers of its own: after each job a helper spins on a generation counter
//! for [`SPIN`], so the next product starts it in well under a microsecond, and then parks on a
//! condvar so an idle daemon burns no CPU.
//!
//! One caller at a time owns the helpers (the `busy` flag); a caller that finds the team busy,
//! including a job that calls [`Team::run`] again on the same team, runs every part on its own
//! thread instead.
//!
//! Soundness rests on [`RunGuard`]: `run` publishes a lifetime-erased pointer to the caller's
//! closure, and the guard, on normal return and on unwind alike, does not let `run` end before
//! every helper has finished its part and the pointer has been cleared. A helper's panic is
//! caught (the helper survives), stored, and re-raised on the caller once all parts are done.

// The job pointer handed to helper threads, its lifetime erased: sound because of `RunGuard`;
// each `unsafe` says why in a `SAFETY:` comment.
#![allow(unsafe_code)]

use std::any::Any;
use std::fmt;
use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle helper spins on the generation counter before it parks.
const SPIN: Duration = Duration::from_micros(200);

/// A job with its lifetime erased to `'static` (see [`JobPtr`]).
type Job = dyn Fn(usize) + Sync;

/// A caught panic.
type Payload = Box<dyn Any + Send>;

struct Shared {
    /// Bumped (Release) once per published job, after `job` and `pending` have been set.
    generation: AtomicU64,
    /// Helpers that have not finished the current job yet.
    pending: AtomicUsize,
    /// The current job: `Some` only from publication until the run guard has waited.
    job: Mutex<Option<JobPtr>>,
    /// The first panic a helper caught during the current job.
    panic: Mutex<Option<Payload>>,
    /// Parked helpers wait on `wake` under this lock.
    sleep: Mutex<()>,
    wake: Condvar,
    /// Set once, by `Team::drop`.
    stop: AtomicBool,
}

/// The caller's job with its lifetime erased.
///
/// A helper dereferences it only between seeing the generation bump that published it and its
/// own decrement of `pending`; [`RunGuard`] keeps `Team::run`, and so the borrow the pointer was
/// made from, alive until `pending` is back to zero, and clears the pointer before it lets go.
#[derive(Clone, Copy)]
struct JobPtr(*const Job);

// SAFETY: the pointee is `Sync`, so calling it through a shared reference from another thread is
// allowed; the pointer is only dereferenced while the borrow it came from is alive (`RunGuard`).
unsafe impl Send for JobPtr {}

/// Locks `m`, ignoring poison: nothing panics while holding these locks, and the data they
/// guard (a pointer, a payload slot, `()`) cannot be left half-updated anyway.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Drops a panic payload; if its destructor panics in turn, that second payload is leaked rather
/// than allowed to unwind (out of a helper, or out of a drop that runs during unwinding).
fn drop_payload(payload: Payload) {
    if let Err(again) = panic::catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(again);
    }
}

/// A fixed team of threads that splits jobs with its caller; see the module documentation.
pub struct Team {
    shared: Arc<Shared>,
    /// Set while a `run` owns the helpers. An atomic, not a `Mutex`, so that a panic cannot
    /// poison it and leave the team single-threaded for good.
    busy: AtomicBool,
    helpers: Vec<JoinHandle<()>>,
}

impl Team {
    /// A team of `threads` threads in all: the caller plus `threads - 1` helpers named
    /// `matmul-{part}`. `0` and `1` both give a team without helpers.
    ///
    /// If the OS refuses a thread, the team keeps the helpers it has (parts stay numbered
    /// `1..threads()`), so it is smaller but still consistent.
    pub fn new(threads: usize) -> Team {
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            job: Mutex::new(None),
            panic: Mutex::new(None),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let mut helpers = Vec::with_capacity(threads.saturating_sub(1));
        for part in 1..threads.max(1) {
            let s = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("matmul-{part}"))
                .spawn(move || helper(&s, part));
            match spawned {
                Ok(handle) => helpers.push(handle),
                Err(_) => break,
            }
        }
        Team {
            shared,
            busy: AtomicBool::new(false),
            helpers,
        }
    }

    /// How many parts `run` splits a job into: the helpers plus the caller.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Calls `job(part)` once for every `part` in `0..self.threads()`: part 0 on the calling
    /// thread, the others on the helpers, and returns when all of them are done.
    ///
    /// If the team is busy (another caller, or a `job` that calls `run` on its own team), every
    /// part runs on the calling thread instead.
    ///
    /// # Panics
    ///
    /// If a part panics, `run` still waits for every other part, then re-raises the panic: the
    /// caller's own if part 0 panicked, else the first helper panic. The team stays whole.
    /// (A part that waits for another part to do something will therefore hang if that other
    /// part panics, as with `std::thread::scope`.)
    pub fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        // Acquire pairs with the Release in `RunGuard::finish`: the previous run's last touches
        // of the shared state happen before ours.
        if self.helpers.is_empty()
            || self
                .busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            (0..self.threads()).for_each(job);
            return;
        }
        // From here on, every exit path goes through the guard. Nothing between here and the
        // generation bump can panic, so the guard never waits for a job it did not publish.
        let mut guard = RunGuard { team: Some(self) };
        let s = &*self.shared;

        let ptr: *const (dyn Fn(usize) + Sync + '_) = job;
        // SAFETY: only the trait object's lifetime bound changes (same layout, same vtable).
        // Helpers dereference the erased pointer only until they decrement `pending`, and
        // `guard` (on return and on unwind alike) does not let this function end before
        // `pending` is zero and the pointer is cleared, so `job` outlives every use.
        let ptr =
            unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const Job>(ptr) };
        *lock(&s.job) = Some(JobPtr(ptr));
        // No helper is working (the previous guard saw `pending == 0`), so a plain store will do;
        // it is published by the generation bump below.
        s.pending.store(self.helpers.len(), Ordering::Relaxed);
        // Release: a helper that sees the new generation (Acquire) also sees the job pointer,
        // `pending`, and everything the caller wrote before calling `run`.
        s.generation.fetch_add(1, Ordering::Release);
        {
            // Under the lock so that a helper between its condition check and its wait cannot
            // miss the notification.
            let _sleep = lock(&s.sleep);
            s.wake.notify_all();
        }

        job(0); // if this unwinds, `guard`'s Drop waits for the helpers

        if let Some(payload) = guard.finish() {
            panic::resume_unwind(payload);
        }
    }
}

/// Owns the helpers for one `run`. `finish` (or, if `job(0)` unwinds, `Drop`) waits until every
/// helper has finished its part, clears the job pointer, takes any helper panic, and only then
/// releases `busy`.
struct RunGuard<'a> {
    /// `None` once finished.
    team: Option<&'a Team>,
}

impl RunGuard<'_> {
    fn finish(&mut self) -> Option<Payload> {
        let team = self.team.take()?;
        let s = &*team.shared;
        // Acquire pairs with each helper's Release `fetch_sub`; the decrements are RMWs, so they
        // all belong to one release sequence and seeing 0 means seeing every helper's writes
        // (its part of the output and its panic payload), not only the last one's.
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) != 0 {
            if spins < 1 << 16 {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // No helper is inside the job now, and none can start it: they only read the pointer
        // after a generation bump, and the next bump comes after the next `busy` acquisition.
        *lock(&s.job) = None;
        let payload = lock(&s.panic).take();
        // Release: the next run's Acquire on `busy` sees the cleared state.
        team.busy.store(false, Ordering::Release);
        payload
    }
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        // Still armed only when `job(0)` unwound: wait all the same, and let the caller's panic
        // win over a helper's, whose payload is dropped here.
        if let Some(payload) = self.finish() {
            drop_payload(payload);
        }
    }
}

/// Waits for a job newer than `seen`: spins for [`SPIN`], then parks. Returns the new
/// generation, or `None` once the team is stopping.
fn next_job(s: &Shared, seen: u64) -> Option<u64> {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        // Acquire pairs with the caller's Release bump (see `Team::run`).
        let generation = s.generation.load(Ordering::Acquire);
        if generation != seen {
            return Some(generation);
        }
        if s.stop.load(Ordering::Acquire) {
            return None;
        }
        spins = spins.wrapping_add(1);
        if spins & 255 == 0 && start.elapsed() >= SPIN {
            break;
        }
        std::hint::spin_loop();
    }
    let sleep = lock(&s.sleep);
    let _sleep = s
        .wake
        .wait_while(sleep, |_| {
            s.generation.load(Ordering::Acquire) == seen && !s.stop.load(Ordering::Acquire)
        })
        .unwrap_or_else(PoisonError::into_inner);
    let generation = s.generation.load(Ordering::Acquire);
    (generation != seen).then_some(generation)
}

fn helper(s: &Shared, part: usize) {
    let mut seen = 0u64;
    // Each generation is handled exactly once: the caller does not bump it again before every
    // helper has decremented `pending` for the current one.
    while let Some(generation) = next_job(s, seen) {
        seen = generation;
        let job = *lock(&s.job);
        if let Some(JobPtr(ptr)) = job {
            // SAFETY: `run` published this pointer for the generation we just saw and its guard
            // keeps the closure alive until `pending` reaches zero, which cannot happen before our
            // decrement below; the closure is `Sync`, so a shared call from here is fine.
            let f = unsafe { &*ptr };
            // AssertUnwindSafe: the panic is not swallowed; it is re-raised on the caller, which
            // is where the job's state would be observed anyway.
            if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| f(part))) {
                let extra = {
                    let mut slot = lock(&s.panic);
                    if slot.is_none() {
                        *slot = Some(payload);
                        None
                    } else {
                        Some(payload)
                    }
                };
                if let Some(payload) = extra {
                    drop_payload(payload);
                }
            }
        }
        // Release: publishes this part's writes and stored payload to the caller (see
        // `RunGuard::finish`). Nothing above can unwind past this point, so it always runs.
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        // No `run` is in progress (it borrows the team), so every helper is spinning or parked.
        self.shared.stop.store(true, Ordering::Release);
        {
            let _sleep = lock(&self.shared.sleep);
            self.shared.wake.notify_all();
        }
        for handle in self.helpers.drain(..) {
            // Helpers catch the panics of their parts, so this cannot fail in practice.
            let _ = handle.join();
        }
    }
}

impl fmt::Debug for Team {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Team({} threads)", self.threads())
    }
}

/// Rows `p` of `n` rows split into `parts` runs of equal length, each a multiple of `align`
/// (the last ones may be short or empty).
pub fn part_of(n: usize, parts: usize, align: usize, p: usize) -> Range<usize> {
    let per = n.div_ceil(parts.max(1)).div_ceil(align) * align;
    (p * per).min(n)..((p + 1) * per).min(n)
}

/// All `parts.max(1)` ranges of [`part_of`], in order.
pub fn split_rows(n: usize, parts: usize, align: usize) -> impl Iterator<Item = Range<usize>> {
    (0..parts.max(1)).map(move |p| part_of(n, parts, align, p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::mpsc;
    use std::thread;

    /// The message of a `panic!` payload.
    fn message(payload: &(dyn Any + Send)) -> Option<&str> {
        payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
    }

    /// Runs `f` on another thread and fails (instead of hanging) if it does not finish within a
    /// very generous deadline: a deadlock detector, not a speed check.
    fn within(f: impl FnOnce() + Send + 'static) {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("deadlocked"),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the checked code panicked"),
        }
    }

    /// One job on a two-thread team: its parts run on two distinct OS threads (part 0 on the
    /// caller) and sum 0..10_000 correctly. Also fails if a stale helper panic leaked over.
    fn assert_team_whole(team: &Team) {
        assert_eq!(team.threads(), 2);
        let ids = Mutex::new(Vec::new());
        let sum = AtomicU64::new(0);
        let job = |p: usize| {
            ids.lock().unwrap().push((p, thread::current().id()));
            let rows = part_of(10_000, 2, 1, p);
            sum.fetch_add(rows.map(|i| i as u64).sum(), Ordering::Relaxed);
        };
        team.run(&job);
        let mut ids = ids.into_inner().unwrap();
        ids.sort_by_key(|&(p, _)| p);
        assert_eq!(ids.iter().map(|&(p, _)| p).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(
            ids[0].1,
            thread::current().id(),
            "part 0 runs on the caller"
        );
        assert_ne!(ids[0].1, ids[1].1, "part 1 must run on a helper");
        assert_eq!(sum.load(Ordering::Relaxed), 10_000 * 9_999 / 2);
    }

    /// The first panic in a process is slow (~100-150 ms in a debug build on a loaded machine:
    /// the unwinder and the panic hook set themselves up), long enough to hide a `run` that does
    /// not wait for its helpers. Panicking once beforehand keeps the helper sleeps below
    /// meaningful; they only widen the window in which a non-waiting `run` is caught.
    fn warm_up_unwinding() {
        let _ = panic::catch_unwind(|| panic!("warm-up panic (expected)"));
    }

    /// Part 0 (the caller) panics at once while part 1 (a helper) sleeps, then writes.
    ///
    /// Against the old implementation this fails at the `done` assertion: its `run` unwound
    /// straight out of `job(0)` without waiting, so `catch_unwind` returned (within ~1-3 ms once
    /// unwinding is warm) while the helper was still inside its 150 ms sleep, and the helper then
    /// wrote into the output after `run` had ended. (Checked by running these tests against the
    /// old code: this assertion failed there, and the process later died of SIGSEGV when the
    /// late write hit a test frame that had already unwound.)
    fn caller_panic(team: &Team) {
        warm_up_unwinding();
        let done = AtomicBool::new(false);
        let out: Vec<AtomicU32> = (0..64).map(|_| AtomicU32::new(0)).collect();
        let job = |p: usize| {
            if p == 0 {
                panic!("caller part failed");
            }
            thread::sleep(Duration::from_millis(150));
            for (i, o) in out.iter().enumerate() {
                o.store(i as u32 + 1, Ordering::Relaxed);
            }
            done.store(true, Ordering::Release);
        };
        let payload = panic::catch_unwind(AssertUnwindSafe(|| team.run(&job)))
            .expect_err("the caller's panic must propagate");
        assert_eq!(message(&*payload), Some("caller part failed"));
        assert!(
            done.load(Ordering::Acquire),
            "run ended while a helper was still in the job"
        );
        let snapshot: Vec<u32> = out.iter().map(|o| o.load(Ordering::Relaxed)).collect();
        assert!(snapshot.iter().enumerate().all(|(i, &v)| v == i as u32 + 1));
        thread::sleep(Duration::from_millis(100));
        let later: Vec<u32> = out.iter().map(|o| o.load(Ordering::Relaxed)).collect();
        assert_eq!(
            snapshot, later,
            "something wrote into the output after run ended"
        );
    }

    /// Part 1 (a helper) panics; part 0 writes its result. The helper's panic reaches the caller.
    fn helper_panic(team: &Team) {
        let written = AtomicU64::new(0);
        let job = |p: usize| {
            if p == 1 {
                panic!("helper part failed");
            }
            written.store(42, Ordering::Relaxed);
        };
        let payload = panic::catch_unwind(AssertUnwindSafe(|| team.run(&job)))
            .expect_err("the helper's panic must reach the caller");
        assert_eq!(message(&*payload), Some("helper part failed"));
        assert_eq!(written.load(Ordering::Relaxed), 42);
    }

    /// Both parts panic (the helper late): the caller's panic wins, and `run` still waited.
    fn both_panic(team: &Team) {
        warm_up_unwinding();
        let helper_done = AtomicBool::new(false);
        let job = |p: usize| {
            if p == 0 {
                panic!("caller part failed");
            }
            thread::sleep(Duration::from_millis(100));
            helper_done.store(true, Ordering::Release);
            panic!("helper part failed");
        };
        let payload = panic::catch_unwind(AssertUnwindSafe(|| team.run(&job)))
            .expect_err("a panic must propagate");
        assert_eq!(message(&*payload), Some("caller part failed"));
        assert!(
            helper_done.load(Ordering::Acquire),
            "run ended while a helper was still in the job"
        );
    }

    #[test]
    fn every_part_runs_once_per_job() {
        let team = Team::new(4);
        assert_eq!(team.threads(), 4);
        let counts: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
        let job = |p: usize| {
            counts[p].fetch_add(1, Ordering::Relaxed);
        };
        for round in 1..=1000 {
            team.run(&job);
            assert!(
                counts.iter().all(|c| c.load(Ordering::Relaxed) == round),
                "round {round}"
            );
        }
        // Long past SPIN: the helpers have parked, and must wake for the next job.
        thread::sleep(Duration::from_millis(20));
        team.run(&job);
        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1001));
    }

    #[test]
    fn two_callers_at_once() {
        let team = Team::new(4);
        let total = AtomicUsize::new(0);
        let job = |p: usize| {
            total.fetch_add(p + 1, Ordering::Relaxed);
        };
        thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    for _ in 0..500 {
                        team.run(&job);
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 2 * 500 * (1 + 2 + 3 + 4));
    }

    #[test]
    fn split_rows_covers_everything_once() {
        for n in [0, 1, 5, 31, 32, 33, 100, 1000, 4097] {
            for parts in 0..=9 {
                for align in [1, 4, 16, 32] {
                    let mut hits = vec![0u32; n];
                    let ranges: Vec<_> = split_rows(n, parts, align).collect();
                    assert_eq!(ranges.len(), parts.max(1));
                    for r in ranges {
                        if !r.is_empty() {
                            assert_eq!(r.start % align, 0, "n={n} parts={parts} align={align}");
                        }
                        r.for_each(|i| hits[i] += 1);
                    }
                    assert!(
                        hits.iter().all(|&h| h == 1),
                        "n={n} parts={parts} align={align}"
                    );
                }
            }
        }
    }

    #[test]
    fn caller_panic_waits_for_helpers() {
        let team = Team::new(2);
        caller_panic(&team);
        assert_team_whole(&team);
    }

    #[test]
    fn helper_panic_reaches_caller() {
        let team = Team::new(2);
        helper_panic(&team);
        assert_team_whole(&team);
    }

    #[test]
    fn caller_panic_wins_over_helper_panic() {
        let team = Team::new(2);
        both_panic(&team);
        assert_team_whole(&team);
    }

    #[test]
    fn team_is_whole_after_each_kind_of_panic() {
        let team = Team::new(2);
        assert_team_whole(&team);
        caller_panic(&team);
        assert_team_whole(&team);
        helper_panic(&team);
        assert_team_whole(&team);
        both_panic(&team);
        assert_team_whole(&team);
        caller_panic(&team);
        helper_panic(&team);
        assert_team_whole(&team);
    }

    #[test]
    fn nested_run_does_not_deadlock() {
        within(|| {
            let team = Team::new(3);
            // hits[outer part][inner part]
            let hits: Vec<Vec<AtomicUsize>> = (0..3)
                .map(|_| (0..3).map(|_| AtomicUsize::new(0)).collect())
                .collect();
            let outer = |p: usize| {
                let me = thread::current().id();
                let inner = |q: usize| {
                    assert_eq!(thread::current().id(), me, "a busy team runs inline");
                    hits[p][q].fetch_add(1, Ordering::Relaxed);
                };
                team.run(&inner);
            };
            team.run(&outer);
            for row in &hits {
                assert!(row.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
            // And the team is not left busy.
            let seen = Mutex::new(Vec::new());
            team.run(&|_| seen.lock().unwrap().push(thread::current().id()));
            let mut seen = seen.into_inner().unwrap();
            seen.sort_unstable_by_key(|id| format!("{id:?}"));
            seen.dedup();
            assert_eq!(seen.len(), 3);
        });
    }

    #[test]
    fn drop_returns_with_helpers_spinning_or_parked() {
        within(|| {
            let job = |_: usize| {};
            for _ in 0..20 {
                let team = Team::new(4);
                team.run(&job);
                drop(team); // helpers are (most likely) still spinning
            }
            let team = Team::new(4);
            team.run(&job);
            thread::sleep(Duration::from_millis(20));
            drop(team); // helpers have parked
            drop(Team::new(4)); // never ran a job
        });
    }

    #[test]
    fn small_teams_run_on_the_caller() {
        for threads in [0, 1] {
            let team = Team::new(threads);
            assert_eq!(team.threads(), 1);
            assert_eq!(format!("{team:?}"), "Team(1 threads)");
            let seen = Mutex::new(Vec::new());
            team.run(&|p| seen.lock().unwrap().push((p, thread::current().id())));
            assert_eq!(seen.into_inner().unwrap(), [(0, thread::current().id())]);
        }
        assert_eq!(format!("{:?}", Team::new(3)), "Team(3 threads)");
    }
}
