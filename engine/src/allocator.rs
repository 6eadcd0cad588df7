//! The process's memory allocator, set for a run of months.
//!
//! Two of glibc malloc's defaults let a long run's RSS climb while the memory in use stays
//! level (measured with `soak`, the stack as `callbus up` runs it, an hour at a time):
//!
//! - **arenas**: threads get arenas of their own, up to eight per core; a thread that comes
//!   later (tokio's blocking pool lets idle threads go and starts new ones; sled and the log
//!   have theirs) may get a new arena, and each keeps free pages of its own;
//! - **the mmap threshold**: a block over 128 KiB is mapped on its own and unmapped when freed,
//!   but glibc raises that threshold to the size of every such block freed (up to 32 MiB), so
//!   the large buffers sled and zstd allocate and free all the time end up inside the arenas,
//!   between small long-lived blocks, and the arenas grow around the holes they leave.
//!
//! With both defaults the soak's RSS climbed 6.7 MiB an hour; with the arenas capped, 4.0 MiB
//! an hour (1.1 in the second half); with the threshold fixed as well, it rose to a high-water
//! mark under load and came back down once the load eased (−1.3 MiB an hour over the second
//! half). [`tune`] sets both; `soak --malloc-as-is` runs with glibc's defaults to compare.

/// What [`tune`] set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuned {
    /// The arenas' cap, unless `MALLOC_ARENA_MAX` was set.
    pub arenas: Option<usize>,
    /// The mmap threshold (bytes), unless `MALLOC_MMAP_THRESHOLD_` was set.
    pub mmap_threshold: Option<usize>,
}

/// glibc's own starting mmap threshold, kept fixed.
pub const MMAP_THRESHOLD: usize = 128 * 1024;

/// Caps glibc's malloc arenas at one per core (at least 2, at most 8) and fixes its mmap
/// threshold at [`MMAP_THRESHOLD`], each unless the environment sets it (`MALLOC_ARENA_MAX`,
/// `MALLOC_MMAP_THRESHOLD_`, which glibc reads itself). Call it first in `main`, before threads
/// start. Elsewhere than Linux with glibc it does nothing.
pub fn tune() -> Tuned {
    let arenas = std::thread::available_parallelism().map_or(2, usize::from).clamp(2, 8);
    Tuned {
        arenas: (std::env::var_os("MALLOC_ARENA_MAX").is_none() && set(Param::ArenaMax, arenas)).then_some(arenas),
        mmap_threshold: (std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none()
            && set(Param::MmapThreshold, MMAP_THRESHOLD))
        .then_some(MMAP_THRESHOLD),
    }
}

enum Param {
    ArenaMax,
    MmapThreshold,
}

/// Sets one of malloc's parameters; whether it took.
#[allow(unsafe_code)]
fn set(param: Param, value: usize) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let param = match param {
            Param::ArenaMax => libc::M_ARENA_MAX,
            Param::MmapThreshold => libc::M_MMAP_THRESHOLD,
        };
        let Ok(value) = libc::c_int::try_from(value) else { return false };
        // SAFETY: mallopt sets one of malloc's parameters from a number; it may be called at
        // any time (arenas already made stay).
        unsafe { libc::mallopt(param, value) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = (param, value);
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn the_arenas_and_the_mmap_threshold_are_set_unless_the_environment_says() {
        let tuned = super::tune();
        match std::env::var_os("MALLOC_ARENA_MAX") {
            Some(_) => assert_eq!(tuned.arenas, None, "the environment's cap stands"),
            None => assert!(tuned.arenas.is_some_and(|n| (2..=8).contains(&n)), "{tuned:?}"),
        }
        match std::env::var_os("MALLOC_MMAP_THRESHOLD_") {
            Some(_) => assert_eq!(tuned.mmap_threshold, None),
            None => assert_eq!(tuned.mmap_threshold, Some(super::MMAP_THRESHOLD)),
        }
    }
}
