"""Label and field selectors, parsed like the Kubernetes API server parses them.

Label selector text (``?labelSelector=``) is a comma-separated AND of requirements:
``key``, ``!key``, ``key=value``, ``key==value``, ``key!=value``, ``key in (a,b)``,
``key notin (a,b)``, ``key>N``, ``key<N``. Field selector text (``?fieldSelector=``) is a
comma-separated AND of ``field=value``, ``field==value`` or ``field!=value`` over a fixed set of
fields per resource type (``metadata.name``, ``metadata.namespace``, ``status.phase``,
``spec.nodeName``, ...); any other field is refused, as a real server does.

Controllers match ``LabelSelector`` objects (``matchLabels`` / ``matchExpressions``) with
:func:`selector_from_object`. Bad syntax raises :class:`BadRequest` (HTTP 400).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sandbox.apiserver.resources import ResourceType
from sandbox.apiserver.store import BadRequest

Obj = dict[str, Any]


class Op(enum.Enum):
    EQUALS = "="
    NOT_EQUALS = "!="
    IN = "in"
    NOT_IN = "notin"
    EXISTS = "exists"
    DOES_NOT_EXIST = "!"
    GREATER_THAN = "gt"
    LESS_THAN = "lt"


def _as_int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


_MATCHERS: dict[Op, Callable[[str | None, frozenset[str]], bool]] = {
    Op.EQUALS: lambda v, vals: v is not None and v in vals,
    Op.IN: lambda v, vals: v is not None and v in vals,
    Op.NOT_EQUALS: lambda v, vals: v is None or v not in vals,
    Op.NOT_IN: lambda v, vals: v is None or v not in vals,
    Op.EXISTS: lambda v, vals: v is not None,
    Op.DOES_NOT_EXIST: lambda v, vals: v is None,
    Op.GREATER_THAN: lambda v, vals: (
        _as_int(v) is not None and _as_int(v) > int(next(iter(vals)))  # type: ignore[operator]
    ),
    Op.LESS_THAN: lambda v, vals: (
        _as_int(v) is not None and _as_int(v) < int(next(iter(vals)))  # type: ignore[operator]
    ),
}


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: Op
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return _MATCHERS[self.op](labels.get(self.key), self.values)


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """An AND of requirements; the empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()
    match_nothing: bool = False

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        if self.match_nothing:
            return False
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)

    def matches_object(self, obj: Obj) -> bool:
        return self.matches(obj.get("metadata", {}).get("labels") or {})

    @property
    def empty(self) -> bool:
        return not self.requirements and not self.match_nothing


EVERYTHING = LabelSelector()
NOTHING = LabelSelector(match_nothing=True)

# -- label selector text ------------------------------------------------------------------

_SPECIAL = "(),!=<>"


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "!=" and text[i : i + 2] in ("!=", "=="):
            tokens.append(text[i : i + 2])
            i += 2
        elif c in _SPECIAL:
            tokens.append(c)
            i += 1
        else:
            j = i
            while j < len(text) and not text[j].isspace() and text[j] not in _SPECIAL:
                j += 1
            tokens.append(text[i:j])
            i = j
    return tokens


_KEYWORDS = {"in", "notin"}


def _is_ident(tok: str | None) -> bool:
    return tok is not None and tok not in _SPECIAL and tok not in ("!=", "==")


