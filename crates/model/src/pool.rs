//! The compute pool: one thread per core, the caller included (the engine thread computes its
//! share instead of blocking), for the forward pass's parallel loops (matmul column blocks,
//! attention heads). Why ours rather than rayon: a decode step is ~100 short parallel loops
//! with serial work between them, and rayon's idle workers go to sleep on a futex (or spin in
//! `sched_yield`); waking them cost ~10% of a TinyLlama-shaped decode step on a 2-core VM
//! (`perf`: `__schedule`, `futex_wait`, `sched_yield`). Here workers spin on an atomic for a
//! short while after each loop (the next one usually comes within microseconds) and only then
//! park, as llama.cpp's thread pool does between graph nodes.
//!
//! Results never depend on the pool: a task is a fixed piece of work (an output block), and
//! which thread runs it, or whether the loop runs inline, changes no number.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(200);

/// A job as workers see it: the task function, erased to `'static` (see `Pool::run` for why
/// that is sound), and the number of tasks.
#[derive(Clone, Copy)]
struct Job {
    f: &'static (dyn Fn(usize) + Sync),
    tasks: usize,
}

struct Shared {
    /// Bumped for each job; workers wait for it to change.
    epoch: AtomicUsize,
    job: Mutex<Option<Job>>,
    /// The next task index to claim.
    next: AtomicUsize,
    /// Workers inside the current job; `OPEN` set while new workers may join it.
    inside: AtomicUsize,
    sleepers: Mutex<usize>,
    wake: Condvar,
    shutdown: AtomicBool,
    /// The first panic of the current job's tasks, re-raised on the caller once every thread
    /// has left the job (a panicking task must not kill a worker and hang the caller).
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    /// Threads that run jobs, the caller included.
    threads: usize,
}

const OPEN: usize = 1 << (usize::BITS - 1);

pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    /// One job at a time; a second caller (another thread, or a task calling back in) runs its
    /// loop inline.
    submit: Mutex<()>,
}

impl Pool {
    /// The process-wide pool: one thread per core (`GLASSBOX_THREADS` overrides), the caller
    /// counted as one.
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            let cores = std::env::var("GLASSBOX_THREADS").ok().and_then(|v| v.parse().ok()).filter(|&n: &usize| n > 0);
            Pool::new(cores.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())))
        })
    }

    /// A pool of `threads` threads, the caller's included.
    pub fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: Mutex::new(None),
            next: AtomicUsize::new(0),
            inside: AtomicUsize::new(0),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            panic: Mutex::new(None),
            threads: threads.max(1),
        });
        let workers = threads.max(1) - 1;
        for i in 0..workers {
            let s = shared.clone();
            // A worker that fails to start leaves its share to the others (the loop still
            // completes: the caller claims tasks too).
            let _ = std::thread::Builder::new().name(format!("glassbox-compute-{i}")).spawn(move || worker(&s));
        }
        Pool { shared, workers, submit: Mutex::new(()) }
    }

    /// Threads that run a job, the caller included.
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Run `f(0..tasks)`, each index exactly once, spread over the pool; returns when all
    /// have run. If tasks panic, the others still run and the first panic is raised here, on
    /// the caller (the engine's per-step crash handling sees it as it would without the pool).
    pub fn run(&self, tasks: usize, f: impl Fn(usize) + Sync) {
        // One job at a time; a poisoned lock (a task panicked while it was held) is still ours.
        let guard = if self.workers == 0 || tasks <= 1 {
            None
        } else {
            match self.submit.try_lock() {
                Ok(g) => Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        };
        let Some(guard) = guard else {
            (0..tasks).for_each(f);
            return;
        };
        let s = &*self.shared;
        let f: &(dyn Fn(usize) + Sync) = &f;
        // SAFETY: workers only call `f` between joining the job (`inside` incremented while
        // OPEN) and leaving it (decremented); below we close the job and wait until `inside`
        // is zero before returning, so `f` outlives every use.
        let f: &'static (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        if let Ok(mut job) = s.job.lock() {
            *job = Some(Job { f, tasks });
        }
        s.next.store(0, Ordering::SeqCst);
        s.inside.store(OPEN, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.lock().map_or(0, |n| *n) > 0 {
            s.wake.notify_all();
        }
        claim(s, f, tasks);
        s.inside.fetch_and(!OPEN, Ordering::SeqCst);
        while s.inside.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
        if let Ok(mut job) = s.job.lock() {
            *job = None;
        }
        // Every thread has left the job, so `f` is no longer used: a task's panic goes on
        // from here, on the caller, as it would have without the pool.
        let panicked = s.panic.lock().ok().and_then(|mut p| p.take());
        drop(guard);
        if let Some(payload) = panicked {
            std::panic::resume_unwind(payload);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        self.shared.wake.notify_all();
    }
}

/// Run tasks until none is left. A panicking task is caught and kept for the caller (the
/// remaining tasks still run), so every thread leaves the job normally.
///
/// Tasks are claimed in runs of consecutive indices, a run being a share of what is left
/// (guided scheduling): a 2-thread decode step claims a few times per loop instead of once
/// per 64-column block, and the last runs are single tasks, so the threads still finish
/// together. (One `fetch_add` per task was 1.5% of a TinyLlama-shaped batch-1 step: both cores
/// bouncing the counter's cache line.) Which thread runs a task changes no number.
fn claim(s: &Shared, f: &(dyn Fn(usize) + Sync), tasks: usize) {
    let threads = s.threads.max(1);
    loop {
        let start = s.next.load(Ordering::SeqCst);
        if start >= tasks {
            return;
        }
        let end = start + ((tasks - start) / (2 * threads)).max(1);
        if s.next.compare_exchange_weak(start, end, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            continue;
        }
        for i in start..end {
            if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i))) {
                if let Ok(mut first) = s.panic.lock() {
                    first.get_or_insert(payload);
                }
            }
        }
    }
}

