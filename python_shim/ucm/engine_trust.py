"""Whether what answers at the endpoint is this user's engine.

A client finds its engine by a socket path (or a tcp port and a key file).
Another user who puts a socket there first (a path in /tmp, or
/tmp/ucm-<uid>/... made before this user's first run) could run a fake engine:
it would answer every lookup with a hit and every load with success while
writing nothing, so vLLM would generate from whatever the KV blocks held, and
it would see every block hash. So before connecting the shim checks that the
socket, and every directory leading to it, belongs to this user, root or the
configured `engineUid` and that nobody else could have put it there; after
connecting, that the process at the other end of each of its connections (the
kernel's SO_PEERCRED) runs as one of those users. The engine's credential
socket (core/identity.ts) hands out the tokens a hello carries; its
SO_PEERCRED is checked the same way.
"""

from __future__ import annotations

import os
import pwd
import socket
import stat
import struct
import time

from .engine_errors import EngineUnavailable, UntrustedEngine

#: core/identity.ts: the credential socket of an ipc endpoint is its path plus this
CRED_SUFFIX = ".cred"
_TOKEN_LEN = 32


def trusted_uids(engine_uid: int | None = None) -> frozenset[int]:
    """The users whose engine this process may use: itself, root, and the configured engineUid."""
    uids = {os.geteuid(), 0}
    if engine_uid is not None:
        uids.add(engine_uid)
    return frozenset(uids)


