"""The scheduler half's lookups, kept off vLLM's step (issue 30).

vLLM asks `get_num_new_matched_tokens` for each waiting request inside the
step that also serves every running request, so a round trip to the engine
there delays every running request's next token, and a burst of arrivals
delays it once per arrival. Instead, the first ask for a request files an
`Ask` (the request and the range of blocks to look up) and is answered
"not known yet" (None): vLLM skips the request for this step, keeps it
waiting, and asks again in the next one. At the end of the step
(`build_connector_meta`) the pump is woken: a thread of its own that sends
the filed asks, the keys of many requests concatenated into one `lookup`,
and posts each request's part of the `found` array on its ask (a prefix
lookup: each request's keys are a run the engine stops at its first miss,
docs/PROTOCOL.md). The next ask of the request is answered from that, with
no engine in between. While no request runs nobody is held back by a wait,
so a new request's first ask is sent at once and its reply awaited for a
moment (IDLE_WAIT_S), and so is an empty step's (await_answer, await_reply).

Bounds: one lookup is in flight at a time and carries at most
`LOOKUP_BATCH_KEYS` keys times namespaces (the asks filed meanwhile wait
for the next one); an ask that got no reply within the client timeout is
answered as a miss and never sent after that; a request has at most one
ask waiting plus one refresh. Which reply belongs to which request is by
object, never by id: an ask dropped (the request was scheduled, finished,
aborted, or the cache epoch changed) still gets its reply written on it,
and nobody reads it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from vllm.v1.request import Request

logger = logging.getLogger("ucm")

#: keys times namespaces one lookup carries (the engine's own bounds are
#: maxKeysPerRequest 65536 keys and maxLookupKeys 262144 key-namespace pairs
#: by default). Packing a lookup holds the GIL; 8192 keys take about 0.25 ms,
#: short enough not to stretch a step the scheduler runs meanwhile.
LOOKUP_BATCH_KEYS = 8192

#: an answer older than this is still used, and a fresh lookup is filed for
#: the next ask: the store may have gained or lost blocks since (the engine
#: caches a miss for 1 s as well)
REFRESH_S = 1.0

#: the longest the scheduler, while nothing runs, waits for lookup replies
#: (await_answer, await_reply)
IDLE_WAIT_S = 0.005


def prompt_end(request: "Request", block_size: int) -> int:
    """The block index past the last one of the request's prompt the store
    may serve: never the block of the last prompt token (vLLM must compute
    at least one), never past the hashes vLLM made."""
    return min((request.num_prompt_tokens - 1) // block_size, len(request.block_hashes))


class Ask:
    """One lookup of one request's blocks [start, end) in namespaces `ns`;
    `end` (prompt_end) is reckoned by the pump, off vLLM's step (-1 until then)."""

    __slots__ = ("request", "start", "end", "ns", "epoch", "asked_at", "expires", "found", "error", "counted", "next")
    __slots__ += ("dropped", "lead")

    def __init__(self, request: "Request", start: int, ns: tuple[str, ...], epoch: int, now: float, expires: float):
        self.request = request
        self.start = start
        self.end = -1
        self.ns = ns
        self.epoch = epoch
        self.asked_at = now
        self.expires = expires  # no reply by then: a miss
        #: set once, by the pump (the reply's part for these keys, a byte a
        #: key, 1 stored: bytes are not tracked by Python's garbage collector,
        #: whose young-generation passes in vLLM's step would otherwise visit
        #: every key of every waiting request) or on expiry (empty: a miss);
        #: None while the reply is on its way
        self.found: bytes | None = None
        self.error = False  # no usable reply: answered as a miss
        self.counted = False  # its error is in the stats already
        self.next: Ask | None = None  # a refresh on its way
        self.dropped = False  # nobody reads the answer any more: not sent
        #: the stored run from `start` (found's leading True values), counted
        #: by the pump off the step; set before `found`
        self.lead = 0


