//! Thread scheduling: background threads doing speculative work step aside for the ones a
//! reading process waits on.

/// Lower the calling thread's scheduling priority to the lowest (nice 19): it then gets
/// the CPU mostly when the threads serving reads do not need it. Best effort.
pub fn lower_current_thread_priority() -> std::io::Result<()> {
    // SAFETY: gettid and setpriority take and return plain integers and touch no memory of
    // ours; on Linux, PRIO_PROCESS with a thread id changes only that thread's nice value.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
