"""Helpers for the black-box tests that drive `blockfork serve` with libnbd's Python binding.

test/blackbox/*.test.ts run snippets under nbdsh with PYTHONPATH-like access to this directory
(env PYLIB) and URI set to the export. Everything here fails with an AssertionError whose message
says what was expected and what came back; nbdsh then exits non-zero and the test fails.
"""

import errno
import hashlib
import os

import nbd

MiB = 1024 * 1024


def connect(uri=None, strict=True, structured=True, meta=True, name=None):
    """A handle connected to URI (default: env URI).

    strict=False turns off libnbd's client-side checks (bounds, alignment, flags, zero size,
    read-only) so that bad requests really reach the server.
    """
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if name is not None:
        h.set_export_name(name)
    h.connect_uri(uri or os.environ["URI"])
    return h


def sha(data):
    return hashlib.sha256(bytes(data)).hexdigest()


def ename(n):
    return errno.errorcode.get(n, str(n)) if n is not None else "success"


def server_error(h, want, fn, *args):
    """Call fn(*args): it must put a command on the wire and fail with errno `want`.

    libnbd's debug stream shows whether the call issued a command ("event CmdIssue") and got
    a reply back ("REPLY.FINISH_COMMAND"): an errno produced by libnbd's own client-side checks
    would satisfy a plain errno comparison without the server ever seeing the request.
    """
    msgs = []
    h.set_debug_callback(lambda _ctx, m: msgs.append(m))
    h.set_debug(True)
    got = None
    text = "success"
    try:
        fn(*args)
    except nbd.Error as e:
        got = e.errnum
        text = e.string
    finally:
        h.set_debug(False)
        h.clear_debug_callback()
    shown = tuple("<%d bytes>" % len(a) if isinstance(a, (bytes, bytearray)) else a for a in args)
    what = "%s%r" % (getattr(fn, "__name__", fn), shown)
    issued = any("event CmdIssue" in m for m in msgs)
    replied = any("REPLY.FINISH_COMMAND" in m for m in msgs)
    assert issued, "%s: libnbd refused the call itself (%s); the server never saw it" % (what, text)
    assert replied and h.aio_is_ready(), "%s: sent, but the connection died instead of a reply: %s" % (what, text)
    assert got == want, "%s: expected %s from the server, got %s (%s)" % (what, ename(want), ename(got), text)


def extents(h, length, offset, flags=0):
    """base:allocation extents of one BLOCK_STATUS call as [(offset, length, flags)]."""
    out = []

    def cb(metacontext, off, entries, err):
        assert metacontext == nbd.CONTEXT_BASE_ALLOCATION, metacontext
        pos = off
        for i in range(0, len(entries), 2):
            out.append((pos, entries[i], entries[i + 1]))
            pos += entries[i]
        return 0

    h.block_status(length, offset, cb, flags)
    return out


def full_map(h, length=None, offset=0):
    """Extents of [offset, offset+length) by repeated BLOCK_STATUS, merged by flags."""
    end = offset + (length if length is not None else h.get_size() - offset)
    out = []
    pos = offset
    while pos < end:
        got = extents(h, min(end - pos, 1 << 30), pos)
        assert got and got[0][0] == pos, "block status at %d answered %r" % (pos, got[:3])
        for off, ln, fl in got:
            ln = min(ln, end - off)
            if ln <= 0:
                break
            if out and out[-1][2] == fl and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + ln, fl)
            else:
                out.append((off, ln, fl))
            pos = off + ln
    return out


def expect_map(h, want, length=None, offset=0):
    got = full_map(h, length, offset)
    assert got == want, "block status map:\n  got  %r\n  want %r" % (got, want)