class LookupPump:
    """The thread that sends filed asks to the engine and posts the replies.

    `call(op, **args)` is the link's request that degrades to None (a miss);
    it blocks this thread only, for at most the client timeout.
    """

    def __init__(self, call: Callable[..., dict[str, Any] | None], block_size: int):
        self._call = call
        self._block_size = block_size
        self._queue: deque[Ask] = deque()
        self._wake = threading.Event()
        self._closed = False
        self._busy = False  # sending or posting (set before the queue is touched)
        self._posted = threading.Event()  # replies posted, or nothing left to send
        self.sent = 0  # lookups sent to the engine (tests, benchmarks)
        #: files an ask (the scheduler thread's only touch of the queue; a deque's append is atomic)
        self.file = self._queue.append
        # Started now, not in a step: a thread's start waits for it to run.
        self._thread = self._start()

    def _start(self) -> threading.Thread:
        t = threading.Thread(target=self._run, name="ucm-lookups", daemon=True)
        t.start()
        return t

    def kick(self) -> None:
        """Sends what was filed (once a step: asks filed together go together)."""
        if not self._queue or self._closed:
            return
        if not self._thread.is_alive():  # a process forked from the one that made it
            self._thread = self._start()
        self._wake.set()

    def await_reply(self, timeout_s: float = IDLE_WAIT_S) -> None:
        """For a step of vLLM's that runs nothing: waits until this thread
        posts a reply (or has nothing left to send), at most timeout_s.

        With nothing to run, vLLM's engine core steps again at once, over
        and over, while a request waits for its lookup; in a driver that
        steps vLLM's scheduler in one thread that loop held the GIL, and
        this thread got it only at Python's switch interval (5 ms) to send
        and again to post (hundreds of empty steps). Waiting here frees the
        GIL; a step that runs a request never waits."""
        if not self._queue and not self._busy:
            return
        self._posted.clear()
        if not self._queue and not self._busy:  # done in between
            return
        self._posted.wait(timeout_s)

    def await_answer(self, ask: Ask, timeout_s: float = IDLE_WAIT_S) -> None:
        """Sends `ask` now and waits until its reply is posted, at most
        timeout_s (or until this thread has nothing left to send). For the
        first ask while no request runs: answered in the same step, the
        request is scheduled without the empty step an answer of None costs
        (vLLM's engine core then runs one more loop, model call included)."""
        end = time.monotonic() + timeout_s
        self.kick()
        while ask.found is None:
            self._posted.clear()
            left = end - time.monotonic()
            if ask.found is not None or left <= 0 or (not self._queue and not self._busy):
                return
            self._posted.wait(left)

    def close(self, wait_s: float = 1.0) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(wait_s)

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            self._busy = True
            while self._queue and not self._closed:
                try:
                    self._send(*self._take())
                except Exception as e:  # noqa: BLE001 - the thread must outlive a bug; its asks become misses
                    logger.error("UCM: lookup pump failed (%s: %s)", type(e).__name__, e, exc_info=True)
                self._posted.set()
            self._busy = False
            self._posted.set()

    def _take(self) -> tuple[list[tuple[Ask, int]], list[bytes]]:
        """The next asks to send together: same namespaces, at most
        LOOKUP_BATCH_KEYS keys times namespaces (one ask alone may be more)."""
        batch: list[tuple[Ask, int]] = []
        keys: list[bytes] = []
        now = time.monotonic()
        ns = None
        while self._queue:
            ask = self._queue[0]
            if ask.dropped or ask.found is not None or now > ask.expires:
                self._queue.popleft()  # nobody waits for it, or it is answered as a miss already
                continue
            if ask.end < 0:
                # Reckoned here, off the step: a waiting request's prompt and
                # its block hashes below `end` never change.
                ask.end = prompt_end(ask.request, self._block_size)
                if ask.end <= ask.start:  # nothing of the prompt to look up: no hit
                    self._queue.popleft()
                    ask.found = b""
                    continue
            if ns is None:
                ns = ask.ns
            elif ask.ns != ns or (len(keys) + ask.end - ask.start) * len(ns) > LOOKUP_BATCH_KEYS:
                break
            self._queue.popleft()
            part = ask.request.block_hashes[ask.start : ask.end]
            keys.extend(part)
            batch.append((ask, len(part)))
        return batch, keys

    def _send(self, batch: list[tuple[Ask, int]], keys: list[bytes]) -> None:
        if not batch:
            return
        self.sent += 1
        # One run per request: the engine stops each at its first miss (a
        # request's stored prefix is all the scheduler can use), which spares
        # it a stat per block of every new prompt's own part.
        runs = [n for _, n in batch]
        # `bits`: the answer comes as bytes, a byte a key (an engine older
        # than that answers booleans, taken as well). As a list of 8,192
        # booleans its decoding, checking and conversion held the GIL for
        # whole C calls while vLLM's step waited for it.
        r = self._call("lookup", ns=list(batch[0][0].ns), keys=keys, runs=runs, bits=True) if keys else {"found": b""}
        bits = _found_bits(r.get("found") if isinstance(r, dict) else None, len(keys))
        i = 0
        for ask, n in batch:
            if bits is not None:
                part = bits[i : i + n]
                # The stored run, counted here (off the step): answering a
                # request's ask is then arithmetic (a scan in the scheduler's
                # step cost 5 us a request, an exception per full hit).
                lead = part.find(0)
                ask.lead = n if lead < 0 else lead
                ask.found = part
                i += n
            else:
                ask.error = True
                ask.found = b""