class _LabelParser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str | None:
        tok = self.peek()
        self.pos += 1
        return tok

    def fail(self, detail: str) -> BadRequest:
        return BadRequest(f"unable to parse requirement: {detail}")

    def parse(self) -> LabelSelector:
        reqs: list[Requirement] = []
        if self.peek() is None:
            return EVERYTHING
        while True:
            reqs.append(self.requirement())
            tok = self.take()
            if tok is None:
                break
            if tok != ",":
                raise self.fail(f"found '{tok}', expected: ',' or 'end of string'")
        return LabelSelector(tuple(reqs))

    def requirement(self) -> Requirement:
        tok = self.take()
        if tok == "!":
            key = self.take()
            if key is None or not _is_ident(key):
                raise self.fail(f"found '{key or ''}', expected: identifier")
            _validate_key(key)
            return Requirement(key, Op.DOES_NOT_EXIST)
        if tok is None or not _is_ident(tok):
            raise self.fail(f"found '{tok or ''}', expected: !, identifier, or 'end of string'")
        key = tok
        _validate_key(key)
        op_tok = self.peek()
        if op_tok is None or op_tok == ",":
            return Requirement(key, Op.EXISTS)
        self.take()
        if op_tok in ("=", "=="):
            return Requirement(key, Op.EQUALS, frozenset({self.single_value()}))
        if op_tok == "!=":
            return Requirement(key, Op.NOT_EQUALS, frozenset({self.single_value()}))
        if op_tok in (">", "<"):
            value = self.single_value()
            if _as_int(value) is None:
                raise self.fail(f"for 'Gt', 'Lt' operators, the value must be an integer: {value}")
            op = Op.GREATER_THAN if op_tok == ">" else Op.LESS_THAN
            return Requirement(key, op, frozenset({value}))
        if op_tok in _KEYWORDS:
            return Requirement(key, Op.IN if op_tok == "in" else Op.NOT_IN, self.value_set())
        raise self.fail(
            f"found '{op_tok}', expected: in, notin, =, ==, !=, gt, lt"
        )

    def single_value(self) -> str:
        tok = self.peek()
        if tok is None or tok == ",":
            return ""
        if not _is_ident(tok):
            raise self.fail(f"found '{tok}', expected: identifier")
        self.take()
        _validate_value(tok)
        return tok

    def value_set(self) -> frozenset[str]:
        if self.take() != "(":
            raise self.fail("found '', expected: '('")
        values: set[str] = set()
        expect_value = True
        while True:
            tok = self.take()
            if tok is None:
                raise self.fail("found '', expected: ')'")
            if tok == ")":
                if expect_value and values:
                    values.add("")
                break
            if tok == ",":
                if expect_value:
                    values.add("")
                expect_value = True
                continue
            if not _is_ident(tok) or not expect_value:
                raise self.fail(f"found '{tok}', expected: ',', ')' or identifier")
            _validate_value(tok)
            values.add(tok)
            expect_value = False
        return frozenset(values)


def _is_qualified_name_part(s: str) -> bool:
    if not s or len(s) > 63 or not s[0].isalnum() or not s[-1].isalnum():
        return False
    return all(c.isalnum() or c in "-_." for c in s) and s.isascii()


def _validate_key(key: str) -> None:
    prefix, _, name = key.rpartition("/")
    if "/" in key and not prefix:
        raise BadRequest(f"unable to parse requirement: invalid label key \"{key}\"")
    if not _is_qualified_name_part(name) or (prefix and len(prefix) > 253):
        raise BadRequest(
            f"unable to parse requirement: invalid label key \"{key}\": name part must consist "
            "of alphanumeric characters, '-', '_' or '.', and must start and end with an "
            "alphanumeric character"
        )


def _validate_value(value: str) -> None:
    if value and not _is_qualified_name_part(value):
        raise BadRequest(
            f"unable to parse requirement: invalid label value: \"{value}\": at key: a valid "
            "label must be an empty string or consist of alphanumeric characters, '-', '_' or "
            "'.', and must start and end with an alphanumeric character"
        )


def parse_label_selector(text: str | None) -> LabelSelector:
    """Parse ``?labelSelector=`` text; BadRequest on bad syntax."""
    if text is None or not text.strip():
        return EVERYTHING
    return _LabelParser(text).parse()


# -- LabelSelector objects ----------------------------------------------------------------

_EXPRESSION_OPS = {
    "In": Op.IN,
    "NotIn": Op.NOT_IN,
    "Exists": Op.EXISTS,
    "DoesNotExist": Op.DOES_NOT_EXIST,
}


def selector_from_object(selector: Mapping[str, Any] | None) -> LabelSelector:
    """A ``metav1.LabelSelector`` object: None matches nothing, ``{}`` matches everything."""
    if selector is None:
        return NOTHING
    reqs: list[Requirement] = []
    for key, value in sorted((selector.get("matchLabels") or {}).items()):
        reqs.append(Requirement(str(key), Op.EQUALS, frozenset({str(value)})))
    for expr in selector.get("matchExpressions") or []:
        if not isinstance(expr, Mapping):
            raise BadRequest("invalid label selector expression")
        op = _EXPRESSION_OPS.get(str(expr.get("operator")))
        if op is None:
            raise BadRequest(f"{expr.get('operator')!r} is not a valid label selector operator")
        values = frozenset(str(v) for v in expr.get("values") or [])
        if op in (Op.IN, Op.NOT_IN) and not values:
            raise BadRequest("values: Required value: must be specified when `operator` is 'In' or 'NotIn'")
        reqs.append(Requirement(str(expr.get("key", "")), op, values))
    return LabelSelector(tuple(reqs))


def format_label_selector(selector: Mapping[str, Any] | None) -> str:
    """Render a LabelSelector object as selector text (``Scale.status.selector``)."""
    parts: list[str] = []
    for req in selector_from_object(selector or {}).requirements:
        vals = sorted(req.values)
        if req.op is Op.EQUALS:
            parts.append(f"{req.key}={vals[0]}")
        elif req.op in (Op.IN, Op.NOT_IN):
            parts.append(f"{req.key} {req.op.value} ({','.join(vals)})")
        elif req.op is Op.EXISTS:
            parts.append(req.key)
        elif req.op is Op.DOES_NOT_EXIST:
            parts.append(f"!{req.key}")
    return ",".join(parts)


