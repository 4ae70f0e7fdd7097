"""Write ordering between a store and its journal: changes are made under the store's lock, written
after it is released, one key at a time and in order, and no answer shows a change not yet written."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Protocol, Set, Tuple

if TYPE_CHECKING:
    from .models import DeletedKey, KeyRecord


class Journal(Protocol):
    """Where a store records its changes (``localvault.persist``). Called without the store's lock, from
    the thread that made the change, before the change is acknowledged; calls for one key come one at a
    time and in the order of the changes, calls for different keys may come at once. An exception fails
    the request that made the change (and any other whose change only this write held)."""

    def key_changed(self, lower: str, record: Optional[KeyRecord], deleted: Optional[DeletedKey]) -> None:
        """The key named ``lower`` is now live as ``record``, deleted as ``deleted``, or gone (both None);
        both are snapshots that the store no longer changes."""


class _KeyWrites:
    """One key's changes not yet settled in the journal, by sequence number (guarded by KeyStore._io),
    and how far its journal writes have got (set under ``lock``, held while writing; ``written`` is read
    under KeyStore._io, which is notified after it is set)."""

    def __init__(self) -> None:
        self.pending: Set[int] = set()
        self.lock = threading.Lock()
        self.attempted = 0
        self.written = 0
        self.error: Optional[BaseException] = None


@dataclass
class _Staged:
    """A change made under the store's lock, to be written by the same thread once it leaves it."""

    lower: str
    seq: int
    writes: _KeyWrites
    record: Optional[KeyRecord]
    deleted: Optional[DeletedKey]


class _Held(threading.local):
    """What a thread did under the store's lock, until it leaves the outermost level."""

    def __init__(self) -> None:
        self.depth = 0
        self.observed: Set[str] = set()
        self.everything = False
        self.staged: List[_Staged] = []


class WriteOrdering:
    """The store's lock (``_locked``) and the staging (``_changed``) and writing (``_settle``) of its
    changes to ``journal``. The store gives each key's state to record with ``_journal_state``."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.journal: Optional[Journal] = None
        # With a journal: changes numbered in order, those not yet written by key, and who waits for them.
        self._seq = 0
        self._writes: Dict[str, _KeyWrites] = {}
        self._io = threading.Condition(threading.Lock())
        self._held = _Held()

    def _journal_state(self, lower: str) -> Tuple[Optional[KeyRecord], Optional[DeletedKey]]:
        raise NotImplementedError

    def _before_lock(self, name: Optional[str]) -> None:
        """Called by ``_locked`` before it takes the lock at the outermost level: slow work goes here."""

    @contextmanager
    def _locked(self, name: Optional[str] = None) -> Iterator[None]:
        """The store's lock, for a block whose answer shows the key ``name`` only, or any key (no name:
        the safe default, which only costs waiting). With a journal, leaving the outermost level
        releases the lock, writes the changes this thread made (``_changed``, the clock's catch-up's
        included), then waits until every change made before to what the block may show is written, so
        no answer shows what is not on disk. No file is written with the lock held."""
        held = self._held
        if not held.depth:
            self._before_lock(name)
        self._lock.acquire()
        held.depth += 1
        try:
            if self.journal is not None:
                if name is None:
                    held.everything = True
                else:
                    held.observed.add(name.lower())
            yield
        finally:
            held.depth -= 1
            if held.depth:
                self._lock.release()
            else:
                staged, observed, everything, upto = held.staged, held.observed, held.everything, self._seq
                busy = staged or observed or everything
                if busy:
                    held.staged, held.observed, held.everything = [], set(), False
                self._lock.release()
                if busy:
                    self._settle(staged, None if everything else observed, upto)

    def _changed(self, name: str) -> None:
        """Stage the key's new state for the journal (inside ``_locked``)."""
        if self.journal is None:
            return
        assert self._held.depth, "_changed() outside _locked()"
        lower = name.lower()
        record, deleted = self._journal_state(lower)
        self._seq += 1
        with self._io:
            writes = self._writes.get(lower)
            if writes is None:
                writes = self._writes[lower] = _KeyWrites()
            writes.pending.add(self._seq)
        self._held.staged.append(_Staged(lower, self._seq, writes, record, deleted))

    def _settle(self, staged: List[_Staged], observed: Optional[Set[str]], upto: int) -> None:
        """Write this thread's changes, then wait for the changes up to ``upto`` to the keys named in
        ``observed`` (None: every key). The first failed write is raised, after every change is tried."""
        failure: Optional[BaseException] = None
        for change in staged:
            try:
                self._write(change)
            except BaseException as exc:  # raised below, once the others are written
                failure = failure or exc
        if failure is not None:
            raise failure

        def written() -> bool:  # each change up to ``upto`` written, or held by a later one written
            keys = self._writes.values() if observed is None else map(self._writes.get, observed)
            return all(w is None or all(s > upto or s <= w.written for s in w.pending) for w in keys)

        with self._io:
            self._io.wait_for(written)

    def _write(self, change: _Staged) -> None:
        """Write one change, unless a later one of its key, which holds it, is written already: never an
        older state over a newer one. A failure is raised for it and for the earlier changes it held."""
        writes = change.writes
        try:
            with writes.lock:
                if writes.attempted < change.seq:
                    writes.attempted = change.seq
                    assert self.journal is not None
                    try:
                        self.journal.key_changed(change.lower, change.record, change.deleted)
                    except BaseException as exc:
                        writes.error = exc
                        raise
                    writes.written = change.seq
                elif writes.written < change.seq:
                    assert writes.error is not None
                    raise writes.error
        finally:
            with self._io:
                writes.pending.discard(change.seq)
                if not writes.pending:
                    del self._writes[change.lower]
                self._io.notify_all()
