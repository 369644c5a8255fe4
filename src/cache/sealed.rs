//! Large cached bodies kept in sealed memory files, so that a hit on a cleartext HTTP/1 connection
//! sends them with `sendfile(2)`: the kernel attaches the file's pages to the socket instead of
//! copying the bytes from the process. For a body of tens of kilobytes that copy is a large part
//! of a hit's cost (docs/design.md, "A request's path through the code"; benches/RESULTS.md).
//!
//! A sealed body is a `memfd` written once, sealed against any change (`F_SEAL_WRITE`, no growing
//! or shrinking, no further seals) and mapped read-only. The mapping is the body's `Bytes`, so the
//! bytes are held once: the TLS, HTTP/2 and shared-tier paths read the mapping, the fast path sends
//! the file. Because the file can never change, pages the kernel still holds for a socket after the
//! entry is dropped carry exactly the bytes that were sent.
//!
//! Each sealed body holds a descriptor and a mapping, so their number is bounded
//! ([`configure`]); bodies past the bound, below the size threshold, or whose file could not be
//! made are kept on the heap as before and written with one `writev`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

/// Bodies from this size up are sealed unless configured otherwise: below it the copy costs less
/// than the descriptor, the mapping and the page rounding.
pub const DEFAULT_MIN_BYTES: usize = 32 * 1024;
/// The default bound on sealed bodies: a quarter of the process's descriptors, at most this.
pub const DEFAULT_MAX_FILES: usize = 16 * 1024;

static MIN_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_MIN_BYTES);
static MAX_FILES: AtomicUsize = AtomicUsize::new(usize::MAX);
static OPEN: AtomicUsize = AtomicUsize::new(0);
static FAILURES: AtomicUsize = AtomicUsize::new(0);

/// Sets the size from which bodies are sealed (0: never) and how many may be sealed at once
/// (`None`: [`default_max_files`]). Process-wide: it decides how bodies are held, never which
/// bytes a client receives.
pub fn configure(min_bytes: usize, max_files: Option<usize>) {
    MIN_BYTES.store(min_bytes, Ordering::Relaxed);
    MAX_FILES.store(max_files.unwrap_or_else(default_max_files), Ordering::Relaxed);
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

// SAFETY: the mapping is read-only and its file sealed against writes, so the bytes never change
// while it exists; sharing the pointer between threads shares immutable memory.
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
    match map_sealed(body) {
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

fn map_sealed(body: &[u8]) -> io::Result<Mapping> {
    // SAFETY: a NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"insights-body".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
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
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: `fcntl` on a descriptor we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn a_sealed_body_holds_the_same_bytes_and_cannot_change() {
        let body = sample(100_000);
        let (bytes, file) = seal(&body).expect("sealed");
        assert_eq!(&bytes[..], &body[..]);
        assert_eq!(file.offset_of(&bytes), Some(0));
        assert_eq!(file.offset_of(&bytes.slice(10..20)), Some(10));
        assert_eq!(file.offset_of(&body), None, "another buffer with the same bytes is not the file");
        // SAFETY: a one-byte write attempt on a descriptor the file owns.
        let n = unsafe { libc::pwrite(file.0.fd.as_raw_fd(), b"x".as_ptr().cast(), 1, 0) };
        assert_eq!(n, -1, "a sealed file refuses writes");
        assert_eq!(footprint(body.len(), true) % page_size(), 0);
        assert!(footprint(body.len(), true) >= body.len());
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
        let body = sample(4 << 20);
        let (bytes, file) = seal(&body).expect("sealed");
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
