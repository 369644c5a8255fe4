//! Large cached bodies kept in files that never change ("sealed"), so that a hit on a cleartext
//! HTTP/1 connection sends them with `sendfile(2)`: the kernel attaches the file's pages to the
//! socket instead of copying the bytes from the process. For a body of tens of kilobytes that copy
//! is a large part of a hit's cost (docs/design.md, "A request's path through the code";
//! benches/RESULTS.md).
//!
//! A body is written once into a file with no name and mapped read-only. The mapping is the body's
//! `Bytes`, so the bytes are held once: the TLS, HTTP/2 and shared-tier paths read the mapping, the
//! fast path sends the file. Because the file never changes, pages the kernel still holds for a
//! socket after the entry is dropped carry exactly the bytes that were sent. Where the file lives
//! is [`BodyFiles`]:
//! - a directory on a disk filesystem (the default, `/var/tmp`): an `O_TMPFILE`, reopened
//!   read-only, so no descriptor in the process can write it. The page cache of ext4 or xfs holds
//!   it in large folios, which the kernel splices to a socket at a fraction of the cost of 4 KiB
//!   pages (benches/RESULTS.md, "the kernel's floor under a 52 KB hit"): this is how nginx's cache
//!   files are sent. The kernel writes the pages back to the disk in time, like any file's;
//! - shared memory: a `memfd`, sealed by the kernel against any change (`F_SEAL_WRITE`, no growing
//!   or shrinking, no further seals). Never on disk, but in 4 KiB pages.
//!
//! Each sealed body holds a descriptor and a mapping, so their number is bounded
//! ([`configure`]); bodies past the bound, below the size threshold, or whose file could not be
//! made are kept on the heap as before and written with one `writev`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;

/// Bodies from this size up are sealed unless configured otherwise. Sending a 16 KiB body from a
/// disk file already costs the kernel less than copying it (benches/RESULTS.md); below it the
/// gain is gone while the descriptor and the page rounding (up to a quarter more) remain.
pub const DEFAULT_MIN_BYTES: usize = 16 * 1024;
/// The default bound on sealed bodies: a quarter of the process's descriptors, at most this.
pub const DEFAULT_MAX_FILES: usize = 16 * 1024;
/// Where body files live unless configured otherwise: on disk on every Linux distribution, and
/// writable by any user.
pub const DEFAULT_DIR: &str = "/var/tmp";

/// Where sealed bodies' files live (`[cache] sendfile_dir`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFiles {
    /// Unnamed files in this directory (`O_TMPFILE`).
    Dir(PathBuf),
    /// Sealed shared memory (`memfd`).
    Memory,
}

impl BodyFiles {
    /// `"memory"`, or an absolute directory.
    pub fn parse(setting: &str) -> Result<BodyFiles, String> {
        match setting {
            "memory" => Ok(BodyFiles::Memory),
            dir if Path::new(dir).is_absolute() => Ok(BodyFiles::Dir(PathBuf::from(dir))),
            other => Err(format!("{other:?} is neither \"memory\" nor an absolute directory")),
        }
    }
}

static MIN_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_MIN_BYTES);
static MAX_FILES: AtomicUsize = AtomicUsize::new(usize::MAX);
/// The directory of body files; `None`: shared memory.
static DIR: RwLock<Option<CString>> = RwLock::new(None);
static OPEN: AtomicUsize = AtomicUsize::new(0);
static FAILURES: AtomicUsize = AtomicUsize::new(0);

