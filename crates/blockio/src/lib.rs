//! blockio: the native block I/O addon of blockfork.
//!
//! Design notes
//! - Two ways in. The `*Nowait` functions run one non-blocking syscall on the JS thread
//!   (preadv2/pwritev2 with RWF_NOWAIT): when the data is in the page cache this costs about as
//!   much as the syscall itself, far less than a trip through the thread pool (~7-13 µs of CPU per
//!   crossing here). When the kernel would block it answers EAGAIN and the caller falls back to
//!   `submit`.
//! - `submit` takes a whole batch of operations (a Float64Array of descriptors, one buffer per
//!   operation, a Float64Array for results) and runs them in order on one libuv pool thread as one
//!   napi async work: one crossing for many requests, in both directions. The TypeScript wrapper
//!   (src/blockio) splits a large batch over several works to keep the disk busy.
//! - Buffers stay owned by JS: the wrapper keeps every buffer, the descriptor and result arrays
//!   referenced until the completion callback runs, so the backing stores cannot be collected
//!   while a pool thread uses them (V8 never moves an ArrayBuffer's backing store).
//! - `sendPieces` sends a snapshot's lent read (file pieces) on a socket during the call: copied
//!   from read-only mappings of registered files (maps.rs: one copy, page cache to socket) or read
//!   into a buffer first; pieces of files that never change may go by sendfile.
//! - No third-party crates: crates.io is unreachable here. N-API and the few libc calls std does
//!   not wrap are declared by hand (napi.rs, sys.rs).

mod crc;
mod maps;
mod napi;
mod ops;
mod sys;

use napi::*;
use std::os::raw::{c_char, c_void};
use std::ptr;

const OP_READ: u32 = 0;
const OP_WRITE: u32 = 1;
const OP_SYNC: u32 = 2;
const OP_FALLOCATE: u32 = 3;
const OP_EXTENTS: u32 = 4;
const OP_ADVISE: u32 = 5;
const OP_WRITE_ZEROES: u32 = 6;
/// What submit makes of an operation with a bad fd, offset, length or flags: EINVAL.
const OP_INVALID: u32 = u32::MAX;
const DESC_FIELDS: usize = 5;

struct Op {
    kind: u32,
    fd: i32,
    offset: i64,
    length: i64,
    flags: i32,
    ptr: *mut u8,
    cap: usize,
}

struct Batch {
    ops: Vec<Op>,
    results: *mut f64,
    callback: napi_ref,
    work: napi_async_work,
}

unsafe fn throw(env: napi_env, msg: &str) -> napi_value {
    let mut text = msg.as_bytes().to_vec();
    text.push(0);
    napi_throw_error(env, ptr::null(), text.as_ptr() as *const c_char);
    ptr::null_mut()
}

unsafe fn args<const N: usize>(env: napi_env, info: napi_callback_info) -> Option<[napi_value; N]> {
    let mut argv: [napi_value; N] = [ptr::null_mut(); N];
    let mut argc = N;
    if napi_get_cb_info(
        env,
        info,
        &mut argc,
        argv.as_mut_ptr(),
        ptr::null_mut(),
        ptr::null_mut(),
    ) != NAPI_OK
        || argc < N
    {
        return None;
    }
    Some(argv)
}

unsafe fn num(env: napi_env, v: napi_value) -> Option<f64> {
    let mut d = 0f64;
    if napi_get_value_double(env, v, &mut d) != NAPI_OK {
        return None;
    }
    Some(d)
}

/// A byte offset or length: a whole number in [0, 2^53]. NaN, fractions, negatives and
/// infinities are refused (an `as i64` would turn NaN into 0 and keep -1, which preadv2 and
/// pwritev2 read as "the file position").
fn is_pos(d: f64) -> bool {
    d.is_finite() && d >= 0.0 && d.fract() == 0.0 && d <= 9007199254740992.0
}

/// A file descriptor: a whole number in [0, i32::MAX].
fn is_fd(d: f64) -> bool {
    is_pos(d) && d <= i32::MAX as f64
}

/// An offset or length from JS (see is_pos).
unsafe fn pos(env: napi_env, v: napi_value) -> Option<i64> {
    let d = num(env, v)?;
    is_pos(d).then_some(d as i64)
}

