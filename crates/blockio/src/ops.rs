//! The block I/O operations themselves: plain functions over a file descriptor and raw memory,
//! returning a byte count (or 0) on success and `-errno` on failure. They run either on the JS
//! thread (the `*_nowait` fast paths, which never block: `RWF_NOWAIT` makes the kernel answer
//! EAGAIN instead of waiting for the disk) or on a libuv pool thread inside a batch (lib.rs).

use crate::sys::*;
use std::os::raw::{c_int, c_void};

/// `base:allocation` flags of NBD, used as the flag word of an extent.
pub const EXTENT_DATA: f64 = 0.0;
pub const EXTENT_HOLE_ZERO: f64 = 3.0;

fn neg_errno() -> i64 {
    -(errno() as i64)
}

/// One preadv2 with RWF_NOWAIT: the bytes the page cache could give at once, or -EAGAIN.
pub fn read_nowait(fd: c_int, ptr: *mut u8, len: usize, offset: i64) -> i64 {
    let iov = IoVec {
        base: ptr as *mut c_void,
        len,
    };
    loop {
        let r = unsafe { preadv2(fd, &iov, 1, offset, RWF_NOWAIT) };
        if r >= 0 {
            return r as i64;
        }
        if errno() != EINTR {
            return neg_errno();
        }
    }
}

/// One pwritev2 with RWF_NOWAIT: bytes written without blocking, or -EAGAIN.
pub fn write_nowait(fd: c_int, ptr: *const u8, len: usize, offset: i64) -> i64 {
    let iov = IoVec {
        base: ptr as *mut c_void,
        len,
    };
    loop {
        let r = unsafe { pwritev2(fd, &iov, 1, offset, RWF_NOWAIT) };
        if r >= 0 {
            return r as i64;
        }
        if errno() != EINTR {
            return neg_errno();
        }
    }
}

/// Read exactly `len` bytes (blocking). End of file before `len` is EIO: a volume never
/// reads past its size, so a short file means someone truncated it under us.
pub fn read_full(fd: c_int, ptr: *mut u8, len: usize, offset: i64) -> i64 {
    let mut done = 0usize;
    while done < len {
        let r = unsafe {
            pread64(
                fd,
                ptr.add(done) as *mut c_void,
                len - done,
                offset + done as i64,
            )
        };
        if r < 0 {
            if errno() == EINTR {
                continue;
            }
            return neg_errno();
        }
        if r == 0 {
            return -(EIO as i64);
        }
        done += r as usize;
    }
    done as i64
}

/// Write exactly `len` bytes (blocking); with `dsync` each write is durable when it returns
/// (RWF_DSYNC, the per-write equivalent of O_DSYNC: how NBD FUA maps onto Linux).
pub fn write_full(fd: c_int, ptr: *const u8, len: usize, offset: i64, dsync: bool) -> i64 {
    let mut done = 0usize;
    while done < len {
        let r = unsafe {
            if dsync {
                let iov = IoVec {
                    base: ptr.add(done) as *mut c_void,
                    len: len - done,
                };
                pwritev2(fd, &iov, 1, offset + done as i64, RWF_DSYNC)
            } else {
                pwrite64(
                    fd,
                    ptr.add(done) as *const c_void,
                    len - done,
                    offset + done as i64,
                )
            }
        };
        if r < 0 {
            if errno() == EINTR {
                continue;
            }
            return neg_errno();
        }
        if r == 0 {
            // No progress and no error: never loop on it.
            return -(EIO as i64);
        }
        done += r as usize;
    }
    done as i64
}

/// fdatasync, or fsync when `full` (metadata too: used after a file was created or resized).
pub fn sync(fd: c_int, full: bool) -> i64 {
    loop {
        let r = unsafe {
            if full {
                fsync(fd)
            } else {
                fdatasync(fd)
            }
        };
        if r == 0 {
            return 0;
        }
        if errno() != EINTR {
            return neg_errno();
        }
    }
}

/// fallocate with the given mode (punch hole / zero range, always with KEEP_SIZE from the caller).
pub fn allocate(fd: c_int, mode: c_int, offset: i64, len: i64) -> i64 {
    loop {
        let r = unsafe { fallocate64(fd, mode, offset, len) };
        if r == 0 {
            return 0;
        }
        if errno() != EINTR {
            return neg_errno();
        }
    }
}

