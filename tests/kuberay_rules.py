"""The KubeRay operator's own checks of a RayCluster / RayJob, which no CRD schema expresses.

KubeRay v1.7.0 runs these in its controllers (ray-operator/controllers/ray/utils/validation.go
upstream) before it creates any pod: a manifest that fails one is accepted by the API server,
then never reconciled (the RayCluster gets an error event, the RayJob fails), so nothing runs.
Only the rules that can concern these manifests are here, restated from that behaviour; each
returns human-readable problems, empty when the object is fine. Rules marked *stricter* are this
project's: KubeRay tolerates the case silently (e.g. clamps replicas) but the manifest would not
mean what it says.
"""

from __future__ import annotations

import re

AUTOSCALER_V2_ENV = "RAY_enable_autoscaler_v2"
MIN_RAY_TOKEN_AUTH = (2, 52, 0)  # authOptions.mode: token
MIN_RAY_K8S_TOKEN_AUTH = (2, 55, 0)  # authOptions.enableK8sTokenAuth
MIN_RAY_GROUP_PRIORITY = (2, 56, 0)  # workerGroupSpecs[].priority
MAX_CLUSTER_NAME = 53  # KubeRay derives pod and service names from it
MAX_JOB_NAME = MAX_CLUSTER_NAME - 6  # the RayJob's cluster is <job>-<5 chars>
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
RAY_START_FLAG = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")  # KubeRay passes each key as --<key>=<value>


def ray_version(text: str) -> tuple[int, ...] | None:
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?\S*", str(text or ""))
    return tuple(int(x or 0) for x in m.groups()) if m else None