/// A file descriptor from JS (see is_fd).
unsafe fn fd_arg(env: napi_env, v: napi_value) -> Option<i32> {
    let d = num(env, v)?;
    is_fd(d).then_some(d as i32)
}

/// `n` f64s at `p` (Node gives a null pointer for an empty typed array, which
/// `slice::from_raw_parts` must never see).
unsafe fn f64s<'a>(p: *const f64, n: usize) -> &'a [f64] {
    if n == 0 || p.is_null() {
        &[]
    } else {
        std::slice::from_raw_parts(p, n)
    }
}

unsafe fn bytes(env: napi_env, v: napi_value) -> Option<(*mut u8, usize)> {
    let mut data: *mut c_void = ptr::null_mut();
    let mut len = 0usize;
    if napi_get_buffer_info(env, v, &mut data, &mut len) != NAPI_OK {
        return None;
    }
    Some((data as *mut u8, len))
}

unsafe fn number(env: napi_env, value: f64) -> napi_value {
    let mut out = ptr::null_mut();
    napi_create_double(env, value, &mut out);
    out
}

/// Parse (fd, buffer, offset) for the fast paths.
unsafe fn fd_buf_off(
    env: napi_env,
    info: napi_callback_info,
) -> Option<(i32, *mut u8, usize, i64)> {
    let a = args::<3>(env, info)?;
    let fd = fd_arg(env, a[0])?;
    let (p, len) = bytes(env, a[1])?;
    let off = pos(env, a[2])?;
    Some((fd, p, len, off))
}

/// readNowait(fd, buf, offset): bytes read from the page cache without blocking, or -errno
/// (-EAGAIN when the data is not cached, -EOPNOTSUPP where RWF_NOWAIT is unsupported).
unsafe extern "C" fn read_nowait(env: napi_env, info: napi_callback_info) -> napi_value {
    match fd_buf_off(env, info) {
        Some((fd, p, len, off)) => number(env, ops::read_nowait(fd, p, len, off) as f64),
        None => throw(env, "readNowait(fd, buffer, offset): bad arguments"),
    }
}

/// writeNowait(fd, buf, offset): bytes written into the page cache without blocking, or -errno.
unsafe extern "C" fn write_nowait(env: napi_env, info: napi_callback_info) -> napi_value {
    match fd_buf_off(env, info) {
        Some((fd, p, len, off)) => number(env, ops::write_nowait(fd, p, len, off) as f64),
        None => throw(env, "writeNowait(fd, buffer, offset): bad arguments"),
    }
}

/// readInline(fd, buf, offset): a blocking pread on the JS thread (bytes read, or -errno). For
/// ranges the caller found in the page cache (cachestat) on files where RWF_NOWAIT reads are
/// unsupported (tmpfs).
unsafe extern "C" fn read_inline(env: napi_env, info: napi_callback_info) -> napi_value {
    match fd_buf_off(env, info) {
        Some((fd, p, len, off)) => number(env, ops::read_full(fd, p, len, off) as f64),
        None => throw(env, "readInline(fd, buffer, offset): bad arguments"),
    }
}

/// writeInline(fd, buf, offset): a blocking pwrite on the JS thread, or -errno. For buffered writes
/// that the caller judged safe (page-cache writes that need no read-modify-write from disk); used
/// where RWF_NOWAIT writes are unsupported (ext4 answers EOPNOTSUPP to them).
unsafe extern "C" fn write_inline(env: napi_env, info: napi_callback_info) -> napi_value {
    match fd_buf_off(env, info) {
        Some((fd, p, len, off)) => number(env, ops::write_full(fd, p, len, off, false) as f64),
        None => throw(env, "writeInline(fd, buffer, offset): bad arguments"),
    }
}

/// extentsSync(fd, offset, length, out: Float64Array): number of (length, flags) pairs or -errno.
unsafe extern "C" fn extents_sync(env: napi_env, info: napi_callback_info) -> napi_value {
    let parsed = (|| {
        let a = args::<4>(env, info)?;
        let fd = fd_arg(env, a[0])?;
        let off = pos(env, a[1])?;
        let len = pos(env, a[2])?;
        let (p, cap) = bytes(env, a[3])?;
        Some((fd, off, len, p, cap))
    })();
    match parsed {
        Some((fd, off, len, p, cap)) => number(
            env,
            ops::extents(fd, off, len, p as *mut f64, cap / 16) as f64,
        ),
        None => throw(env, "extentsSync(fd, offset, length, out): bad arguments"),
    }
}

