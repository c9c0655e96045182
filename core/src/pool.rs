//! The worker threads behind [`fused::parallel`](crate::fused::parallel).
//!
//! A parallel driver splits its rows into a few blocks and must not return
//! before every block is done. Starting a thread per block for each call
//! (`std::thread::scope`) costs 60–70 µs on a 2-core VM — a tenth of the
//! fused token loss at `[256, 4096]`, most of it at `[64, 1024]`. So the
//! blocks run on a pool instead:
//!
//! - **Workers start on first use and stay.** The pool grows to
//!   `threads − 1` workers when a call asks for `threads` (at most twice the
//!   cores); the calling thread works too, drawing blocks like the others.
//! - **A worker polls briefly before it sleeps.** After its last block it
//!   polls for the next call for [`SPIN`] (200 µs; `POSTTRAIN_SPIN_US`
//!   sets it, 0 sleeps at once), yielding its CPU between polls to any
//!   thread that wants it, then waits on a condition variable. Only as many
//!   workers poll as the machine has cores besides the caller's; the others
//!   sleep at once, so an oversubscribed pool never polls against the
//!   threads doing the work.
//! - **One call at a time.** A second caller arriving while the pool is busy
//!   (another user thread, or a parallel driver called from inside a block)
//!   runs its blocks on scoped threads of its own, as before: never a
//!   deadlock, never a queue.
//! - **A forked child does not use it.** After `fork` (Python's
//!   `multiprocessing`, data-loader workers) the child has none of the
//!   workers and may hold a copy of a lock taken at the time; a call in a
//!   process other than the one that started the pool runs on scoped
//!   threads.
//! - **Panics come back to the caller.** A block that panics is caught on its
//!   worker; the call waits for the other blocks, then resumes the panic on
//!   the calling thread, as `std::thread::scope` does.
//!
//! Which thread runs which block changes nothing in the results: every block
//! writes its own rows, and the drivers combine per-row results in row order.

use std::any::Any;
use std::boxed::Box;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, TryLockError};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};
use std::vec::Vec;

/// How long an idle worker (and a caller waiting for its last blocks) polls
/// before it sleeps, unless `POSTTRAIN_SPIN_US` says otherwise.
const SPIN: Duration = Duration::from_micros(200);

/// The polling time: `POSTTRAIN_SPIN_US` (microseconds; 0 sleeps at once,
/// for a machine shared with other busy threads) if set, else [`SPIN`].
fn spin_time() -> Duration {
    std::env::var("POSTTRAIN_SPIN_US")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(SPIN, Duration::from_micros)
}

/// One block of work, borrowing the caller's data for `'a`.
type Task<'a> = Box<dyn FnOnce() + Send + 'a>;

/// The blocks of one parallel call: pushed one by one, run together by
/// [`Blocks::run`], which returns when every block has finished.
pub(crate) struct Blocks<'a> {
    tasks: Vec<Task<'a>>,
}

impl<'a> Blocks<'a> {
    pub(crate) fn new() -> Self {
        Blocks { tasks: Vec::new() }
    }

    pub(crate) fn push(&mut self, work: impl FnOnce() + Send + 'a) {
        self.tasks.push(Box::new(work));
    }