def _env(container: dict, name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def _truthy_env(container: dict, name: str) -> bool:
    return _env(container, name) in ("1", "true")


def _head_container(spec: dict) -> dict:
    containers = spec["headGroupSpec"]["template"].get("spec", {}).get("containers", [])
    return containers[0] if containers else {}


def autoscaling(spec: dict) -> bool:
    return spec.get("enableInTreeAutoscaling") is True


def autoscaler_v2(spec: dict) -> bool:
    """KubeRay's test: ``autoscalerOptions.version: v2`` (or, before KubeRay 1.4, the head's env)."""
    return (spec.get("autoscalerOptions") or {}).get("version") == "v2" \
        or _truthy_env(_head_container(spec), AUTOSCALER_V2_ENV)


def cluster_spec_problems(spec: dict) -> list[str]:
    """The controller's RayClusterSpec checks (also applied to a RayJob's rayClusterSpec)."""
    out = []
    head = spec["headGroupSpec"]
    groups = spec.get("workerGroupSpecs", [])
    opts = spec.get("autoscalerOptions") or {}
    if not head["template"].get("spec", {}).get("containers"):
        out.append("headGroupSpec has no container")
    for name, g in [("head", head), *[(g["groupName"], g) for g in groups]]:
        params = g.get("rayStartParams", {})
        if g.get("resources") and any(params.get(k) for k in RESOURCE_PARAMS):
            out.append(f"group {name}: resources set both in rayStartParams and in resources")
        if "labels" in params:
            out.append(f"group {name}: rayStartParams['labels'] is not supported, use the group's labels")
        bad = [k for k in params if not RAY_START_FLAG.fullmatch(k)]
        if bad:  # stricter: `ray start --num_cpus` is an unknown option, the pod crash-loops
            out.append(f"group {name}: rayStartParams keys {bad} are not `ray start` flags (lower-case, dashes)")
    for g in groups:
        name = g["groupName"]
        lo, hi, n = g.get("minReplicas"), g.get("maxReplicas"), g.get("replicas")
        if not g["template"].get("spec", {}).get("containers"):
            out.append(f"worker group {name} has no container")
        if not autoscaling(spec) and (lo is None or hi is None):
            out.append(f"worker group {name} must set minReplicas and maxReplicas when autoscaling is disabled")
        for field, v in (("minReplicas", lo), ("maxReplicas", hi), ("replicas", n)):
            if v is not None and v < 0:
                out.append(f"worker group {name}: negative {field} {v}")
        if lo is not None and hi is not None and lo > hi:
            out.append(f"worker group {name}: minReplicas {lo} > maxReplicas {hi}")
        elif n is not None and not ((lo or 0) <= n <= (hi if hi is not None else n)):
            # stricter: KubeRay clamps replicas into [min, max] without a word
            out.append(f"worker group {name}: replicas {n} outside [minReplicas {lo}, maxReplicas {hi}]")
        idle = g.get("idleTimeoutSeconds")
        if idle is not None:
            if idle < 0:
                out.append(f"worker group {name}: idleTimeoutSeconds must be non-negative, got {idle}")
            elif not autoscaler_v2(spec):
                out.append(f"worker group {name}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled "
                           f"(set autoscalerOptions.version: v2)")
        priority = g.get("priority")
        if priority:
            v = ray_version(spec.get("rayVersion"))
            if v is None or v < MIN_RAY_GROUP_PRIORITY or not autoscaler_v2(spec):
                out.append(f"worker group {name}: priority needs Ray >= 2.56.0 and autoscaler v2")
        if autoscaling(spec) and g.get("suspend"):
            out.append(f"worker group {name} cannot be suspended with the autoscaler enabled")
    head_env_v2 = _env(_head_container(spec), AUTOSCALER_V2_ENV)
    if not autoscaling(spec) and head_env_v2 in ("1", "true"):
        out.append(f"{AUTOSCALER_V2_ENV}={head_env_v2} on the head while enableInTreeAutoscaling is false")
    if autoscaling(spec) and opts.get("version") and head_env_v2 is not None:
        out.append(f"both autoscalerOptions.version and the head's {AUTOSCALER_V2_ENV} are set: use the former")
    if autoscaling(spec) and autoscaler_v2(spec):
        for name, g in [("head", head), *[(g["groupName"], g) for g in groups]]:
            policy = g["template"].get("spec", {}).get("restartPolicy")
            if policy not in (None, "", "Never"):
                out.append(f"group {name}: restartPolicy must be Never or unset with autoscaler v2, got {policy}")
    if opts.get("idleTimeoutSeconds") is not None and opts["idleTimeoutSeconds"] < 0:
        out.append("autoscalerOptions.idleTimeoutSeconds must be non-negative")
    auth = spec.get("authOptions") or {}
    k8s_auth = auth.get("enableK8sTokenAuth") is True
    if auth.get("mode") == "token":
        v = ray_version(spec.get("rayVersion"))
        if v is None:
            out.append(f"authOptions.mode is token but rayVersion {spec.get('rayVersion')!r} is not a Ray version "
                       f"(>= 2.52.0 required)")
        elif v < MIN_RAY_TOKEN_AUTH:
            out.append(f"authOptions.mode is token but rayVersion {spec['rayVersion']} < 2.52.0")
        elif k8s_auth and v < MIN_RAY_K8S_TOKEN_AUTH:
            out.append(f"authOptions.enableK8sTokenAuth needs rayVersion >= 2.55.0, got {spec['rayVersion']}")
        if k8s_auth and auth.get("secretName"):
            out.append("authOptions.enableK8sTokenAuth and authOptions.secretName are both set")
    elif k8s_auth:
        out.append("authOptions.enableK8sTokenAuth without authOptions.mode: token")
    if spec.get("historyServerOptions") or spec.get("networkPolicy") or spec.get("tlsOptions"):
        out.append("historyServerOptions / networkPolicy / tlsOptions need KubeRay feature gates that are off by default")
    return out


def cluster_problems(doc: dict) -> list[str]:
    """A RayCluster: name, then its spec."""
    out = _name_problems(doc, "RayCluster", MAX_CLUSTER_NAME)
    upgrade = (doc["spec"].get("upgradeStrategy") or {}).get("type")
    if upgrade not in (None, "Recreate", "None"):
        out.append(f"upgradeStrategy.type {upgrade!r}: Recreate or None")
    return out + cluster_spec_problems(doc["spec"])


def job_problems(doc: dict) -> list[str]:
    """A RayJob: name, submission, shutdown and retry settings, then its cluster spec."""
    out = _name_problems(doc, "RayJob", MAX_JOB_NAME)
    spec = doc["spec"]
    mode = spec.get("submissionMode", "K8sJobMode")
    selector = spec.get("clusterSelector") or {}
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    backoff = spec.get("backoffLimit")
    if mode not in SUBMISSION_MODES:
        out.append(f"submissionMode {mode!r}: one of {', '.join(SUBMISSION_MODES)}")
    if spec.get("suspend") and not shutdown:
        out.append("a RayJob with shutdownAfterJobFinishes false cannot be suspended")
    if ttl < 0:
        out.append("ttlSecondsAfterFinished must be non-negative")
    if ttl > 0 and not shutdown:
        out.append("ttlSecondsAfterFinished > 0 needs shutdownAfterJobFinishes: true")
    if spec.get("deletionStrategy"):
        out.append("deletionStrategy needs the RayJobDeletionPolicy feature gate (off by default)")
    if not spec.get("rayClusterSpec") and not selector:
        out.append("one of rayClusterSpec or clusterSelector must be set")
    if selector:
        if not selector.get("ray.io/cluster"):
            out.append("clusterSelector needs a non-empty ray.io/cluster")
        if mode == "SidecarMode":
            out.append("clusterSelector is not supported in SidecarMode")
        if backoff:
            out.append("backoffLimit is incompatible with clusterSelector")
        if spec.get("suspend"):
            out.append("clusterSelector does not support suspend")
        if spec.get("rayClusterSpec"):  # stricter: the job would ignore the spec
            out.append("both clusterSelector and rayClusterSpec are set: the spec is ignored")
        if shutdown:  # stricter: KubeRay never deletes a cluster it did not create
            out.append("shutdownAfterJobFinishes on a selected cluster does nothing")
    if mode == "InteractiveMode" and backoff:
        out.append("backoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode":
        if spec.get("submitterPodTemplate"):
            out.append("SidecarMode does not support submitterPodTemplate")
        if spec.get("submitterConfig"):
            out.append("SidecarMode does not support submitterConfig")
        head_policy = (spec.get("rayClusterSpec") or {}).get("headGroupSpec", {}).get("template", {}) \
            .get("spec", {}).get("restartPolicy")
        if head_policy not in (None, "", "Never"):
            out.append("SidecarMode needs the head's restartPolicy Never or unset")
    if mode == "K8sJobMode" and spec.get("submitterPodTemplate"):
        pod = spec["submitterPodTemplate"].get("spec", {})
        if not pod.get("containers"):
            out.append("submitterPodTemplate has no container (KubeRay runs `ray job submit` in the first)")
        if pod.get("restartPolicy") not in ("Never", "OnFailure"):  # a Kubernetes Job's pods must not restart Always
            out.append(f"submitterPodTemplate restartPolicy {pod.get('restartPolicy')!r}: a Job pod needs Never "
                       f"or OnFailure")
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if spec.get(field) is not None and spec[field] <= 0:
            out.append(f"{field} must be positive")
    if backoff is not None and backoff < 0:
        out.append("backoffLimit must be non-negative")
    cluster = spec.get("rayClusterSpec")
    if cluster:
        if (cluster.get("authOptions") or {}).get("enableK8sTokenAuth"):
            out.append("K8s token auth is not supported for a RayJob")
        out += [f"rayClusterSpec: {p}" for p in cluster_spec_problems(cluster)]
    return out


def _name_problems(doc: dict, kind: str, limit: int) -> list[str]:
    name = doc["metadata"].get("name", "")
    if len(name) > limit:
        return [f"{kind} name {name!r} longer than {limit} characters"]
    if not DNS1035.fullmatch(name):
        return [f"{kind} name {name!r} is not a DNS-1035 label"]
    return []


def problems(doc: dict) -> list[str]:
    """KubeRay's checks for a RayCluster or RayJob document; [] for any other kind."""
    if doc.get("apiVersion", "").startswith("ray.io/"):
        if doc["kind"] == "RayCluster":
            return [f"RayCluster/{doc['metadata']['name']}: {p}" for p in cluster_problems(doc)]
        if doc["kind"] == "RayJob":
            return [f"RayJob/{doc['metadata']['name']}: {p}" for p in job_problems(doc)]
    return []
