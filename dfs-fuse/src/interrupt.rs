//! Whether a process waiting in the file system has been signalled. fuser does not implement
//! FUSE_INTERRUPT, and the kernel waits for the answer to a request already handed to the file
//! system even when its caller is killed: a lock wait that never ends would keep a process
//! that got Ctrl-C (or SIGKILL) stuck, and its place in the lock queue taken. So a long wait
//! watches its caller: a signal it neither blocks nor ignores ends the wait with EINTR (what
//! `fcntl(F_SETLKW)` and `flock` answer on a signal), and a caller that is gone ends it too.

/// Whether thread `tid` has a signal pending that it does not block or ignore, or is gone.
pub fn signalled(tid: u32) -> bool {
    if tid == 0 {
        // No caller named (outside this pid namespace): nothing to watch.
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return true;
    };
    let mask = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    if status
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .is_some_and(|s| s.trim_start().starts_with('Z') || s.trim_start().starts_with('X'))
    {
        return true;
    }
    let pending = mask("SigPnd:") | mask("ShdPnd:");
    pending & !mask("SigBlk:") & !mask("SigIgn:") != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_quiet_thread_is_not_signalled_and_a_gone_one_is() {
        assert!(!signalled(std::process::id()));
        assert!(signalled(u32::MAX - 1));
    }
}
