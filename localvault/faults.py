"""Injected failures, decided before a request is processed, so a failed request changes nothing.

A fault is an HTTP status the service answers when it is overloaded or failing (429 with the service's
``Throttled`` body and ``Retry-After``, 500, 503) or ``drop``: the connection is closed with no answer.
Faults come at a rate (deterministic with a seed) or as "the next N requests", optionally only for
some operations (keys.json operationIds such as ``CreateKey``). The "next N" faults come first; a
request they take draws no random number, so a seeded sequence stays the same around them.

A hold keeps the next request of one operation waiting, before the vault acts on it or once its answer
is ready, until the test releases it: a test knows the request is in flight, and what it has changed.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, Iterator, List, Optional

from .exceptions import InternalServerError, ServiceUnavailable, Throttled
from .urls import ROUTES

DROP = "drop"
KINDS = ("429", "500", "503", DROP)
MAX_NEXT = 1_000_000
HOLD_WHEN = ("before", "after")
HOLD_TIMEOUT = 120.0  # a held request goes on by itself after this many seconds, so none is held forever
MAX_HOLD_TIMEOUT = 3600.0
# keys.json operationIds, by lower-case name, so that a filter may be given in any case.
OPERATIONS = {route.operation.lower(): route.operation for route in ROUTES}


_ERRORS = {
    "429": (
        Throttled,
        "Request was not processed because too many requests were received. "
        "Reason: VaultRequestTypeLimitReached",
    ),
    "500": (InternalServerError, "The service encountered an internal error (injected by localvault)."),
    "503": (ServiceUnavailable, "The service is temporarily unavailable (injected by localvault)."),
}


INJECTED = {error: kind for kind, (error, _) in _ERRORS.items()}


class DropConnection(Exception):
    """Close the connection without an answer."""


def fault_of(error: BaseException) -> Optional[str]:
    """The kind of an injected fault (``429``, ``500``, ``503``, ``drop``); None for anything else."""
    return DROP if isinstance(error, DropConnection) else INJECTED.get(type(error))


def canonical_names(names: Iterable[str], spellings: Dict[str, str], what: str) -> FrozenSet[str]:
    """Names given in any case, spelled as ``spellings`` (lower-case name to spelling) spells them;
    ValueError naming an unknown one and listing the known."""
    if isinstance(names, (str, bytes, dict)) or not isinstance(names, Iterable):
        raise ValueError(f"give a list of {what}s")
    chosen = set()
    for name in names:
        if not isinstance(name, str) or name.lower() not in spellings:
            known = ", ".join(sorted(set(spellings.values()), key=str.lower))
            raise ValueError(f"unknown {what} {str(name)[:64]!r}; {what}s: {known}")
        chosen.add(spellings[name.lower()])
    return frozenset(chosen)


def check_operations(names: Optional[Iterable[str]]) -> Optional[FrozenSet[str]]:
    """keys.json operationIds, in any case, as the table spells them; None (or empty): every operation."""
    return None if names is None else canonical_names(names, OPERATIONS, "operation") or None


def parse_operations(text: str) -> Optional[FrozenSet[str]]:
    """``CreateKey,GetKey`` as a set of operationIds."""
    return check_operations([p.strip() for p in text.split(",") if p.strip()])


def parse_rates(text: str) -> Dict[str, float]:
    """``429=0.2,503=0.1,drop=0.05`` as a dict; ValueError with a readable message otherwise."""
    rates: Dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, value = part.partition("=")
        kind = kind.strip().lower()
        if not sep or kind not in KINDS:
            raise ValueError(f"{part!r}: expected KIND=RATE with KIND one of {', '.join(KINDS)}")
        try:
            rates[kind] = float(value)
        except ValueError:
            raise ValueError(f"{part!r}: the rate must be a number between 0 and 1") from None
    return check_rates(rates)


def check_rates(rates: Dict[str, float]) -> Dict[str, float]:
    for kind, rate in rates.items():
        if kind not in KINDS:
            raise ValueError(f"unknown fault {str(kind)[:16]!r}; faults: {', '.join(KINDS)}")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ValueError(f"the rate of {kind} must be a number between 0 and 1")
    if sum(rates.values()) > 1:
        raise ValueError("the fault rates add up to more than 1")
    return {kind: float(rate) for kind, rate in rates.items()}


@dataclass
class _Next:
    kind: str
    remaining: int
    operations: Optional[FrozenSet[str]]


@dataclass
class FaultPlan:
    """What to inject; thread-safe. ``decide(operation)`` raises the fault for a request, if any."""

    rates: Dict[str, float] = field(default_factory=dict)
    seed: Optional[int] = None
    operations: Optional[FrozenSet[str]] = None  # None: every operation
    _queue: List[_Next] = field(default_factory=list)
    _random: random.Random = field(default_factory=random.Random, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.configure(self.rates, self.seed, self.operations)

    def configure(
        self,
        rates: Optional[Dict[str, float]] = None,
        seed: Optional[int] = None,
        operations: Optional[Iterable[str]] = None,
    ) -> None:
        """Replace the rates (and the seed and operations they apply to); ``{}`` turns them off.
        The random sequence starts again from the seed."""
        if not isinstance(rates, (dict, type(None))):
            raise ValueError("rates must map a fault (429, 500, 503, drop) to a rate between 0 and 1")
        checked = check_rates({str(kind).lower(): rate for kind, rate in (rates or {}).items()})
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError("the seed must be a whole number")
        chosen = check_operations(operations)
        with self._lock:
            self.rates, self.seed, self.operations = checked, seed, chosen
            self._random = random.Random(seed)

    def fail_next(self, count: int, kind: str, operations: Optional[Iterable[str]] = None) -> None:
        """Fail the next ``count`` requests (of these operations) with ``kind``."""
        kind = str(kind).lower()
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind[:16]!r}; faults: {', '.join(KINDS)}")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_NEXT:
            raise ValueError(f"count must be a whole number from 1 to {MAX_NEXT}")
        chosen = check_operations(operations)
        with self._lock:
            self._queue.append(_Next(kind, count, chosen))

    def clear(self) -> None:
        """No faults: no rates, no pending "next N"."""
        with self._lock:
            self._queue.clear()
        self.configure({}, None, None)

    def describe(self) -> Dict[str, object]:
        with self._lock:
            return {
                "rates": dict(self.rates),
                "seed": self.seed,
                "operations": sorted(self.operations) if self.operations else None,
                "next": [
                    {"fault": n.kind, "count": n.remaining, "operations": sorted(n.operations or ()) or None}
                    for n in self._queue
                ],
            }

    def decide(self, operation: str) -> None:
        """Raise the fault this request of ``operation`` gets, if any: a VaultError or DropConnection."""
        kind = self._pick(operation)
        if kind == DROP:
            raise DropConnection()
        if kind is not None:
            error, message = _ERRORS[kind]
            raise error(message)

    def _pick(self, operation: str) -> Optional[str]:
        with self._lock:
            for queued in self._queue:
                if queued.operations is None or operation in queued.operations:
                    queued.remaining -= 1
                    if not queued.remaining:
                        self._queue.remove(queued)
                    return queued.kind
            if not self.rates or (self.operations is not None and operation not in self.operations):
                return None
            draw = self._random.random()
            for kind, rate in self.rates.items():
                if draw < rate:
                    return kind
                draw -= rate
            return None


class Hold:
    """The next request of ``operation``, held ``before`` the vault acts on it (nothing has changed yet) or
    ``after`` (it has changed what it changes and its answer waits) until ``release()``, or for ``timeout``
    seconds at most. Leaving a ``with`` block releases it."""

    def __init__(self, number: int, operation: str, when: str, timeout: float) -> None:
        self.id, self.operation, self.when, self.timeout = number, operation, when, timeout
        self._reached, self._released = threading.Event(), threading.Event()
        self._taken = False  # by a request, under Holds' lock

    @property
    def held(self) -> bool:
        """Whether a request is held now."""
        return self._reached.is_set() and not self._released.is_set()

    @property
    def reached(self) -> bool:
        """Whether a request has come to the hold (and may have gone on since)."""
        return self._reached.is_set()

    def wait(self, timeout: float = 60.0) -> bool:
        """Wait until a request is held; False if ``timeout`` seconds pass first."""
        return self._reached.wait(timeout)

    def release(self) -> None:
        """Let the held request go on; a hold no request has reached yet is cancelled."""
        self._released.set()

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def describe(self) -> Dict[str, object]:
        return {"id": self.id, "operation": self.operation, "when": self.when, "held": self.held}

    def _hold(self) -> None:
        self._reached.set()
        self._released.wait(self.timeout)


class Holds:
    """The holds set and not yet released, in the order set; thread-safe. Each request takes at most one:
    the first set for its operation."""

    def __init__(self) -> None:
        self._holds: List[Hold] = []
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()

    def hold_next(self, operation: str, when: str = "before", timeout: float = HOLD_TIMEOUT) -> Hold:
        (chosen,) = canonical_names([operation], OPERATIONS, "operation")
        if when not in HOLD_WHEN:
            raise ValueError(f"'when' must be {' or '.join(HOLD_WHEN)}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_HOLD_TIMEOUT:
            raise ValueError(f"the timeout must be a number of seconds above 0 and at most {MAX_HOLD_TIMEOUT:g}")
        with self._lock:
            hold = Hold(next(self._numbers), chosen, when, float(timeout))
            self._holds.append(hold)
        return hold

    def find(self, number: object) -> Optional[Hold]:
        with self._lock:
            return next((hold for hold in self._holds if hold.id == number), None)

    def release_all(self) -> None:
        with self._lock:
            holds, self._holds = self._holds, []
        for hold in holds:
            hold.release()

    def describe(self) -> List[Dict[str, object]]:
        with self._lock:
            self._forget_released()
            return [hold.describe() for hold in self._holds]

    @contextlib.contextmanager
    def around(self, operation: str) -> Iterator[None]:
        """Serve one request of ``operation`` inside this block, held at its start or at its end if a hold
        takes it; at its end even when it fails, since its answer is then the error."""
        with self._lock:
            self._forget_released()
            hold = next((h for h in self._holds if h.operation == operation and not h._taken), None)
            if hold is not None:
                hold._taken = True
        if hold is not None and hold.when == "before":
            hold._hold()
        try:
            yield
        finally:
            if hold is not None and hold.when == "after":
                hold._hold()

    def _forget_released(self) -> None:
        self._holds = [hold for hold in self._holds if not hold._released.is_set()]
