"""The launcher's runtime directory, /tmp/ucm-<uid>/<digest>, and the files in it.

It holds the launch lock, the engine's log and the record of the engine the
launcher started (pid and settings). It must be a real directory of this
user that nobody else can write: another user who could plant a symbolic
link there could make us write through it. So the directory is checked
(owner, mode, not a link) and every file in it is opened relative to the
directory's descriptor, never through a symbolic link; files written whole
are new files renamed over the name, which replaces a link instead of
following it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
from typing import Any

RECORD = "engine.json"
LOG = "engine.log"


class RuntimeDirError(RuntimeError):
    """The runtime directory (or its parent) is not safe to use."""


def secure_runtime_dir(rdir: str) -> int:
    """Creates rdir and its parent (mode 0700) where missing and returns an
    O_DIRECTORY descriptor of rdir. Refuses, naming the path, its owner and
    mode, a directory that is a symbolic link, belongs to another user or is
    writable by group or others. Never changes the mode of a directory it did
    not create."""
    uid = os.getuid()
    for d in (os.path.dirname(rdir), rdir):
        created = False
        try:
            os.mkdir(d, 0o700)
            created = True
        except FileExistsError:
            pass
        st = os.lstat(d)
        problem = None
        if stat.S_ISLNK(st.st_mode):
            problem = "a symbolic link"
        elif not stat.S_ISDIR(st.st_mode):
            problem = "not a directory"
        elif st.st_uid != uid:
            problem = (
                f"owned by uid {st.st_uid}, not by this user: another user made it (and could serve a fake engine "
                f"from it)"
            )
        elif st.st_mode & 0o022:
            problem = "writable by other users"
        if problem:
            raise RuntimeDirError(
                f"runtime directory {d} is {problem} (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}); "
                f"this process runs as uid {uid}. It holds the engine's lock, log and socket, so it must be a real "
                f"directory of this user that nobody else can write: remove it (as root or its owner; it is created "
                f"again with mode 0700), set XDG_RUNTIME_DIR to a private directory of yours (systemd's "
                f"/run/user/{uid} is one), or point TMPDIR elsewhere"
            )
        if created and stat.S_IMODE(st.st_mode) != 0o700:  # a umask took bits we need: ours to fix
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
    fd = os.open(rdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st, lst = os.fstat(fd), os.lstat(rdir)
    if (st.st_dev, st.st_ino) != (lst.st_dev, lst.st_ino):
        os.close(fd)
        raise RuntimeDirError(f"runtime directory {rdir} was replaced while it was being opened")
    return fd


def open_in(dir_fd: int, rdir: str, name: str, flags: int, mode: int = 0o600) -> int:
    """Opens rdir/name relative to dir_fd, never through a symbolic link, and
    only a regular file of this user."""
    path = os.path.join(rdir, name)
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RuntimeDirError(f"{path} is a symbolic link; refusing to open it (remove it)") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        os.close(fd)
        raise RuntimeDirError(
            f"{path} is not a regular file of uid {os.getuid()} (owner uid {st.st_uid}, "
            f"mode {stat.S_IMODE(st.st_mode):04o}); remove it"
        )
    return fd


def write_in(dir_fd: int, rdir: str, name: str, data: bytes) -> str:
    """Writes rdir/name whole: a new file (O_EXCL, never through a link)
    renamed over the old name, which replaces a link rather than follows it."""
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = open_in(dir_fd, rdir, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    return os.path.join(rdir, name)


def read_record(dir_fd: int, rdir: str) -> dict[str, Any] | None:
    try:
        fd = open_in(dir_fd, rdir, RECORD, os.O_RDONLY)
    except (OSError, RuntimeDirError):
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            rec = json.loads(f.read(1 << 20) or b"null")
        return rec if isinstance(rec, dict) else None
    except ValueError:
        return None


def open_log(rdir: str, dir_fd: int) -> tuple[int, str]:
    """The engine's log: UCM_ENGINE_LOG (appended to), or engine.log in the
    runtime directory (the previous engine's kept as engine.log.1). Opened
    for reading too: the launcher reads an engine's reason for exiting at
    startup from it (startup_reason)."""
    path = os.environ.get("UCM_ENGINE_LOG")
    if path:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600), path
    try:
        os.replace(LOG, LOG + ".1", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # moves a link, never follows it
    except FileNotFoundError:
        pass
    return open_in(dir_fd, rdir, LOG, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND), os.path.join(rdir, LOG)


#: how the engine writes an error line (core/log.ts; core/cli.ts writes the
#: reason it exits for so, as its last line)
_ERROR_LINE = "[UCMNFSSTORE] [E] "
_NODE_ERROR = re.compile(r"\b[A-Za-z]*Error\b:")


def startup_reason(log_fd: int, offset: int, limit: int = 1 << 16) -> str | None:
    """Why an engine that exited at startup did, in one line, from what it
    wrote to its log after byte `offset`: its last error line (the reason
    core/cli.ts prints before exiting: a config error names the key and the
    value), else the first line of a Node.js exception, else its last line.
    None when it wrote nothing."""
    try:
        size = os.fstat(log_fd).st_size
        start = max(offset, size - limit)
        data = os.pread(log_fd, size - start, start) if size > start else b""
    except OSError:
        return None
    lines = data.decode("utf-8", "replace").splitlines()
    if start > offset and lines:
        lines = lines[1:]  # began mid-line
    lines = [ln.strip() for ln in lines if ln.strip()]
    if not lines:
        return None
    errors = [ln for ln in lines if ln.startswith(_ERROR_LINE)]
    if errors:
        reason = errors[-1][len(_ERROR_LINE) :]
    else:
        reason = next((ln for ln in lines if _NODE_ERROR.search(ln)), lines[-1])
    reason = "".join(c if c.isprintable() else "?" for c in reason)
    return reason if len(reason) <= 1000 else reason[:1000] + "..."
