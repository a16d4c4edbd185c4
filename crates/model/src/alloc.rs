//! A global allocator that keeps freed large blocks for reuse (`#[global_allocator]` in the
//! `glassbox` binary; library users may install it too).
//!
//! Why ours: a forward pass allocates its activations per op (candle tensors own their
//! buffers), and the system allocator hands every block above its mmap threshold back to the
//! OS on free, so the next step's block of the same size is a fresh mapping whose every page
//! faults in and is zeroed by the kernel. On the benchmark VM a 32 x 128-token prefill plus 16
//! decode steps of the TinyLlama-shaped Q4_0 model took 4.5M page faults; with freed blocks
//! kept for the next step's same-sized ones, see PERFORMANCE.md for the numbers. The same
//! shapes come back every step: this is the "reusable per-step buffers" of llama.cpp's compute
//! graph, without threading buffers through every op.
//!
//! While the engine steps ([`keep_freed`] until [`release`]), blocks of at least [`MIN`]
//! bytes are sized up to a class (eight per power of two, so a prefill of 1000 tokens reuses
//! the blocks of one of 960) and kept on free, up to [`SLOTS`] blocks and [`CAP`] bytes (the
//! oldest goes back to the system first); smaller ones go straight to the system allocator.
//! Memory held is what recent steps freed, at most the cap.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Blocks from this size on are kept for reuse.
pub const MIN: usize = 1 << 20;
/// Most blocks kept.
pub const SLOTS: usize = 64;
/// Most bytes kept.
pub const CAP: usize = 256 << 20;

/// The allocator: [`System`] plus a cache of freed large blocks.
pub struct ReuseLarge;

#[derive(Clone, Copy)]
struct Block {
    addr: usize,
    size: usize,
    align: usize,
}

struct Cache {
    blocks: [Block; SLOTS],
    len: usize,
    bytes: usize,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache { blocks: [Block { addr: 0, size: 0, align: 0 }; SLOTS], len: 0, bytes: 0 });

fn cache() -> std::sync::MutexGuard<'static, Cache> {
    // Nothing panics while the lock is held; a poisoned lock still holds consistent blocks.
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cache {
    fn remove(&mut self, i: usize) -> Block {
        let b = self.blocks[i];
        self.blocks.copy_within(i + 1..self.len, i);
        self.len -= 1;
        self.bytes -= b.size;
        b
    }

    /// A kept block of exactly this layout, taken out.
    fn take(&mut self, layout: Layout) -> Option<*mut u8> {
        let i = self.blocks[..self.len].iter().position(|b| b.size == layout.size() && b.align == layout.align())?;
        Some(self.remove(i).addr as *mut u8)
    }
}

/// Whether freed blocks are kept: from an engine step on ([`keep_freed`]) until a step leaves
/// no work ([`release`]), so loading's temporaries never pile up in the cache.
static KEEP: AtomicBool = AtomicBool::new(false);

/// Keep freed large blocks from now on (the engine calls it as a step starts).
pub fn keep_freed() {
    KEEP.store(true, Ordering::Relaxed);
}

/// Stop keeping freed blocks and give every kept one back to the system (the engine calls it
/// after a step that leaves no work), so memory held between bursts is what the weights and
/// KV cache take. A no-op when nothing is kept (or [`ReuseLarge`] is not the global
/// allocator).
pub fn release() {
    KEEP.store(false, Ordering::Relaxed);
    let mut c = cache();
    while c.len > 0 {
        let last = c.len - 1;
        let b = c.remove(last);
        // SAFETY: a kept block was allocated by `System` with exactly this layout and is owned
        // by the cache alone (its owner freed it).
        unsafe { System.dealloc(b.addr as *mut u8, Layout::from_size_align_unchecked(b.size, b.align)) };
    }
}

/// The layout a large block is allocated with: its size rounded up to the next of eight steps
/// per power of two (at most 1/8 more). Smaller layouts are left as they are.
fn class(layout: Layout) -> Layout {
    let size = layout.size();
    if size < MIN {
        return layout;
    }
    let step = (1usize << (usize::BITS - 1 - size.leading_zeros())) / 8;
    // A size too large to round (never a real allocation) keeps its own layout: `class` is
    // still a function of the layout, which is all `dealloc` needs.
    size.checked_next_multiple_of(step).and_then(|s| Layout::from_size_align(s, layout.align()).ok()).unwrap_or(layout)
}