/// posix_fadvise(WILLNEED): start readahead of a range (NBD_CMD_CACHE). Returns the error number
/// directly (posix_fadvise does not use errno).
pub fn advise_willneed(fd: c_int, offset: i64, len: i64) -> i64 {
    let r = unsafe { posix_fadvise64(fd, offset, len, POSIX_FADV_WILLNEED) };
    -(r as i64)
}

static ZEROES: [u8; 1 << 20] = [0u8; 1 << 20];

/// Write zeroes the slow way, for storage where fallocate cannot make zeroes.
pub fn write_zeroes(fd: c_int, offset: i64, len: i64, dsync: bool) -> i64 {
    let mut done: i64 = 0;
    while done < len {
        let n = std::cmp::min(len - done, ZEROES.len() as i64) as usize;
        let r = write_full(fd, ZEROES.as_ptr(), n, offset + done, dsync);
        if r < 0 {
            return r;
        }
        done += n as i64;
    }
    0
}

/// Map [offset, offset+len) into runs of data and holes with SEEK_DATA/SEEK_HOLE, writing
/// (length, flags) pairs of f64 into `out` (room for `max` pairs). Returns the number of pairs.
/// Where the file system cannot tell (EINVAL, e.g. block devices), everything is data. A range
/// that reaches past the end of the file is -EIO, as a read of it is (see read_full): a volume
/// never asks past its size, so the file was cut short under us, and what was there is not a hole.
pub fn extents(fd: c_int, offset: i64, len: i64, out: *mut f64, max: usize) -> i64 {
    let end = offset + len;
    let mut pos = offset;
    let mut n = 0usize;
    let emit = |length: i64, flags: f64, n: &mut usize| unsafe {
        *out.add(2 * *n) = length as f64;
        *out.add(2 * *n + 1) = flags;
        *n += 1;
    };
    while pos < end && n < max {
        let data = unsafe { lseek64(fd, pos, SEEK_DATA) };
        if data < 0 {
            let e = errno();
            if e == ENXIO {
                // No data at or after pos: the rest is a hole, if it is inside the file.
                let size = unsafe { lseek64(fd, 0, SEEK_END) };
                if size >= 0 && end > size {
                    return -(EIO as i64);
                }
                emit(end - pos, EXTENT_HOLE_ZERO, &mut n);
                break;
            }
            if e == EINVAL && n == 0 {
                emit(end - pos, EXTENT_DATA, &mut n);
                break;
            }
            return -(e as i64);
        }
        if data > pos {
            let stop = std::cmp::min(data, end);
            emit(stop - pos, EXTENT_HOLE_ZERO, &mut n);
            pos = stop;
            continue;
        }
        let hole = unsafe { lseek64(fd, pos, SEEK_HOLE) };
        if hole < 0 {
            return neg_errno();
        }
        // A concurrent write may have filled the hole between the two lseeks; report data.
        let stop = if hole <= pos {
            end
        } else {
            std::cmp::min(hole, end)
        };
        emit(stop - pos, EXTENT_DATA, &mut n);
        pos = stop;
    }
    n as i64
}

/// Size of a block device (BLKGETSIZE64), or -errno.
pub fn device_size(fd: c_int) -> i64 {
    let mut size: u64 = 0;
    let r = unsafe { ioctl(fd, BLKGETSIZE64, &mut size as *mut u64) };
    if r < 0 {
        return neg_errno();
    }
    size as i64
}

/// Bytes of [offset, offset+len) in the page cache (cachestat, whole pages), or -errno
/// (-ENOSYS before Linux 6.5).
pub fn cached_bytes(fd: c_int, offset: i64, len: i64) -> i64 {
    let range = CachestatRange {
        off: offset as u64,
        len: len as u64,
    };
    let mut cs = Cachestat::default();
    let r = unsafe {
        syscall(
            SYS_CACHESTAT,
            fd,
            &range as *const CachestatRange,
            &mut cs as *mut Cachestat,
            0,
        )
    };
    if r < 0 {
        return neg_errno();
    }
    (cs.nr_cache * 4096) as i64
}

/// Bytes read into user space per send (see send_pieces), for pieces that are not mapped.
const GATHER: usize = 256 * 1024;

