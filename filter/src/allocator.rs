//! The VM's allocator: wasi-libc's malloc, with linear memory grown in large
//! steps. malloc alone grows the memory by what each allocation lacks, a
//! 64 KiB page or a few at a time, and V8 spends time on every
//! `memory.grow` that rises with the memory's size: a replica of a million
//! blocks, built from empty by growing hash tables, took hundreds of grows,
//! each a pause inside some state-stream callback. Whenever malloc has just
//! grown the memory, this grows it by another quarter of its size at once
//! (a block allocated and freed straight away, which malloc keeps as free
//! space, since wasm memory never shrinks), so grows become logarithmic in
//! the memory's size, at the price of up to a quarter of it unused.

use std::alloc::{GlobalAlloc, Layout, System};

const PAGE_BYTES: usize = 65_536;
/// Headroom added after each growth, as a fraction of the memory's size.
const HEADROOM_DIVISOR: usize = 4;

pub struct GrowInSteps;

fn pages() -> usize {
    core::arch::wasm32::memory_size(0)
}

/// After a call that may have grown the memory from `before` pages: if it
/// did, make a quarter of the memory free at once.
///
/// # Safety
/// As any call into the system allocator.
unsafe fn add_headroom_if_grown(before: usize) {
    let now = pages();
    if now <= before {
        return;
    }
    let bytes = now * PAGE_BYTES / HEADROOM_DIVISOR;
    if let Ok(layout) = Layout::from_size_align(bytes, 16) {
        let block = System.alloc(layout);
        if !block.is_null() {
            System.dealloc(block, layout);
        }
    }
}

// SAFETY: every call is the system allocator's with the caller's arguments;
// the headroom is one more allocation, freed before returning.
unsafe impl GlobalAlloc for GrowInSteps {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let before = pages();
        let block = System.alloc(layout);
        add_headroom_if_grown(before);
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        System.dealloc(block, layout);
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let before = pages();
        let moved = System.realloc(block, layout, new_size);
        add_headroom_if_grown(before);
        moved
    }
}