    /// Runs every block on at most `threads` threads (the calling thread one
    /// of them) and returns when all have finished; a block's panic is
    /// resumed here after the others finish.
    pub(crate) fn run(self, threads: usize) {
        let mut tasks = self.tasks;
        if tasks.len() <= 1 || threads <= 1 {
            for t in tasks {
                t();
            }
            return;
        }
        let pool = POOL.get_or_init(Pool::new);
        // In a child of `fork` the workers are gone and a lock may have been
        // copied held: the child never touches the pool.
        let busy = if pool.pid != std::process::id() {
            None
        } else {
            match pool.submit.try_lock() {
                Ok(guard) => Some(guard),
                Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            }
        };
        let Some(_submit) = busy else {
            // The pool is running another call: scoped threads of our own,
            // the last block on this thread.
            let last = tasks.pop().expect("two blocks or more");
            let panic = thread::scope(|s| {
                let started: Vec<_> = tasks.into_iter().map(|t| s.spawn(t)).collect();
                let mut panic = catch_unwind(AssertUnwindSafe(last)).err();
                for h in started {
                    if let Err(p) = h.join() {
                        panic.get_or_insert(p);
                    }
                }
                panic
            });
            if let Some(p) = panic {
                resume_unwind(p);
            }
            return;
        };
        pool.grow((threads.min(tasks.len()) - 1).min(pool.max_workers));
        let n = tasks.len();
        let cells = tasks
            .into_iter()
            .map(|t| {
                #[allow(unsafe_code)]
                // SAFETY: only the lifetime changes (`'a` to `'static`; the
                // layout of a boxed trait object does not depend on it). Every
                // task is taken out of its cell and run (or dropped, for a
                // panic) before `remaining` reaches 0, and this function does
                // not return — nor unwind: the tasks run under `catch_unwind`,
                // and the waiting below cannot panic — before it reaches 0. So
                // no task, nor anything it borrows, is used after `'a` ends;
                // the workers' clones of the `Job` hold only empty cells by
                // then.
                let t: Task<'static> =
                    unsafe { core::mem::transmute::<Task<'a>, Task<'static>>(t) };
                Mutex::new(Some(t))
            })
            .collect();
        let job = Arc::new(Job {
            cells,
            next: AtomicUsize::new(0),
            remaining: AtomicUsize::new(n),
            panic: Mutex::new(None),
            caller: thread::current(),
        });
        pool.shared.publish(job.clone());
        job.work();
        // Wait for the blocks still running on the workers.
        let start = Instant::now();
        while job.remaining.load(Ordering::Acquire) != 0 {
            if start.elapsed() < pool.spin {
                // Polite polling: a thread waiting for this CPU (a worker
                // placed on it, say) runs first.
                thread::yield_now();
            } else {
                // The worker finishing the last block unparks this thread.
                thread::park_timeout(Duration::from_millis(10));
            }
        }
        pool.shared.clear();
        let panic = lock(&job.panic).take();
        if let Some(p) = panic {
            resume_unwind(p);
        }
    }
}

/// A poisoned lock still guards consistent data here (every critical section
/// is a plain store or take), so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One call's blocks, shared by the caller and the workers.
struct Job {
    /// Each block, taken once by whichever thread draws its index.
    cells: Vec<Mutex<Option<Task<'static>>>>,
    /// The next index to draw.
    next: AtomicUsize,
    /// Blocks not yet finished.
    remaining: AtomicUsize,
    /// The first panic of a block.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    caller: Thread,
}

impl Job {
    /// Draws and runs blocks until none is left to draw.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(cell) = self.cells.get(i) else {
                return;
            };
            let task = lock(cell).take();
            if let Some(t) = task {
                if let Err(p) = catch_unwind(AssertUnwindSafe(t)) {
                    lock(&self.panic).get_or_insert(p);
                }
            }
            if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.caller.unpark();
            }
        }
    }
}

/// What the workers watch: the current call (if any) and its number.
struct Shared {
    /// `(call number, job)`.
    slot: Mutex<(u64, Option<Arc<Job>>)>,
    /// The call number, for the workers' polling without the lock.
    epoch: AtomicU64,
    wake: Condvar,
}

impl Shared {
    /// Puts `job` in the slot under a new call number and wakes the sleepers.
    fn publish(&self, job: Arc<Job>) {
        let mut g = lock(&self.slot);
        g.0 += 1;
        g.1 = Some(job);
        self.epoch.store(g.0, Ordering::Release);
        drop(g);
        self.wake.notify_all();
    }

    /// Empties the slot after a call (the workers are not woken: a worker
    /// that looks finds nothing, or the next call).
    fn clear(&self) {
        lock(&self.slot).1 = None;
    }
}

struct Pool {
    shared: Arc<Shared>,
    /// Workers started so far.
    workers: Mutex<usize>,
    /// Held by the call running on the pool.
    submit: Mutex<()>,
    /// Workers that may spin: the cores besides the caller's.
    spinners: usize,
    /// The most workers the pool starts: twice the cores (more threads than
    /// cores only take turns; the blocks are drawn, so fewer workers than
    /// blocks is never a deadlock).
    max_workers: usize,
    /// The process that started the workers.
    pid: u32,
    /// How long the workers and the caller poll (see [`spin_time`]).
    spin: Duration,
}

