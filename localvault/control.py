"""What a test controls beyond the keys: faults, holds, key permissions, the request log, the clock and
reset, in-process (``Controls``, behind ``LocalVault``'s methods) and over the control API.

The control API lives on the vault's TLS port under ``/_localvault/``, which no Key Vault route uses.
Every request to it needs the identity secret in ``X-IDENTITY-HEADER``; without it the answer is 401 and
the body is not read. Its requests are neither logged nor subject to faults or permissions.
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable, Deque, Dict, FrozenSet, Iterable, List, NamedTuple, Optional, Tuple
from urllib.parse import urlsplit

from .clock import MAX_CLOCK
from .exceptions import (
    BadParameter,
    Forbidden,
    InternalServerError,
    MethodNotAllowed,
    NotFound,
    Unauthorized,
    VaultError,
)
from .faults import HOLD_TIMEOUT, FaultPlan, Holds, canonical_names
from .http11 import CLIENT_GONE
from .models import VAULT_LOCATION, KeyStore, add_duration, check_delay
from .responses import json_object
from .tokens import TENANT_ID
from .urls import ROUTES, Route, resolve

log = logging.getLogger("localvault")
PREFIX = "/_localvault"
MAX_LOG = 10_000
MAX_WAIT_IDLE = 60.0
# Access-policy key permissions, as the route table spells them; "all" stands for every one.
KEY_PERMISSIONS = frozenset(route.permission for route in ROUTES if route.permission)
_SPELLINGS = {name.lower(): name for name in (*KEY_PERMISSIONS, "all")}


def check_permissions(names: Optional[Iterable[str]]) -> FrozenSet[str]:
    """Access-policy key permission names in any case (``all`` for every one); None: every one.
    ValueError names an unknown one."""
    if names is None:
        return KEY_PERMISSIONS
    chosen = canonical_names(names, _SPELLINGS, "key permission")
    return KEY_PERMISSIONS if "all" in chosen else chosen


def parse_permissions(text: str) -> FrozenSet[str]:
    """``get,list,create`` as a set of permissions; an empty string: none."""
    return check_permissions([p.strip() for p in text.split(",") if p.strip()])


def _path_of(target: str) -> str:
    try:
        return urlsplit(target).path
    except ValueError:  # a broken absolute-form target
        return ""


def operation_of(method: str, target: str) -> Optional[str]:
    """The keys.json operationId a request is for, if it names one."""
    try:
        return resolve(method, _path_of(target))[0].operation
    except VaultError:
        return None


def is_control(target: str) -> bool:
    path = _path_of(target)
    return path == PREFIX or path.startswith(PREFIX + "/")


class RequestLog:
    """The last ``MAX_LOG`` Key Vault requests served: method, path (never the query), operationId,
    status (None for a dropped connection), the injected fault if any, and when (UTC, real time)."""

    def __init__(self, size: int = MAX_LOG) -> None:
        self._entries: Deque[Dict[str, Any]] = deque(maxlen=size)
        self._lock = threading.Lock()

    def record(self, method: str, target: str, status: Optional[int], fault: Optional[str]) -> None:
        entry = {
            "method": method,
            "path": _path_of(target),
            "operation": operation_of(method, target),
            "status": status,
            "fault": fault,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        with self._lock:
            self._entries.append(entry)

    def entries(self) -> List[Dict[str, Any]]:
        with self._lock:
            return [dict(entry) for entry in self._entries]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class Controls:
    """A vault's run-time controls, and the settings it started with, which ``reset()`` restores."""

    def __init__(
        self,
        store: KeyStore,
        principal_id: str,
        secret: str,
        faults: FaultPlan,
        key_permissions: Optional[Iterable[str]],
        wait_idle: Callable[[float], bool],
    ) -> None:
        self.store, self.faults, self.log = store, faults, RequestLog()
        self.holds = Holds()
        self._principal_id, self._secret = principal_id, secret.encode()
        self.key_permissions = check_permissions(key_permissions)
        self.wait_idle = wait_idle
        self._start = (
            dict(faults.rates),
            faults.seed,
            faults.operations,
            self.key_permissions,
            store.delete_delay,
        )

    def authorized(self, given: Optional[str]) -> bool:
        """Whether ``given`` is the identity secret; constant time, whatever characters it holds."""
        return hmac.compare_digest((given or "").encode("utf-8", "surrogateescape"), self._secret)

    def inject_fault(self, route: Route) -> None:
        """Raise the fault injected into this request, if any. Called before ``authorize``: throttling and
        outages come from the service's front end, before the access policy is consulted."""
        self.faults.decide(route.operation)

    def authorize(self, route: Route) -> None:
        """Raise the service's 403 if the key permission the route needs is not granted."""
        if route.permission and route.permission not in self.key_permissions:
            raise Forbidden.access_denied(route.permission, self._principal_id, TENANT_ID, VAULT_LOCATION)

    def set_key_permissions(self, names: Optional[Iterable[str]]) -> None:
        self.key_permissions = check_permissions(names)

    def reset(self) -> None:
        """Keys, clock, request log, faults, delete delay and permissions back to how the vault started,
        and every hold released. The clock goes first, its write before any change, so that a failure to write leaves everything
        as it was; forgetting the keys only removes files."""
        rates, seed, operations, permissions, delay = self._start
        try:
            self.store.clock.reset()
        except OSError as exc:
            raise InternalServerError(
                f"Nothing was reset: the clock could not be written ({exc.strerror})."
            ) from None
        try:
            self.store.reset()
        except OSError as exc:
            raise InternalServerError(
                "The clock is back to real time and every key is forgotten, but removing their files "
                f"failed ({exc.strerror}): they come back when the vault restarts. Faults, permissions "
                "and the request log were not reset."
            ) from None
        self.faults.clear()
        self.faults.configure(rates, seed, operations)
        self.holds.release_all()
        self.store.set_delete_delay(delay)
        self.key_permissions = permissions
        self.log.clear()

    def describe_faults(self) -> Dict[str, Any]:
        return {**self.faults.describe(), "delete_delay": self.store.delete_delay}

    def clock_state(self) -> Dict[str, Any]:
        now = self.store.clock.now()
        return {
            "now": now,
            "offset": self.store.clock.offset,
            "time": datetime.fromtimestamp(now, timezone.utc).isoformat().replace("+00:00", "Z"),
        }

    def advance_clock(self, step: Any) -> None:
        """Move the vault's clock forward by seconds (a number) or an ISO-8601 duration such as P30D."""
        now = self.store.clock.now()
        if isinstance(step, str):
            seconds: float = add_duration(int(now), step, "advance") - int(now)
        elif isinstance(step, (int, float)) and not isinstance(step, bool):
            seconds = step
        else:
            raise BadParameter("'advance' must be a number of seconds or an ISO 8601 duration such as P30D.")
        if not 0 <= seconds <= MAX_CLOCK - now:
            raise BadParameter("'advance' must move the clock forward, and not past the year 9000.")
        try:
            self.store.clock.advance(seconds=seconds)
        except ValueError:  # the clock moved on by itself past the bound checked above
            raise BadParameter("'advance' must move the clock forward, and not past the year 9000.") from None
        except OSError as exc:
            raise InternalServerError(
                f"The clock was not moved: it could not be written ({exc.strerror})."
            ) from None


