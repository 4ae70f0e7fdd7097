"""Replay recordings of the real service against a fresh localvault and say where its answers differ.

``python -m localvault.replay DIR`` replays every recording under DIR (the format is in the corpus's
README: one JSON file per recorded sequence of requests) and prints one line per recording, then
``N/M recordings match``. ``--verbose`` lists every difference. A ``known-differences.json`` in DIR
(``{"js/NAME.json": "reason", ...}``) names recordings that localvault deliberately does not match; their
lines say so, and they do not count as matching.

What must match, entry by entry:

- the status, and which of a few headers are there (``content-type``, ``www-authenticate`` with its
  resource, ``x-ms-keyvault-service-version``; ``x-ms-server-latency``, ``x-ms-request-id``,
  ``x-ms-keyvault-region``, ``retry-after`` where the recording has them);
- errors: ``error.code``, ``innererror.code`` and the message, with hosts and key versions
  substituted and a Managed HSM ``(Activity ID: ...)`` suffix compared by shape;
- successes: the JSON members at every level, and every value that is not random. Random are times,
  key material of generated keys, ciphertexts, signatures, tags, blobs and random bytes, unless the
  client sent the value itself; the plaintext of a decrypt or an unwrap and a verify's answer are
  never random. Ids are compared with their host replaced.

What a recorded answer returned (versions, kids, ciphertexts, signatures, backup blobs, ivs, tags) is
mapped onto what the live answer returned, and substituted in later requests, so a recorded decrypt
decrypts the live ciphertext. Polls (the same request repeated after failures, such as 404s until a
deletion finishes) are replayed and compared once, as their last, successful attempt.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set

import requests

from .vault import LocalVault

KNOWN_DIFFERENCES_FILE = "known-differences.json"
# Nock recordings kept no query string: 7.0 before recoverableDays existed (2019), else 7.2 (the JS
# SDK's version in 2021).
OLD_API_VERSION, NOCK_API_VERSION = "7.0", "7.2"
# The unauthenticated 401 of a key vault, in the service's words of 2019, 2020-2022 and now.
MISSING_TOKEN_WORDINGS = {
    "Request is missing a Bearer or PoP token.",
    "AKV10000: Request is missing a Bearer or PoP token.",
    "AKV10000: Request is missing a Bearer, PoP, or MTLS_POP token.",
}
TIMES = {"created", "updated", "nbf", "exp", "deletedDate", "scheduledPurgeDate"}
RANDOM = {"value", "iv", "tag", "n", "x", "y"}  # random unless the client sent them
PLAINTEXT_OPERATIONS = ("/decrypt", "/unwrapkey", "/verify")
CARRIED = {"kid", "value", "iv", "tag"}  # recorded values mapped onto live ones
HEADERS_BOTH_WAYS = ("content-type", "www-authenticate", "x-ms-keyvault-service-version")
HEADERS_WHERE_RECORDED = ("x-ms-server-latency", "x-ms-request-id", "x-ms-keyvault-region", "retry-after")
_HOST = re.compile(r"https://[^/\s'\"]+?(?::443)?(?=/|$|[\s'\"])")
_BARE_GUID_BASE = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(?=(?:deleted)?keys/)"
)
_VERSION = re.compile(r"\b[0-9a-f]{32}\b")
_ACTIVITY_ID = re.compile(r" \(Activity ID: [0-9A-Za-z-]+\)$")
_TENANT = re.compile(r'authorization="https://login\.(?:microsoftonline\.com|windows\.net)/[^"]*"')


@dataclass
class Result:
    name: str
    differences: List[str]
    known: Optional[str] = None  # the reason, when known-differences.json lists it

    @property
    def matches(self) -> bool:
        return not self.differences


@dataclass
class _State:
    """What one recording's replay has learnt so far."""

    substitutions: Dict[str, str] = field(default_factory=dict)  # recorded value -> live value
    sent: Set[str] = field(default_factory=set)  # every string a recorded request sent
    imported: Set[str] = field(default_factory=set)  # lower-cased names of imported keys

    def substitute(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.substitutions.get(value, value)
        if isinstance(value, list):
            return [self.substitute(v) for v in value]
        if isinstance(value, dict):
            return {k: self.substitute(v) for k, v in value.items()}
        return value


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


def _is_challenge(entry: Dict[str, Any]) -> bool:
    return entry["status"] == 401 and "www-authenticate" in entry["response_headers"]


def _empty(body: Any, status: int) -> bool:
    """A body the recorders wrote for an empty one: null, "", the old .NET recorder's [], and the "OK" some
    Managed HSM 401s were stored as."""
    return body is None or body == "" or body == [] or (status == 401 and body == "OK")


def _same_request(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    return all(a[k] == b[k] for k in ("method", "path", "query", "request_body"))


def polls(entries: Sequence[Dict[str, Any]]) -> Set[int]:
    """The indices of failed attempts that the same request repeats later, with only challenges between:
    polls and retries, of which only the last counts."""
    skipped: Set[int] = set()
    for i, entry in enumerate(entries):
        if entry["status"] < 400 or _is_challenge(entry):
            continue
        for later in entries[i + 1 :]:
            if _is_challenge(later):
                continue
            if _same_request(entry, later):
                skipped.add(i)
            break
    return skipped


def _api_version(recording: Dict[str, Any]) -> str:
    for entry in recording["entries"]:
        attributes = (
            entry["response_body"].get("attributes") if isinstance(entry["response_body"], dict) else None
        )
        if isinstance(attributes, dict) and "recoverableDays" in attributes:
            return NOCK_API_VERSION
    return OLD_API_VERSION


def vault_settings(recording: Dict[str, Any]) -> Dict[str, Any]:
    """How the recorded vault was set up, as far as its answers show: retention and purge protection."""
    settings: Dict[str, Any] = {"managed_hsm": recording["service"] == "managedhsm"}
    for entry in recording["entries"]:
        body = entry["response_body"]
        attributes = body.get("attributes") if isinstance(body, dict) else None
        if isinstance(attributes, dict) and "recoveryLevel" in attributes:
            if isinstance(attributes.get("recoverableDays"), int):
                settings["retention_days"] = attributes["recoverableDays"]
            settings["purge_protection"] = "Purgeable" not in attributes["recoveryLevel"]
            break
    return settings


def _normalise_text(text: str) -> str:
    text = _BARE_GUID_BASE.sub("https://VAULT/", text)
    text = _HOST.sub("https://VAULT", text)
    text = _VERSION.sub("{version}", text)
    return _ACTIVITY_ID.sub(" (Activity ID: {id})", text)


def _live_body(response: requests.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text


class Replayer:
    """Replays recordings, each against a fresh LocalVault."""

    def __init__(self) -> None:
        self.session = requests.Session()
        self.session.trust_env = False  # straight to the vault, whatever proxy variables say

    def replay(self, recording: Dict[str, Any]) -> List[str]:
        """The differences between the recording and localvault's answers (empty: it matches)."""
        with LocalVault(**vault_settings(recording)) as vault:
            token = vault.issuer.issue(vault.resource)[0]
            state = _State()
            differences: List[str] = []
            skipped = polls(recording["entries"])
            fallback_version = _api_version(recording)
            for index, entry in enumerate(recording["entries"]):
                if index in skipped:
                    continue
                label = f"#{index} {entry['method']} {entry['path']}"
                try:
                    found = self._entry(vault, token, entry, state, fallback_version)
                except requests.RequestException as exc:
                    found = [f"no answer: {type(exc).__name__}"]
                differences.extend(f"{label}: {d}" for d in found)
            return differences

    def _entry(
        self, vault: LocalVault, token: str, entry: Dict[str, Any], state: _State, fallback_version: str
    ) -> List[str]:
        challenge = _is_challenge(entry)
        path = "/".join(state.substitute(part) for part in entry["path"].split("/"))
        query = dict(entry["query"]) or {"api-version": fallback_version}
        headers: Dict[str, str] = {}
        data: Optional[bytes] = None
        body = entry["request_body"]
        if not challenge:
            headers["Authorization"] = f"Bearer {token}"
            if body not in (None, ""):
                state.sent.update(_strings(body))
                live_request = state.substitute(body)
                text = live_request if isinstance(live_request, str) else json.dumps(live_request)
                data = text.encode("utf-8")
                headers["Content-Type"] = "application/json"
        if entry["method"] == "PUT" and re.fullmatch(r"/keys/[^/]+", entry["path"]):
            state.imported.add(entry["path"].split("/")[2].lower())
        response = self.session.request(
            entry["method"],
            vault.url + path,
            params=query,
            data=data,
            headers=headers,
            verify=vault.ca_file,
            timeout=60,
        )
        live = _live_body(response)
        recorded = entry["response_body"]
        differences: List[str] = []
        if response.status_code != entry["status"]:
            differences.append(f"status {response.status_code}, recorded {entry['status']}")
            detail = live.get("error", {}).get("message") if isinstance(live, dict) else None
            if detail:
                differences[-1] += f" ({detail[:160]})"
            return differences
        differences.extend(self._headers(entry["response_headers"], response.headers))
        if _empty(recorded, entry["status"]):
            if live not in (None, ""):
                differences.append(f"a body {json.dumps(live)[:120]}, recorded none")
        elif entry["status"] >= 400:
            differences.extend(_compare_error(recorded, live))
        else:
            differences.extend(_compare(recorded, live, "", entry, state))
            if isinstance(recorded, dict) and isinstance(live, dict):
                _learn(recorded, live, state)
        return differences

    @staticmethod
    def _headers(recorded: Dict[str, str], live: Any) -> List[str]:
        differences = []
        for name in HEADERS_BOTH_WAYS:
            if (name in recorded) != (name in live):
                differences.append(
                    f"header {name} {'missing' if name in recorded else 'sent'}, recorded "
                    f"{'with' if name in recorded else 'without'} it"
                )
        for name in HEADERS_WHERE_RECORDED:
            if name in recorded and name not in live:
                differences.append(f"header {name} missing")
        if (
            "content-type" in recorded
            and "content-type" in live
            and recorded["content-type"].split(";")[0] != live["content-type"].split(";")[0]
        ):
            differences.append(f"content-type {live['content-type']}, recorded {recorded['content-type']}")
        if "www-authenticate" in recorded and "www-authenticate" in live:
            want = _TENANT.sub("authorization=T", recorded["www-authenticate"])
            got = _TENANT.sub("authorization=T", live["www-authenticate"])
            if want != got:
                differences.append(
                    f"www-authenticate {live['www-authenticate']!r}, recorded {recorded['www-authenticate']!r}"
                )
        return differences


def _compare_error(recorded: Any, live: Any) -> List[str]:
    if not isinstance(recorded, dict) or not isinstance(recorded.get("error"), dict):
        return (
            []
            if recorded == live
            else [f"body {json.dumps(live)[:160]}, recorded {json.dumps(recorded)[:160]}"]
        )
    if not isinstance(live, dict) or not isinstance(live.get("error"), dict):
        return [f"body {json.dumps(live)[:160]}, recorded an error"]
    want, got = recorded["error"], live["error"]
    differences = []
    if want.get("code") != got.get("code"):
        differences.append(f"error code {got.get('code')!r}, recorded {want.get('code')!r}")
    inner_want = (want.get("innererror") or {}).get("code")
    inner_got = (got.get("innererror") or {}).get("code")
    if inner_want != inner_got:
        differences.append(f"innererror {inner_got!r}, recorded {inner_want!r}")
    message_want, message_got = str(want.get("message")), str(got.get("message"))
    both_missing_token = {message_want, message_got} <= MISSING_TOKEN_WORDINGS
    if not both_missing_token and _normalise_text(message_want) != _normalise_text(message_got):
        differences.append(f"message {message_got!r}, recorded {message_want!r}")
    return differences


def _item_key(item: Any) -> str:
    if isinstance(item, dict) and isinstance(item.get("kid"), str):
        return _normalise_text(item["kid"])
    return json.dumps(item, sort_keys=True)


def _compare(recorded: Any, live: Any, where: str, entry: Dict[str, Any], state: _State) -> List[str]:
    """Members at every level, and the values that are not random."""
    if isinstance(recorded, dict):
        if not isinstance(live, dict):
            return [f"{where or 'body'} is {json.dumps(live)[:80]}, recorded an object"]
        differences = []
        missing, extra = sorted(set(recorded) - set(live)), sorted(set(live) - set(recorded))
        if missing:
            differences.append(f"{where or 'body'} lacks {', '.join(missing)}")
        if extra:
            differences.append(f"{where or 'body'} has {', '.join(extra)}, not recorded")
        for member in sorted(set(recorded) & set(live)):
            differences.extend(
                _value(member, recorded[member], live[member], f"{where}.{member}".lstrip("."), entry, state)
            )
        return differences
    if isinstance(recorded, list):
        if not isinstance(live, list):
            return [f"{where} is {json.dumps(live)[:80]}, recorded a list"]
        if len(recorded) != len(live):
            return [f"{where} has {len(live)} items, recorded {len(recorded)}"]
        differences = []
        for i, (a, b) in enumerate(zip(sorted(recorded, key=_item_key), sorted(live, key=_item_key))):
            differences.extend(_compare(a, b, f"{where}[{i}]", entry, state))
        return differences
    if recorded != live:
        return [f"{where} {json.dumps(live)[:80]}, recorded {json.dumps(recorded)[:80]}"]
    return []


def _value(
    member: str, recorded: Any, live: Any, where: str, entry: Dict[str, Any], state: _State
) -> List[str]:
    if member in TIMES and isinstance(recorded, int) and isinstance(live, int):
        return []
    if member == "key_ops" and isinstance(recorded, list) and isinstance(live, list):
        if sorted(map(str, recorded)) != sorted(map(str, live)):
            return [f"{where} {sorted(map(str, live))}, recorded {sorted(map(str, recorded))}"]
        return []
    if member == "nextLink":
        return [] if (recorded is None) == (live is None) else [f"{where} {live!r}, recorded {recorded!r}"]
    if isinstance(recorded, str) and isinstance(live, str):
        if member in ("kid", "recoveryId", "id") or recorded.startswith("https://"):
            return _compare_id(recorded, live, where, state)
        if member in RANDOM and not _compared(member, recorded, entry, state):
            return []
    return _compare(recorded, live, where, entry, state)


def _compared(member: str, recorded: str, entry: Dict[str, Any], state: _State) -> bool:
    """Whether a value that is usually random is not: the client sent it, it is an imported key's, or it
    is what a decrypt, unwrap or verify gives back."""
    if member == "value" and entry["path"].endswith(PLAINTEXT_OPERATIONS):
        return True
    if member in ("n", "x", "y"):
        body = entry["response_body"]
        kid = body.get("key", {}).get("kid", "") if isinstance(body, dict) else ""
        parts = _normalise_text(kid).split("/")
        return len(parts) > 4 and parts[4].lower() in state.imported
    return recorded in state.sent


def _compare_id(recorded: str, live: str, where: str, state: _State) -> List[str]:
    """An id or link with its host replaced; a recorded version must be the live one it was mapped to, or
    any version if it is new."""
    want, got = _BARE_GUID_BASE.sub("https://VAULT/", recorded), live
    want, got = _HOST.sub("https://VAULT", want), _HOST.sub("https://VAULT", got)
    want_parts, got_parts = want.split("/"), got.split("/")
    if len(want_parts) == len(got_parts):
        for i, (a, b) in enumerate(zip(want_parts, got_parts)):
            if _VERSION.fullmatch(a) and _VERSION.fullmatch(b):
                mapped = state.substitutions.get(a)
                if mapped is None or mapped == b:
                    want_parts[i] = b
        want = "/".join(want_parts)
    return [] if want == got else [f"{where} {live!r}, recorded {recorded!r}"]


def _learn(recorded: Any, live: Any, state: _State, member: str = "") -> None:
    """Map what the recorded answer returned onto what the live one did."""
    if isinstance(recorded, dict) and isinstance(live, dict):
        for key in set(recorded) & set(live):
            _learn(recorded[key], live[key], state, key)
    elif isinstance(recorded, str) and isinstance(live, str) and member in CARRIED and recorded != live:
        state.substitutions.setdefault(recorded, live)
        if member == "kid":
            a, b = recorded.rsplit("/", 1)[-1], live.rsplit("/", 1)[-1]
            if _VERSION.fullmatch(a) and _VERSION.fullmatch(b):
                state.substitutions.setdefault(a, b)


def recordings(directory: Path) -> List[Path]:
    return sorted(p for p in directory.rglob("*.json") if p.name != KNOWN_DIFFERENCES_FILE)


def known_differences(directory: Path) -> Dict[str, str]:
    path = directory / KNOWN_DIFFERENCES_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def replay_directory(directory: Path) -> List[Result]:
    known = known_differences(directory)
    replayer = Replayer()
    results = []
    for path in recordings(directory):
        name = path.relative_to(directory).as_posix()
        recording = json.loads(path.read_text(encoding="utf-8"))
        results.append(Result(name, replayer.replay(recording), known.get(name)))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m localvault.replay",
        description="Replay recordings of the real Key Vault / Managed HSM against a fresh localvault.",
    )
    parser.add_argument("directory", type=Path, help="a directory of recordings (searched recursively)")
    parser.add_argument("--verbose", "-v", action="store_true", help="list every difference")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        parser.error(f"{args.directory} is not a directory")
    results = replay_directory(args.directory)
    for result in results:
        if result.matches:
            line = f"match    {result.name}"
        else:
            first = result.differences[0]
            more = f" (+{len(result.differences) - 1} more)" if len(result.differences) > 1 else ""
            kind = "known   " if result.known else "DIFFERS "
            line = f"{kind} {result.name}: {first}{more}"
            if result.known:
                line += f" [known: {result.known}]"
        print(line)
        if args.verbose and not result.matches:
            for difference in result.differences:
                print(f"    {difference}")
    matching = sum(r.matches for r in results)
    print(f"{matching}/{len(results)} recordings match")
    return 0 if matching == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
