//! The process's memory allocator, set for a run of months.
//!
//! glibc's malloc gives threads arenas of their own, up to eight per core; a thread that
//! comes later (tokio's blocking pool lets idle threads go and starts new ones, sled and the
//! log have theirs) may get a new arena, and each arena keeps free pages of its own. In the
//! soak (`soak`, the stack as `callbus up` runs it) that showed as RSS climbing ~7 MiB an hour
//! while the heap in use stayed level, the allocator's arenas taking 41 → 50 MiB from the
//! system over ten minutes; with two arenas, RSS stayed level. [`limit_arenas`] caps them.

/// Caps glibc's malloc arenas at one per core (at least 2, at most 8), unless
/// `MALLOC_ARENA_MAX` is set in the environment (which glibc reads itself). Call it first in
/// `main`, before threads start. Elsewhere than Linux with glibc it does nothing. Returns the
/// cap set, if any.
#[allow(unsafe_code)]
pub fn limit_arenas() -> Option<usize> {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return None;
    }
    let arenas = std::thread::available_parallelism().map_or(2, usize::from).clamp(2, 8);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let n = libc::c_int::try_from(arenas).unwrap_or(2);
        // SAFETY: mallopt sets one of malloc's parameters; M_ARENA_MAX takes a count. It is
        // safe to call at any time; arenas already made stay.
        let done = unsafe { libc::mallopt(libc::M_ARENA_MAX, n) };
        (done == 1).then_some(arenas)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = arenas;
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn the_arenas_are_capped_at_a_few_per_core_unless_the_environment_says() {
        let set = super::limit_arenas();
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
            assert_eq!(set, None, "the environment's cap stands");
        } else {
            let n = set.expect("glibc takes the cap");
            assert!((2..=8).contains(&n), "{n}");
        }
    }
}