/// iovecs per sendmsg(2) (IOV_MAX is 1024).
const MAX_IOV: usize = 1024;

/// What zero pieces are sent from.
static ZEROS: [u8; 65536] = [0; 65536];

thread_local! {
    static GATHER_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    static IOVS: std::cell::RefCell<Vec<IoVec>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Send `header` (at most 64 KiB: sendPieces refuses more) and then each piece of `pieces` (fd, offset, length triples; fd < 0 stands for
/// `length` zero bytes), less their first `skip` bytes, on the non-blocking socket `sock`.
/// Pieces from `copy_fd` (every piece when `copy_fd` is -2) are copied: sent with sendmsg(2)
/// straight from a read-only mapping of their file when it is registered (maps.rs: one copy,
/// page cache to socket), otherwise read into a buffer first (up to 256 KiB a send); the header
/// and zeroes go in the same sendmsg. Other pieces go with sendfile(2), which hands the kernel
/// references to their page-cache pages, so only files that never change under a sent reply may
/// be sent that way (a snapshot's journal: a snapshot's primary may be overwritten while its
/// pages wait in the socket). Returns the bytes sent in all (header included), stopping at the
/// first EAGAIN, end of file or read error (the caller reads the rest itself); -errno when the
/// connection failed before anything was sent.
pub fn send_pieces(
    sock: c_int,
    header: *const u8,
    hlen: usize,
    pieces: &[f64],
    skip: usize,
    copy_fd: c_int,
) -> i64 {
    GATHER_BUF.with(|cell| {
        IOVS.with(|iovs| {
            let mut buf = cell.borrow_mut();
            if buf.len() < GATHER {
                buf.resize(GATHER, 0);
            }
            let mut iov = iovs.borrow_mut();
            iov.clear();
            iov.reserve(MAX_IOV);
            let mut maps = crate::maps::lock();
            maps.begin();
            let mut g = Gather {
                sock,
                copy_fd,
                buf: buf.as_mut_ptr(),
                fill: 0,
                sent: 0,
                iov: &mut iov,
                queued: 0,
                maps: Some(&mut *maps),
            };
            match g.send(header, hlen, pieces, skip) {
                Ok(n) => n,
                Err(Fault) => {
                    // A mapped page could not be read (a disk error, a file cut short): the rest
                    // again without mappings, from where it stopped; pread reports the error.
                    let done = g.sent;
                    g.maps = None;
                    g.iov.clear();
                    g.queued = 0;
                    g.fill = 0;
                    let r = if done < hlen {
                        g.send(unsafe { header.add(done) }, hlen - done, pieces, skip)
                    } else {
                        g.send(header, 0, pieces, skip + (done - hlen))
                    };
                    r.unwrap_or(g.sent as i64)
                }
            }
        })
    })
}

/// sendmsg failed with EFAULT: a mapped page could not be read.
struct Fault;

struct Gather<'a> {
    sock: c_int,
    copy_fd: c_int,
    /// GATHER bytes for pieces read with pread; `fill` of them are queued.
    buf: *mut u8,
    fill: usize,
    /// Bytes sent so far.
    sent: usize,
    /// What the next sendmsg sends: `queued` bytes in all.
    iov: &'a mut Vec<IoVec>,
    queued: usize,
    maps: Option<&'a mut crate::maps::Maps>,
}

/// Why a send stops early: the value to return, or a fault to retry without mappings.
type Stop = Result<i64, Fault>;

impl Gather<'_> {
    /// Queue `len` bytes at `ptr` for the next sendmsg.
    fn push(&mut self, ptr: *const u8, len: usize) -> Result<(), Stop> {
        if self.iov.len() == MAX_IOV {
            self.flush(true)?;
        }
        self.iov.push(IoVec {
            base: ptr as *mut c_void,
            len,
        });
        self.queued += len;
        Ok(())
    }

    /// Send what is queued: Err(stop) when the caller must stop there.
    fn flush(&mut self, more: bool) -> Result<(), Stop> {
        let flags = MSG_DONTWAIT | MSG_NOSIGNAL | if more { MSG_MORE } else { 0 };
        let mut first = 0;
        while self.queued > 0 {
            let msg = MsgHdr {
                name: std::ptr::null_mut(),
                namelen: 0,
                iov: self.iov[first..].as_ptr(),
                iovlen: self.iov.len() - first,
                control: std::ptr::null_mut(),
                controllen: 0,
                flags: 0,
            };
            let r = unsafe { sendmsg(self.sock, &msg, flags) };
            if r < 0 {
                let e = errno();
                if e == EINTR {
                    continue;
                }
                if e == EFAULT && self.maps.is_some() {
                    return Err(Err(Fault));
                }
                if e == EAGAIN {
                    return Err(Ok(self.sent as i64));
                }
                return Err(Ok(if self.sent > 0 {
                    self.sent as i64
                } else {
                    -(e as i64)
                }));
            }
            let mut r = r as usize;
            self.sent += r;
            self.queued -= r;
            while r > 0 {
                let v = &mut self.iov[first];
                if r >= v.len {
                    r -= v.len;
                    first += 1;
                } else {
                    v.base = unsafe { (v.base as *mut u8).add(r) } as *mut c_void;
                    v.len -= r;
                    r = 0;
                }
            }
        }
        self.iov.clear();
        self.fill = 0;
        Ok(())
    }

    /// See send_pieces.
    fn send(&mut self, header: *const u8, hlen: usize, pieces: &[f64], skip: usize) -> Stop {
        match self.send_all(header, hlen, pieces, skip) {
            Ok(()) => Ok(self.sent as i64),
            Err(stop) => stop,
        }
    }

    fn send_all(
        &mut self,
        header: *const u8,
        hlen: usize,
        pieces: &[f64],
        skip: usize,
    ) -> Result<(), Stop> {
        if hlen > 0 {
            self.push(header, hlen)?;
        }
        let mut skip = skip;
        for piece in pieces.chunks_exact(3) {
            let (fd, plen) = (piece[0] as c_int, piece[2] as usize);
            if skip >= plen {
                skip -= plen;
                continue;
            }
            let len = plen - skip;
            let mut off = piece[1] as i64 + skip as i64;
            skip = 0;
            let mut done = 0usize;
            if fd < 0 {
                while done < len {
                    let n = (len - done).min(ZEROS.len());
                    self.push(ZEROS.as_ptr(), n)?;
                    done += n;
                }
            } else if self.copy_fd == -2 || fd == self.copy_fd {
                while done < len {
                    if let Some(m) = self.maps.as_mut() {
                        if let Some((p, n)) = m.at(fd, off as u64, len - done) {
                            self.push(p, n)?;
                            done += n;
                            off += n as i64;
                            continue;
                        }
                    }
                    // Room for the read and its iovec first: a flush from push() would free
                    // the buffer under the bytes just read.
                    if self.fill == GATHER || self.iov.len() == MAX_IOV {
                        self.flush(true)?;
                    }
                    let n = (len - done).min(GATHER - self.fill);
                    let at = unsafe { self.buf.add(self.fill) };
                    let r = unsafe { pread64(fd, at as *mut c_void, n, off) };
                    if r < 0 && errno() == EINTR {
                        continue;
                    }
                    if r <= 0 {
                        // End of file or a read error: send what is queued; the caller reads the
                        // rest itself and reports the error.
                        self.flush(false)?;
                        return Err(Ok(self.sent as i64));
                    }
                    self.push(at, r as usize)?;
                    self.fill += r as usize;
                    done += r as usize;
                    off += r as i64;
                }
            } else {
                self.flush(true)?;
                while done < len {
                    let r = unsafe { sendfile64(self.sock, fd, &mut off, len - done) };
                    if r < 0 {
                        let e = errno();
                        if e == EINTR {
                            continue;
                        }
                        if e == EAGAIN {
                            return Err(Ok((self.sent + done) as i64));
                        }
                        let total = self.sent + done;
                        return Err(Ok(if total > 0 { total as i64 } else { -(e as i64) }));
                    }
                    if r == 0 {
                        // End of file: the caller sends the rest.
                        return Err(Ok((self.sent + done) as i64));
                    }
                    done += r as usize;
                }
                self.sent += done;
            }
        }
        self.flush(false)
    }
}