// SAFETY: every block handed out is either fresh from `System` for the layout's class (at
// least the size asked, the same alignment) or one that was allocated by `System` for exactly
// that class and since freed by its owner; blocks go back to `System` with the class layout
// they were allocated with (`class` is a function of the layout, so `dealloc` finds it again).
unsafe impl GlobalAlloc for ReuseLarge {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let layout = class(layout);
        if layout.size() >= MIN {
            if let Some(p) = cache().take(layout) {
                return p;
            }
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let class = class(layout);
        if class.size() >= MIN {
            if let Some(p) = cache().take(class) {
                // The bytes asked for; the class's rounding beyond them is never read.
                std::ptr::write_bytes(p, 0, layout.size());
                return p;
            }
        }
        System.alloc_zeroed(class)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let layout = class(layout);
        if layout.size() < MIN || layout.size() > CAP || !KEEP.load(Ordering::Relaxed) {
            return System.dealloc(ptr, layout);
        }
        let mut c = cache();
        // The oldest kept blocks go back to the system until this one fits (under the lock:
        // another thread's large allocation waits, which is rare; `System` never calls back).
        while c.len == SLOTS || c.bytes + layout.size() > CAP {
            let old = c.remove(0);
            System.dealloc(old.addr as *mut u8, Layout::from_size_align_unchecked(old.size, old.align));
        }
        let at = c.len;
        c.blocks[at] = Block { addr: ptr as usize, size: layout.size(), align: layout.align() };
        c.len += 1;
        c.bytes += layout.size();
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < MIN && new_size < MIN {
            return System.realloc(ptr, layout, new_size);
        }
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let new = self.alloc(new_layout);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_by_at_most_an_eighth() {
        let l = |size| Layout::from_size_align(size, 64).unwrap();
        assert_eq!(class(l(1000)).size(), 1000, "small blocks are left alone");
        assert_eq!(class(l(MIN)).size(), MIN);
        assert_eq!(class(l(MIN + 1)).size(), MIN + MIN / 8);
        assert_eq!(class(l(184 << 20)).size(), 192 << 20);
        let huge = Layout::from_size_align(isize::MAX as usize - 63, 64).unwrap();
        assert_eq!(class(huge), huge, "a size that cannot be rounded keeps its layout");
        for size in [MIN, 3 * MIN + 7, 100 << 20, (1 << 30) - 1] {
            let c = class(l(size));
            assert!(c.size() >= size && c.size() - size <= size / 8 && c.align() == 64 && class(c) == c, "{size}");
        }
    }

    /// A freed block comes back for the next same-class allocation, zeroed when asked, and
    /// what is written survives a reallocation across the threshold.
    #[test]
    fn freed_blocks_are_reused_zeroed_and_kept_within_the_cap() {
        let a = ReuseLarge;
        let layout = Layout::from_size_align(3 * MIN + 5, 8).unwrap();
        keep_freed();
        unsafe {
            let p = a.alloc(layout);
            std::ptr::write_bytes(p, 7, layout.size());
            a.dealloc(p, layout);
            let q = a.alloc_zeroed(Layout::from_size_align(3 * MIN + 1, 8).unwrap());
            assert_eq!(q, p, "the same class's block is reused");
            assert!(std::slice::from_raw_parts(q, 3 * MIN + 1).iter().all(|&b| b == 0));
            *q = 42;
            let r = a.realloc(q, Layout::from_size_align(3 * MIN + 1, 8).unwrap(), 16);
            assert_eq!(*r, 42);
            a.dealloc(r, Layout::from_size_align(16, 8).unwrap());
            // Far more than the cap, freed: the cache keeps at most the cap.
            let big = Layout::from_size_align(200 << 20, 8).unwrap();
            let ps: Vec<_> = (0..4).map(|_| a.alloc(big)).collect();
            for p in ps {
                a.dealloc(p, big);
            }
            {
                let c = cache();
                assert!(c.bytes <= CAP && c.len <= SLOTS && c.blocks[..c.len].iter().map(|b| b.size).sum::<usize>() == c.bytes);
            }
            release();
            {
                let c = cache();
                assert_eq!((c.len, c.bytes), (0, 0));
            }
            // Not keeping (before a step, while loading): a freed block goes to the system.
            let p = a.alloc(layout);
            a.dealloc(p, layout);
            assert_eq!(cache().len, 0);
        }
    }
}