fn worker(s: &Shared) {
    let mut seen = s.epoch.load(Ordering::SeqCst);
    loop {
        // Spin, then park until the epoch moves.
        let start = Instant::now();
        let mut spins = 0u32;
        while s.epoch.load(Ordering::SeqCst) == seen {
            spins = spins.wrapping_add(1);
            // The clock only every 256 spins: reading it was 2% of a decode step.
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                let Ok(mut sleepers) = s.sleepers.lock() else { return };
                *sleepers += 1;
                while s.epoch.load(Ordering::SeqCst) == seen {
                    sleepers = match s.wake.wait_timeout(sleepers, Duration::from_millis(100)) {
                        Ok((g, _)) => g,
                        Err(_) => return,
                    };
                }
                *sleepers -= 1;
                break;
            }
            std::hint::spin_loop();
        }
        if s.shutdown.load(Ordering::SeqCst) {
            return;
        }
        seen = s.epoch.load(Ordering::SeqCst);
        // Join the job if it is still open; it may already be done.
        let mut cur = s.inside.load(Ordering::SeqCst);
        loop {
            if cur & OPEN == 0 {
                break;
            }
            match s.inside.compare_exchange(cur, cur + 1, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => {
                    let job = s.job.lock().ok().and_then(|j| *j);
                    if let Some(job) = job {
                        claim(s, job.f, job.tasks);
                    }
                    s.inside.fetch_sub(1, Ordering::SeqCst);
                    break;
                }
                Err(now) => cur = now,
            }
        }
    }
}

/// One task's view of a `[rows, n]` f32 output: it may write only its own columns.
pub struct Columns {
    ptr: *mut f32,
    rows: usize,
    n: usize,
    cols: std::ops::Range<usize>,
}

// SAFETY: each task's view writes only its own column range (checked in `set`), and
// `by_column_blocks` hands out disjoint ranges.
unsafe impl Sync for Columns {}