/// cachedBytes(fd, offset, length): bytes of the range in the page cache, or -errno.
unsafe extern "C" fn cached_bytes(env: napi_env, info: napi_callback_info) -> napi_value {
    let parsed = (|| {
        let a = args::<3>(env, info)?;
        Some((fd_arg(env, a[0])?, pos(env, a[1])?, pos(env, a[2])?))
    })();
    match parsed {
        Some((fd, off, len)) => number(env, ops::cached_bytes(fd, off, len) as f64),
        None => throw(env, "cachedBytes(fd, offset, length): bad arguments"),
    }
}

/// sendPieces(sock, header, pieces: Float64Array, skip, copyFd): header (at most 64 KiB), then
/// (fd, offset, length) triples of file data or zeroes (fd -1) less their first `skip` bytes;
/// pieces of `copyFd` (all when -2) copied, the others with sendfile (see ops::send_pieces);
/// bytes sent in all, stopping at EAGAIN; -errno when the connection failed before anything was
/// sent.
unsafe extern "C" fn send_pieces(env: napi_env, info: napi_callback_info) -> napi_value {
    let parsed = (|| {
        let a = args::<5>(env, info)?;
        let sock = fd_arg(env, a[0])?;
        let (hp, hl) = bytes(env, a[1])?;
        let (pp, pl) = bytes(env, a[2])?;
        let skip = pos(env, a[3])? as usize;
        let copy_fd = num(env, a[4])?;
        // A descriptor, or -1 (none) / -2 (all pieces copied).
        if !(copy_fd.fract() == 0.0 && copy_fd >= -2.0 && copy_fd <= i32::MAX as f64) {
            return None;
        }
        let copy_fd = copy_fd as i32;
        if hl > 65536 {
            return None;
        }
        Some((sock, hp, hl, pp, pl / 8, skip, copy_fd))
    })();
    match parsed {
        Some((sock, hp, hl, pp, n, skip, copy_fd)) => {
            let pieces = f64s(pp as *const f64, n - n % 3);
            number(
                env,
                ops::send_pieces(sock, hp, hl, pieces, skip, copy_fd) as f64,
            )
        }
        None => throw(
            env,
            "sendPieces(sock, header, pieces, skip, copyFd): bad arguments",
        ),
    }
}

/// mapRegister(fd, limit): let sendPieces send `fd`'s copied pieces from read-only mappings of
/// at most `limit` bytes from its start (-1: no limit, for regular files); see maps.rs. The
/// caller must call mapForget(fd) before closing `fd`.
unsafe extern "C" fn map_register(env: napi_env, info: napi_callback_info) -> napi_value {
    let parsed = (|| {
        let a = args::<2>(env, info)?;
        Some((num(env, a[0])? as i32, num(env, a[1])?))
    })();
    match parsed {
        Some((fd, limit)) if fd >= 0 => {
            maps::register(fd, if limit < 0.0 { u64::MAX } else { limit as u64 });
            number(env, 0.0)
        }
        _ => throw(env, "mapRegister(fd, limit): bad arguments"),
    }
}

/// mapForget(fd): unmap every window onto `fd` and stop mapping it.
unsafe extern "C" fn map_forget(env: napi_env, info: napi_callback_info) -> napi_value {
    match args::<1>(env, info).and_then(|a| num(env, a[0])) {
        Some(fd) => {
            maps::forget(fd as i32);
            number(env, 0.0)
        }
        None => throw(env, "mapForget(fd): bad arguments"),
    }
}

/// mappedWindows(): windows mapped now, onto every registered file (for tests).
unsafe extern "C" fn mapped_windows(env: napi_env, _info: napi_callback_info) -> napi_value {
    number(env, maps::mapped_windows() as f64)
}

