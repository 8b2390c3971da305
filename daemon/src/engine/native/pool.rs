//! The threads a forward pass splits its matrix products over.
//!
//! A decode step is ~20 products of a few hundred microseconds or less each;
//! waking a sleeping thread (futex, tens of microseconds on a VM or a Pi)
//! per product costs more than it saves, which is what a general pool such as
//! rayon's does. Here the workers spin for a while after each product (the
//! next one comes within microseconds while a sequence is generating), then
//! sleep, so an idle daemon uses no CPU.
//!
//! Each thread takes its own indices first (thread `t` of `T`: `t`, `t + T`,
//! …) and only then the others', so a product split into one part per thread
//! runs each part on the same core call after call; a thread that is late or
//! asleep still has its part taken by the others. Measured against taking
//! indices in one shared order, this gained nothing (the caller, which
//! publishes a job and drains at once, already took index 0 nearly every
//! time): it makes the placement certain, not faster.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ember_kernels::gemv::{Parallel, Serial};

/// How long an idle worker spins before sleeping.
const SPIN: Duration = Duration::from_micros(200);

/// Most indices one job hands out; `run` splits larger ones.
const MAX_INDICES: usize = 64;

type Task = dyn Fn(usize) + Sync;

struct Shared {
    /// The current job's generation. 64 bits, so it never wraps: a job a
    /// microsecond would take 580 000 years.
    gen: AtomicU64,
    /// The current job's generation, task (its lifetime erased, see `run`)
    /// and size, set before `gen` moves to it.
    task: Mutex<Option<(u64, &'static Task, usize)>>,
    /// The last generation that claimed each index. A claim moves it up to
    /// the claimer's generation, so an index is run once per job, and a
    /// thread still holding a finished job's task claims nothing: every
    /// index of that job is already claimed at its generation or later.
    claims: Box<[AtomicU64]>,
    /// Completed indices of the current job.
    done: AtomicUsize,
    sleeping: AtomicUsize,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

/// A fixed set of spinning workers; the calling thread works too.
pub struct SpinPool {
    shared: Arc<Shared>,
    threads: usize,
    handles: Vec<JoinHandle<()>>,
    /// One job at a time (the engine's work lock already ensures it).
    running: Mutex<()>,
}

impl std::fmt::Debug for SpinPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpinPool")
            .field("threads", &self.threads)
            .finish()
    }
}

impl SpinPool {
    /// `threads` in all: the caller plus `threads - 1` workers.
    pub fn new(threads: usize, name: &str) -> std::io::Result<SpinPool> {
        SpinPool::from_generation(threads, name, 0)
    }

