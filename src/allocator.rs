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
