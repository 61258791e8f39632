"""Field validation shared by admission: Kubernetes-style field errors and the checks.

``FieldError`` values carry the reason, the field path and the message body exactly as the
real API server words them (``spec.ports[0].port: Invalid value: 0: must be between 1 and
65535, inclusive``); :func:`invalid` folds a list of them into one ``Invalid`` (HTTP 422) with
``details.causes``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sandbox.apiserver import resources as R
from sandbox.apiserver.resources import ResourceType
from sandbox.apiserver.store import Invalid

Obj = dict[str, Any]

# -- field errors -------------------------------------------------------------------------


def go_value(value: object) -> str:
    """Render a value the way Go's field errors do (strings quoted, ints bare)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "[]string{" + ", ".join(json.dumps(v) for v in value) + "}"
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        inner = ", ".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in value.items())
        return "map[string]string{" + inner + "}"
    return json.dumps(value, sort_keys=True)


@dataclass(frozen=True, slots=True)
class FieldError:
    reason: str  # FieldValueInvalid | FieldValueRequired | ...
    field: str
    body: str

    @property
    def message(self) -> str:
        return f"{self.field}: {self.body}"


def invalid_value(field: str, value: object, detail: str) -> FieldError:
    return FieldError("FieldValueInvalid", field, f"Invalid value: {go_value(value)}: {detail}")


def required(field: str, detail: str = "") -> FieldError:
    return FieldError("FieldValueRequired", field, "Required value" + (f": {detail}" if detail else ""))


def not_supported(field: str, value: object, supported: tuple[str, ...]) -> FieldError:
    allowed = ", ".join(json.dumps(s) for s in supported)
    return FieldError(
        "FieldValueNotSupported",
        field,
        f"Unsupported value: {go_value(value)}: supported values: {allowed}",
    )


def duplicate(field: str, value: object) -> FieldError:
    return FieldError("FieldValueDuplicate", field, f"Duplicate value: {go_value(value)}")


def forbidden(field: str, detail: str) -> FieldError:
    return FieldError("FieldValueForbidden", field, f"Forbidden: {detail}")


def qualified_kind(rt: ResourceType) -> str:
    return f"{rt.kind}.{rt.group}" if rt.group else rt.kind


def invalid(rt: ResourceType, name: str, errors: list[FieldError], *, kind: str | None = None) -> Invalid:
    """One ``Invalid`` (422) for a list of field errors, worded like ``errors.NewInvalid``."""
    aggregate = (
        errors[0].message if len(errors) == 1 else "[" + ", ".join(e.message for e in errors) + "]"
    )
    details: dict[str, Any] = {"name": name, "kind": kind or rt.kind}
    if rt.group and kind is None:
        details["group"] = rt.group
    details["causes"] = [{"reason": e.reason, "message": e.body, "field": e.field} for e in errors]
    return Invalid(f'{kind or qualified_kind(rt)} "{name}" is invalid: {aggregate}', details=details)


# -- names and labels ---------------------------------------------------------------------

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")

_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_DNS1035_MSG = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
    "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or "
    "'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)


def check_dns_subdomain(field: str, value: str) -> list[FieldError]:
    if len(value) > 253:
        return [invalid_value(field, value, "must be no more than 253 characters")]
    if not DNS1123_SUBDOMAIN.match(value):
        return [invalid_value(field, value, _SUBDOMAIN_MSG)]
    return []


def check_dns_label(field: str, value: str) -> list[FieldError]:
    if len(value) > 63:
        return [invalid_value(field, value, "must be no more than 63 characters")]
    if not DNS1123_LABEL.match(value):
        return [invalid_value(field, value, _LABEL_MSG)]
    return []


def check_dns1035_label(field: str, value: str) -> list[FieldError]:
    if len(value) > 63:
        return [invalid_value(field, value, "must be no more than 63 characters")]
    if not DNS1035_LABEL.match(value):
        return [invalid_value(field, value, _DNS1035_MSG)]
    return []


NAME_CHECKS: dict[str, Callable[[str, str], list[FieldError]]] = {
    R.NAMESPACES.key: check_dns_label,
    R.SERVICES.key: check_dns1035_label,
}