# -- the control API --------------------------------------------------------------------------------


class Call(NamedTuple):
    controls: Controls
    handler: Any  # the VaultHandler serving this request
    body: Dict[str, Any]


Answer = Tuple[int, Optional[Dict[str, Any]]]


def _number(body: Dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise BadParameter(f"'{name}' must be a number from {low:g} to {high:g}.")
    return float(value)


def _reset(call: Call) -> Answer:
    call.controls.reset()
    return 204, None


def _get_clock(call: Call) -> Answer:
    return 200, call.controls.clock_state()


def _advance_clock(call: Call) -> Answer:
    if "advance" not in call.body:
        raise BadParameter("Give 'advance': a number of seconds or an ISO 8601 duration such as P30D.")
    call.controls.advance_clock(call.body["advance"])
    return 200, call.controls.clock_state()


def _get_faults(call: Call) -> Answer:
    return 200, call.controls.describe_faults()


def _put_faults(call: Call) -> Answer:
    """Replace every fault setting; what the body leaves out is off. Nothing changes on a 400."""
    body, controls = call.body, call.controls
    queued = body.get("next") or []
    if isinstance(queued, dict):
        queued = [queued]
    if not isinstance(queued, list) or not all(isinstance(item, dict) for item in queued):
        raise BadParameter('\'next\' must be a list of {"fault", "count", "operations"} objects.')
    delay = body.get("delete_delay", 0)

    def apply(plan: FaultPlan) -> None:
        plan.clear()
        plan.configure(body.get("rates"), body.get("seed"), body.get("operations"))
        for item in queued:
            plan.fail_next(item.get("count", 1), item.get("fault", ""), item.get("operations"))

    try:
        check_delay(delay)
        apply(FaultPlan())  # a scratch plan first, so that a bad body changes nothing
    except ValueError as exc:
        raise BadParameter(f"Invalid faults: {exc}.") from None
    apply(controls.faults)
    controls.store.set_delete_delay(delay)
    return 200, controls.describe_faults()


def _delete_faults(call: Call) -> Answer:
    call.controls.faults.clear()
    call.controls.store.set_delete_delay(0)
    return 200, call.controls.describe_faults()


def _permissions(controls: Controls) -> Dict[str, Any]:
    return {"keys": sorted(controls.key_permissions, key=str.lower)}


def _get_permissions(call: Call) -> Answer:
    return 200, _permissions(call.controls)


def _put_permissions(call: Call) -> Answer:
    if "keys" not in call.body:
        raise BadParameter('Give \'keys\': a list of key permissions, such as ["get", "list"], or ["all"].')
    try:
        call.controls.set_key_permissions(call.body["keys"])
    except ValueError as exc:
        raise BadParameter(f"Invalid key permissions: {exc}.") from None
    return 200, _permissions(call.controls)


def _wait_idle(call: Call) -> Answer:
    timeout = _number(call.body, "timeout", 10.0, 0.0, MAX_WAIT_IDLE)
    server, connection = call.handler.server, call.handler.connection
    server.wait_for_request(connection)  # this request is not one to wait for
    try:
        idle = call.controls.wait_idle(timeout)
    finally:
        server.request_arrived(connection)
    return 200, {"idle": idle}


def _holds(controls: Controls) -> Dict[str, Any]:
    return {"holds": controls.holds.describe()}


def _get_holds(call: Call) -> Answer:
    return 200, _holds(call.controls)


def _post_holds(call: Call) -> Answer:
    body = call.body
    try:
        hold = call.controls.holds.hold_next(
            body.get("operation", ""), body.get("when", "before"), body.get("timeout", HOLD_TIMEOUT)
        )
    except ValueError as exc:
        raise BadParameter(f"Invalid hold: {exc}.") from None
    return 200, hold.describe()


def _find_hold(call: Call) -> Any:
    hold = call.controls.holds.find(call.body.get("id"))
    if hold is None:
        raise NotFound(f"No hold {str(call.body.get('id'))[:32]!r} is set: it was released, or never set.")
    return hold


def _delete_holds(call: Call) -> Answer:
    if "id" in call.body:
        _find_hold(call).release()
    else:
        call.controls.holds.release_all()
    return 200, _holds(call.controls)


def _wait_held(call: Call) -> Answer:
    hold = _find_hold(call)
    timeout = _number(call.body, "timeout", 10.0, 0.0, MAX_WAIT_IDLE)
    server, connection = call.handler.server, call.handler.connection
    server.wait_for_request(connection)  # not a request in flight, for wait-idle
    try:
        hold.wait(timeout)
    finally:
        server.request_arrived(connection)
    return 200, hold.describe()


def _get_requests(call: Call) -> Answer:
    return 200, {"requests": call.controls.log.entries()}


def _delete_requests(call: Call) -> Answer:
    call.controls.log.clear()
    return 204, None


CONTROL_ROUTES: Dict[str, Dict[str, Callable[[Call], Answer]]] = {
    "reset": {"POST": _reset},
    "clock": {"GET": _get_clock, "POST": _advance_clock},
    "faults": {"GET": _get_faults, "PUT": _put_faults, "DELETE": _delete_faults},
    "permissions": {"GET": _get_permissions, "PUT": _put_permissions},
    "wait-idle": {"POST": _wait_idle},
    "holds": {"GET": _get_holds, "POST": _post_holds, "DELETE": _delete_holds},
    "wait-held": {"POST": _wait_held},
    "requests": {"GET": _get_requests, "DELETE": _delete_requests},
}
_CONTROL_PATH = re.compile(rf"^{PREFIX}/(?P<name>[a-z-]+)/?$")


def _route(method: str, target: str) -> Callable[[Call], Answer]:
    match = _CONTROL_PATH.match(_path_of(target))
    methods = CONTROL_ROUTES.get(match["name"]) if match else None
    if methods is None:
        raise NotFound(
            f"No control route {_path_of(target)[:128]!r}; routes: "
            + ", ".join(f"{PREFIX}/{name}" for name in CONTROL_ROUTES)
        )
    if method not in methods:
        raise MethodNotAllowed(f"{PREFIX}/{match['name']} supports {', '.join(methods)}.")  # type: ignore[index]
    return methods[method]


def handle(handler: Any) -> None:
    """Serve one control API request on ``handler`` (a VaultHandler)."""
    controls: Controls = handler.server.controls
    try:
        if not controls.authorized(handler.headers.get("X-IDENTITY-HEADER")):
            handler.skip_body()
            raise Unauthorized("The control API needs the identity secret in X-IDENTITY-HEADER.")
        action = _route(handler.command, handler.path)
        status, payload = action(Call(controls, handler, json_object(handler.read_body()) or {}))
    except VaultError as error:
        status, payload = error.status, error.body()
    except CLIENT_GONE:
        raise
    except Exception:  # a bug in localvault; the server keeps serving
        log.exception(
            "internal error in the control API: %s %s", handler.command, _path_of(handler.path)[:128]
        )
        status, payload = 500, InternalServerError("localvault internal error in the control API").body()
    handler.send_json(status, payload, {"Cache-Control": "no-store"})