impl Columns {
    /// Set `y[i, j]`; `j` must be one of this task's columns.
    #[inline]
    pub fn set(&self, i: usize, j: usize, v: f32) {
        assert!(i < self.rows && self.cols.contains(&j));
        // SAFETY: in bounds (checked: `cols` lies within `0..n`); no other task writes `j`.
        unsafe { *self.ptr.add(i * self.n + j) = v }
    }

    /// Set `y[i, j..j + v.len()]`; those columns must be this task's.
    #[inline]
    pub fn set_run(&self, i: usize, j: usize, v: &[f32]) {
        assert!(i < self.rows && self.cols.start <= j && j + v.len() <= self.cols.end);
        // SAFETY: in bounds (checked: `cols` lies within `0..n`); no other task writes them.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), self.ptr.add(i * self.n + j), v.len()) }
    }
}

/// `y[m, n]` computed in blocks of `cols` output columns across the pool: `f(c0, c1, y)`
/// fills columns `c0..c1` of every row.
pub fn by_column_blocks(m: usize, n: usize, cols: usize, f: impl Fn(usize, usize, &Columns) + Sync) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    // The address as an integer, so the closure is `Sync`; each task gets its own view.
    let ptr = y.as_mut_ptr() as usize;
    Pool::global().run(n.div_ceil(cols), |b| {
        let (c0, c1) = (b * cols, ((b + 1) * cols).min(n));
        f(c0, c1, &Columns { ptr: ptr as *mut f32, rows: m, n, cols: c0..c1 });
    });
    y
}

/// `f(i, &mut out[ranges[i]])` for every `i`, across the pool. The ranges must lie within
/// `out` and not overlap (checked: a task never sees another's elements); elements outside
/// every range are left as they were.
pub fn for_each_slice(out: &mut [f32], ranges: &[std::ops::Range<usize>], f: impl Fn(usize, &mut [f32]) + Sync) {
    let pieces = Pieces::new(out, ranges);
    // SAFETY: the pool runs each task once, so each piece is handed out once.
    Pool::global().run(ranges.len(), |i| f(i, unsafe { pieces.piece(i) }));
}

/// [`for_each_slice`] where each task also gives back a value: the values in range order.
fn map_slices<T: Send>(out: &mut [f32], ranges: &[std::ops::Range<usize>], f: impl Fn(usize, &mut [f32]) -> T + Sync) -> Vec<T> {
    let pieces = Pieces::new(out, ranges);
    // SAFETY: the pool runs each task once, so each piece is handed out once.
    map_tasks(ranges.len(), |i| f(i, unsafe { pieces.piece(i) }))
}

/// `out` cut into `ranges` for the pool's tasks, checked once to lie within `out` and not to
/// overlap, so a task never sees another's elements.
struct Pieces<'a> {
    /// The address as an integer, so the pieces are `Sync`.
    ptr: usize,
    ranges: &'a [std::ops::Range<usize>],
    /// `out` stays borrowed mutably while the pieces live.
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> Pieces<'a> {
    fn new(out: &'a mut [f32], ranges: &'a [std::ops::Range<usize>]) -> Pieces<'a> {
        let mut sorted: Vec<&std::ops::Range<usize>> = ranges.iter().collect();
        sorted.sort_by_key(|r| r.start);
        let disjoint = sorted.windows(2).all(|w| w[0].end <= w[1].start);
        assert!(disjoint && ranges.iter().all(|r| r.start <= r.end && r.end <= out.len()), "for_each_slice: ranges overlap or lie outside the output");
        Pieces { ptr: out.as_mut_ptr() as usize, ranges, _out: std::marker::PhantomData }
    }

    /// Piece `i`.
    /// SAFETY: the caller asks for each `i` at most once while the pieces live.
    unsafe fn piece(&self, i: usize) -> &'a mut [f32] {
        let r = &self.ranges[i];
        // SAFETY: `r` lies within `out` and overlaps no other range (checked in `new`), `out`
        // is borrowed mutably for `'a`, and this piece is handed out once (the caller's promise).
        unsafe { std::slice::from_raw_parts_mut((self.ptr as *mut f32).add(r.start), r.end - r.start) }
    }
}