    /// A pool whose first job is generation `gen + 1` (tests start near the
    /// bounds of narrower counters).
    fn from_generation(threads: usize, name: &str, gen: u64) -> std::io::Result<SpinPool> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            gen: AtomicU64::new(gen),
            task: Mutex::new(None),
            claims: (0..MAX_INDICES.max(threads))
                .map(|_| AtomicU64::new(gen))
                .collect(),
            done: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut handles = vec![];
        for i in 1..threads {
            let s = shared.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || worker(&s, i, threads))?,
            );
        }
        Ok(SpinPool {
            shared,
            threads,
            handles,
            running: Mutex::new(()),
        })
    }

    /// One job of at most `claims.len()` indices.
    fn run_some(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        let s = &*self.shared;
        assert!(n <= s.claims.len());
        // SAFETY: the task is only called for indices claimed in this
        // generation, every one of which finishes before this function
        // returns (the wait on `done` below); a thread that read the task
        // and is late claims nothing once they are all claimed (see
        // `claims`), so the extended borrow is never used past its real end.
        let task: &'static Task =
            unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Task>(task) };
        let gen = s.gen.load(SeqCst) + 1;
        *s.task.lock().unwrap_or_else(|e| e.into_inner()) = Some((gen, task, n));
        s.done.store(0, SeqCst);
        s.gen.store(gen, SeqCst);
        if s.sleeping.load(SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        drain(s, gen, 0, self.threads);
        while s.done.load(SeqCst) < n {
            std::hint::spin_loop();
        }
        *s.task.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The order thread `me` of `threads` tries a job's `n` indices in: its own
/// (`me`, `me + threads`, …), then everyone else's.
fn claim_order(me: usize, threads: usize, n: usize) -> impl Iterator<Item = usize> {
    let own = (me..n).step_by(threads);
    own.chain((0..n).filter(move |i| i % threads != me))
}

/// Take index `claim` (its slot in `claims`) for generation `gen`.
fn take(claim: &AtomicU64, gen: u64) -> bool {
    let mut last = claim.load(SeqCst);
    while last < gen {
        match claim.compare_exchange_weak(last, gen, SeqCst, SeqCst) {
            Ok(_) => return true,
            Err(now) => last = now,
        }
    }
    false
}

/// As thread `me`, run every index of generation `gen` that is still free.
fn drain(s: &Shared, gen: u64, me: usize, threads: usize) {
    let Some((job, task, n)) = *s.task.lock().unwrap_or_else(|e| e.into_inner()) else {
        return;
    };
    if job != gen {
        return;
    }
    for i in claim_order(me, threads, n) {
        if take(&s.claims[i], gen) {
            // Index `i` of generation `gen` is ours, so the job is not done
            // and `run_some` has not returned: `task` is still borrowed.
            task(i);
            s.done.fetch_add(1, SeqCst);
        }
    }
}

fn worker(s: &Shared, me: usize, threads: usize) {
    let mut seen = s.gen.load(SeqCst);
    loop {
        let t0 = Instant::now();
        loop {
            if s.stop.load(SeqCst) {
                return;
            }
            let gen = s.gen.load(SeqCst);
            if gen != seen {
                seen = gen;
                drain(s, gen, me, threads);
                break;
            }
            if t0.elapsed() > SPIN {
                let g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleeping.fetch_add(1, SeqCst);
                let _g = s
                    .wake
                    .wait_while(g, |_| s.gen.load(SeqCst) == seen && !s.stop.load(SeqCst))
                    .unwrap_or_else(|e| e.into_inner());
                s.sleeping.fetch_sub(1, SeqCst);
                break;
            }
            std::hint::spin_loop();
        }
    }
}

impl Parallel for SpinPool {
    fn threads(&self) -> usize {
        self.threads
    }

    fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        if n <= 1 || self.threads == 1 {
            (0..n).for_each(task);
            return;
        }
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let most = self.shared.claims.len();
        for first in (0..n).step_by(most) {
            self.run_some(most.min(n - first), &|i| task(first + i));
        }
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The pool when there is one, else the calling thread alone.
pub fn or_serial(pool: &Option<SpinPool>) -> &dyn Parallel {
    match pool {
        Some(p) => p,
        None => &Serial,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `rounds` jobs of `sizes(round)` indices; each index runs once.
    fn each_once(pool: &SpinPool, rounds: usize, sizes: impl Fn(usize) -> usize) {
        for round in 0..rounds {
            let n = sizes(round);
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|i| {
                hits[i].fetch_add(1, SeqCst);
            });
            let got: Vec<usize> = hits.iter().map(|h| h.load(SeqCst)).collect();
            assert!(got.iter().all(|&h| h == 1), "round {round}: {got:?}");
            if round % 500 == 0 {
                std::thread::sleep(Duration::from_millis(2)); // let workers fall asleep
            }
        }
    }

    #[test]
    fn every_index_runs_once_per_job() {
        let pool = SpinPool::new(3, "t").unwrap();
        each_once(&pool, 2000, |round| 1 + round % 7);
    }

    #[test]
    fn jobs_larger_than_the_claims_are_split() {
        let pool = SpinPool::new(2, "t").unwrap();
        each_once(&pool, 50, |round| {
            MAX_INDICES - 2 + round % 5 + 60 * (round % 3)
        });
    }

    /// The generation used to live in the high half of a 64-bit word with
    /// the next index in the low half: job 2³² wrapped it to 0 and the pool
    /// hung (at ~280 000 jobs a second, kjv-gpt2 on 2 threads, after about
    /// four hours of decoding).
    #[test]
    fn jobs_go_on_past_two_to_the_32() {
        let pool = SpinPool::from_generation(2, "t", u64::from(u32::MAX) - 3).unwrap();
        each_once(&pool, 20, |round| 2 + round % 3);
        assert!(pool.shared.gen.load(SeqCst) > u64::from(u32::MAX) + 10);
    }

    #[test]
    fn each_thread_tries_its_own_indices_first_then_all() {
        for threads in 1..5 {
            for n in 0..12 {
                for me in 0..threads {
                    let order: Vec<usize> = claim_order(me, threads, n).collect();
                    let own = n.saturating_sub(me).div_ceil(threads);
                    assert!(order[..own].iter().all(|i| i % threads == me), "{order:?}");
                    let mut all = order.clone();
                    all.sort_unstable();
                    assert_eq!(all, (0..n).collect::<Vec<_>>(), "{me}/{threads}");
                }
            }
        }
    }
}
