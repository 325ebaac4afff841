//! How the process gets memory back. A password check (argon2) takes about 19 MiB; glibc serves
//! it from the arena of whichever blocking thread ran it and, past its first frees, raises its
//! mmap threshold so later ones come from arenas too, which it never gives back: 50 failed
//! logins once left the gateway at 570 MiB. Pinning the threshold at 1 MiB makes most large
//! blocks their own mapping, returned to the kernel when freed, and [`trim`] after each check
//! returns the rest.

/// Gives free memory in every arena back to the kernel; call after a large temporary block is
/// freed (a password check). A block that did land in a thread's arena (glibc reuses a free
/// chunk there before it looks at the mmap threshold) is returned here.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it touches nothing in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Call once at start, before the first large allocation.
pub fn return_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; any value is accepted or refused.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}