/// dupFd(fd): a close-on-exec duplicate of a descriptor, or -errno.
unsafe extern "C" fn dup_fd(env: napi_env, info: napi_callback_info) -> napi_value {
    match args::<1>(env, info).and_then(|a| num(env, a[0])) {
        Some(fd) => number(env, ops::dup_fd(fd as i32) as f64),
        None => throw(env, "dupFd(fd): bad arguments"),
    }
}

/// sendNow(sock, buf): non-blocking send of a whole buffer; bytes sent (stops at EAGAIN), or -errno.
unsafe extern "C" fn send_now(env: napi_env, info: napi_callback_info) -> napi_value {
    let parsed = (|| {
        let a = args::<2>(env, info)?;
        Some((num(env, a[0])? as i32, bytes(env, a[1])?))
    })();
    match parsed {
        Some((sock, (p, len))) => number(env, ops::send_now(sock, p, len) as f64),
        None => throw(env, "sendNow(sock, buffer): bad arguments"),
    }
}

/// recvNowait(sock, buf): non-blocking recv into a buffer; bytes (0 at end of stream) or -errno.
unsafe extern "C" fn recv_nowait(env: napi_env, info: napi_callback_info) -> napi_value {
    let parsed = (|| {
        let a = args::<2>(env, info)?;
        Some((num(env, a[0])? as i32, bytes(env, a[1])?))
    })();
    match parsed {
        Some((sock, (p, len))) => number(env, ops::recv_nowait(sock, p, len) as f64),
        None => throw(env, "recvNowait(sock, buffer): bad arguments"),
    }
}

/// setSendBuffer(sock, bytes): SO_SNDBUF; the size the kernel then reports, or -errno.
unsafe extern "C" fn set_send_buffer(env: napi_env, info: napi_callback_info) -> napi_value {
    let parsed = (|| {
        let a = args::<2>(env, info)?;
        Some((num(env, a[0])? as i32, num(env, a[1])?))
    })();
    match parsed {
        Some((sock, n)) if (0.0..=i32::MAX as f64).contains(&n) => {
            number(env, ops::set_send_buffer(sock, n as i32) as f64)
        }
        _ => throw(env, "setSendBuffer(sock, bytes): bad arguments"),
    }
}

/// tuneMalloc(mmapThreshold, trimThreshold, topPad): see ops::tune_malloc; true when applied.
unsafe extern "C" fn tune_malloc(env: napi_env, info: napi_callback_info) -> napi_value {
    let parsed = (|| {
        let a = args::<3>(env, info)?;
        let v = [num(env, a[0])?, num(env, a[1])?, num(env, a[2])?];
        if v.iter().all(|x| (0.0..=i32::MAX as f64).contains(x)) {
            Some(v)
        } else {
            None
        }
    })();
    match parsed {
        Some(v) => number(
            env,
            if ops::tune_malloc(v[0] as i32, v[1] as i32, v[2] as i32) {
                1.0
            } else {
                0.0
            },
        ),
        None => throw(
            env,
            "tuneMalloc(mmapThreshold, trimThreshold, topPad): bad arguments",
        ),
    }
}

/// lockFd(fd, exclusive): a non-blocking flock, LOCK_EX when `exclusive` is non-zero, else
/// LOCK_SH; 0 or -errno.
unsafe extern "C" fn lock_fd(env: napi_env, info: napi_callback_info) -> napi_value {
    let parsed = (|| {
        let a = args::<2>(env, info)?;
        Some((num(env, a[0])?, num(env, a[1])? != 0.0))
    })();
    match parsed {
        Some((fd, ex)) => number(env, ops::lock_fd(fd as i32, ex) as f64),
        None => throw(env, "lockFd(fd, exclusive): bad arguments"),
    }
}

/// threadSleeps(): voluntary context switches of the calling (JS) thread so far, or -errno.
unsafe extern "C" fn thread_sleeps(env: napi_env, _info: napi_callback_info) -> napi_value {
    number(env, ops::thread_sleeps() as f64)
}

