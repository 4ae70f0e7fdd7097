"""The route table: (method, path pattern, handler). Names and versions are matched loosely here
and validated by the handlers, so a bad name gets the service's 400 rather than a 404."""

from __future__ import annotations

import re
from typing import Callable, List, Optional, Tuple

from . import responses
from .exceptions import MethodNotAllowed, NotFound

_SEG = r"(?P<{}>[^/]+)"
NAME, VERSION = _SEG.format("name"), _SEG.format("version")
_OPS = r"(?:encrypt|decrypt|sign|verify|wrapkey|unwrapkey|release)"

ROUTES: List[Tuple[str, str, Callable]] = [
    ("GET", r"/keys/?", responses.list_keys),
    ("POST", r"/keys/restore", responses.restore_key),
    ("GET", rf"/keys/{NAME}/versions", responses.list_key_versions),
    ("POST", rf"/keys/{NAME}/create", responses.create_key),
    ("POST", rf"/keys/{NAME}/backup", responses.backup_key),
    ("POST", rf"/keys/{NAME}/rotate", responses.not_emulated),
    ("GET", rf"/keys/{NAME}/rotationpolicy", responses.not_emulated),
    ("PUT", rf"/keys/{NAME}/rotationpolicy", responses.not_emulated),
    ("PUT", rf"/keys/{NAME}", responses.import_key),
    ("DELETE", rf"/keys/{NAME}", responses.delete_key),
    ("GET", rf"/keys/{NAME}/?", responses.get_key),
    ("GET", rf"/keys/{NAME}/{VERSION}", responses.get_key),
    ("PATCH", rf"/keys/{NAME}/?", responses.update_key),
    ("PATCH", rf"/keys/{NAME}/{VERSION}", responses.update_key),
    ("POST", rf"/keys/{NAME}/(?:{VERSION}/)?{_OPS}", responses.not_emulated),
    ("GET", rf"/keys/{NAME}/{VERSION}/attestation", responses.not_emulated),
    ("GET", r"/deletedkeys/?", responses.list_deleted_keys),
    ("GET", rf"/deletedkeys/{NAME}", responses.get_deleted_key),
    ("DELETE", rf"/deletedkeys/{NAME}", responses.purge_deleted_key),
    ("POST", rf"/deletedkeys/{NAME}/recover", responses.recover_deleted_key),
    ("POST", r"/rng", responses.not_emulated),
]

_COMPILED = [(method, re.compile(f"^{pattern}$"), handler) for method, pattern, handler in ROUTES]


def resolve(method: str, path: str) -> Tuple[Callable, dict]:
    """The handler and path parameters for a request; NotFound or MethodNotAllowed otherwise."""
    allowed: List[str] = []
    for route_method, pattern, handler in _COMPILED:
        match: Optional[re.Match] = pattern.match(path)
        if match is None:
            continue
        if route_method == method:
            return handler, {k: v for k, v in match.groupdict().items() if v is not None}
        allowed.append(route_method)
    if allowed:
        raise MethodNotAllowed(f"The requested resource does not support http method '{method}'.")
    raise NotFound(f"The requested resource '{path}' was not found.")
