"""``--data DIR`` under concurrent requests: a key's write on disk holds up only the requests about that
key, each answer waits for what it shows to be on disk, one key's writes reach disk in order, and a
failed write fails every request whose change it held. A gate (a threading.Event) holds one key's
write; nothing here waits on time."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List

import pytest
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys import KeyClient

from localvault import LocalVault
from localvault.models import KeyStore
from localvault.persist import KEYS, DataDir

PASSPHRASE = "correct horse battery staple"
WAIT = 30  # seconds: only a bound on a wait that a correct vault ends at once


class Gate:
    """Holds the writes of one key's file until opened, and tells when one is held."""

    def __init__(self, name: str) -> None:
        self.relative = os.path.join(KEYS, f"{name}.json")
        self.armed = False
        self.held = threading.Event()
        self.opened = threading.Event()
        self.fail = False

    def __call__(self, relative: str) -> None:
        if self.armed and relative == self.relative:
            self.held.set()
            assert self.opened.wait(WAIT), "the gate was never opened"
            if self.fail:
                raise OSError(28, "No space left on device")


class WatchedCondition(threading.Condition):
    """The store's condition, telling when a request starts waiting for another's write."""

    def __init__(self) -> None:
        super().__init__(threading.Lock())
        self.waiting = threading.Event()

    def wait(self, timeout: Any = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


@pytest.fixture
def data_dir(tmp_path) -> str:
    return str(tmp_path / "vault")


@pytest.fixture
def gated(monkeypatch, data_dir) -> Iterator[Dict[str, Any]]:
    """A vault on DIR with keys "a" and "b", a gate for writes of "a", a pool of threads each with its
    own client, and the store's condition watched."""
    gate = Gate("a")
    write = DataDir._write

    def gated_write(self: DataDir, relative: str, data: bytes) -> None:
        gate(relative)
        write(self, relative, data)

    changes: List[str] = []
    changed_twice = threading.Event()
    changed = KeyStore._changed

    def counted_change(self: KeyStore, name: str) -> None:
        changed(self, name)
        changes.append(name.lower())
        if gate.armed and changes.count("a") == 2:
            changed_twice.set()

    monkeypatch.setattr(DataDir, "_write", gated_write)
    monkeypatch.setattr(KeyStore, "_changed", counted_change)
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE) as vault:
        clients: List[KeyClient] = [vault.key_client(retry_total=0) for _ in range(6)]
        for name in ("a", "b"):
            clients[0].create_ec_key(name)
        for client in clients:  # each has its token before anything is held
            client.get_key("b")
        watched = WatchedCondition()
        monkeypatch.setattr(vault.store, "_io", watched)
        changes.clear()
        gate.armed = True
        with ThreadPoolExecutor(len(clients)) as pool:
            free = iter(clients)

            def run(call: Callable[[KeyClient], Any]) -> Future:
                return pool.submit(call, next(free))

            try:
                yield {
                    "gate": gate,
                    "run": run,
                    "watched": watched,
                    "store": vault.store,
                    "vault": vault,
                    "changed_twice": changed_twice,  # "a" changed twice in memory
                }
            finally:
                gate.opened.set()


def _tags(gated: Dict[str, Any], data_dir: str, name: str) -> Dict[str, str]:
    """The key's tags as the directory holds them: the vault stops, and a new one reads them."""
    gated["vault"].stop()
    with LocalVault(data_dir=data_dir, data_key=PASSPHRASE) as vault:
        return vault.key_client().get_key(name).properties.tags or {}


def test_a_held_write_holds_up_only_its_own_request_and_readers_of_its_key(gated, data_dir):
    gate, run = gated["gate"], gated["run"]
    writer = run(lambda client: client.update_key_properties("a", tags={"n": "1"}))
    assert gate.held.wait(WAIT)
    # Other keys are read, changed and created while the write of "a" is held.
    assert run(lambda client: client.get_key("b")).result(timeout=WAIT).name == "b"
    changed = run(lambda client: client.update_key_properties("b", tags={"n": "1"}))
    assert changed.result(timeout=WAIT).properties.tags == {"n": "1"}
    assert run(lambda client: client.create_ec_key("c")).result(timeout=WAIT).name == "c"
    # A reader of "a" waits for the held write, which is not answered either.
    reader = run(lambda client: client.get_key("a"))
    assert gated["watched"].waiting.wait(WAIT)
    assert not writer.done() and not reader.done()
    answered_while_held: List[bool] = []
    reader.add_done_callback(lambda _: answered_while_held.append(not gate.opened.is_set()))
    gate.opened.set()
    assert writer.result(timeout=WAIT).properties.tags == {"n": "1"}
    assert reader.result(timeout=WAIT).properties.tags == {"n": "1"}
    assert answered_while_held == [False]
    assert _tags(gated, data_dir, "a") == {"n": "1"}