/// crc32c(buf, seed): CRC32C of a buffer, continuing from `seed` (0 to start).
unsafe extern "C" fn crc32c(env: napi_env, info: napi_callback_info) -> napi_value {
    let parsed = (|| {
        let a = args::<2>(env, info)?;
        let (p, len) = bytes(env, a[0])?;
        let seed = num(env, a[1])? as u32;
        Some((p, len, seed))
    })();
    match parsed {
        Some((p, len, seed)) => {
            let data = if len == 0 {
                &[][..]
            } else {
                std::slice::from_raw_parts(p as *const u8, len)
            };
            number(env, crc::crc32c(seed, data) as f64)
        }
        None => throw(env, "crc32c(buffer, seed): bad arguments"),
    }
}

/// deviceSize(fd): size in bytes of a block device (BLKGETSIZE64), or -errno.
unsafe extern "C" fn device_size(env: napi_env, info: napi_callback_info) -> napi_value {
    match args::<1>(env, info).and_then(|a| num(env, a[0])) {
        Some(fd) => number(env, ops::device_size(fd as i32) as f64),
        None => throw(env, "deviceSize(fd): bad arguments"),
    }
}

fn run(op: &Op) -> i64 {
    match op.kind {
        OP_READ => {
            let n = std::cmp::min(op.length as usize, op.cap);
            ops::read_full(op.fd, op.ptr, n, op.offset)
        }
        OP_WRITE => {
            let n = std::cmp::min(op.length as usize, op.cap);
            ops::write_full(op.fd, op.ptr, n, op.offset, op.flags & 1 != 0)
        }
        OP_SYNC => ops::sync(op.fd, op.flags & 1 != 0),
        OP_FALLOCATE => ops::allocate(op.fd, op.flags, op.offset, op.length),
        OP_EXTENTS => ops::extents(op.fd, op.offset, op.length, op.ptr as *mut f64, op.cap / 16),
        OP_ADVISE => ops::advise_willneed(op.fd, op.offset, op.length),
        OP_WRITE_ZEROES => ops::write_zeroes(op.fd, op.offset, op.length, op.flags & 1 != 0),
        _ => -(sys::EINVAL as i64),
    }
}

unsafe extern "C" fn batch_execute(_env: napi_env, data: *mut c_void) {
    let batch = &mut *(data as *mut Batch);
    for (i, op) in batch.ops.iter().enumerate() {
        *batch.results.add(i) = run(op) as f64;
    }
}

unsafe extern "C" fn batch_complete(env: napi_env, _status: napi_status, data: *mut c_void) {
    let batch = Box::from_raw(data as *mut Batch);
    let mut cb = ptr::null_mut();
    let mut recv = ptr::null_mut();
    napi_get_reference_value(env, batch.callback, &mut cb);
    napi_get_undefined(env, &mut recv);
    napi_delete_reference(env, batch.callback);
    napi_delete_async_work(env, batch.work);
    let mut ignored = ptr::null_mut();
    // An exception thrown by the callback stays pending; Node reports it as uncaught.
    napi_call_function(env, recv, cb, 0, ptr::null(), &mut ignored);
}

