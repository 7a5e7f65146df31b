//! Process-wide allocator settings for tensor work.
//!
//! Every layer allocates and frees activation-sized buffers (1–30 MiB). By default glibc
//! serves blocks over 128 KiB with `mmap` and returns them with `munmap`, and each
//! `munmap` stalls every thread for a TLB shootdown, then the next allocation faults its
//! pages back in. Keeping freed memory in the heap measured a batch-16 training step of
//! the spatial model at 155–190 ms instead of 510–520 ms on the 2-core CI machine (same
//! run, alternating). The cost: memory freed after a peak stays with the process.

/// Keeps blocks up to 32 MiB (glibc's largest mmap threshold) in the heap and never trims
/// it. Call once at start, before threads allocate. A no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// One malloc arena for every thread, for the server. There the model thread, the pool
/// its convolutions run on and the request threads that drop its outputs are different
/// threads; with glibc's per-thread arenas, activation-sized blocks kept their pages
/// poorly and a sampled profile under load spent about a fifth of the CPU in page faults,
/// zeroing and copying into fresh pages. Measured on the 2-core machine with the default
/// model and 32 clients (`/metrics` after 15 s of wrk, same binary, back to back): 18.7
/// requests/s and 52 ms of model time per image with per-thread arenas, 25.0 and 40 ms
/// with one. `vigil bench` (one thread driving the model) showed no difference, so
/// training and the other commands keep glibc's default. Call before threads start.
pub fn one_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: as above; called from `main` before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
