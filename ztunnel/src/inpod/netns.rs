//! A handle on a network namespace, and the one way ztunnel enters it.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::sched::{CloneFlags, setns};

/// An open network namespace: a pod's (received from istio-cni) or ztunnel's own.
///
/// Holding the file descriptor keeps the namespace alive even after the pod's processes exit, so a
/// `NetNs` is also what keeps a pod's listeners valid until ztunnel lets go of them. The inode (with
/// the device of the nsfs mount) identifies the namespace: two handles with the same identity are
/// the same namespace, which is how a re-sent pod is recognised and what logs print.
pub struct NetNs {
    fd: OwnedFd,
    dev: u64,
    inode: u64,
}

// === impl NetNs ===

impl NetNs {
    /// The network namespace of the calling thread.
    ///
    /// Uses `/proc/thread-self`, not `/proc/self`: the latter names the main thread's namespace,
    /// which is not the caller's when called inside [`NetNs::run_in`].
    pub fn current() -> io::Result<Self> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// Opens a namespace by path: a bind mount such as `/run/netns/<name>` (what `ip netns add`
    /// creates) or `/proc/<pid>/ns/net`.
    ///
    /// Fails with `InvalidInput` if the path is not a network namespace, so a wrong path is caught
    /// here rather than when the first socket is created.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("open network namespace {}: {e}", path.display()),
            )
        })?;
        Self::from_fd(file.into())
    }

    /// Wraps a namespace file descriptor, e.g. one received over ZDS with `SCM_RIGHTS`.
    ///
    /// Fails with `InvalidInput` if the descriptor is not a namespace, or is visibly another kind
    /// of namespace: the fd comes from another process, and a mistake should surface here, not at
    /// the first socket. (For a bind-mounted namespace the kind is not visible without an ioctl;
    /// entering one of the wrong kind still fails, in [`NetNs::run_in`], because `setns` is told to
    /// expect a network namespace.)
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        ensure_netns(Path::new(&format!("/proc/self/fd/{}", fd.as_raw_fd())))?;
        let stat = nix::sys::stat::fstat(&fd)?;
        Ok(Self {
            fd,
            dev: stat.st_dev,
            inode: stat.st_ino,
        })
    }

    /// The namespace's inode number, as `ip netns identify`, `lsns` and `/proc/<pid>/ns/net` show it.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Runs `f` with the calling context switched into this namespace and returns its result.
    ///
    /// `f` runs on a fresh, short-lived OS thread that first calls `setns(fd, CLONE_NEWNET)` and
    /// exits when `f` returns. Why a thread of its own:
    /// - the namespace is a property of the *thread*, so switching a tokio worker would silently
    ///   move every task that worker later polls into the pod, and a failed switch-back would leave
    ///   it there for good; a thread that dies afterwards cannot leak its namespace;
    /// - a socket belongs to the namespace it was created in for its whole life, so sockets made
    ///   inside `f` can be returned and used from any thread or runtime afterwards;
    /// - `std::process::Command` spawns from the calling thread, so commands started inside `f`
    ///   (`iptables`, `ip`) run in the namespace too, with no `nsenter` or `ip netns exec`.
    ///
    /// This blocks the caller until `f` finishes (thread creation costs tens of microseconds); from
    /// async code, keep `f` short (socket creation) or call this from `spawn_blocking`. A panic in
    /// `f` is propagated to the caller. Errors are only those of creating the thread or entering the
    /// namespace; `f`'s own result is returned as is.
    pub fn run_in<R: Send>(&self, f: impl FnOnce() -> R + Send) -> io::Result<R> {
        let fd = self.fd.as_fd();
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("netns-{}", self.inode))
                .spawn_scoped(scope, move || {
                    setns(fd, CloneFlags::CLONE_NEWNET).map_err(|errno| {
                        io::Error::new(
                            io::Error::from(errno).kind(),
                            format!("setns into network namespace {}: {errno}", self.inode),
                        )
                    })?;
                    Ok(f())
                })?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

impl PartialEq for NetNs {
    fn eq(&self, other: &Self) -> bool {
        (self.dev, self.inode) == (other.dev, other.inode)
    }
}

impl Eq for NetNs {}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl fmt::Debug for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetNs")
            .field("inode", &self.inode)
            .field("fd", &self.fd.as_raw_fd())
            .finish()
    }
}

/// Checks that `path` (a file, or a `/proc/self/fd/N` link) is a network namespace, without
/// opening it: opening an arbitrary file from another process (a FIFO, a device) could block.
///
/// The filesystem must be nsfs. The link target names the kind (`net:[4026531840]`) when the fd
/// was opened through `/proc/<pid>/ns/`; for a bind mount (`/run/netns/<name>`) it is the mount's
/// path and says nothing, and the kind is left to `setns` to check.
pub(super) fn ensure_netns(path: &Path) -> io::Result<()> {
    let fs = nix::sys::statfs::statfs(path)?;
    let target = std::fs::read_link(path)
        .map(|t| t.to_string_lossy().into_owned())
        .unwrap_or_else(|_| path.display().to_string());
    let not = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("expected a network namespace, but {what}"),
        )
    };
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err(not(format!("{target:?} is not a namespace")));
    }
    match target.split_once(":[") {
        Some((kind, _)) if kind != "net" => Err(not(format!("{target:?} is a {kind} namespace"))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_is_stable_and_equal_to_itself() {
        let a = NetNs::current().expect("current netns");
        let b = NetNs::current().expect("current netns");
        assert_eq!(a, b);
        assert_ne!(a.inode(), 0);
        // Without a setns, the dedicated thread is still in the same namespace.
        let inside = a.run_in(NetNs::current).expect("run_in").expect("current");
        assert_eq!(inside, a);
    }

    #[test]
    fn other_namespace_kinds_are_refused() {
        let err = NetNs::open("/proc/self/ns/uts").expect_err("uts is not a netns");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        assert!(err.to_string().contains("is a uts namespace"), "{err}");
    }

    #[test]
    fn plain_files_are_refused() {
        let err = NetNs::from_fd(File::open("/proc/self/status").expect("open").into())
            .expect_err("not a namespace");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    }

    #[test]
    fn missing_path_names_the_path() {
        let err = NetNs::open("/run/netns/does-not-exist-ztunnel-test").expect_err("missing");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(
            err.to_string().contains("does-not-exist-ztunnel-test"),
            "{err}"
        );
    }
}
