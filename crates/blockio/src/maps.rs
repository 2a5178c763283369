//! Read-only windows onto registered files, so that send_pieces (ops.rs) can send their bytes
//! with one copy, page cache to socket buffer inside sendmsg(2), instead of two (pread into a
//! buffer, then send). The copy still happens during the call, so what is sent is the file as it
//! is at that moment, exactly as with pread; no page reference outlives the call (unlike sendfile).
//!
//! - Only the kernel touches these mappings (as the source of a sendmsg). A page that cannot be
//!   read (an I/O error, a truncated file, past the end) then makes sendmsg fail with EFAULT
//!   instead of raising SIGBUS, and send_pieces falls back to pread, which reports the error.
//!   Nothing in user space ever dereferences a window.
//! - A file is registered by its descriptor and must be forgotten before that descriptor is
//!   closed: a window holds its own reference to the file, so after the number is reused it would
//!   still show the old file. BlockFile (src/blockio/index.ts) does both.
//! - Windows are WINDOW bytes at WINDOW-aligned offsets, mapped on first use, at most
//!   MAX_WINDOWS at a time, the least recently used unmapped first (never one in use by the
//!   current send): address space and page tables stay bounded whatever the volume's size
//!   (16 GiB mapped, at most 32 MiB of page tables).
//! - A send maps at most FRESH_PER_SEND new windows; pieces beyond them are read with pread. A
//!   send whose pieces are spread over more files or windows than the registry keeps (a snapshot
//!   over a long journal: one window per 64 MiB segment) would otherwise mmap and munmap on
//!   most pieces, which could cost more than the copies it saves (reasoned, not measured).
//! - A file that cannot be mapped (mmap fails) is dropped from the registry: pread from then on.

use crate::sys::*;
use std::os::raw::{c_int, c_void};
use std::sync::{Mutex, MutexGuard};

const WINDOW: u64 = 64 << 20;
const MAX_WINDOWS: usize = 256;
const FRESH_PER_SEND: u32 = 2;

struct Window {
    fd: c_int,
    index: u64,
    addr: *mut u8,
    len: usize,
    /// The send that used it last (see Maps::begin).
    used: u64,
}

/// The registry: files that may be mapped (descriptor, bytes that may be mapped) and their windows.
pub struct Maps {
    files: Vec<(c_int, u64)>,
    windows: Vec<Window>,
    call: u64,
    /// Windows mapped by the current send.
    fresh: u32,
}

// The raw window addresses are only handed to the kernel; the mutex serializes every use.
unsafe impl Send for Maps {}

static MAPS: Mutex<Maps> = Mutex::new(Maps {
    files: Vec::new(),
    windows: Vec::new(),
    call: 0,
    fresh: 0,
});

/// The registry, locked (a panic elsewhere never leaves it unusable).
pub fn lock() -> MutexGuard<'static, Maps> {
    MAPS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Allow windows onto `fd`, at most `limit` bytes from its start (a block device's size; a
/// regular file may be mapped past its end, harmlessly: see the module notes).
pub fn register(fd: c_int, limit: u64) {
    let mut m = lock();
    m.drop_fd(fd);
    m.files.push((fd, limit));
}

/// Unmap every window onto `fd` and stop mapping it: call before closing `fd`.
pub fn forget(fd: c_int) {
    lock().drop_fd(fd);
}

/// Windows mapped now (for tests).
pub fn mapped_windows() -> usize {
    lock().windows.len()
}

impl Maps {
    fn drop_fd(&mut self, fd: c_int) {
        self.files.retain(|f| f.0 != fd);
        self.windows.retain(|w| {
            if w.fd == fd {
                unsafe { munmap(w.addr as *mut c_void, w.len) };
                false
            } else {
                true
            }
        });
    }

    /// A new send begins: the windows it uses are not unmapped before the next one begins.
    pub fn begin(&mut self) {
        self.call += 1;
        self.fresh = 0;
    }

    /// The address of `fd`'s byte at `off` and how many bytes follow it in the same window (at
    /// most `len`), or None when `fd` is not to be mapped there.
    pub fn at(&mut self, fd: c_int, off: u64, len: usize) -> Option<(*const u8, usize)> {
        let limit = self.files.iter().find(|f| f.0 == fd)?.1;
        if off >= limit {
            return None;
        }
        let index = off / WINDOW;
        let i = match self
            .windows
            .iter()
            .position(|w| w.fd == fd && w.index == index)
        {
            Some(i) => i,
            None if self.fresh < FRESH_PER_SEND => {
                self.fresh += 1;
                self.map(fd, index, limit)?
            }
            None => return None,
        };
        let w = &mut self.windows[i];
        w.used = self.call;
        let within = (off - index * WINDOW) as usize;
        if within >= w.len {
            return None;
        }
        Some((unsafe { w.addr.add(within) }, (w.len - within).min(len)))
    }

    fn map(&mut self, fd: c_int, index: u64, limit: u64) -> Option<usize> {
        if self.windows.len() >= MAX_WINDOWS {
            let call = self.call;
            let (i, _) = self
                .windows
                .iter()
                .enumerate()
                .filter(|(_, w)| w.used != call)
                .min_by_key(|(_, w)| w.used)?;
            let w = self.windows.swap_remove(i);
            unsafe { munmap(w.addr as *mut c_void, w.len) };
        }
        let start = index * WINDOW;
        let len = (limit - start).min(WINDOW) as usize;
        let addr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                PROT_READ,
                MAP_SHARED,
                fd,
                start as i64,
            )
        };
        if addr as usize == usize::MAX {
            // MAP_FAILED: pread from now on. Its windows (none, or some mapped before a failure
            // such as ENOMEM) stay until forget(): the current send may be using them.
            self.files.retain(|f| f.0 != fd);
            return None;
        }
        self.windows.push(Window {
            fd,
            index,
            addr: addr as *mut u8,
            len,
            used: self.call,
        });
        Some(self.windows.len() - 1)
    }
}
