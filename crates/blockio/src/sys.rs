//! The few Linux system calls std does not wrap, declared by hand (glibc, x86_64/aarch64 LP64).

use std::os::raw::{c_int, c_long, c_void};

#[repr(C)]
pub struct IoVec {
    pub base: *mut c_void,
    pub len: usize,
}

pub const RWF_DSYNC: c_int = 0x02;
pub const RWF_NOWAIT: c_int = 0x08;

pub const SEEK_DATA: c_int = 3;
pub const SEEK_HOLE: c_int = 4;
pub const SEEK_END: c_int = 2;

pub const POSIX_FADV_WILLNEED: c_int = 3;

/// _IOR(0x12, 114, size_t): size of a block device in bytes.
pub const BLKGETSIZE64: c_long = 0x8008_1272;

/// cachestat(2), Linux 6.5+: page-cache residency of a file range (same number on x86_64 and aarch64).
pub const SYS_CACHESTAT: c_long = 451;
pub const MSG_DONTWAIT: c_int = 0x40;
pub const MSG_NOSIGNAL: c_int = 0x4000;
pub const MSG_MORE: c_int = 0x8000;
pub const M_TRIM_THRESHOLD: c_int = -1;
pub const M_TOP_PAD: c_int = -2;
pub const M_MMAP_THRESHOLD: c_int = -3;
pub const SOL_SOCKET: c_int = 1;
pub const SO_SNDBUF: c_int = 7;

#[repr(C)]
pub struct CachestatRange {
    pub off: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Default)]
pub struct Cachestat {
    pub nr_cache: u64,
    pub nr_dirty: u64,
    pub nr_writeback: u64,
    pub nr_evicted: u64,
    pub nr_recently_evicted: u64,
}

pub const F_DUPFD_CLOEXEC: c_int = 1030;

/// getrusage(2) `who` for the calling thread.
pub const RUSAGE_THREAD: c_int = 1;

/// struct rusage (LP64): two timevals, then fourteen longs (ru_maxrss .. ru_nivcsw).
#[repr(C)]
#[derive(Default)]
pub struct Rusage {
    pub times: [c_long; 4],
    pub counters: [i64; 14],
}

/// Index of ru_nvcsw (voluntary context switches) in `Rusage::counters`.
pub const RU_NVCSW: usize = 12;

pub const EINTR: i32 = 4;
pub const EINVAL: i32 = 22;
pub const ENXIO: i32 = 6;
pub const EIO: i32 = 5;
pub const EAGAIN: i32 = 11;
pub const EFAULT: i32 = 14;

pub const PROT_READ: c_int = 1;
pub const MAP_SHARED: c_int = 1;

/// struct msghdr (LP64; repr(C) pads after the socklen_t).
#[repr(C)]
pub struct MsgHdr {
    pub name: *mut c_void,
    pub namelen: u32,
    pub iov: *const IoVec,
    pub iovlen: usize,
    pub control: *mut c_void,
    pub controllen: usize,
    pub flags: c_int,
}

extern "C" {
    pub fn preadv2(fd: c_int, iov: *const IoVec, iovcnt: c_int, offset: i64, flags: c_int)
        -> isize;
    pub fn pwritev2(
        fd: c_int,
        iov: *const IoVec,
        iovcnt: c_int,
        offset: i64,
        flags: c_int,
    ) -> isize;
    pub fn pread64(fd: c_int, buf: *mut c_void, count: usize, offset: i64) -> isize;
    pub fn pwrite64(fd: c_int, buf: *const c_void, count: usize, offset: i64) -> isize;
    pub fn fdatasync(fd: c_int) -> c_int;
    pub fn fsync(fd: c_int) -> c_int;
    pub fn fallocate64(fd: c_int, mode: c_int, offset: i64, len: i64) -> c_int;
    pub fn lseek64(fd: c_int, offset: i64, whence: c_int) -> i64;
    pub fn posix_fadvise64(fd: c_int, offset: i64, len: i64, advice: c_int) -> c_int;
    pub fn ioctl(fd: c_int, request: c_long, ...) -> c_int;
    pub fn sendfile64(out_fd: c_int, in_fd: c_int, offset: *mut i64, count: usize) -> isize;
    pub fn send(fd: c_int, buf: *const c_void, len: usize, flags: c_int) -> isize;
    pub fn sendmsg(fd: c_int, msg: *const MsgHdr, flags: c_int) -> isize;
    pub fn mmap(
        addr: *mut c_void,
        len: usize,
        prot: c_int,
        flags: c_int,
        fd: c_int,
        offset: i64,
    ) -> *mut c_void;
    pub fn munmap(addr: *mut c_void, len: usize) -> c_int;
    pub fn recv(fd: c_int, buf: *mut c_void, len: usize, flags: c_int) -> isize;
    pub fn setsockopt(
        fd: c_int,
        level: c_int,
        name: c_int,
        value: *const c_void,
        len: u32,
    ) -> c_int;
    pub fn getsockopt(
        fd: c_int,
        level: c_int,
        name: c_int,
        value: *mut c_void,
        len: *mut u32,
    ) -> c_int;
    pub fn syscall(number: c_long, ...) -> c_long;
    pub fn fcntl(fd: c_int, cmd: c_int, ...) -> c_int;
    pub fn flock(fd: c_int, operation: c_int) -> c_int;
    pub fn getrusage(who: c_int, usage: *mut Rusage) -> c_int;
    pub fn mallopt(param: c_int, value: c_int) -> c_int;
    fn __errno_location() -> *mut c_int;
}

/// The calling thread's errno.
pub fn errno() -> i32 {
    unsafe { *__errno_location() }
}
