//! The threads a forward pass splits its matrix products over.
//!
//! A decode step is ~20 products of a few hundred microseconds or less each;
//! waking a sleeping thread (futex, tens of microseconds on a VM or a Pi)
//! per product costs more than it saves, which is what a general pool such as
//! rayon's does. Here the workers spin for a while after each product (the
//! next one comes within microseconds while a sequence is generating), then
//! sleep, so an idle daemon uses no CPU.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ember_kernels::gemv::{Parallel, Serial};

/// How long an idle worker spins before sleeping.
const SPIN: Duration = Duration::from_micros(200);

type Task = dyn Fn(usize) + Sync;

struct Shared {
    /// Generation (high 32 bits) and next unclaimed index (low 32 bits):
    /// claiming an index is one compare-and-swap that also proves the job is
    /// the one published.
    word: AtomicU64,
    /// The current job's generation, task (its lifetime erased, see `run`)
    /// and size. The generation ties the task to the claimable word: the slot
    /// is filled before the word moves to the new generation, and a claim on
    /// the old, exhausted word must not take an index of the new task.
    task: Mutex<Option<(u64, &'static Task, usize)>>,
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
        let shared = Arc::new(Shared {
            word: AtomicU64::new(0),
            task: Mutex::new(None),
            done: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut handles = vec![];
        for i in 1..threads.max(1) {
            let s = shared.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || worker(&s))?,
            );
        }
        Ok(SpinPool {
            shared,
            threads: threads.max(1),
            handles,
            running: Mutex::new(()),
        })
    }
}

/// Claim and run indices of generation `gen` until none is left.
fn drain(s: &Shared, gen: u64) {
    loop {
        let w = s.word.load(SeqCst);
        if w >> 32 != gen {
            return;
        }
        let Some((job, task, n)) = *s.task.lock().unwrap_or_else(|e| e.into_inner()) else {
            return;
        };
        if job != gen {
            return;
        }
        let i = (w & 0xffff_ffff) as usize;
        if i >= n {
            return;
        }
        if s.word.compare_exchange(w, w + 1, SeqCst, SeqCst).is_err() {
            continue;
        }
        // `task` belongs to generation `gen`, whose index `i` we just claimed:
        // `run` does not return (ending the real borrow) before `done` counts it.
        task(i);
        s.done.fetch_add(1, SeqCst);
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        let t0 = Instant::now();
        loop {
            if s.stop.load(SeqCst) {
                return;
            }
            let gen = s.word.load(SeqCst) >> 32;
            if gen != seen {
                seen = gen;
                drain(s, gen);
                break;
            }
            if t0.elapsed() > SPIN {
                let g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleeping.fetch_add(1, SeqCst);
                let _g = s
                    .wake
                    .wait_while(g, |_| {
                        s.word.load(SeqCst) >> 32 == seen && !s.stop.load(SeqCst)
                    })
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
        let s = &*self.shared;
        // SAFETY: the task is only called for indices claimed in this
        // generation, every one of which finishes before this function
        // returns (the wait on `done` below); afterwards the slot is cleared
        // and a late worker fails to claim (the generation's indices are
        // exhausted), so the extended borrow is never used past its real end.
        let task: &'static Task =
            unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Task>(task) };
        let gen = (s.word.load(SeqCst) >> 32) + 1;
        *s.task.lock().unwrap_or_else(|e| e.into_inner()) = Some((gen, task, n));
        s.done.store(0, SeqCst);
        s.word.store(gen << 32, SeqCst);
        if s.sleeping.load(SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        drain(s, gen);
        while s.done.load(SeqCst) < n {
            std::hint::spin_loop();
        }
        *s.task.lock().unwrap_or_else(|e| e.into_inner()) = None;
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

    #[test]
    fn every_index_runs_once_per_job() {
        let pool = SpinPool::new(3, "t").unwrap();
        for round in 0..2000 {
            let n = 1 + round % 7;
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
}
