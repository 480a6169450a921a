//! Starting a child process with a clean signal mask: a thread that blocks signals to
//! wait for them (`sigwait`) would otherwise hand that mask to every program it starts.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Make `cmd` start its program with no signal blocked, whatever the mask of the thread
/// that spawns it.
pub fn unblock_signals_on_exec(cmd: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe functions may be called: it calls sigemptyset and sigprocmask
    // (both async-signal-safe) on a sigset_t on its own stack, allocates nothing and
    // takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
