//! Starting and stopping the control-plane processes.
//!
//! Each component runs in its own process group so that teardown reaches everything it
//! started. In [`Lifetime::Attached`] mode the kernel also kills a component when the
//! process that started it dies (`PR_SET_PDEATHSIG`), so a test binary that crashes or is
//! killed leaves nothing running. The children are spawned from one thread that lives as
//! long as the process, because the death signal fires when the *spawning thread* exits.
#![allow(unsafe_code)]

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Mutex, OnceLock, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow};

/// Whether started processes die with the process that started them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// Killed by the kernel when this process exits (tests).
    Attached,
    /// Left running after this process exits, until `weft-testbed down` (interactive use).
    Detached,
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` with stdout and stderr appended to `log`, in a new process group.
pub fn spawn(mut cmd: Command, log: &Path, lifetime: Lifetime) -> anyhow::Result<Child> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    match lifetime {
        Lifetime::Detached => cmd.spawn().context("spawning a test-bed process"),
        Lifetime::Attached => {
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent; this
            // closure runs in the child between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let (tx, rx) = mpsc::channel();
            spawner()
                .lock()
                .map_err(|_| anyhow!("spawner lock poisoned"))?
                .send((cmd, tx))
                .map_err(|_| anyhow!("spawner thread is gone"))?;
            rx.recv()
                .map_err(|_| anyhow!("spawner thread is gone"))?
                .context("spawning a test-bed process")
        }
    }
}

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        // Never joined: it must outlive every child it spawns.
        let _ = thread::Builder::new()
            .name("testbed-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // All senders gone: park forever so the children's death signal only
                // fires when the whole process exits.
                loop {
                    thread::park();
                }
            });
        Mutex::new(tx)
    })
}

/// Whether a process (or process group leader) with this pid exists.
pub fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Sends SIGTERM to the process group `pgid`, waits up to `grace` for it to exit, then
/// sends SIGKILL.
pub fn stop_group(pgid: i32, grace: Duration) {
    if pgid <= 1 {
        return;
    }
    // SAFETY: signalling a process group we created; a stale pgid yields ESRCH, ignored.
    unsafe {
        libc::kill(-pgid, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && group_alive(pgid) {
        reap(pgid);
        thread::sleep(Duration::from_millis(50));
    }
    if group_alive(pgid) {
        // SAFETY: as above.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && group_alive(pgid) {
        reap(pgid);
        thread::sleep(Duration::from_millis(20));
    }
}

fn group_alive(pgid: i32) -> bool {
    // SAFETY: signal 0 to a process group only checks for existence.
    unsafe { libc::kill(-pgid, 0) == 0 }
}

/// Collects the exit status of our own child, so that it does not linger as a zombie
/// (a zombie still counts as alive for `kill(pid, 0)`).
fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: WNOHANG never blocks; a pid that is not our child yields ECHILD, ignored.
    unsafe {
        libc::waitpid(pid, &mut status, libc::WNOHANG);
    }
}

/// Sends SIGKILL to one process (the node's leftovers: shims, container processes).
pub fn kill(pid: i32) {
    if pid <= 1 {
        return;
    }
    // SAFETY: signalling a pid; a stale one yields ESRCH, ignored.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Detaches the mount at `path` (lazy unmount: it goes once nothing uses it).
pub fn unmount_detach(path: &Path) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    unsafe {
        libc::umount2(c.as_ptr(), libc::MNT_DETACH);
    }
}
