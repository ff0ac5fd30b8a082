//! A team of spinning helpers for the many short hand-offs inside one [`crate::exec::Pool::run`].
//!
//! A decode step hands out ~400 small products a token (RWKV-6 1.6B: 17 a layer). Through rayon's
//! work stealing each one woke the other worker from its futex sleep or left the caller asleep on
//! its latch: `perf stat` counted ~360 context switches a token and 1.77 of 2 CPUs busy. Here the
//! caller (the *leader*) publishes each [`Exec::for_each`](stuffed_core::exec::Exec::for_each) call
//! as a job in one atomic word; `threads − 1` helpers, started once a run, spin on that word and
//! claim task indices from it, and the leader claims them too and then spins until the last one
//! is done. A helper idle for longer than [`SPIN`] yields its core, and after [`PARK_AFTER`] parks
//! until the next job (a long serial stretch of the leader costs one wake-up, as before).
//!
//! The job word is `epoch << 32 | next index` ([`CLOSED`]: no claims). A helper reads the job's task
//! pointer only while counted in `busy` and only after re-reading the word with the same open
//! epoch; the leader closes the word and waits for `busy == 0` before it returns (so the task, a
//! borrow of its caller's frame, outlives every use) and before it writes the next job.
use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::Mutex;
use std::thread::Thread;
use std::time::{Duration, Instant};

type Task<'a> = dyn Fn(usize) + Sync + 'a;

/// The low half of the job word: the next index to claim.
const INDEX: u64 = u32::MAX as u64;
/// The low half when no index may be claimed (above any job's task count).
const CLOSED: u64 = INDEX;
/// How long an idle helper (or the waiting leader) spins before it starts yielding its core.
const SPIN: Duration = Duration::from_micros(50);
/// How long an idle helper yields before it parks until the next job.
const PARK_AFTER: Duration = Duration::from_millis(2);

/// One run's job slot and its helpers.
pub(crate) struct Team {
    /// `epoch << 32 | next index to claim`, or `… | CLOSED`.
    word: AtomicU64,
    /// The open job's task (lifetime erased: see the module doc) and its task count. Written by the
    /// leader only while the word is closed and `busy` is 0.
    job: UnsafeCell<(*const Task<'static>, usize)>,
    /// Helpers inside the open job (from their check of the word until their last task returns):
    /// the leader's `for_each` returns once it is 0 with the word closed.
    busy: AtomicUsize,
    /// The run is over: helpers return.
    stop: AtomicBool,
    /// Helpers parked, or about to park.
    sleepers: AtomicUsize,
    helpers: Mutex<Vec<Thread>>,
    /// The first panic of a task of the open job, re-raised on the leader.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// The leader's last epoch (only the leader touches it).
    epoch: Cell<u32>,
}

// SAFETY: `job` and `epoch` are written by the leader alone, under the protocol of the module doc;
// everything else is atomic or locked.
unsafe impl Sync for Team {}

/// What this thread is to a team.
#[derive(Clone, Copy)]
enum Role {
    None,
    /// Leading the team at this address, between jobs.
    Leader(*const Team),
    /// Running a team's task (leader or helper): a nested `for_each` runs in place.
    InTask,
}

thread_local! {
    static ROLE: Cell<Role> = const { Cell::new(Role::None) };
}

/// Sets this thread's role for the life of the guard, then puts the old one back.
struct RoleGuard(Role);

impl RoleGuard {
    fn set(role: Role) -> RoleGuard {
        RoleGuard(ROLE.with(|r| r.replace(role)))
    }
}

impl Drop for RoleGuard {
    fn drop(&mut self) {
        ROLE.with(|r| r.set(self.0));
    }
}

/// Waits with a short spin, then yielding the core; `park_after` also parks (helpers only).
struct Backoff {
    since: Instant,
    rounds: u32,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { since: Instant::now(), rounds: 0 }
    }