def _who(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _allowed(uids: frozenset[int]) -> str:
    return ", ".join(_who(u) for u in sorted(uids))


def ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None


def _check_dirs(path: str, uids: frozenset[int], what: str) -> None:
    """Every directory from / to the one holding `path` belongs to a trusted
    user and nobody else can write it (sticky ones excepted, like /tmp, where
    nobody can rename what is ours); the last one nobody else may write at
    all; and no symbolic link on the way belongs to anyone else."""
    parts = os.path.dirname(path).split("/")[1:]
    prefix = ""
    for p in parts:
        prefix += "/" + p
        st = os.lstat(prefix)
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in uids:
            raise UntrustedEngine(
                f"{what} {path}: {prefix} is a symbolic link of {_who(st.st_uid)}, who could point it anywhere; "
                f"trusted: {_allowed(uids)}"
            )
    real = os.path.realpath(os.path.dirname(path))
    chain = ["/"] + ["/" + "/".join(real.split("/")[1 : i + 1]) for i in range(1, len(real.split("/")))]
    for i, d in enumerate(chain):
        st = os.lstat(d)
        last = i == len(chain) - 1
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid not in uids:
            raise UntrustedEngine(
                f"{what} {path}: directory {d} belongs to {_who(st.st_uid)}, who could have put a socket of their own "
                f"there to pose as the engine (trusted: {_allowed(uids)}). Remove it (as root or that user) and start "
                f"again, set XDG_RUNTIME_DIR, or name an endpoint in a directory of your own"
            )
        if mode & 0o022 and (last or not mode & stat.S_ISVTX):
            how = "sticky, like /tmp: any user can bind a name there first" if mode & stat.S_ISVTX else "not sticky"
            raise UntrustedEngine(
                f"{what} {path}: directory {d} is writable by other users (mode {mode:04o}, {how}), so the socket may "
                f"be anybody's. Put the engine's socket in a directory of your own (the default endpoint does: leave "
                f"`endpoint` out of the config)"
            )


def check_ipc_endpoint(endpoint: str, uids: frozenset[int]) -> str:
    """Before connecting: the socket of an ipc endpoint is a socket of a
    trusted user in a directory nobody else can write. Returns its path.
    Raises UntrustedEngine, or EngineUnavailable when there is no socket."""
    path = ipc_path(endpoint)
    if path is None:
        raise ValueError(f"not an ipc endpoint: {endpoint!r}")
    if not path.startswith("/"):
        raise UntrustedEngine(
            f"{endpoint}: an ipc endpoint must be an absolute path (an abstract name, @..., can be bound by any user)"
        )
    try:
        _check_dirs(path, uids, "engine socket")
        st = os.lstat(path)
    except FileNotFoundError:
        raise EngineUnavailable(f"no engine at {endpoint}: {path} does not exist") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UntrustedEngine(f"{path} is not a socket (mode {stat.filemode(st.st_mode)}); remove it")
    if st.st_uid not in uids:
        raise UntrustedEngine(
            f"the socket {path} belongs to {_who(st.st_uid)}: another user's process listens there, not this user's "
            f"engine (trusted: {_allowed(uids)}); nothing it answers is used. Remove it (as root or that user)"
        )
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise UntrustedEngine(
            f"the socket {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}); the engine makes "
            f"its socket 0600, so this one is not the engine's"
        )
    return path


def check_key_file(path: str, uids: frozenset[int]) -> None:
    """A tcp endpoint's CURVE key file: a regular file of a trusted user that
    nobody else can read or replace (whoever wrote it is who we would talk to)."""
    _check_dirs(path, uids, "CURVE key file")
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_uid not in uids or stat.S_IMODE(st.st_mode) & 0o077:
        raise UntrustedEngine(
            f"CURVE key file {path} is not a private file of a trusted user ({_who(st.st_uid)}, mode "
            f"{stat.filemode(st.st_mode)}; trusted: {_allowed(uids)}): another user may have put it there. Remove it"
        )


def _peer(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel saw it."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))


def fetch_token(path: str, uids: frozenset[int], timeout_s: float) -> str | None:
    """A token from the engine's credential socket beside `path`, for a hello
    (the engine learns this process's pid from it). None when the engine has
    no credential socket. Raises UntrustedEngine when another user's process
    serves it, EngineUnavailable when it does not answer in time."""
    cred = path + CRED_SUFFIX
    deadline = time.monotonic() + timeout_s
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(max(0.001, timeout_s))
        try:
            s.connect(cred)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except OSError as e:
            raise EngineUnavailable(f"credential socket {cred}: {e}") from None
        pid, uid, _ = _peer(s)
        if uid not in uids:
            raise UntrustedEngine(
                f"the credential socket {cred} is served by pid {pid}, {_who(uid)}, not by this user's engine "
                f"(trusted: {_allowed(uids)})"
            )
        got = b""
        while len(got) < _TOKEN_LEN:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EngineUnavailable(f"no token from {cred} within {timeout_s * 1000:.0f} ms")
            s.settimeout(left)
            try:
                chunk = s.recv(_TOKEN_LEN - len(got))
            except TimeoutError:
                raise EngineUnavailable(f"no token from {cred} within {timeout_s * 1000:.0f} ms") from None
            if not chunk:
                break
            got += chunk
        token = got.decode("ascii", "replace")
        if len(token) != _TOKEN_LEN or any(c not in "0123456789abcdef" for c in token):
            raise EngineUnavailable(f"credential socket {cred} sent {got!r}, not a token")
        return token
    finally:
        s.close()


def check_connected(path: str, uids: frozenset[int]) -> int:
    """After connecting: every connection of this process to the socket at
    `path` leads to a process of a trusted user (the kernel's SO_PEERCRED; a
    socket file of ours may still be served by a process that took over its
    listening descriptor). Returns how many were checked; raises
    UntrustedEngine."""
    want = path.encode()
    checked = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(int(name)))
        except (OSError, ValueError):
            continue  # closed meanwhile, or not a socket Python can wrap
        try:
            if s.family != socket.AF_UNIX:
                continue
            try:
                peer = s.getpeername()
            except OSError:
                continue
            if (peer.encode() if isinstance(peer, str) else peer) != want:
                continue
            pid, uid, _ = _peer(s)
            checked += 1
            if uid not in uids:
                raise UntrustedEngine(
                    f"the process serving {path} is pid {pid}, {_who(uid)}, not this user's engine (trusted: "
                    f"{_allowed(uids)}); nothing it answered is used"
                )
        finally:
            s.close()
    return checked