/// submit(desc: Float64Array, bufs: Array, results: Float64Array, callback): queue a batch.
/// desc holds 5 numbers per operation: kind, fd, offset, length, flags.
unsafe extern "C" fn submit(env: napi_env, info: napi_callback_info) -> napi_value {
    let a = match args::<4>(env, info) {
        Some(a) => a,
        None => {
            return throw(
                env,
                "submit(desc, bufs, results, callback): missing arguments",
            )
        }
    };
    let (desc_p, desc_len) = match bytes(env, a[0]) {
        Some(x) => x,
        None => return throw(env, "submit: desc must be a Float64Array"),
    };
    let (res_p, res_len) = match bytes(env, a[2]) {
        Some(x) => x,
        None => return throw(env, "submit: results must be a Float64Array"),
    };
    let count = desc_len / 8 / DESC_FIELDS;
    if res_len / 8 < count {
        return throw(env, "submit: results array is shorter than the batch");
    }
    let desc = f64s(desc_p as *const f64, count * DESC_FIELDS);
    let mut ops = Vec::with_capacity(count);
    for i in 0..count {
        let d = &desc[i * DESC_FIELDS..(i + 1) * DESC_FIELDS];
        let kind = d[0] as u32;
        // fd, offset, length and flags as fd_arg() and pos() take them; an operation with any
        // other is answered EINVAL (through the batch's results, like any failed operation).
        let kind = if is_fd(d[1]) && is_pos(d[2]) && is_pos(d[3]) && is_pos(d[4]) {
            kind
        } else {
            OP_INVALID
        };
        let (mut p, mut cap) = (ptr::null_mut(), 0usize);
        if kind == OP_READ || kind == OP_WRITE || kind == OP_EXTENTS {
            let mut el = ptr::null_mut();
            if napi_get_element(env, a[1], i as u32, &mut el) != NAPI_OK {
                return throw(env, "submit: bufs must be an array");
            }
            match bytes(env, el) {
                Some((bp, bl)) => {
                    p = bp;
                    cap = bl;
                }
                None => return throw(env, "submit: operation needs a buffer"),
            }
        }
        ops.push(Op {
            kind,
            fd: d[1] as i32,
            offset: d[2] as i64,
            length: d[3] as i64,
            flags: d[4] as i32,
            ptr: p,
            cap,
        });
    }
    let mut callback = ptr::null_mut();
    if napi_create_reference(env, a[3], 1, &mut callback) != NAPI_OK {
        return throw(env, "submit: callback must be a function");
    }
    let batch = Box::into_raw(Box::new(Batch {
        ops,
        results: res_p as *mut f64,
        callback,
        work: ptr::null_mut(),
    }));
    let mut name = ptr::null_mut();
    let label = b"blockio";
    napi_create_string_utf8(env, label.as_ptr() as *const c_char, label.len(), &mut name);
    let mut work = ptr::null_mut();
    if napi_create_async_work(
        env,
        ptr::null_mut(),
        name,
        batch_execute,
        batch_complete,
        batch as *mut c_void,
        &mut work,
    ) != NAPI_OK
    {
        let b = Box::from_raw(batch);
        napi_delete_reference(env, b.callback);
        return throw(env, "submit: napi_create_async_work failed");
    }
    (*batch).work = work;
    if napi_queue_async_work(env, work) != NAPI_OK {
        let b = Box::from_raw(batch);
        napi_delete_reference(env, b.callback);
        napi_delete_async_work(env, work);
        return throw(env, "submit: napi_queue_async_work failed");
    }
    let mut undef = ptr::null_mut();
    napi_get_undefined(env, &mut undef);
    undef
}

unsafe fn export(env: napi_env, exports: napi_value, name: &[u8], f: napi_callback) {
    let mut func = ptr::null_mut();
    napi_create_function(
        env,
        name.as_ptr() as *const c_char,
        name.len() - 1,
        f,
        ptr::null_mut(),
        &mut func,
    );
    napi_set_named_property(env, exports, name.as_ptr() as *const c_char, func);
}

/// Module entry point, found by Node by name when it loads the `.node` file.
///
/// # Safety
/// Called by Node with a valid environment and exports object.
#[no_mangle]
pub unsafe extern "C" fn napi_register_module_v1(env: napi_env, exports: napi_value) -> napi_value {
    export(env, exports, b"readNowait\0", read_nowait);
    export(env, exports, b"writeNowait\0", write_nowait);
    export(env, exports, b"readInline\0", read_inline);
    export(env, exports, b"writeInline\0", write_inline);
    export(env, exports, b"extentsSync\0", extents_sync);
    export(env, exports, b"deviceSize\0", device_size);
    export(env, exports, b"cachedBytes\0", cached_bytes);
    export(env, exports, b"sendPieces\0", send_pieces);
    export(env, exports, b"mapRegister\0", map_register);
    export(env, exports, b"mapForget\0", map_forget);
    export(env, exports, b"mappedWindows\0", mapped_windows);
    export(env, exports, b"dupFd\0", dup_fd);
    export(env, exports, b"lockFd\0", lock_fd);
    export(env, exports, b"sendNow\0", send_now);
    export(env, exports, b"setSendBuffer\0", set_send_buffer);
    export(env, exports, b"tuneMalloc\0", tune_malloc);
    export(env, exports, b"recvNowait\0", recv_nowait);
    export(env, exports, b"threadSleeps\0", thread_sleeps);
    export(env, exports, b"crc32c\0", crc32c);
    export(env, exports, b"submit\0", submit);
    exports
}
