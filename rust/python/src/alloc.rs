//! The process's Rust allocator: mimalloc, asked for plain `mi_malloc` whenever that already
//! gives the alignment asked for.
//!
//! `mimalloc::MiMalloc` sends every allocation through `mi_malloc_aligned`: its fast path
//! covers only blocks up to 1 KiB whose free block happens to be aligned, and anything bigger
//! (a request's boxed futures are 1.5-2.5 KB) takes the over-allocating fallback. `mi_malloc`
//! aligns every block to 16 bytes (8 for blocks under 16 bytes), as glibc's malloc does, so
//! std's own rule for the system allocator applies: the plain call when the alignment is at
//! most 16 and no more than the size.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{mi_free, mi_malloc, mi_realloc, mi_zalloc};

pub struct Mimalloc;

/// What `mi_malloc` guarantees (mimalloc's `MI_MAX_ALIGN_SIZE`).
const PLAIN_ALIGN: usize = 16;

fn plain(align: usize, size: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

// SAFETY: each call keeps GlobalAlloc's contract by handing it to mimalloc, whose plain
// calls return blocks aligned as `plain` requires and whose aligned ones honour any
// alignment; every block, however made, is freed by `mi_free`.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            return mi_malloc(layout.size()).cast();
        }
        mimalloc::MiMalloc.alloc(layout)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            return mi_zalloc(layout.size()).cast();
        }
        mimalloc::MiMalloc.alloc_zeroed(layout)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(layout.align(), new_size) {
            return mi_realloc(ptr.cast::<c_void>(), new_size).cast();
        }
        mimalloc::MiMalloc.realloc(ptr, layout, new_size)
    }
}
