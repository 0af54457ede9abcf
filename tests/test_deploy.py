"""deploy/kubernetes/: every manifest validates against the Kubernetes schemas (offline, with
``kubernetes-validate``), and the pieces agree with each other and with netloader: the vLLM
config each container passes parses as netloader's own, its rank and metrics ports are the
container's and the Service's ports, and the Secret it mounts is the one defined."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from netloader.integrations.vllm.config import NetloaderConfig

kubernetes_validate = pytest.importorskip("kubernetes_validate")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
KUBERNETES = "1.30.0"
CONFIG_FLAG = "--model-loader-extra-config="


def manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def test_every_manifest_validates_against_the_kubernetes_schemas():
    docs = manifests()
    assert {"Secret", "Service", "StatefulSet", "Deployment"} <= {d["kind"] for d in docs.values()}
    for name, doc in docs.items():
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {exc.message} at {list(exc.path)}")


def workloads(docs: dict[str, dict]) -> list[tuple[str, dict]]:
    return [(n, d) for n, d in docs.items() if d["kind"] in ("StatefulSet", "Deployment")]


def test_the_vllm_config_ports_secret_and_service_agree():
    docs = manifests()
    service = docs["Service/llm-weights"]["spec"]
    assert service["clusterIP"] == "None"  # headless: one A record per ready pod
    service_ports = {p["name"]: p["port"] for p in service["ports"]}
    secrets = {d["metadata"]["name"] for d in docs.values() if d["kind"] == "Secret"}
    for name, doc in workloads(docs):
        pod = doc["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = container["args"]
        (flag,) = [a for a in args if a.startswith(CONFIG_FLAG)]
        config = NetloaderConfig.parse(json.loads(flag[len(CONFIG_FLAG) :]))
        (tp,) = [int(a.split("=")[1]) for a in args if a.startswith("--tensor-parallel-size=")]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for rank in range(tp):
            weights = config.serve.listen_port + rank
            metrics = config.serve.metrics_port + rank
            assert ports[f"weights-{rank}"] == service_ports[f"weights-{rank}"] == weights, name
            assert ports[f"metrics-{rank}"] == service_ports[f"metrics-{rank}"] == metrics, name
            for source in config.sources_for(rank):  # the replicas' SOURCE names the Service
                assert source == f"llm-weights:{weights}", name
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        token_volume = next(n for n, v in volumes.items() if "secret" in v)
        assert volumes[token_volume]["secret"]["secretName"] in secrets, name
        assert config.token_file.startswith(mounts[token_volume] + "/"), name
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert service["selector"].items() <= labels.items(), name
        assert container["readinessProbe"]["httpGet"]["path"] == "/health", name
