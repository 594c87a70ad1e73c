//! The only unsafe code of spawned instances: asking the kernel to kill a child when sluice
//! dies, and signalling a child's process group. Each function is a single libc call with plain
//! integer arguments.

/// Starts the child in a process group of its own (so a signal reaches whatever it started,
/// and a Ctrl-C in sluice's terminal reaches only sluice, which stops the instances in order),
/// and makes the kernel SIGKILL it when the thread that spawned it ends: sluice spawns from one
/// thread that lives as long as the process, so a sluice that dies, even by SIGKILL, leaves no
/// instance behind.
pub fn contain(cmd: &mut tokio::process::Command) {
    cmd.process_group(0);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: in the child, between fork and exec, only `prctl` and `getppid` run, both
    // async-signal-safe, touching no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before the signal was armed: do not run an orphan.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("sluice exited while starting it"));
            }
            Ok(())
        });
    }
}

/// Sends `signal` to every process of the group `pgid`; false when none is left.
pub fn signal_group(pgid: u32, signal: i32) -> bool {
    let Ok(pgid) = i32::try_from(pgid) else {
        return false;
    };
    if pgid <= 1 {
        // Never 0 (our own group) or -1 (every process we may signal).
        return false;
    }
    // SAFETY: kill(2) with integer arguments; a negative pid addresses the group.
    unsafe { libc::kill(-pgid, signal) == 0 }
}

/// SIGTERM.
pub const TERM: i32 = libc::SIGTERM;
/// SIGKILL.
pub const KILL: i32 = libc::SIGKILL;