    /// One round of waiting; true once the wait has lasted `park_after`.
    fn snooze(&mut self, park_after: Option<Duration>) -> bool {
        self.rounds += 1;
        if self.rounds < 64 {
            std::hint::spin_loop();
            return false;
        }
        let waited = self.since.elapsed();
        if park_after.is_some_and(|p| waited >= p) {
            return true;
        }
        if waited < SPIN {
            // A few `pause`s between clock reads (one is ~140 cycles on recent Xeons): a new job is
            // seen within a fraction of a microsecond.
            for _ in 0..8 {
                std::hint::spin_loop();
            }
        } else {
            std::thread::yield_now();
        }
        false
    }
}

impl Team {
    fn new() -> Team {
        Team {
            word: AtomicU64::new(CLOSED),
            job: UnsafeCell::new((std::ptr::null::<fn(usize)>() as *const Task<'static>, 0)),
            busy: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            helpers: Mutex::new(Vec::new()),
            panic: Mutex::new(None),
            epoch: Cell::new(0),
        }
    }

    /// Claims and runs tasks of the job of epoch `e` (`n` tasks) until none is left.
    fn work(&self, e: u32, n: usize, f: &Task<'_>) {
        let _role = RoleGuard::set(Role::InTask);
        let mut w = self.word.load(Acquire);
        loop {
            let i = (w & INDEX) as usize;
            if (w >> 32) as u32 != e || i >= n {
                return;
            }
            match self.word.compare_exchange_weak(w, w + 1, AcqRel, Acquire) {
                Ok(_) => {
                    if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(i))) {
                        self.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(p);
                    }
                    w = self.word.load(Acquire);
                }
                Err(now) => w = now,
            }
        }
    }

    /// A helper's life: join jobs as they open, until the run stops.
    fn help(&self) {
        // A helper job that rayon hands to the leader itself (only if something under the leader
        // waits in rayon) or into a task must not wait for the run it is part of to stop.
        if !matches!(ROLE.with(|r| r.get()), Role::None) {
            return;
        }
        self.helpers.lock().unwrap_or_else(|e| e.into_inner()).push(std::thread::current());
        let mut seen = 0u32;
        let mut wait = Backoff::new();
        while !self.stop.load(Acquire) {
            let w = self.word.load(Acquire);
            let e = (w >> 32) as u32;
            if e == seen || w & INDEX == CLOSED {
                if wait.snooze(Some(PARK_AFTER)) {
                    self.sleepers.fetch_add(1, SeqCst);
                    if self.word.load(SeqCst) == w && !self.stop.load(SeqCst) {
                        std::thread::park();
                    }
                    self.sleepers.fetch_sub(1, SeqCst);
                    wait = Backoff::new();
                }
                continue;
            }
            self.busy.fetch_add(1, SeqCst);
            let again = self.word.load(SeqCst);
            if (again >> 32) as u32 == e && again & INDEX != CLOSED {
                // SAFETY: counted in `busy` with the job of epoch `e` still open, so the leader has
                // neither returned from that job's `for_each` nor written the slot since.
                let (f, n) = unsafe { *self.job.get() };
                self.work(e, n, unsafe { &*f });
            }
            self.busy.fetch_sub(1, Release);
            seen = e;
            wait = Backoff::new();
        }
    }

    /// The leader's `for_each`: opens the job, runs its share, waits for the rest.
    fn for_each(&self, n: usize, f: &Task<'_>) {
        assert!((n as u64) < CLOSED, "{n} tasks do not fit the job word");
        let e = self.epoch.get().wrapping_add(1).max(1);
        self.epoch.set(e);
        // SAFETY: the word is closed and no helper is inside a job (the last `for_each` waited for
        // `busy == 0` after closing it), so no helper reads the slot now. The task's lifetime is
        // erased; it is used only until this call returns (module doc).
        unsafe {
            *self.job.get() = (std::mem::transmute::<&Task<'_>, &'static Task<'static>>(f) as *const Task<'static>, n)
        };
        self.word.store((e as u64) << 32, SeqCst);
        if self.sleepers.load(SeqCst) > 0 {
            self.wake();
        }
        self.work(e, n, f);
        // Every index is claimed now; close the word and wait for the helpers still running one.
        self.word.store((e as u64) << 32 | CLOSED, SeqCst);
        let mut wait = Backoff::new();
        while self.busy.load(SeqCst) > 0 {
            wait.snooze(None);
        }
        if let Some(p) = self.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
            resume_unwind(p);
        }
    }

    fn wake(&self) {
        for h in self.helpers.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            h.unpark();
        }
    }
}