/// send(2) of a whole buffer with `flags`: bytes sent, stopping at EAGAIN (0 when the socket is
/// full); -errno when the connection failed before anything was sent.
fn send_all(sock: c_int, buf: *const u8, len: usize, flags: c_int) -> i64 {
    let mut sent = 0usize;
    while sent < len {
        let r = unsafe { send(sock, buf.add(sent) as *const c_void, len - sent, flags) };
        if r < 0 {
            let e = errno();
            if e == EINTR {
                continue;
            }
            if e == EAGAIN {
                break;
            }
            return if sent > 0 { sent as i64 } else { -(e as i64) };
        }
        sent += r as usize;
    }
    sent as i64
}

/// send(MSG_DONTWAIT | MSG_NOSIGNAL) of a whole buffer (see send_all).
pub fn send_now(sock: c_int, buf: *const u8, len: usize) -> i64 {
    send_all(sock, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL)
}

/// recv(MSG_DONTWAIT) into a buffer: bytes received (0 at end of stream), or -errno (-EAGAIN when
/// nothing is waiting).
pub fn recv_nowait(sock: c_int, buf: *mut u8, len: usize) -> i64 {
    loop {
        let r = unsafe { recv(sock, buf as *mut c_void, len, MSG_DONTWAIT) };
        if r >= 0 {
            return r as i64;
        }
        let e = errno();
        if e != EINTR {
            return -(e as i64);
        }
    }
}