def _found_bits(found: Any, n: int) -> bytes | None:
    """A lookup reply's `found` for `n` keys as bytes (1 stored, 0 not); None
    unless it says exactly that: one 0/1 byte, or one boolean, per key (the
    counts run in C)."""
    if isinstance(found, bytes):
        return found if len(found) == n and found.count(0) + found.count(1) == n else None
    if isinstance(found, list) and len(found) == n and found.count(True) + found.count(False) == n:
        return bytes(found)
    return None


class AsyncLookups:
    """The scheduler thread's side: per waiting request, its ask and the
    answer it got. Never waits for the engine while a request runs (while
    none does, a new request's reply is awaited for up to IDLE_WAIT_S)."""

    def __init__(self, pump: LookupPump, config: Any, count: Callable[[str, int], None], ns: tuple[str, ...]):
        self.pump = pump
        #: its timeout_ms is how long a reply may take (the client timeout; read
        #: at each new ask: the engine's hello may change it)
        self._config = config
        self._count = count
        self._asks: dict[str, Ask] = {}
        self._file = pump.file
        self._ns = ns  # the namespaces a lookup asks in (the cache epoch's)
        self._epoch = 0

    def reset(self, epoch: int, ns: tuple[str, ...]) -> None:
        """A new cache epoch: what was asked in the old one says nothing now."""
        self._epoch, self._ns = epoch, ns
        self.forget_all()

    def hits(self, request: "Request", start: int, now: float, can_ask: bool, idle: bool = False) -> int | None:
        """How many blocks from `start` on (up to its prompt's end) the store
        holds for the request, from a reply that arrived; None while it is on its way
        (a lookup is filed when there is none). `can_ask` False (the engine
        is known down): a request without an answer is a miss. `idle`: no
        request runs, so a new ask is sent at once and its reply awaited
        for a moment (await_answer) instead of answered None. vLLM may ask
        about every waiting request in one step: the path of a new request
        is kept short (a dict lookup, one object, a deque append)."""
        req_id = request.request_id
        ask = self._asks.get(req_id)
        if ask is not None and (ask.request is not request or ask.epoch != self._epoch or start < ask.start):
            # Another request under the same id, another cache epoch, or blocks
            # before the range asked about (vLLM's prefix cache lost some
            # since): that answer says nothing here.
            ask.dropped = True
            if ask.next is not None:
                ask.next.dropped = True
            del self._asks[req_id]
            ask = None
        if ask is None:
            if not can_ask:
                return 0
            expires = now + self._config.timeout_ms / 1000
            self._asks[req_id] = ask = Ask(request, start, self._ns, self._epoch, now, expires)
            self._file(ask)
            if not idle:
                return None
            self.pump.await_answer(ask)
            if ask.found is None:
                return None
        fresh = ask.next
        if fresh is not None and fresh.found is not None:
            self._asks[req_id] = ask = fresh
        elif fresh is not None and now > fresh.expires:
            ask.next = None  # the refresh got no reply: the answer stands, and another may be filed
        found = ask.found
        if found is None:
            if now <= ask.expires:
                return None
            # No reply within the client timeout (engine stopped, gone, or
            # slower than that): a miss, and the request is not held longer.
            ask.error, ask.found = True, b""
            found = ask.found
        elif ask.next is None and can_ask and now - ask.asked_at > REFRESH_S:
            ask.next = Ask(request, start, self._ns, self._epoch, now, now + self._config.timeout_ms / 1000)
            self._file(ask.next)
        if ask.error and not ask.counted:
            ask.counted = True
            self._count("lookup_errors", 1)
        # The stored run from `start`, within the range asked about then. (The
        # engine answers a run's keys after its first miss false: past such a
        # miss this is 0, a miss, until a refresh asks from `start`.)
        i = start - ask.start
        stop = len(found)  # the range asked about: [ask.start, ask.end)
        if i >= stop:
            return 0
        if i == 0:  # the common case: nothing computed since the ask
            return min(ask.lead, stop)
        miss = found.find(0, i, stop)
        return stop - i if miss < 0 else miss - i

    def forget(self, req_id: str) -> None:
        """The request was scheduled or finished: a reply still on its way is
        dropped, and a later ask (after a preemption) looks up anew."""
        ask = self._asks.pop(req_id, None)
        if ask is not None:
            ask.dropped = True
            if ask.next is not None:
                ask.next.dropped = True

    def forget_all(self) -> None:
        for req_id in list(self._asks):
            self.forget(req_id)

    def pending(self) -> int:
        """Requests with an ask (tests, diagnostics)."""
        return len(self._asks)
