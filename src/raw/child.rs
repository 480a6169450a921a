//! Starting a child process confined to a directory tree, as a container runtime would
//! start it: in a mount namespace of its own with `/proc` and `/dev` mounted in the tree,
//! chrooted there, in its working directory, with a clean signal mask (a thread that
//! blocks signals to wait for them would otherwise hand that mask to every program it
//! starts).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Make `cmd` start its program chrooted to `root`, in `workdir` (an absolute path inside
/// `root`, made there if missing), with no signal blocked. It gets a private mount namespace in which a fresh `proc` is
/// mounted on `root/proc` and the host's `/dev` bound on `root/dev` where the tree has
/// those directories (programs write to `/dev/null` and read `/proc/self`); the mounts go
/// away with the namespace, when the last of its processes exits. The program's path is
/// looked up inside `root`, so it must be absolute there.
pub fn confine(cmd: &mut Command, root: &Path, workdir: &Path) -> std::io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::other(format!("{} contains a NUL byte", p.display())))
    };
    let (proc_at, dev_at) = (c(&root.join("proc"))?, c(&root.join("dev"))?);
    // The working directory and its parents, made inside the tree if missing (as Docker
    // makes a WorkingDir the image lacks): after the chroot, so that no symlink of the
    // tree leads outside it.
    let made: Vec<CString> = workdir
        .ancestors()
        .filter(|p| p.parent().is_some())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .map(c)
        .collect::<Result<_, _>>()?;
    let (root, workdir) = (c(root)?, c(workdir)?);
    let (proc_fs, dev, slash) = (
        c(Path::new("proc"))?,
        c(Path::new("/dev"))?,
        c(Path::new("/"))?,
    );
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe functions may be called: unshare, mount, chroot, mkdir, chdir,
    // sigemptyset and sigprocmask are system calls or plain memory writes; the C strings
    // were made before the fork, the sigset_t lives on the closure's stack, and nothing
    // allocates or takes a lock. Null pointers are passed only where mount(2) allows them.
    unsafe {
        cmd.pre_exec(move || {
            let none = std::ptr::null();
            // Mounts made from here on stay in the child's namespace. Without it (no
            // CAP_SYS_ADMIN) the program still runs, without /proc and /dev.
            if libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    none,
                    slash.as_ptr(),
                    none,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
            {
                libc::mount(
                    proc_fs.as_ptr(),
                    proc_at.as_ptr(),
                    proc_fs.as_ptr(),
                    0,
                    std::ptr::null(),
                );
                libc::mount(
                    dev.as_ptr(),
                    dev_at.as_ptr(),
                    none,
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                );
            }
            if libc::chroot(root.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for dir in &made {
                libc::mkdir(dir.as_ptr(), 0o755);
            }
            if libc::chdir(workdir.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut no_signals: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut no_signals);
            if libc::sigprocmask(libc::SIG_SETMASK, &no_signals, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}
