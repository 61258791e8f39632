"""The sandbox's Kubernetes API server over HTTP (aiohttp), in front of an ``Api``.

Theory of operation
-------------------
One catch-all handler parses the URL into a ``Target`` (group, version, resource type,
namespace, name, subresource) and dispatches on (target shape, HTTP method) through a table.
Every error is a ``StoreError`` raised deep and turned into a ``kind: Status`` JSON body once,
in the error middleware, like a real server. Discovery (``/api``, ``/apis``, ``/api/v1``,
``/apis/apps/v1``) and ``/version`` are generated from resources.py.

Lists page with ``limit`` + ``continue``: the opaque token carries the list's revision and the
last (namespace, name) served. Watches (``?watch=true``) stream JSON lines: synthetic ADDED
events for existing objects when no resourceVersion (or "0") is given, otherwise the store's
event log from that revision (an ERROR event with a 410 Status once it is compacted away), then
live events. Selectors filter events; an object that stops matching is sent as DELETED.
Bookmarks, ``sendInitialEvents`` and ``timeoutSeconds`` are honoured, and the stream ends when
the client goes away.

Authentication is a static bearer token; every resource request is then authorized by
``authorization.Authorizer`` (deny rules a test sets at runtime; 403 worded like RBAC's), which
also answers ``SelfSubjectAccessReview``. exec/portforward/log are handed to ``PodStreams``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import yaml
from aiohttp import web

from sandbox.apiserver import authorization as authz
from sandbox.apiserver import resources as R
from sandbox.apiserver.api import Api
from sandbox.apiserver.discovery import api_groups, resource_list, version_info
from sandbox.apiserver.patch import APPLY_PATCH, normalize_content_type
from sandbox.apiserver.resources import ResourceType
from sandbox.apiserver.selectors import parse_field_selector, parse_label_selector
from sandbox.apiserver.store import (
    BadRequest,
    Gone,
    MethodNotAllowed,
    NotFound,
    Obj,
    StoreError,
    Unauthorized,
    WatchEvent,
)

log = logging.getLogger("sandbox.apiserver")

UNAUTHENTICATED_PATHS = ("/healthz", "/readyz", "/livez", "/version", "/version/")
DEFAULT_VERSION = "v1.36.0"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TargetHandler = Callable[[web.Request, "Target"], Awaitable[web.StreamResponse]]


class PodStreamsLike(Protocol):
    async def exec(self, request: web.Request, pod: dict[str, Any]) -> web.StreamResponse: ...
    async def portforward(self, request: web.Request, pod: dict[str, Any]) -> web.StreamResponse: ...
    async def log(self, request: web.Request, pod: dict[str, Any]) -> web.StreamResponse: ...


class ServiceUnavailable(StoreError):
    code = 503
    reason = "ServiceUnavailable"


# -- URL parsing ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    group: str
    version: str
    rt: ResourceType | None = None  # None: the group-version's discovery document
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None

    @property
    def shape(self) -> str:
        if self.rt is None:
            return "discovery"
        if self.name is None:
            return "collection"
        return "object" if self.subresource is None else self.subresource


def _resource(group: str, version: str, plural: str) -> ResourceType:
    rt = R.BY_GROUP_VERSION_PLURAL.get((group, version, plural))
    if rt is None:
        raise NotFound("the server could not find the requested resource")
    return rt


def parse_target(path: str) -> Target:
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis" and parts[1:3] == ["apps", "v1"]:
        group, version, rest = "apps", "v1", parts[3:]
    else:
        raise NotFound("the server could not find the requested resource")
    if not rest:
        return Target(group, version)
    namespace: str | None = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        candidate = R.BY_GROUP_VERSION_PLURAL.get((group, version, rest[2]))
        if candidate is not None and candidate.namespaced:
            namespace, rest = rest[1], rest[2:]
    if len(rest) > 3:
        raise NotFound("the server could not find the requested resource")
    rt = _resource(group, version, rest[0])
    if namespace is None and rt.namespaced and len(rest) > 1:
        raise NotFound("the server could not find the requested resource")
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if sub is not None and sub not in rt.subresources:
        raise NotFound("the server could not find the requested resource")
    return Target(group, version, rt, namespace, name, sub)


# -- bodies and parameters --------------------------------------------------------------------


def status_body(err: StoreError) -> Obj:
    return err.status()


def success_status(details: Obj | None = None) -> Obj:
    body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
    if details:
        body["details"] = details
    return body


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


async def _read_json(request: web.Request, *, allow_empty: bool = False) -> Any:
    raw = await request.read()
    if not raw.strip():
        if allow_empty:
            return None
        raise BadRequest("the body of the request was empty")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"couldn't get version/kind; json parse error: {exc}") from exc


async def _read_patch(request: web.Request) -> tuple[Any, str]:
    ctype = normalize_content_type(request.headers.get("Content-Type"))
    raw = await request.read()
    if ctype == APPLY_PATCH:
        try:
            return yaml.safe_load(raw.decode()), ctype
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise BadRequest(f"error decoding YAML: {exc}") from exc
    try:
        return json.loads(raw), ctype
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"error decoding patch: {exc}") from exc


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("true", "1")


def _int_param(request: web.Request, name: str) -> int | None:
    text = request.query.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError as exc:
        raise BadRequest(f"invalid value for {name}: {text!r}") from exc


def _dry_run(request: web.Request, body: Obj | None = None) -> bool:
    values = list(request.query.getall("dryRun", []))
    if isinstance(body, dict) and isinstance(body.get("dryRun"), list):
        values += [str(v) for v in body["dryRun"]]
    for v in values:
        if v != "All":
            raise BadRequest(f'Invalid dryRun value: "{v}"; supported values: "All"')
    return bool(values)


# -- continue tokens ----------------------------------------------------------------------------


def encode_continue(revision: int, namespace: str, name: str) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": revision, "start": [namespace, name]})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_continue(token: str) -> tuple[int, tuple[str, str]]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        ns, name = data["start"]
        return int(data["rv"]), (str(ns), str(name))
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise BadRequest(f"continue key is not valid: {exc}") from exc


def _sort_key(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata", {})
    return (meta.get("namespace") or "", meta.get("name") or "")


# -- the server ---------------------------------------------------------------------------------


class ApiServer:
    """Request handlers bound to one ``Api``; ``build_app`` wires them into aiohttp."""

    def __init__(
        self,
        api: Api,
        *,
        token: str,
        streams: PodStreamsLike | None,
        git_version: str = DEFAULT_VERSION,
        bookmark_interval: float = 60.0,
        watch_poll_interval: float = 1.0,
    ) -> None:
        self.api = api
        self.token = token
        self.streams = streams
        self.git_version = git_version
        self.bookmark_interval = bookmark_interval
        self.watch_poll_interval = watch_poll_interval
        self.authorizer = authz.Authorizer(api.store)
        self._routes: dict[tuple[str, str], TargetHandler] = {
            ("discovery", "GET"): self._discovery,
            ("collection", "GET"): self._list_or_watch,
            ("collection", "POST"): self._create,
            ("collection", "DELETE"): self._delete_collection,
            ("object", "GET"): self._get,
            ("object", "PUT"): self._update,
            ("object", "PATCH"): self._patch,
            ("object", "DELETE"): self._delete,
            ("status", "GET"): self._get,
            ("status", "PUT"): self._update,
            ("status", "PATCH"): self._patch,
            ("scale", "GET"): self._get_scale,
            ("scale", "PUT"): self._update_scale,
            ("scale", "PATCH"): self._patch_scale,
            ("exec", "GET"): self._stream,
            ("exec", "POST"): self._stream,
            ("portforward", "GET"): self._stream,
            ("portforward", "POST"): self._stream,
            ("log", "GET"): self._stream,
        }

    # -- middleware ---------------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if request.path not in UNAUTHENTICATED_PATHS:
                self._authenticate(request)
            return await handler(request)
        except StoreError as err:
            return _json(status_body(err), err.code)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            reason = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status, "BadRequest")
            return _json(
                {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                 "message": exc.reason, "reason": reason, "code": exc.status},
                exc.status,
            )
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug: answer 500 like a real server, and log it
            log.exception("internal error serving %s %s", request.method, request.path)
            return _json(
                {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                 "message": f"Internal error occurred: {exc}", "reason": "InternalError",
                 "code": 500},
                500,
            )

    def _authenticate(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credential.strip().encode(), self.token.encode()
        ):
            raise Unauthorized("Unauthorized")

    # -- fixed endpoints ------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok", content_type="text/plain")

    async def version(self, request: web.Request) -> web.StreamResponse:
        return _json(version_info(self.git_version))

    async def core_versions(self, request: web.Request) -> web.StreamResponse:
        host = request.host or "127.0.0.1:6443"
        return _json({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}],
        })

    async def group_list(self, request: web.Request) -> web.StreamResponse:
        return _json({"kind": "APIGroupList", "apiVersion": "v1", "groups": api_groups()})

    async def group(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["group"]
        for g in api_groups():
            if g["name"] == name:
                return _json({"kind": "APIGroup", "apiVersion": "v1", **g})
        raise NotFound("the server could not find the requested resource")

    # -- resource dispatch ----------------------------------------------------------------------

    async def resource(self, request: web.Request) -> web.StreamResponse:
        target = parse_target(request.path)
        handler = self._routes.get((target.shape, request.method))
        if handler is None:
            raise MethodNotAllowed(
                f"the server does not allow this method on the requested resource "
                f"({request.method} {target.shape})"
            )
        if target.rt is not None:
            self.authorizer.authorize_request(
                request.method, target.shape, target.rt, namespace=target.namespace,
                name=target.name, subresource=target.subresource, watch=_flag(request, "watch"),
            )
        return await handler(request, target)

    async def authorization_resources(self, request: web.Request) -> web.StreamResponse:
        return _json(authz.resource_list())

    async def self_subject_access_review(self, request: web.Request) -> web.StreamResponse:
        self.authorizer.authorize(authz.ssar_attributes())
        return _json(self.authorizer.review(await _read_json(request)), 201)

    @staticmethod
    def _target(target: Target) -> tuple[ResourceType, Target]:
        if target.rt is None:
            raise NotFound("the server could not find the requested resource")
        return target.rt, target

    async def _discovery(self, request: web.Request, target: Target) -> web.StreamResponse:
        return _json(resource_list(target.group, target.version))

    async def _get(self, request: web.Request, target: Target) -> web.StreamResponse:
        rt, t = self._target(target)
        return _json(self.api.get(rt, t.namespace, t.name or ""))

    async def _create(self, request: web.Request, target: Target) -> web.StreamResponse:
        rt, t = self._target(target)
        body = await _read_json(request)
        created = self.api.create(rt, t.namespace, body, dry_run=_dry_run(request))
        return _json(created, 201)

    async def _update(self, request: web.Request, target: Target) -> web.StreamResponse:
        rt, t = self._target(target)
        body = await _read_json(request)
        updated = self.api.update(
            rt, t.namespace, t.name or "", body, subresource=t.subresource,
            dry_run=_dry_run(request),
        )
        return _json(updated)

    async def _patch(self, request: web.Request, target: Target) -> web.StreamResponse:
        rt, t = self._target(target)
        body, ctype = await _read_patch(request)
        existed = self.api.store.find(rt, t.namespace, t.name or "") is not None
        patched = self.api.patch(
            rt, t.namespace, t.name or "", body, ctype, subresource=t.subresource,
            dry_run=_dry_run(request),
        )
        return _json(patched, 200 if existed else 201)

    async def _get_scale(self, request: web.Request, target: Target) -> web.StreamResponse:
        rt, t = self._target(target)
        return _json(self.api.get_scale(rt, t.namespace, t.name or ""))

    async def _update_scale(self, request: web.Request, target: Target) -> web.StreamResponse:
        rt, t = self._target(target)
        body = await _read_json(request)
        return _json(self.api.update_scale(rt, t.namespace, t.name or "", body,
                                           dry_run=_dry_run(request)))

    async def _patch_scale(self, request: web.Request, target: Target) -> web.StreamResponse:
        rt, t = self._target(target)
        body, ctype = await _read_patch(request)
        return _json(self.api.patch_scale(rt, t.namespace, t.name or "", body, ctype,
                                          dry_run=_dry_run(request)))

    async def _delete_options(self, request: web.Request) -> tuple[Obj, bool]:
        body = await _read_json(request, allow_empty=True)
        opts: Obj = body if isinstance(body, dict) else {}
        grace = _int_param(request, "gracePeriodSeconds")
        if grace is None and isinstance(opts.get("gracePeriodSeconds"), int):
            grace = opts["gracePeriodSeconds"]
        policy = request.query.get("propagationPolicy") or opts.get("propagationPolicy")
        orphan = request.query.get("orphanDependents", "").lower()
        if policy is None and (orphan == "true" or opts.get("orphanDependents") is True):
            policy = "Orphan"
        pre = opts.get("preconditions") if isinstance(opts.get("preconditions"), dict) else None
        return (
            {"grace_period_seconds": grace, "propagation_policy": policy, "preconditions": pre},
            _dry_run(request, opts),
        )

    async def _delete(self, request: web.Request, target: Target) -> web.StreamResponse:
        rt, t = self._target(target)
        opts, dry_run = await self._delete_options(request)
        deleted = self.api.delete(rt, t.namespace, t.name or "", dry_run=dry_run, **opts)
        return _json(deleted)

    async def _delete_collection(self, request: web.Request, target: Target) -> web.StreamResponse:
        rt, t = self._target(target)
        opts, dry_run = await self._delete_options(request)
        deleted = self.api.delete_collection(
            rt, t.namespace,
            label_selector=request.query.get("labelSelector"),
            field_selector=request.query.get("fieldSelector"),
            grace_period_seconds=opts["grace_period_seconds"],
            propagation_policy=opts["propagation_policy"],
            dry_run=dry_run,
        )
        return _json({
            "kind": rt.list_kind, "apiVersion": rt.api_version,
            "metadata": {"resourceVersion": str(self.api.store.revision)}, "items": deleted,
        })

    async def _stream(self, request: web.Request, target: Target) -> web.StreamResponse:
        rt, t = self._target(target)
        pod = self.api.get(rt, t.namespace, t.name or "")
        if self.streams is None:
            raise ServiceUnavailable(f"pod {t.subresource} is not available in this server")
        table = {
            "exec": self.streams.exec,
            "portforward": self.streams.portforward,
            "log": self.streams.log,
        }
        return await table[t.subresource or ""](request, pod)

    # -- list -----------------------------------------------------------------------------------

    async def _list_or_watch(self, request: web.Request, target: Target) -> web.StreamResponse:
        if _flag(request, "watch"):
            return await self._watch(request, target)
        rt, t = self._target(target)
        items, revision = self.api.list_with_revision(
            rt, t.namespace,
            label_selector=request.query.get("labelSelector"),
            field_selector=request.query.get("fieldSelector"),
        )
        meta: Obj = {}
        token = request.query.get("continue")
        if token:
            revision, start = decode_continue(token)
            try:
                self.api.store.events_since(revision)
            except Gone as exc:
                raise Gone(
                    "The provided continue parameter is too old to display a consistent list "
                    "result. You can start a new list without the continue parameter, or use "
                    "the continue token in this response to retrieve the remainder of the "
                    "results. Continuing with the provided token results in an inconsistent "
                    "list - objects that were created, modified, or deleted between the time "
                    "the first chunk was returned and now may show up in the list."
                ) from exc
            items = [i for i in items if _sort_key(i) > start]
        limit = _int_param(request, "limit") or 0
        if limit > 0 and len(items) > limit:
            items, rest = items[:limit], items[limit:]
            meta["continue"] = encode_continue(revision, *_sort_key(items[-1]))
            meta["remainingItemCount"] = len(rest)
        meta["resourceVersion"] = str(revision)
        return _json({
            "kind": rt.list_kind,
            "apiVersion": rt.api_version,
            "metadata": meta,
            "items": items,
        })

    # -- watch ----------------------------------------------------------------------------------

    async def _watch(self, request: web.Request, target: Target) -> web.StreamResponse:
        rt, t = self._target(target)
        labels = parse_label_selector(request.query.get("labelSelector"))
        fields = parse_field_selector(request.query.get("fieldSelector"), rt)
        rv_text = request.query.get("resourceVersion", "")
        timeout = _int_param(request, "timeoutSeconds")
        if timeout is None or timeout <= 0:
            timeout = random.randint(1800, 3600)
        bookmarks = _flag(request, "allowWatchBookmarks")
        initial_events = _flag(request, "sendInitialEvents")
        if rv_text not in ("", "0"):
            try:
                start_revision = int(rv_text)
            except ValueError as exc:
                raise BadRequest(f"invalid resource version: {rv_text}") from exc
        else:
            start_revision = -1

        def matches(obj: Obj) -> bool:
            if t.namespace is not None and obj.get("metadata", {}).get("namespace") != t.namespace:
                return False
            return labels.matches_object(obj) and fields.matches(obj)

        store = self.api.store
        sub = store.subscribe()
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        visible: set[tuple[str, str]] = set()  # objects this watcher currently sees
        last = 0

        async def send(type_: str, obj: Obj) -> None:
            line = json.dumps({"type": type_, "object": obj}, separators=(",", ":")) + "\n"
            await response.write(line.encode())

        def bookmark(revision: int, *, initial_end: bool = False) -> Obj:
            meta: Obj = {"resourceVersion": str(revision)}
            if initial_end:
                meta["annotations"] = {"k8s.io/initial-events-end": "true"}
            return {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta}

        async def deliver(event: WatchEvent) -> None:
            nonlocal last
            last = max(last, event.revision)
            if event.resource.key != rt.key:
                return
            key = _sort_key(event.object)
            ok = matches(event.object)
            if event.type == "DELETED":
                if ok or key in visible:
                    visible.discard(key)
                    await send("DELETED", event.object)
                return
            if ok:
                # A watch resumed from a revision cannot know what the client saw before, so
                # it passes MODIFIED through; a fresh watch knows, and says ADDED when an object
                # starts to match.
                fresh = event.type == "ADDED" or (key not in visible and not resumed)
                type_ = "ADDED" if fresh else "MODIFIED"
                visible.add(key)
                await send(type_, event.object)
            elif key in visible:
                visible.discard(key)
                await send("DELETED", event.object)

        resumed = start_revision >= 0 and not initial_events
        try:
            if resumed:
                try:
                    backlog = store.events_since(start_revision)
                except Gone as err:
                    await send("ERROR", err.status())
                    return response
                last = start_revision
                for event in backlog:
                    await deliver(event)
            else:
                items, revision = store.list(rt, t.namespace if rt.namespaced else None, matches)
                for obj in items:
                    visible.add(_sort_key(obj))
                    await send("ADDED", obj)
                last = revision
                if initial_events:
                    await send("BOOKMARK", bookmark(revision, initial_end=True))
            await self._pump(request, sub, deliver, send, bookmark, bookmarks, timeout,
                             lambda: last)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            sub.close()
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    async def _pump(
        self,
        request: web.Request,
        sub: Any,
        deliver: Callable[[WatchEvent], Awaitable[None]],
        send: Callable[[str, Obj], Awaitable[None]],
        bookmark: Callable[[int], Obj],
        bookmarks: bool,
        timeout: int,
        last: Callable[[], int],
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        next_bookmark = time.monotonic() + self.bookmark_interval
        while True:
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            now = loop.time()
            if now >= deadline:
                return
            wait = min(deadline - now, self.watch_poll_interval)
            if bookmarks:
                wait = max(0.0, min(wait, next_bookmark - time.monotonic()))
            try:
                event: WatchEvent = await asyncio.wait_for(sub.queue.get(), timeout=wait)
            except TimeoutError:
                if bookmarks and time.monotonic() >= next_bookmark:
                    next_bookmark = time.monotonic() + self.bookmark_interval
                    # Every event up to the store's revision has reached this queue.
                    revision = self.api.store.revision if sub.queue.empty() else last()
                    await send("BOOKMARK", bookmark(revision))
                continue
            if event.revision > last():
                await deliver(event)


SERVER_KEY: web.AppKey[ApiServer] = web.AppKey("apiserver", ApiServer)


def build_app(
    api: Api,
    *,
    token: str,
    streams: PodStreamsLike | None,
    git_version: str = DEFAULT_VERSION,
    bookmark_interval: float = 60.0,
) -> web.Application:
    server = ApiServer(
        api, token=token, streams=streams, git_version=git_version,
        bookmark_interval=bookmark_interval,
    )
    app = web.Application(middlewares=[server.middleware], client_max_size=16 * 1024 * 1024)
    app[SERVER_KEY] = server
    fixed: tuple[tuple[str, Handler], ...] = (
        ("/healthz", server.health),
        ("/readyz", server.health),
        ("/livez", server.health),
        ("/version", server.version),
        ("/api", server.core_versions),
        ("/apis", server.group_list),
        ("/apis/{group}", server.group),
    )
    for path, handler in fixed:
        app.router.add_get(path, handler)
        app.router.add_get(path + "/", handler)
    app.router.add_get(f"/apis/{authz.GROUP}/{authz.VERSION}", server.authorization_resources)
    app.router.add_get(f"/apis/{authz.GROUP}/{authz.VERSION}/", server.authorization_resources)
    app.router.add_post(authz.SSAR_PATH, server.self_subject_access_review)
    app.router.add_route("*", "/api/{tail:.*}", server.resource)
    app.router.add_route("*", "/apis/{group}/{tail:.+}", server.resource)
    return app