/// Stops the helpers when the leader's work ends, returning or unwinding.
struct StopOnDrop<'a>(&'a Team);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop.store(true, SeqCst);
        self.0.wake();
    }
}

/// Runs `f` on the calling thread (a worker of rayon's global pool) as the leader of a team of
/// `threads − 1` helpers taken from the pool for the call.
pub(crate) fn lead<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    let team = Team::new();
    rayon::scope(|s| {
        for _ in 1..threads {
            s.spawn(|_| team.help());
        }
        let _stop = StopOnDrop(&team);
        let _role = RoleGuard::set(Role::Leader(&team));
        f()
    })
}

/// Whether this thread leads a team now (between its jobs): for tests.
#[cfg(test)]
pub(crate) fn leading() -> bool {
    matches!(ROLE.with(|r| r.get()), Role::Leader(_))
}

/// `for_each` through this thread's team: true when it ran here (as the team's job, or in place
/// inside a team's task), false when this thread has no team.
pub(crate) fn for_each(n: usize, f: &Task<'_>) -> bool {
    match ROLE.with(|r| r.get()) {
        Role::None => false,
        Role::InTask => {
            (0..n).for_each(f);
            true
        }
        Role::Leader(team) => {
            // SAFETY: the leader's role is set only inside `lead`, which owns the team until the
            // role is put back.
            unsafe { &*team }.for_each(n, f);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn pool2() {
        let _ = rayon::ThreadPoolBuilder::new().num_threads(2).build_global();
    }

    /// Many jobs of every size, back to back: each index runs exactly once a job, and the job sees
    /// its own task (a borrow of the frame that made it).
    #[test]
    fn each_job_runs_each_index_once() {
        pool2();
        let threads = rayon::current_num_threads().max(2);
        lead(threads, || {
            for round in 0..3000usize {
                let n = [0, 1, 2, 3, 7, 8, 33, 200][round % 8];
                // Some jobs of slow tasks, the later ones slower: a helper is still running one
                // when the leader has run out of indices.
                let slow = round % 100 == 2;
                let counts: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                let tag = round * 1000;
                let seen = AtomicUsize::new(0);
                assert!(for_each(n, &|i| {
                    if slow {
                        std::thread::sleep(Duration::from_micros(200 * (i as u64 + 1)));
                    }
                    counts[i].fetch_add(1, Relaxed);
                    seen.fetch_add(tag + i, Relaxed);
                }));
                assert!(counts.iter().all(|c| c.load(Relaxed) == 1), "round {round}: {counts:?}");
                assert_eq!(seen.load(Relaxed), (0..n).map(|i| tag + i).sum::<usize>(), "round {round}");
            }
        });
    }

    /// The helpers take tasks too (the leader does not run everything itself), and a nested call
    /// inside a task runs in place.
    #[test]
    fn helpers_take_tasks_and_nested_calls_run_in_place() {
        pool2();
        let threads = rayon::current_num_threads().max(2);
        let leader = std::thread::current().id();
        let by_helper = AtomicUsize::new(0);
        lead(threads, || {
            let leader_here = std::thread::current().id();
            assert_ne!(leader_here, leader, "the leader runs on a pool worker");
            for _ in 0..200 {
                for_each(8, &|_| {
                    if std::thread::current().id() != leader_here {
                        by_helper.fetch_add(1, Relaxed);
                    }
                    std::thread::sleep(Duration::from_micros(200));
                    let inner = AtomicUsize::new(0);
                    assert!(for_each(4, &|i| {
                        inner.fetch_add(i + 1, Relaxed);
                    }));
                    assert_eq!(inner.load(Relaxed), 10);
                });
            }
        });
        assert!(by_helper.load(Relaxed) > 0, "no task ran on a helper");
        assert!(!for_each(2, &|_| ()), "outside a run there is no team");
    }

    /// A task's panic, on the leader or on a helper, reaches the caller of `for_each` only after
    /// every other task of the job has returned (the job's task borrows the caller's frame); a run
    /// whose work panics still ends (the helpers stop), and the next run works.
    #[test]
    fn a_task_panic_reaches_the_caller_after_the_other_tasks() {
        pool2();
        let threads = rayon::current_num_threads().max(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            lead(threads, || {
                let leader_here = std::thread::current().id();
                for on_helper in [false, true] {
                    let (done, fired) = (AtomicUsize::new(0), AtomicBool::new(false));
                    let r = catch_unwind(AssertUnwindSafe(|| {
                        for_each(64, &|i| {
                            std::thread::sleep(Duration::from_millis(1));
                            let helper = std::thread::current().id() != leader_here;
                            if i >= 4 && helper == on_helper && !fired.swap(true, Relaxed) {
                                panic!("a task");
                            }
                            done.fetch_add(1, Relaxed);
                        })
                    }));
                    let msg = r.expect_err("the panic was lost");
                    assert_eq!(msg.downcast_ref::<&str>(), Some(&"a task"));
                    assert_eq!(done.load(Relaxed), 63, "on a helper: {on_helper}");
                }
                panic!("the run's own work");
            })
        }));
        assert_eq!(r.expect_err("lost").downcast_ref::<&str>(), Some(&"the run's own work"));
        let sum = AtomicUsize::new(0);
        lead(threads, || {
            for_each(10, &|i| {
                sum.fetch_add(i, Relaxed);
            })
        });
        assert_eq!(sum.load(Relaxed), 45);
    }

    /// Runs led from several threads at once (an embedder's threads sharing the pool): each gets
    /// its own jobs done, whether it found helpers or ran alone (every task returned before its
    /// `for_each` did), and none waits forever.
    #[test]
    fn runs_from_several_threads_at_once_each_finish() {
        pool2();
        let threads = rayon::current_num_threads().max(2);
        std::thread::scope(|s| {
            for caller in 0..4usize {
                s.spawn(move || {
                    for round in 0..200usize {
                        lead(threads, || {
                            let n = 1 + (caller * 7 + round) % 40;
                            let sum = AtomicUsize::new(0);
                            for_each(n, &|i| {
                                // Every tenth run's later tasks are slow, so a helper is still
                                // inside one when the leader runs out of indices.
                                if round % 10 == 0 {
                                    std::thread::sleep(Duration::from_micros(10 * i as u64));
                                }
                                sum.fetch_add(caller * 1000 + i, Relaxed);
                            });
                            assert_eq!(sum.load(Relaxed), (0..n).map(|i| caller * 1000 + i).sum::<usize>());
                        });
                    }
                });
            }
        });
    }

    /// A leader that pauses longer than the helpers' spin (so they park) still gets its next
    /// jobs done by them.
    #[test]
    fn parked_helpers_wake_for_the_next_job() {
        pool2();
        let threads = rayon::current_num_threads().max(2);
        lead(threads, || {
            for _ in 0..5 {
                std::thread::sleep(PARK_AFTER * 3);
                let leader_here = std::thread::current().id();
                let by_helper = AtomicUsize::new(0);
                for_each(16, &|_| {
                    if std::thread::current().id() != leader_here {
                        by_helper.fetch_add(1, Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                });
                assert!(by_helper.load(Relaxed) > 0, "the helpers stayed parked");
            }
        });
    }
}
