//! Thread scheduling: background threads doing speculative work step aside for the ones a
//! reading process waits on.

/// Set the calling thread's nice value to `nice` (0 normal, 19 lowest): a thread at a
/// higher nice value gets the CPU mostly when the threads serving reads do not need it.
pub fn set_current_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid and setpriority take and return plain integers and touch no memory of
    // ours; on Linux, PRIO_PROCESS with a thread id changes only that thread's nice value.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