/// `f(i)` for every task `i < tasks` across the pool; the results in task order.
fn map_tasks<T: Send>(tasks: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let slots: Vec<Mutex<Option<T>>> = (0..tasks).map(|_| Mutex::new(None)).collect();
    Pool::global().run(tasks, |i| {
        let v = f(i);
        if let Ok(mut slot) = slots[i].lock() {
            *slot = Some(v);
        }
    });
    // Every task ran (a panic would have been re-raised above), so every slot is filled.
    slots.into_iter().filter_map(|s| s.into_inner().ok().flatten()).collect()
}

/// How `len` elements of `row`-element rows are cut for the pool: (rows, rows per piece),
/// at least `min_elems` elements a piece and at most 4 pieces per thread.
fn row_pieces(len: usize, row: usize, min_elems: usize) -> (usize, usize) {
    let rows = len / row;
    let pieces = (len / min_elems.max(1)).clamp(1, 4 * Pool::global().threads()).min(rows.max(1));
    (rows, rows.div_ceil(pieces).max(1))
}

/// `f(first_row, piece)` over `out` cut into pieces of whole rows (`row` elements each), at
/// least `min_elems` elements a piece: small outputs (a decode step's one row) stay on the
/// caller, large ones spread over the pool, a few pieces per thread.
pub fn for_each_rows(out: &mut [f32], row: usize, min_elems: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    match row_ranges(out.len(), row, min_elems) {
        None => f(0, out),
        Some((per, ranges)) => for_each_slice(out, &ranges, |i, piece| f(i * per, piece)),
    }
}

/// [`for_each_rows`] where each piece also gives back a value: the values in row order.
pub fn map_rows_mut<T: Send>(out: &mut [f32], row: usize, min_elems: usize, f: impl Fn(usize, &mut [f32]) -> T + Sync) -> Vec<T> {
    match row_ranges(out.len(), row, min_elems) {
        None => vec![f(0, out)],
        Some((per, ranges)) => map_slices(out, &ranges, |i, piece| f(i * per, piece)),
    }
}

/// `len` elements of `row`-element rows cut for the pool as `row_pieces` says: `None` when
/// one piece takes them all (it stays on the caller), else the rows per piece and the pieces.
fn row_ranges(len: usize, row: usize, min_elems: usize) -> Option<(usize, Vec<std::ops::Range<usize>>)> {
    let row = row.max(1);
    let (rows, per) = row_pieces(len, row, min_elems);
    (rows > per).then(|| (per, (0..rows).step_by(per).map(|r| r * row..(r + per).min(rows) * row).collect()))
}