/// Sets the size from which bodies are sealed (0: never), how many may be sealed at once (`None`:
/// [`default_max_files`]) and where their files live. A directory that cannot hold unnamed files
/// (missing, not writable, a filesystem without `O_TMPFILE`) is said once, and shared memory is
/// used instead. Process-wide: it decides how bodies are held, never which bytes a client receives.
pub fn configure(min_bytes: usize, max_files: Option<usize>, files: &BodyFiles) {
    MIN_BYTES.store(min_bytes, Ordering::Relaxed);
    MAX_FILES.store(max_files.unwrap_or_else(default_max_files), Ordering::Relaxed);
    let dir = match files {
        BodyFiles::Dir(dir) if min_bytes > 0 => match usable_dir(dir) {
            Ok(dir) => Some(dir),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), "cache.sendfile_dir cannot hold body files ({e}); large bodies are kept in shared memory instead");
                None
            }
        },
        _ => None,
    };
    *DIR.write().unwrap_or_else(|e| e.into_inner()) = dir;
}

/// `dir` as a C string, once an unnamed file could be made in it.
fn usable_dir(dir: &Path) -> io::Result<CString> {
    let dir = CString::new(dir.as_os_str().as_bytes()).map_err(|_| io::Error::other("a NUL in the path"))?;
    unnamed_file(&dir).map(|_| dir)
}

/// A new unnamed file in `dir`, open for writing.
fn unnamed_file(dir: &CString) -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated path and flags; the result is checked.
    owned(unsafe { libc::open(dir.as_ptr(), libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC, 0o600) })
}

/// The descriptor a system call just returned, or its error.
fn owned(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened by the caller's call and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A quarter of the soft limit on open descriptors (the rest is for connections), at most
/// [`DEFAULT_MAX_FILES`].
pub fn default_max_files() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `getrlimit` writes one `rlimit` through a valid pointer.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    let soft = if ok { usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX) } else { 1024 };
    (soft / 4).min(DEFAULT_MAX_FILES)
}

/// Sealed bodies held right now (for the metrics).
pub fn open_files() -> usize {
    OPEN.load(Ordering::Relaxed)
}

/// What a body of `len` bytes occupies: whole pages when sealed.
pub fn footprint(len: usize, sealed: bool) -> usize {
    if sealed {
        len.div_ceil(page_size()) * page_size()
    } else {
        len
    }
}

fn page_size() -> usize {
    // SAFETY: `sysconf` has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1)
}

