"""Validate rendered custom resources against the upstream CustomResourceDefinitions.

The CRD files are the operators' own (KubeRay v1.7.0: RayCluster, RayJob; prometheus-operator
v0.93.0: PodMonitor, PrometheusRule), unmodified, in ``CRD_DIR``: ``$TSN_K8S_CRDS`` or
``../shared/k8s-crds`` beside the checkout (its README names each file's origin).

A CRD's ``openAPIV3Schema`` is a *structural* schema, which the API server applies more strictly
than plain JSON Schema does; `to_json_schema` adds what JSON Schema would otherwise let through:

* an object that does not say ``x-kubernetes-preserve-unknown-fields: true`` accepts only the
  fields it lists (``additionalProperties: false``): the API server prunes or, with strict field
  validation (kubectl's default), rejects any other field, so a typo never reaches KubeRay;
* ``nullable: true`` admits null;
* ``metadata`` is left to the API server's own ObjectMeta validation: `metadata_error` checks it
  with the core ObjectMeta schema of kubernetes-validate.

CEL rules (``x-kubernetes-validations``) are not evaluated: `cel_paths` lists where they sit, so
a test can assert no manifest sets such a field (none of the rules is then left unchecked).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = Path(os.environ.get("TSN_K8S_CRDS", ROOT.parent / "shared" / "k8s-crds"))
CRD_FILES = {  # (group, kind) -> file in CRD_DIR (and where upstream keeps it)
    ("ray.io", "RayCluster"): "ray.io_rayclusters.yaml",  # kuberay v1.7.0 helm-chart/kuberay-operator/crds/
    ("ray.io", "RayJob"): "ray.io_rayjobs.yaml",
    ("monitoring.coreos.com", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",  # prometheus-operator
    ("monitoring.coreos.com", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",  # v0.93.0 example/
}


class CRDNotFound(LookupError):
    pass


@functools.cache
def crd(group: str, kind: str) -> dict:
    """The CRD document of ``kind`` in ``group``."""
    name = CRD_FILES.get((group, kind))
    if name is None:
        raise CRDNotFound(f"no upstream CRD known for {kind} ({group}): add it to CRD_FILES in {__file__}")
    path = CRD_DIR / name
    if not path.is_file():
        raise CRDNotFound(f"{path}: missing; set TSN_K8S_CRDS to a directory holding the upstream CRD files "
                          f"{sorted(CRD_FILES.values())} (versions in {__file__})")
    doc = yaml.safe_load(path.read_text())
    if (doc.get("kind"), doc["spec"]["group"], doc["spec"]["names"]["kind"]) != ("CustomResourceDefinition", group, kind):
        raise CRDNotFound(f"{path}: not the CustomResourceDefinition of {kind} ({group})")
    return doc


def openapi_schema(api_version: str, kind: str) -> dict:
    """The served version's ``openAPIV3Schema`` for ``apiVersion``/``kind``."""
    group, _, version = api_version.rpartition("/")
    doc = crd(group, kind)
    for v in doc["spec"]["versions"]:
        if v["name"] == version:
            if not v.get("served", False):
                raise CRDNotFound(f"{kind} {api_version}: the CRD does not serve version {version}")
            return v["schema"]["openAPIV3Schema"]
    raise CRDNotFound(f"{kind}: the CRD has no version {version!r} "
                      f"(has {[v['name'] for v in doc['spec']['versions']]})")


def to_json_schema(s: dict) -> dict:
    """A structural schema as JSON Schema with the API server's strictness (module docstring)."""
    if isinstance(s, list):  # anyOf / allOf members
        return [to_json_schema(x) for x in s]
    if not isinstance(s, dict):  # enum values, patterns, numbers
        return s
    out = {}
    for k, v in s.items():
        if k == "properties":  # a map of field names, not a schema: keep every name
            out[k] = {name: to_json_schema(sub) for name, sub in v.items()}
        elif k == "pattern":
            out[k] = python_regex(v)
        elif not k.startswith("x-kubernetes-") and k not in ("nullable", "description", "default"):
            out[k] = to_json_schema(v)
    if s.get("type") == "object" and "additionalProperties" not in s \
            and not s.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if s.get("nullable") and "type" in s:
        out["type"] = [s["type"], "null"]
    return out


def python_regex(go_pattern: str) -> str:
    """A Go (RE2) pattern for Python's re: RE2 allows an inline flag group after ``^``
    (``^(?i)(abort|warn)?$``), Python only at the very start."""
    m = re.match(r"\^(\(\?[a-z]+\))", go_pattern)
    return m.group(1) + "^" + go_pattern[m.end():] if m else go_pattern


@functools.cache
def validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    schema = to_json_schema(openapi_schema(api_version, kind))
    schema["properties"]["metadata"] = {"type": "object"}  # metadata_error checks it
    return jsonschema.Draft7Validator(schema)


def metadata_error(doc: dict, k8s_version: str) -> str | None:
    """ObjectMeta checked as the API server does, with the core schema (any core kind carries it)."""
    try:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})},
                                     k8s_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"metadata.{'.'.join(map(str, e.path))}: {e.message}"
    return None


def _short(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[:limit] + " ..."


def errors(doc: dict, k8s_version: str) -> list[str]:
    """Every schema violation of one rendered custom resource, as ``Kind/name: path: message``."""
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    out = [f"{where}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {_short(e.message)}"
           for e in validator(doc["apiVersion"], doc["kind"]).iter_errors(doc)]
    meta = metadata_error(doc, k8s_version)
    if meta:
        out.append(f"{where}: {meta}")
    return out


def cel_paths(api_version: str, kind: str) -> list[tuple[str, ...]]:
    """Field paths (property names; ``*`` for list items / map values) that carry CEL rules."""
    found = []

    def walk(s, path):
        if not isinstance(s, dict):
            return
        if s.get("x-kubernetes-validations"):
            found.append(path)
        for name, sub in s.get("properties", {}).items():
            walk(sub, (*path, name))
        for key in ("items", "additionalProperties"):
            if isinstance(s.get(key), dict):
                walk(s[key], (*path, "*"))

    walk(openapi_schema(api_version, kind), ())
    return found


def has_path(doc, path: tuple[str, ...]) -> bool:
    """Whether ``doc`` sets the field at ``path`` (``*``: any list item or map value)."""
    if not path:
        return True
    head, rest = path[0], path[1:]
    if head == "*":
        values = doc if isinstance(doc, list) else list(doc.values()) if isinstance(doc, dict) else []
        return any(has_path(v, rest) for v in values)
    return isinstance(doc, dict) and head in doc and has_path(doc[head], rest)