def test_a_list_of_keys_waits_for_a_held_write(gated):
    gate, run = gated["gate"], gated["run"]
    writer = run(lambda client: client.update_key_properties("a", tags={"n": "1"}))
    assert gate.held.wait(WAIT)
    lister = run(lambda client: {p.name: p.tags for p in client.list_properties_of_keys()})
    assert gated["watched"].waiting.wait(WAIT)
    assert not lister.done()
    gate.opened.set()
    assert lister.result(timeout=WAIT) == {"a": {"n": "1"}, "b": None}
    assert writer.result(timeout=WAIT).properties.tags == {"n": "1"}


def test_two_writes_of_a_key_reach_disk_in_order(gated, data_dir):
    gate, run = gated["gate"], gated["run"]
    first = run(lambda client: client.update_key_properties("a", tags={"n": "1"}))
    assert gate.held.wait(WAIT)  # the first holds "a"'s file; the second waits for it
    second = run(lambda client: client.update_key_properties("a", tags={"n": "2"}))
    assert gated["changed_twice"].wait(WAIT)
    assert not second.done()
    gate.opened.set()
    assert first.result(timeout=WAIT).properties.tags == {"n": "1"}
    assert second.result(timeout=WAIT).properties.tags == {"n": "2"}
    assert _tags(gated, data_dir, "a") == {"n": "2"}


@pytest.fixture
def parked(monkeypatch, gated) -> Dict[str, Any]:
    """Holds the first request that writes "a" before it starts writing, so a later write of "a" can
    reach disk first; counts the writes of "a"'s file."""
    gated["gate"].armed = False
    park, parked, writes = threading.Event(), threading.Event(), []
    journal_write = KeyStore._write
    data_write = DataDir._write

    def parked_write(self: KeyStore, change: Any) -> None:
        if change.lower == "a" and not parked.is_set():
            parked.set()
            assert park.wait(WAIT), "never released"
        journal_write(self, change)

    def counted_write(self: DataDir, relative: str, data: bytes) -> None:
        if relative == gated["gate"].relative:
            writes.append(relative)
        data_write(self, relative, data)

    monkeypatch.setattr(KeyStore, "_write", parked_write)
    monkeypatch.setattr(DataDir, "_write", counted_write)
    yield {**gated, "park": park, "parked": parked, "writes": writes}
    park.set()


def test_an_older_state_is_never_written_over_a_newer_one(parked, data_dir):
    run = parked["run"]
    first = run(lambda client: client.update_key_properties("a", tags={"n": "1"}))
    assert parked["parked"].wait(WAIT)
    second = run(lambda client: client.update_key_properties("a", tags={"n": "2"}))
    assert second.result(timeout=WAIT).properties.tags == {"n": "2"}  # on disk, with the first change in it
    assert not first.done()
    parked["park"].set()
    # Held by the second's write, the first change is not written again.
    assert first.result(timeout=WAIT).properties.tags == {"n": "1"}
    assert parked["writes"] == [parked["gate"].relative]
    assert _tags(parked, data_dir, "a") == {"n": "2"}


def test_a_failed_write_fails_its_request_and_those_whose_change_it_held(parked, data_dir):
    run, gate = parked["run"], parked["gate"]
    first = run(lambda client: client.update_key_properties("a", tags={"n": "1"}))
    assert parked["parked"].wait(WAIT)
    gate.armed = gate.fail = True
    gate.opened.set()
    second = run(lambda client: client.update_key_properties("a", tags={"n": "2"}))
    with pytest.raises(HttpResponseError) as failed:
        second.result(timeout=WAIT)
    assert failed.value.status_code == 500
    parked["park"].set()
    with pytest.raises(HttpResponseError) as held:
        first.result(timeout=WAIT)
    assert held.value.status_code == 500
    assert run(lambda client: client.get_key("b")).result(timeout=WAIT).name == "b"
    gate.armed = False
    assert run(lambda client: client.update_key_properties("a", tags={"n": "3"})).result(timeout=WAIT)
    assert _tags(parked, data_dir, "a") == {"n": "3"}


def test_a_reset_leaves_no_key_on_disk_even_with_a_write_held(gated, data_dir):
    gate, run = gated["gate"], gated["run"]
    writer = run(lambda client: client.update_key_properties("a", tags={"n": "1"}))
    assert gate.held.wait(WAIT)
    resetter = run(lambda client: gated["store"].reset())
    assert gated["changed_twice"].wait(WAIT)  # the reset has removed "a" in memory
    assert not resetter.done()
    gate.opened.set()
    resetter.result(timeout=WAIT)
    writer.result(timeout=WAIT)
    assert os.listdir(os.path.join(data_dir, KEYS)) == []
