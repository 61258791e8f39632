"""Defaulting, validation and allocation per kind, as a real API server's strategies do them.

Theory of operation
-------------------
``Admission.on_create(rt, obj)`` and ``Admission.on_update(rt, old, new)`` take a complete
object (name and namespace already set by the ``Api``), fill in the defaults a real server
fills in (pods: ``restartPolicy``, ``dnsPolicy``, ...; services: ``type``, a ClusterIP from
``config.service_cidr``, node ports, ...), validate it (checks in validation.py) and return it.
Validation errors are collected as ``FieldError`` values and raised as one ``Invalid`` (HTTP 422) whose message and
``details.causes`` read like the real server's (``Service "x" is invalid: spec.ports[0].port:
Invalid value: 0: must be between 1 and 65535, inclusive``).

Allocations (ClusterIPs, node ports) are derived from the objects in the store, so deleting a
Service frees its addresses with no separate allocator state to keep in step.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sandbox.apiserver import resources as R
from sandbox.apiserver.resources import ResourceType
from sandbox.apiserver.selectors import selector_from_object
from sandbox.apiserver.store import Store
from sandbox.apiserver.validation import (
    FieldError,
    check_labels,
    check_metadata,
    check_pod_spec,
    check_service_spec,
    forbidden,
    invalid,
    invalid_value,
    required,
)
from sandbox.config import SandboxConfig

Obj = dict[str, Any]

NODE_PORT_RANGE = (30000, 32767)

# -- defaults -----------------------------------------------------------------------------


def _image_pull_policy(image: str) -> str:
    last = image.rsplit("/", 1)[-1]
    if "@" in last:
        return "IfNotPresent"
    tag = last.split(":", 1)[1] if ":" in last else ""
    return "Always" if tag in ("", "latest") else "IfNotPresent"


def default_container(c: Obj) -> None:
    image = c.get("image")
    if isinstance(image, str) and image:
        c.setdefault("imagePullPolicy", _image_pull_policy(image))
    c.setdefault("terminationMessagePath", "/dev/termination-log")
    c.setdefault("terminationMessagePolicy", "File")
    resources = c.setdefault("resources", {})
    if isinstance(resources, dict) and isinstance(resources.get("limits"), dict):
        requests = resources.setdefault("requests", {})
        if isinstance(requests, dict):
            for name, quantity in resources["limits"].items():
                requests.setdefault(name, quantity)
    for port in c.get("ports") or []:
        if isinstance(port, dict):
            port.setdefault("protocol", "TCP")
    for env in c.get("env") or []:
        field_ref = env.get("valueFrom", {}).get("fieldRef") if isinstance(env, dict) else None
        if isinstance(field_ref, dict):
            field_ref.setdefault("apiVersion", "v1")


def qos_class(spec: object) -> str:
    """Guaranteed (cpu+memory limits == requests everywhere), BestEffort (none), Burstable."""
    containers = [
        c for key in ("containers", "initContainers")
        for c in ((spec.get(key) or []) if isinstance(spec, dict) else [])
        if isinstance(c, dict)
    ]
    sections = [c.get("resources") or {} for c in containers]
    if not any((r.get("requests") or r.get("limits")) for r in sections if isinstance(r, dict)):
        return "BestEffort"
    for r in sections:
        limits = r.get("limits") or {} if isinstance(r, dict) else {}
        requests = r.get("requests") or {} if isinstance(r, dict) else {}
        if not {"cpu", "memory"} <= set(limits) or any(
            requests.get(k, limits[k]) != limits[k] for k in ("cpu", "memory")
        ):
            return "Burstable"
    return "Guaranteed"


def default_pod_spec(spec: Obj) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("serviceAccountName", spec.get("serviceAccount") or "default")
    spec.setdefault("serviceAccount", spec["serviceAccountName"])
    for key in ("containers", "initContainers"):
        for c in spec.get(key) or []:
            if isinstance(c, dict):
                default_container(c)


# What a pod update may change in spec (besides binding an unscheduled pod).
_POD_MUTABLE = ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds")
_POD_UPDATE_MSG = (
    "pod updates may not change fields other than `spec.containers[*].image`,"
    "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only "
    "additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be "
    "set to 1 if it was previously negative)"
)


def _pod_spec_immutable_view(spec: Obj) -> Obj:
    view = copy.deepcopy(spec)
    for key in _POD_MUTABLE:
        view.pop(key, None)
    for key in ("containers", "initContainers"):
        for c in view.get(key) or []:
            if isinstance(c, dict):
                c.pop("image", None)
    return view


# -- services -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ServiceRange:
    network: ipaddress.IPv4Network

    def contains(self, ip: ipaddress.IPv4Address) -> bool:
        return ip in self.network and ip not in (
            self.network.network_address,
            self.network.broadcast_address,
        )

    def first_free(self, used: set[str]) -> str | None:
        hosts = self.network.num_addresses - 2  # neither the network nor the broadcast address
        # Dynamic allocations skip the low addresses, like the real allocator, which leaves
        # them to static ones (kubernetes: +1, kube-dns: +10).
        start = min(hosts // 2, 100)
        for i in range(hosts):
            ip = str(self.network.network_address + 1 + (start + i) % hosts)
            if ip not in used:
                return ip
        return None


class Admission:
    def __init__(self, store: Store, config: SandboxConfig) -> None:
        self.store = store
        self.config = config
        self.service_range = ServiceRange(config.service_cidr)
        self._create: dict[str, Callable[[ResourceType, Obj], list[FieldError]]] = {
            R.PODS.key: self._create_pod,
            R.SERVICES.key: self._create_service,
            R.DEPLOYMENTS.key: self._create_workload,
            R.REPLICASETS.key: self._create_workload,
            R.NAMESPACES.key: self._create_namespace,
            R.SECRETS.key: self._create_secret,
            R.ENDPOINTS.key: self._create_endpoints,
        }
        self._update: dict[str, Callable[[ResourceType, Obj, Obj], list[FieldError]]] = {
            R.PODS.key: self._update_pod,
            R.SERVICES.key: self._update_service,
            R.DEPLOYMENTS.key: self._update_workload,
            R.REPLICASETS.key: self._update_workload,
            R.NAMESPACES.key: self._update_namespace,
            R.SECRETS.key: self._update_secret,
            R.ENDPOINTS.key: self._update_endpoints,
        }

    def on_create(self, rt: ResourceType, obj: Obj) -> Obj:
        obj = copy.deepcopy(obj)
        errors = check_metadata(rt, obj)
        handler = self._create.get(rt.key)
        if handler is not None:
            errors += handler(rt, obj)
        if errors:
            raise invalid(rt, str(obj.get("metadata", {}).get("name", "")), errors)
        return obj

    def on_update(self, rt: ResourceType, old: Obj, new: Obj) -> Obj:
        new = copy.deepcopy(new)
        errors = check_metadata(rt, new)
        handler = self._update.get(rt.key)
        if handler is not None:
            errors += handler(rt, old, new)
        if errors:
            raise invalid(rt, str(new.get("metadata", {}).get("name", "")), errors)
        return new

    # -- namespaces, secrets, endpoints ---------------------------------------------------

    def _create_namespace(self, rt: ResourceType, obj: Obj) -> list[FieldError]:
        meta = obj["metadata"]
        labels = meta.setdefault("labels", {})
        if isinstance(labels, dict):
            labels["kubernetes.io/metadata.name"] = meta.get("name", "")
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj["status"] = {"phase": "Active"}
        return []

    def _update_namespace(self, rt: ResourceType, old: Obj, new: Obj) -> list[FieldError]:
        labels = new["metadata"].setdefault("labels", {})
        if isinstance(labels, dict):
            labels["kubernetes.io/metadata.name"] = new["metadata"].get("name", "")
        new.setdefault("spec", {}).setdefault("finalizers", old.get("spec", {}).get("finalizers", []))
        return []

    @staticmethod
    def _fold_string_data(obj: Obj) -> list[FieldError]:
        """``stringData`` is write-only: the server folds it into ``data`` (base64)."""
        string_data = obj.pop("stringData", None)
        if string_data is None:
            return []
        if not isinstance(string_data, dict) or not all(isinstance(v, str) for v in string_data.values()):
            return [invalid_value("stringData", "", "must be a map of strings")]
        data = obj.get("data") or {}
        if not isinstance(data, dict):
            return [invalid_value("data", "", "must be a map of base64 strings")]
        for key, value in string_data.items():
            data[key] = base64.b64encode(value.encode()).decode()
        obj["data"] = data
        return []

    def _create_secret(self, rt: ResourceType, obj: Obj) -> list[FieldError]:
        obj.setdefault("type", "Opaque")
        return self._fold_string_data(obj)

    def _update_secret(self, rt: ResourceType, old: Obj, new: Obj) -> list[FieldError]:
        new.setdefault("type", old.get("type", "Opaque"))
        if new["type"] != old.get("type"):
            return [invalid_value("type", new["type"], "field is immutable")]
        return self._fold_string_data(new)

    def _create_endpoints(self, rt: ResourceType, obj: Obj) -> list[FieldError]:
        for subset in obj.get("subsets") or []:
            for port in (subset.get("ports") or []) if isinstance(subset, dict) else []:
                if isinstance(port, dict):
                    port.setdefault("protocol", "TCP")
        return []

    def _update_endpoints(self, rt: ResourceType, old: Obj, new: Obj) -> list[FieldError]:
        return self._create_endpoints(rt, new)

    # -- pods -----------------------------------------------------------------------------

    def _create_pod(self, rt: ResourceType, obj: Obj) -> list[FieldError]:
        spec = obj.get("spec")
        if isinstance(spec, dict):
            default_pod_spec(spec)
            spec.setdefault("tolerations", [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                 "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                 "effect": "NoExecute", "tolerationSeconds": 300},
            ])
            spec.setdefault("priority", 0)
            spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
        obj["status"] = {"phase": "Pending", "qosClass": qos_class(spec)}
        return check_pod_spec("spec", spec)

    def _update_pod(self, rt: ResourceType, old: Obj, new: Obj) -> list[FieldError]:
        spec = new.get("spec")
        if not isinstance(spec, dict):
            return [required("spec")]
        old_spec = old.get("spec", {})
        # Binding an unscheduled pod to a node (the kubelet does this) is allowed.
        if spec.get("nodeName") and not old_spec.get("nodeName"):
            old_spec = {**old_spec, "nodeName": spec["nodeName"]}
        for key in ("containers", "initContainers"):
            for c in spec.get(key) or []:
                if isinstance(c, dict):
                    default_container(c)
        errors = check_pod_spec("spec", spec)
        if not errors and _pod_spec_immutable_view(spec) != _pod_spec_immutable_view(old_spec):
            errors.append(forbidden("spec", _POD_UPDATE_MSG))
        return errors

    # -- deployments and replicasets ------------------------------------------------------

    def _create_workload(self, rt: ResourceType, obj: Obj) -> list[FieldError]:
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            return [required("spec")]
        self._default_workload(rt, spec)
        # ReplicaSetStatus.replicas is a required field; a fresh DeploymentStatus is empty.
        obj["status"] = {"replicas": 0} if rt is R.REPLICASETS else {}
        return self._check_workload(rt, spec)

    def _update_workload(self, rt: ResourceType, old: Obj, new: Obj) -> list[FieldError]:
        spec = new.get("spec")
        if not isinstance(spec, dict):
            return [required("spec")]
        self._default_workload(rt, spec)
        errors = self._check_workload(rt, spec)
        old_selector = old.get("spec", {}).get("selector")
        if spec.get("selector") != old_selector:
            errors.append(invalid_value("spec.selector", spec.get("selector"), "field is immutable"))
        return errors

    @staticmethod
    def _default_workload(rt: ResourceType, spec: Obj) -> None:
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        if rt is R.DEPLOYMENTS:
            strategy = spec.setdefault("strategy", {})
            if isinstance(strategy, dict):
                strategy.setdefault("type", "RollingUpdate")
                if strategy["type"] == "RollingUpdate":
                    rolling = strategy.setdefault("rollingUpdate", {})
                    if isinstance(rolling, dict):
                        rolling.setdefault("maxUnavailable", "25%")
                        rolling.setdefault("maxSurge", "25%")
            spec.setdefault("progressDeadlineSeconds", 600)
        template = spec.get("template")
        if isinstance(template, dict):
            template.setdefault("metadata", {})
            pod_spec = template.get("spec")
            if isinstance(pod_spec, dict):
                default_pod_spec(pod_spec)

    @staticmethod
    def _check_workload(rt: ResourceType, spec: Obj) -> list[FieldError]:
        errors: list[FieldError] = []
        replicas = spec.get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            errors.append(invalid_value("spec.replicas", replicas, "must be greater than or equal to 0"))
        selector = spec.get("selector")
        template = spec.get("template")
        labels = template.get("metadata", {}).get("labels") if isinstance(template, dict) else None
        if not isinstance(selector, dict):
            errors.append(required("spec.selector"))
        elif not selector.get("matchLabels") and not selector.get("matchExpressions"):
            errors.append(invalid_value("spec.selector", selector, f"empty selector is invalid for {rt.singular}"))
        else:
            try:
                matches = selector_from_object(selector).matches(labels or {})
            except Exception:  # a malformed selector is reported below, not crashed on
                matches = False
            if not matches:
                errors.append(invalid_value(
                    "spec.template.metadata.labels", labels or {},
                    "`selector` does not match template `labels`",
                ))
        if not isinstance(template, dict):
            errors.append(required("spec.template"))
        else:
            errors += check_labels("spec.template.metadata.labels", labels)
            errors += check_pod_spec("spec.template.spec", template.get("spec"), restart_policies=("Always",))
        return errors

    # -- services -------------------------------------------------------------------------

    def _used_cluster_ips(self, exclude_uid: str | None = None) -> set[str]:
        used: set[str] = set()
        for svc in self.store.iter_objects(R.SERVICES):
            if svc["metadata"].get("uid") == exclude_uid:
                continue
            for ip in svc.get("spec", {}).get("clusterIPs") or [svc.get("spec", {}).get("clusterIP")]:
                if isinstance(ip, str) and ip and ip != "None":
                    used.add(ip)
        return used

    def _used_node_ports(self, exclude_uid: str | None = None) -> set[int]:
        used: set[int] = set()
        for svc in self.store.iter_objects(R.SERVICES):
            if svc["metadata"].get("uid") == exclude_uid:
                continue
            for port in svc.get("spec", {}).get("ports") or []:
                if isinstance(port, dict) and isinstance(port.get("nodePort"), int):
                    used.add(port["nodePort"])
        return used

    def _create_service(self, rt: ResourceType, obj: Obj) -> list[FieldError]:
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            spec = obj["spec"] = {}
        self._default_service(spec)
        obj["status"] = {"loadBalancer": {}}
        errors = check_service_spec(spec)
        if errors:
            return errors
        return self._allocate_service(obj, spec, None)

    def _update_service(self, rt: ResourceType, old: Obj, new: Obj) -> list[FieldError]:
        spec = new.get("spec")
        if not isinstance(spec, dict):
            spec = new["spec"] = {}
        old_spec = old.get("spec", {})
        same_kind = spec.get("type", "ClusterIP") == old_spec.get("type", "ClusterIP")
        # Like the real server, keep allocated values the client left out.
        if not spec.get("clusterIP") and old_spec.get("clusterIP") and spec.get("type") != "ExternalName":
            spec["clusterIP"] = old_spec["clusterIP"]
            spec.setdefault("clusterIPs", old_spec.get("clusterIPs"))
        if same_kind:
            old_ports = {(p.get("port"), p.get("protocol", "TCP")): p for p in old_spec.get("ports") or []
                         if isinstance(p, dict)}
            for port in spec.get("ports") or []:
                if isinstance(port, dict) and not port.get("nodePort"):
                    match = old_ports.get((port.get("port"), port.get("protocol", "TCP")))
                    if match and match.get("nodePort"):
                        port["nodePort"] = match["nodePort"]
        self._default_service(spec)
        errors = check_service_spec(spec)
        old_ip = old_spec.get("clusterIP")
        if old_ip and spec.get("type") != "ExternalName" and old_spec.get("type") != "ExternalName" and spec.get("clusterIP") != old_ip:
            errors.append(invalid_value("spec.clusterIPs[0]", spec.get("clusterIP"), "may not change once set"))
        if errors:
            return errors
        return self._allocate_service(new, spec, old["metadata"].get("uid"))

    @staticmethod
    def _default_service(spec: Obj) -> None:
        svc_type = spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for port in spec.get("ports") or []:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")
                if "targetPort" not in port and "port" in port:
                    port["targetPort"] = port["port"]
        if svc_type == "ExternalName":
            return
        spec.setdefault("internalTrafficPolicy", "Cluster")
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        if svc_type in ("NodePort", "LoadBalancer"):
            spec.setdefault("externalTrafficPolicy", "Cluster")
        if svc_type == "LoadBalancer":
            spec.setdefault("allocateLoadBalancerNodePorts", True)
        ips = spec.get("clusterIPs")
        if not spec.get("clusterIP") and isinstance(ips, list) and ips and isinstance(ips[0], str):
            spec["clusterIP"] = ips[0]

    def _allocate_service(self, obj: Obj, spec: Obj, own_uid: str | None) -> list[FieldError]:
        name = str(obj["metadata"].get("name", ""))
        svc_type = spec["type"]
        if svc_type == "ExternalName":
            spec.pop("clusterIP", None)
            spec.pop("clusterIPs", None)
            return []
        cluster_ip = spec.get("clusterIP") or ""
        ips = spec.get("clusterIPs")
        if ips is not None and (not isinstance(ips, list) or (cluster_ip and ips and ips[0] != cluster_ip)):
            return [invalid_value("spec.clusterIPs", ips, "must match `clusterIP` when both are specified")]
        if cluster_ip == "None":
            spec["clusterIPs"] = ["None"]
        elif not cluster_ip:
            allocated = self.service_range.first_free(self._used_cluster_ips(own_uid))
            if allocated is None:
                raise invalid(R.SERVICES, name, [FieldError(
                    "FieldValueInvalid", "spec.clusterIPs",
                    "failed to allocate a serviceIP: range is full")])
            spec["clusterIP"] = allocated
            spec["clusterIPs"] = [allocated]
        else:
            try:
                ip = ipaddress.ip_address(cluster_ip)
            except ValueError:
                return [invalid_value("spec.clusterIPs[0]", cluster_ip,
                                      "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)")]
            if not isinstance(ip, ipaddress.IPv4Address) or not self.service_range.contains(ip):
                return [invalid_value(
                    "spec.clusterIPs", [cluster_ip],
                    f"failed to allocate IP {cluster_ip}: the provided IP ({cluster_ip}) is not in "
                    f"the valid range. The range of valid IPs is {self.config.service_cidr}",
                )]
            if cluster_ip in self._used_cluster_ips(own_uid):
                return [invalid_value(
                    "spec.clusterIPs", [cluster_ip],
                    f"failed to allocate IP {cluster_ip}: provided IP is already allocated",
                )]
            spec["clusterIPs"] = [cluster_ip]
        if svc_type not in ("NodePort", "LoadBalancer"):
            for port in spec.get("ports") or []:
                port.pop("nodePort", None)
            return []
        used = self._used_node_ports(own_uid)
        errors: list[FieldError] = []
        lo, hi = NODE_PORT_RANGE
        for i, port in enumerate(spec.get("ports") or []):
            node_port = port.get("nodePort")
            if node_port:
                if not isinstance(node_port, int) or not lo <= node_port <= hi:
                    errors.append(invalid_value(
                        f"spec.ports[{i}].nodePort", node_port,
                        f"provided port is not in the valid range. The range of valid ports is {lo}-{hi}"))
                elif node_port in used:
                    errors.append(invalid_value(f"spec.ports[{i}].nodePort", node_port, "provided port is already allocated"))
                else:
                    used.add(node_port)
                continue
            for candidate in range(lo, hi + 1):
                if candidate not in used:
                    port["nodePort"] = candidate
                    used.add(candidate)
                    break
        return errors
