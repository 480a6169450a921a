//! Starting a child process confined to a directory tree: chrooted there, in its working
//! directory, with a clean signal mask (a thread that blocks signals to wait for them
//! would otherwise hand that mask to every program it starts).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Make `cmd` start its program chrooted to `root`, in `workdir` (a path inside `root`),
/// with no signal blocked. The program's path is looked up inside `root` too, so it must
/// be absolute there.
pub fn confine(cmd: &mut Command, root: &Path, workdir: &Path) -> std::io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::other(format!("{} contains a NUL byte", p.display())))
    };
    let (root, workdir) = (c(root)?, c(workdir)?);
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe functions may be called: chroot, chdir, sigemptyset and
    // sigprocmask are; the C strings were made before the fork, the sigset_t lives on the
    // closure's stack, and nothing allocates or takes a lock.
    unsafe {
        cmd.pre_exec(move || {
            if libc::chroot(root.as_ptr()) != 0 || libc::chdir(workdir.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}