/// A sealed body's file and its read-only mapping.
#[derive(Debug)]
struct Mapping {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and its file is never written again (sealed, or unnamed with no
// writable descriptor left), so the bytes never change while it exists; sharing the pointer between
// threads shares immutable memory.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes until `self` is dropped, and they never change.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are the mapping `seal` made, unmapped once, here; no slice of it
        // outlives `self` (every `Bytes` over it holds this mapping).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The owner behind a sealed body's `Bytes`.
struct Owner(Arc<Mapping>);

impl AsRef<[u8]> for Owner {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// A sealed body's file, to send from. Cloning shares it.
#[derive(Debug, Clone)]
pub struct SealedFile(Arc<Mapping>);

impl SealedFile {
    /// Where `body` starts in this file, if `body` is a view of this file's mapping; the file
    /// then holds exactly `body`'s bytes from there.
    pub fn offset_of(&self, body: &[u8]) -> Option<usize> {
        let start = self.0.ptr.as_ptr() as usize;
        let at = body.as_ptr() as usize;
        (at >= start && at + body.len() <= start + self.0.len).then(|| at - start)
    }

    /// Writes `head`, then `len` bytes of this file from `offset`, to the non-blocking socket
    /// `socket`, as far as it takes them without waiting. Returns how many bytes of head and body
    /// went out: fewer than all when the socket's buffer filled (the caller writes the rest the
    /// usual way, from the same bytes).
    pub fn send(&self, socket: RawFd, head: &[u8], offset: usize, len: usize) -> io::Result<usize> {
        // The head waits in the socket (MSG_MORE) to leave with the body's first bytes.
        // SAFETY: `head` is a valid buffer of `head.len()` bytes for the call.
        let sent = unsafe { libc::send(socket, head.as_ptr().cast(), head.len(), libc::MSG_MORE | libc::MSG_NOSIGNAL) };
        let sent = match sent {
            n if n >= 0 => n as usize,
            _ => return would_block(io::Error::last_os_error(), 0),
        };
        if sent < head.len() {
            return Ok(sent);
        }
        let mut at = offset as libc::off_t;
        let end = (offset + len) as libc::off_t;
        while at < end {
            // SAFETY: `at` is a valid offset pointer; the kernel reads the file, not our memory.
            let n = unsafe { libc::sendfile(socket, self.0.fd.as_raw_fd(), &mut at, (end - at) as usize) };
            match n {
                0 => break,
                n if n > 0 => {}
                _ => return would_block(io::Error::last_os_error(), head.len() + (at as usize - offset)),
            }
        }
        Ok(head.len() + (at as usize - offset))
    }
}

/// `sent` when `e` only says the socket takes nothing more now, or was interrupted (the caller
/// writes the rest the usual way), else `e`.
fn would_block(e: io::Error, sent: usize) -> io::Result<usize> {
    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) {
        Ok(sent)
    } else {
        Err(e)
    }
}

/// `body` in a sealed file, as `Bytes` over its mapping and the file to send it from; `None` when
/// it is below the size threshold, the bound on sealed bodies is reached, or the file could not be
/// made (the caller keeps the body on the heap).
pub fn seal(body: &[u8]) -> Option<(Bytes, SealedFile)> {
    let min = MIN_BYTES.load(Ordering::Relaxed);
    if min == 0 || body.len() < min {
        return None;
    }
    let max = MAX_FILES.load(Ordering::Relaxed);
    if OPEN.fetch_add(1, Ordering::Relaxed) >= max {
        OPEN.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    let dir = DIR.read().unwrap_or_else(|e| e.into_inner());
    match map_file(body, dir.as_ref()) {
        Ok(mapping) => {
            let mapping = Arc::new(mapping);
            Some((Bytes::from_owner(Owner(mapping.clone())), SealedFile(mapping)))
        }
        Err(e) => {
            OPEN.fetch_sub(1, Ordering::Relaxed);
            // Logged at the 1st, 2nd, 4th, 8th... failure: a lasting cause (descriptors, mappings)
            // shows without a line per entry.
            let failures = FAILURES.fetch_add(1, Ordering::Relaxed) + 1;
            if failures.is_power_of_two() {
                tracing::warn!(failures, "a large body stays on the heap: its sealed file could not be made: {e}");
            }
            None
        }
    }
}

/// `body` in a new file that never changes, mapped read-only: an unnamed file in `dir`, or sealed
/// shared memory without one.
fn map_file(body: &[u8], dir: Option<&CString>) -> io::Result<Mapping> {
    let fd = match dir {
        Some(dir) => {
            let fd = unnamed_file(dir)?;
            write_all(&fd, body)?;
            read_only(fd)
        }
        None => {
            // SAFETY: a NUL-terminated name and flags; the result is checked.
            let fd = owned(unsafe {
                libc::memfd_create(c"insights-body".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
            })?;
            write_all(&fd, body)?;
            let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
            // SAFETY: `fcntl` on a descriptor we own.
            if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
                return Err(io::Error::last_os_error());
            }
            fd
        }
    };
    // SAFETY: a new read-only shared mapping of the whole file, which holds `body.len()` (> 0)
    // bytes; the result is checked.
    let ptr =
        unsafe { libc::mmap(std::ptr::null_mut(), body.len(), libc::PROT_READ, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
    Ok(Mapping { fd, ptr, len: body.len() })
}

fn write_all(fd: &OwnedFd, body: &[u8]) -> io::Result<()> {
    let mut written = 0;
    while written < body.len() {
        let rest = &body[written..];
        // SAFETY: `rest` is a valid buffer of `rest.len()` bytes.
        let n = unsafe { libc::write(fd.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        written += n as usize;
    }
    Ok(())
}

/// The same unnamed file through a read-only descriptor, the writable one closed: nothing in the
/// process can change it any more. Where `/proc` is not mounted, the writable descriptor is kept
/// (and never written again).
fn read_only(fd: OwnedFd) -> OwnedFd {
    let Ok(path) = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())) else { return fd };
    // SAFETY: a NUL-terminated path and flags; the result is checked.
    owned(unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) }).unwrap_or(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn stores() -> Vec<(&'static str, Option<CString>)> {
        vec![("disk", Some(usable_dir(Path::new(DEFAULT_DIR)).expect("an unnamed file in /var/tmp"))), ("memory", None)]
    }

    #[test]
    fn a_body_file_holds_the_same_bytes_and_cannot_change() {
        let body = sample(100_000);
        for (store, dir) in stores() {
            let mapping = Arc::new(map_file(&body, dir.as_ref()).expect("a body file"));
            OPEN.fetch_add(1, Ordering::Relaxed); // as `seal` counts it; the drop uncounts it
            let (bytes, file) = (Bytes::from_owner(Owner(mapping.clone())), SealedFile(mapping));
            assert_eq!(&bytes[..], &body[..], "{store}");
            assert_eq!(file.offset_of(&bytes), Some(0));
            assert_eq!(file.offset_of(&bytes.slice(10..20)), Some(10));
            assert_eq!(file.offset_of(&body), None, "another buffer with the same bytes is not the file");
            let fd = file.0.fd.as_raw_fd();
            // SAFETY: a one-byte write attempt on a descriptor the file owns.
            let n = unsafe { libc::pwrite(fd, b"x".as_ptr().cast(), 1, 0) };
            assert_eq!(n, -1, "{store}: the file refuses writes");
            // SAFETY: `fstat` writes one `stat` through a valid pointer.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0);
            assert_eq!(st.st_nlink, 0, "{store}: the file has no name another process could open");
            assert_eq!(st.st_size as usize, body.len());
        }
        assert_eq!(footprint(100_000, true) % page_size(), 0);
        assert!(footprint(100_000, true) >= 100_000);
    }

    #[test]
    fn a_directory_without_unnamed_files_is_refused() {
        assert!(usable_dir(Path::new("/nonexistent-insights-proxy-dir")).is_err());
        assert_eq!(BodyFiles::parse("memory"), Ok(BodyFiles::Memory));
        assert_eq!(BodyFiles::parse("/var/tmp"), Ok(BodyFiles::Dir(PathBuf::from("/var/tmp"))));
        assert!(BodyFiles::parse("var/tmp").is_err());
    }

    #[test]
    fn small_bodies_stay_on_the_heap() {
        assert!(seal(&sample(DEFAULT_MIN_BYTES - 1)).is_none());
        assert!(seal(&[]).is_none());
    }

    /// The socket receives the head and the body whole, also when its buffer fills mid-body and
    /// the rest is written from the mapping.
    #[test]
    fn send_writes_head_then_body_and_reports_how_far_it_got() {
        for (_, dir) in stores() {
            sends_whole(dir.as_ref());
        }
    }

    fn sends_whole(dir: Option<&CString>) {
        let body = sample(4 << 20);
        let mapping = Arc::new(map_file(&body, dir).expect("a body file"));
        OPEN.fetch_add(1, Ordering::Relaxed);
        let (bytes, file) = (Bytes::from_owner(Owner(mapping.clone())), SealedFile(mapping));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let head = b"HTTP/1.1 200 OK\r\n\r\n";
        let sent = file.send(server.as_raw_fd(), head, 0, bytes.len()).unwrap();
        assert!(sent > head.len(), "some of the body went out");
        assert!(sent < head.len() + bytes.len(), "4 MiB fill a fresh socket's buffers");
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            (&client).take((head.len() + body.len()) as u64).read_to_end(&mut all).unwrap();
            all
        });
        server.set_nonblocking(false).unwrap();
        std::io::Write::write_all(&mut &server, &bytes[sent - head.len()..]).unwrap();
        let all = reader.join().unwrap();
        assert_eq!(&all[..head.len()], head);
        assert!(all[head.len()..] == bytes[..], "the body arrives whole and in order");
    }
}