static POOL: OnceLock<Pool> = OnceLock::new();

fn cores() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

impl Pool {
    fn new() -> Self {
        Pool {
            shared: Arc::new(Shared {
                slot: Mutex::new((0, None)),
                epoch: AtomicU64::new(0),
                wake: Condvar::new(),
            }),
            workers: Mutex::new(0),
            submit: Mutex::new(()),
            spinners: cores() - 1,
            max_workers: 2 * cores(),
            pid: std::process::id(),
            spin: spin_time(),
        }
    }

    /// Starts workers until there are `want`. A worker that cannot be started
    /// is not an error: the caller and the others draw its blocks.
    fn grow(&self, want: usize) {
        let mut have = lock(&self.workers);
        while *have < want {
            let shared = self.shared.clone();
            // Only the workers the machine has cores for poll.
            let spin = if *have < self.spinners {
                self.spin
            } else {
                Duration::ZERO
            };
            let started = thread::Builder::new()
                .name(std::format!("posttrain-{}", *have))
                .spawn(move || worker(&shared, spin));
            if started.is_err() {
                return;
            }
            *have += 1;
        }
    }
}

/// A worker: waits for a call (polling for `spin`, then asleep), draws its
/// blocks, and waits again.
fn worker(shared: &Shared, spin: Duration) {
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut polls = 0u32;
        while shared.epoch.load(Ordering::Acquire) == seen {
            polls = polls.wrapping_add(1);
            if spin.is_zero() || (polls % 16 == 0 && start.elapsed() > spin) {
                let mut g = lock(&shared.slot);
                while g.0 == seen {
                    g = shared.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                break;
            }
            thread::yield_now();
        }
        let job = {
            let g = lock(&shared.slot);
            seen = g.0;
            g.1.clone()
        };
        if let Some(job) = job {
            job.work();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Blocks;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::vec::Vec;

    /// Runs `blocks` blocks on `threads` threads, each adding its index + 1
    /// to its own slot; returns the slots.
    fn run_counting(blocks: usize, threads: usize) -> Vec<usize> {
        let mut slots = std::vec![0usize; blocks];
        let mut work = Blocks::new();
        for (i, s) in slots.iter_mut().enumerate() {
            work.push(move || *s += i + 1);
        }
        work.run(threads);
        slots
    }

    #[test]
    fn every_block_runs_once_for_every_thread_count() {
        for threads in 1..=9 {
            for blocks in 0..=12 {
                for _ in 0..20 {
                    let want: Vec<usize> = (1..=blocks).collect();
                    assert_eq!(
                        run_counting(blocks, threads),
                        want,
                        "{blocks} blocks, {threads} threads"
                    );
                }
            }
        }
    }

    #[test]
    fn a_panicking_block_panics_the_call_after_the_others_finish() {
        let done = AtomicUsize::new(0);
        let caught = std::panic::catch_unwind(|| {
            let mut work = Blocks::new();
            for i in 0..6 {
                let done = &done;
                work.push(move || {
                    if i == 2 {
                        panic!("block {i} fails");
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                });
            }
            work.run(4);
        });
        let msg = caught.expect_err("the panic comes back to the caller");
        assert_eq!(
            msg.downcast_ref::<std::string::String>()
                .map(|s| s.as_str()),
            Some("block 2 fails")
        );
        assert_eq!(done.load(Ordering::SeqCst), 5);
        // The pool still runs calls afterwards.
        assert_eq!(run_counting(5, 3), std::vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_call_from_inside_a_block_and_concurrent_callers_complete() {
        let inner = AtomicUsize::new(0);
        let mut work = Blocks::new();
        for _ in 0..4 {
            let inner = &inner;
            work.push(move || {
                let got = run_counting(4, 2);
                assert_eq!(got, std::vec![1, 2, 3, 4]);
                inner.fetch_add(1, Ordering::SeqCst);
            });
        }
        work.run(2);
        assert_eq!(inner.load(Ordering::SeqCst), 4);
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    for k in 0..200 {
                        let blocks = 1 + (t + k) % 7;
                        let want: Vec<usize> = (1..=blocks).collect();
                        assert_eq!(run_counting(blocks, 2 + t), want);
                    }
                });
            }
        });
    }
}
