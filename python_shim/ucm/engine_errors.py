"""What can go wrong talking to the engine (ucm.client and ucm.engine_trust
raise these; every caller treats them as misses, never as hits)."""

from __future__ import annotations


class EngineError(RuntimeError):
    """The engine refused a request; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class EngineUnavailable(EngineError):
    """No answer within the deadline (engine down, busy or unreachable).
    `sent` names the request when it did go out: the engine may still act
    on it later (a dump or load then runs until its deadline)."""

    def __init__(self, message: str, sent: str | None = None):
        super().__init__("unavailable", message)
        self.sent = sent


class UntrustedEngine(EngineError):
    """Whatever listens at the endpoint cannot be this user's engine: its
    socket, its directory or the process behind it belongs to someone else.
    Nothing it says may be believed (a fake engine would report every block
    as stored and every load as done while writing nothing)."""

    def __init__(self, message: str):
        super().__init__("untrusted", message)