def check_labels(field: str, labels: object) -> list[FieldError]:
    if labels is None:
        return []
    if not isinstance(labels, dict):
        return [invalid_value(field, str(labels), "must be a map of string keys and values")]
    errors: list[FieldError] = []
    for key, value in labels.items():
        prefix, _, name = str(key).rpartition("/")
        if (
            ("/" in str(key) and not prefix)
            or not QUALIFIED_NAME.match(name)
            or len(name) > 63
            or (prefix and check_dns_subdomain(field, prefix))
        ):
            errors.append(
                invalid_value(
                    field,
                    key,
                    "name part must consist of alphanumeric characters, '-', '_' or '.', and must "
                    "start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  "
                    "or '123-abc', regex used for validation is "
                    "'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')",
                )
            )
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            errors.append(
                invalid_value(
                    field,
                    value if isinstance(value, str) else str(value),
                    "a valid label must be an empty string or consist of alphanumeric characters, "
                    "'-', '_' or '.', and must start and end with an alphanumeric character (e.g. "
                    "'MyValue',  or 'my_value',  or '12345', regex used for validation is "
                    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')",
                )
            )
    return errors


def check_metadata(rt: ResourceType, obj: Obj) -> list[FieldError]:
    meta = obj.get("metadata") or {}
    errors: list[FieldError] = []
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        errors.append(required("metadata.name", "name or generateName is required"))
    else:
        errors += NAME_CHECKS.get(rt.key, check_dns_subdomain)("metadata.name", name)
    errors += check_labels("metadata.labels", meta.get("labels"))
    annotations = meta.get("annotations")
    if annotations is not None and (
        not isinstance(annotations, dict)
        or not all(isinstance(v, str) for v in annotations.values())
    ):
        errors.append(invalid_value("metadata.annotations", "", "must be a map of strings"))
    return errors


# -- pod specs and services ----------------------------------------------------------------------------

RESTART_POLICIES = ("Always", "OnFailure", "Never")
DNS_POLICIES = ("ClusterFirstWithHostNet", "ClusterFirst", "Default", "None")
PROTOCOLS = ("SCTP", "TCP", "UDP")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")

SERVICE_TYPES = ("ClusterIP", "ExternalName", "LoadBalancer", "NodePort")


def check_container(path: str, c: object, names: set[str]) -> list[FieldError]:
    if not isinstance(c, dict):
        return [invalid_value(path, str(c), "must be an object")]
    errors: list[FieldError] = []
    name = c.get("name")
    if not isinstance(name, str) or not name:
        errors.append(required(f"{path}.name"))
    else:
        errors += check_dns_label(f"{path}.name", name)
        if name in names:
            errors.append(duplicate(f"{path}.name", name))
        names.add(name)
    image = c.get("image")
    if not isinstance(image, str) or not image.strip():
        errors.append(required(f"{path}.image"))
    policy = c.get("imagePullPolicy")
    if policy is not None and policy not in PULL_POLICIES:
        errors.append(not_supported(f"{path}.imagePullPolicy", policy, PULL_POLICIES))
    port_names: set[str] = set()
    for i, port in enumerate(c.get("ports") or []):
        p = f"{path}.ports[{i}]"
        if not isinstance(port, dict):
            errors.append(invalid_value(p, str(port), "must be an object"))
            continue
        cport = port.get("containerPort")
        if not isinstance(cport, int) or isinstance(cport, bool) or not 1 <= cport <= 65535:
            errors.append(
                invalid_value(f"{p}.containerPort", cport if cport is not None else 0,
                              "must be between 1 and 65535, inclusive")
            )
        if port.get("protocol") not in PROTOCOLS:
            errors.append(not_supported(f"{p}.protocol", port.get("protocol"), PROTOCOLS))
        pname = port.get("name")
        if pname is not None:
            errors += check_port_name(f"{p}.name", pname)
            if pname in port_names:
                errors.append(duplicate(f"{p}.name", pname))
            port_names.add(pname)
    for i, env in enumerate(c.get("env") or []):
        if not isinstance(env, dict) or not env.get("name"):
            errors.append(required(f"{path}.env[{i}].name"))
    return errors