# -- field selectors ----------------------------------------------------------------------


def _path(*keys: str) -> Callable[[Obj], str]:
    def get(obj: Obj) -> str:
        cur: Any = obj
        for k in keys:
            if not isinstance(cur, Mapping):
                return ""
            cur = cur.get(k)
        if cur is None:
            return ""
        if isinstance(cur, bool):
            return "true" if cur else "false"
        return str(cur)

    return get


_COMMON_FIELDS: dict[str, Callable[[Obj], str]] = {
    "metadata.name": _path("metadata", "name"),
    "metadata.namespace": _path("metadata", "namespace"),
}

FIELDS_BY_RESOURCE: dict[str, dict[str, Callable[[Obj], str]]] = {
    "pods": {
        "spec.nodeName": _path("spec", "nodeName"),
        "spec.restartPolicy": _path("spec", "restartPolicy"),
        "spec.schedulerName": _path("spec", "schedulerName"),
        "spec.serviceAccountName": _path("spec", "serviceAccountName"),
        "spec.hostNetwork": lambda o: "true" if o.get("spec", {}).get("hostNetwork") else "false",
        "status.phase": _path("status", "phase"),
        "status.podIP": _path("status", "podIP"),
        "status.nominatedNodeName": _path("status", "nominatedNodeName"),
    },
    "namespaces": {"status.phase": _path("status", "phase")},
    "nodes": {"spec.unschedulable": lambda o: "true" if o.get("spec", {}).get("unschedulable") else "false"},
    "services": {"spec.clusterIP": _path("spec", "clusterIP"), "spec.type": _path("spec", "type")},
    "secrets": {"type": _path("type")},
    "replicasets.apps": {"status.replicas": _path("status", "replicas")},
    "events": {
        "involvedObject.kind": _path("involvedObject", "kind"),
        "involvedObject.namespace": _path("involvedObject", "namespace"),
        "involvedObject.name": _path("involvedObject", "name"),
        "involvedObject.uid": _path("involvedObject", "uid"),
        "involvedObject.apiVersion": _path("involvedObject", "apiVersion"),
        "involvedObject.resourceVersion": _path("involvedObject", "resourceVersion"),
        "involvedObject.fieldPath": _path("involvedObject", "fieldPath"),
        "reason": _path("reason"),
        "reportingComponent": _path("reportingComponent"),
        "source": _path("source", "component"),
        "type": _path("type"),
    },
}


@dataclass(frozen=True, slots=True)
class FieldRequirement:
    field: str
    value: str
    negate: bool
    getter: Callable[[Obj], str]

    def matches(self, obj: Obj) -> bool:
        return (self.getter(obj) == self.value) != self.negate


@dataclass(frozen=True, slots=True)
class FieldSelector:
    requirements: tuple[FieldRequirement, ...] = ()

    def matches(self, obj: Obj) -> bool:
        return all(r.matches(obj) for r in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i : i + 2])
            i += 2
            continue
        if c == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\":
            if i + 1 >= len(text) or text[i + 1] not in "\\,=!":
                raise BadRequest(f"invalid field selector: invalid escape sequence in {text!r}")
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_field_selector(text: str | None, rt: ResourceType) -> FieldSelector:
    """Parse ``?fieldSelector=`` for a resource type; BadRequest on bad syntax or field."""
    if text is None or not text.strip():
        return FieldSelector()
    fields = {**_COMMON_FIELDS, **FIELDS_BY_RESOURCE.get(rt.key, {})}
    reqs: list[FieldRequirement] = []
    for part in _split_unescaped(text, ","):
        part = part.strip()
        if not part:
            continue
        parsed = _split_field_requirement(part)
        if parsed is None:
            raise BadRequest(f"invalid selector: '{text}'; can't understand '{part}'")
        name, value, negate = parsed
        getter = fields.get(name)
        if getter is None:
            raise BadRequest(f'field label not supported: {name}')
        reqs.append(FieldRequirement(name, value, negate, getter))
    return FieldSelector(tuple(reqs))


def _split_field_requirement(part: str) -> tuple[str, str, bool] | None:
    for op, negate in (("!=", True), ("==", False), ("=", False)):
        idx = _find_unescaped(part, op)
        if idx >= 0:
            return part[:idx].strip(), _unescape(part[idx + len(op) :].strip()), negate
    return None


def _find_unescaped(text: str, op: str) -> int:
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text.startswith(op, i):
            return i
        i += 1
    return -1