/// Ask for a socket send buffer of `bytes` (the kernel caps it at net.core.wmem_max and doubles
/// it for its own bookkeeping); the size it then reports, or -errno.
pub fn set_send_buffer(sock: c_int, bytes: i32) -> i64 {
    let v: c_int = bytes;
    let r = unsafe {
        setsockopt(
            sock,
            SOL_SOCKET,
            SO_SNDBUF,
            &v as *const c_int as *const c_void,
            std::mem::size_of::<c_int>() as u32,
        )
    };
    if r < 0 {
        return -(errno() as i64);
    }
    let mut out: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as u32;
    let r = unsafe {
        getsockopt(
            sock,
            SOL_SOCKET,
            SO_SNDBUF,
            &mut out as *mut c_int as *mut c_void,
            &mut len,
        )
    };
    if r < 0 {
        return -(errno() as i64);
    }
    out as i64
}

const LOCK_SH: c_int = 1;
const LOCK_EX: c_int = 2;
const LOCK_NB: c_int = 4;

/// flock(fd, LOCK_EX or LOCK_SH | LOCK_NB): 0, or -errno (-EWOULDBLOCK when another open file
/// description holds a conflicting lock).
pub fn lock_fd(fd: c_int, exclusive: bool) -> i64 {
    let op = if exclusive { LOCK_EX } else { LOCK_SH } | LOCK_NB;
    if unsafe { flock(fd, op) } < 0 {
        return neg_errno();
    }
    0
}

/// A close-on-exec duplicate of `fd`, or -errno.
pub fn dup_fd(fd: c_int) -> i64 {
    let r = unsafe { fcntl(fd, F_DUPFD_CLOEXEC, 0) };
    if r < 0 {
        return neg_errno();
    }
    r as i64
}

/// Tell malloc to keep freed memory for reuse: allocations up to `mmap_threshold` come from the
/// heap (not a fresh mapping each), and the heap is trimmed only when `trim_threshold` bytes are
/// free at its top (with `top_pad` more taken whenever it grows). Node copies every HTTP body
/// chunk into a fresh 64 KiB allocation; with glibc's defaults (128 KiB) the heap shrank and grew
/// around them, and each growth paid page faults and page zeroing. True when malloc accepted all
/// three (glibc; other C libraries may ignore them).
pub fn tune_malloc(mmap_threshold: i32, trim_threshold: i32, top_pad: i32) -> bool {
    unsafe {
        mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
            && mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
            && mallopt(M_TOP_PAD, top_pad) == 1
    }
}

/// Voluntary context switches of the calling thread so far (getrusage RUSAGE_THREAD), or -errno.
/// A blocking call that slept in the kernel (dirty-page throttling, a lock, a disk read) raises
/// it; being preempted does not.
pub fn thread_sleeps() -> i64 {
    let mut r = Rusage::default();
    if unsafe { getrusage(RUSAGE_THREAD, &mut r) } < 0 {
        return neg_errno();
    }
    r.counters[RU_NVCSW]
}