def check_port_name(field: str, name: object) -> list[FieldError]:
    if not isinstance(name, str) or len(name) > 15 or not IANA_SVC_NAME.match(name) or "--" in name or not any(ch.isalpha() for ch in name):
        return [invalid_value(field, str(name), "must be no more than 15 characters, contain only lowercase alphanumeric characters or '-', contain at least one letter (a-z) and not start or end with '-' or contain '--'")]
    return []


def check_pod_spec(path: str, spec: object, *, restart_policies: tuple[str, ...] = RESTART_POLICIES) -> list[FieldError]:
    if not isinstance(spec, dict):
        return [required(path)]
    errors: list[FieldError] = []
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        errors.append(required(f"{path}.containers"))
    names: set[str] = set()
    for key in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(key) or []):
            errors += check_container(f"{path}.{key}[{i}]", c, names)
    if spec.get("restartPolicy") not in restart_policies:
        errors.append(not_supported(f"{path}.restartPolicy", spec.get("restartPolicy"), restart_policies))
    if spec.get("dnsPolicy") not in DNS_POLICIES:
        errors.append(not_supported(f"{path}.dnsPolicy", spec.get("dnsPolicy"), DNS_POLICIES))
    grace = spec.get("terminationGracePeriodSeconds")
    if not isinstance(grace, int) or grace < 0:
        errors.append(invalid_value(f"{path}.terminationGracePeriodSeconds", grace, "must be greater than or equal to 0"))
    vol_names: set[str] = set()
    for i, vol in enumerate(spec.get("volumes") or []):
        vname = vol.get("name") if isinstance(vol, dict) else None
        if not isinstance(vname, str) or not vname:
            errors.append(required(f"{path}.volumes[{i}].name"))
        elif vname in vol_names:
            errors.append(duplicate(f"{path}.volumes[{i}].name", vname))
        else:
            vol_names.add(vname)
    return errors


def check_service_spec(spec: Obj) -> list[FieldError]:
    errors: list[FieldError] = []
    svc_type = spec.get("type")
    if svc_type not in SERVICE_TYPES:
        return [not_supported("spec.type", svc_type, SERVICE_TYPES)]
    ports = spec.get("ports") or []
    if svc_type == "ExternalName":
        if not spec.get("externalName"):
            errors.append(required("spec.externalName"))
    elif not ports and spec.get("clusterIP") != "None":
        errors.append(required("spec.ports"))
    if not isinstance(ports, list):
        return [invalid_value("spec.ports", str(ports), "must be a list")]
    names: set[str] = set()
    seen: set[tuple[object, object]] = set()
    for i, port in enumerate(ports):
        p = f"spec.ports[{i}]"
        if not isinstance(port, dict):
            errors.append(invalid_value(p, str(port), "must be an object"))
            continue
        name = port.get("name")
        if len(ports) > 1 and not name:
            errors.append(required(f"{p}.name"))
        elif name:
            errors += check_dns_label(f"{p}.name", name) if isinstance(name, str) else [invalid_value(f"{p}.name", str(name), "must be a string")]
            if name in names:
                errors.append(duplicate(f"{p}.name", name))
            names.add(name)
        number = port.get("port")
        if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= 65535:
            errors.append(invalid_value(f"{p}.port", number if number is not None else 0,
                                        "must be between 1 and 65535, inclusive"))
        if port.get("protocol") not in PROTOCOLS:
            errors.append(not_supported(f"{p}.protocol", port.get("protocol"), PROTOCOLS))
        key = (number, port.get("protocol"))
        if key in seen:
            errors.append(duplicate(p, f"{number}/{port.get('protocol')}"))
        seen.add(key)
        target = port.get("targetPort")
        if isinstance(target, int) and not isinstance(target, bool):
            if not 1 <= target <= 65535:
                errors.append(invalid_value(f"{p}.targetPort", target, "must be between 1 and 65535, inclusive"))
        elif isinstance(target, str):
            errors += check_port_name(f"{p}.targetPort", target)
        elif target is not None:
            errors.append(invalid_value(f"{p}.targetPort", str(target), "must be an int or a string"))
        node_port = port.get("nodePort")
        if node_port is not None and svc_type not in ("NodePort", "LoadBalancer"):
            errors.append(forbidden(f"{p}.nodePort", "may not be used when `type` is 'ClusterIP'"))
    selector = spec.get("selector")
    if selector is not None:
        errors += check_labels("spec.selector", selector)
    return errors