/// `f` over `x` cut into pieces of whole rows (`row` elements each, at least `min_elems` a
/// piece, as `for_each_rows`), across the pool; the results in row order.
pub fn map_rows<T: Send>(x: &[f32], row: usize, min_elems: usize, f: impl Fn(&[f32]) -> T + Sync) -> Vec<T> {
    let row = row.max(1);
    let (rows, per) = row_pieces(x.len(), row, min_elems);
    if rows <= per {
        return vec![f(x)];
    }
    map_tasks(rows.div_ceil(per), |i| f(&x[i * per * row..((i + 1) * per).min(rows) * row]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_even_under_concurrent_callers() {
        let pool = Arc::new(Pool::new(3));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    for round in 0..200 {
                        let tasks = 1 + round % 37;
                        let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                        pool.run(tasks, |i| {
                            counts[i].fetch_add(1, Ordering::SeqCst);
                        });
                        assert!(counts.iter().all(|c| c.load(Ordering::SeqCst) == 1));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    /// A panicking task (on a worker or on the caller) reaches the caller as a panic once the
    /// job is over, and the pool keeps working: no dead worker, no hang.
    #[test]
    fn a_task_panic_reaches_the_caller_and_the_pool_survives() {
        let pool = Pool::new(2);
        for bad in [0, 7, 63] {
            let ran = AtomicUsize::new(0);
            let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.run(64, |i| {
                    ran.fetch_add(1, Ordering::SeqCst);
                    assert_ne!(i, bad, "task {bad} fails");
                })
            }));
            assert!(got.is_err(), "the panic of task {bad} must reach the caller");
            assert_eq!(ran.load(Ordering::SeqCst), 64, "the other tasks still run");
        }
        runs_every_task(&pool);
    }

    #[test]
    fn parked_workers_wake_for_the_next_job() {
        let pool = Pool::new(2);
        std::thread::sleep(SPIN * 3);
        runs_every_task(&pool);
    }

    /// A 100-task loop on `pool` runs each task once.
    fn runs_every_task(pool: &Pool) {
        let sum = AtomicUsize::new(0);
        pool.run(100, |i| {
            sum.fetch_add(i, Ordering::SeqCst);
        });
        assert_eq!(sum.load(Ordering::SeqCst), 4950);
    }

    /// A task writing outside its own columns is stopped (the write would race another task).
    #[test]
    #[should_panic]
    fn a_task_cannot_write_another_tasks_columns() {
        by_column_blocks(2, 130, 64, |_, c1, out| out.set(0, c1 % 130, 1.0));
    }

    /// Runs too: one reaching past the task's last column is stopped.
    #[test]
    fn a_run_stays_in_its_columns() {
        let y = by_column_blocks(2, 130, 64, |c0, c1, out| out.set_run(1, c0, &vec![c0 as f32; c1 - c0]));
        assert!(y[..130].iter().all(|v| *v == 0.0) && y[130..].iter().enumerate().all(|(j, v)| *v == (j / 64 * 64) as f32));
        let past = std::panic::catch_unwind(|| by_column_blocks(1, 130, 64, |c0, c1, out| out.set_run(0, c0, &vec![0.0; c1 - c0 + 1])));
        assert!(past.is_err());
    }

    #[test]
    fn slices_are_filled_and_overlaps_refused() {
        let mut y = vec![-1f32; 10];
        for_each_slice(&mut y, &[6..10, 0..3, 3..3], |i, s| s.fill(i as f32));
        assert_eq!(y, [1., 1., 1., -1., -1., -1., 0., 0., 0., 0.]);
        for bad in [vec![0..4, 3..5], vec![8..11, 0..0]] {
            let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| for_each_slice(&mut y, &bad, |_, s| s.fill(9.0))));
            assert!(got.is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn row_pieces_cover_every_row_once() {
        for (rows, row, min) in [(1, 2048, 4096), (32, 2048, 4096), (7, 3, 1), (0, 5, 1)] {
            let mut y = vec![0f32; rows * row];
            for_each_rows(&mut y, row, min, |first, piece| {
                assert_eq!(piece.len() % row, 0);
                for (i, v) in piece.iter_mut().enumerate() {
                    *v += (first * row + i) as f32;
                }
            });
            assert!(y.iter().enumerate().all(|(i, v)| *v == i as f32), "{rows} rows of {row}");
        }
    }

    #[test]
    fn mapped_pieces_come_back_in_order() {
        let x: Vec<f32> = (0..70 * 3).map(|v| v as f32).collect();
        let sums = map_rows(&x, 3, 1, |piece| piece.to_vec());
        assert!(sums.len() > 1);
        assert_eq!(sums.concat(), x);
        assert_eq!(map_rows(&x[..6], 3, 1000, |p| p.len()), vec![6]);
    }

    #[test]
    fn column_blocks_fill_every_element() {
        let y = by_column_blocks(3, 130, 64, |c0, c1, out| {
            for i in 0..3 {
                for j in c0..c1 {
                    out.set(i, j, (i * 1000 + j) as f32);
                }
            }
        });
        assert!(y.iter().enumerate().all(|(x, v)| *v == ((x / 130) * 1000 + x % 130) as f32));
    }
}
