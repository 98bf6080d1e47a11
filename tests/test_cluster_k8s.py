"""Every manifest under cluster/k8s/ against the API it will meet, offline.

No API server runs here, so: KubeRay objects (RayJob, RayCluster) against the
``openAPIV3Schema`` of KubeRay's CRDs (tests/data/kuberay-crds/, vendored), made strict the way
the API server is (unknown fields rejected, ``default``s applied before ``required``);
built-in kinds (Deployment, Service, Secret, ConfigMap, PVC) with ``kubernetes-validate`` in
strict mode. A deliberately broken copy of each manifest must fail. CEL rules
(``x-kubernetes-validations``) are not evaluated.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "cluster" / "k8s"
CRDS = Path(__file__).resolve().parent / "data" / "kuberay-crds"
KUBERNETES_VERSION = "1.32.0"  # the oldest API we promise; kubectl 1.32 on the dev machine
NOT_MANIFESTS = {"runtime_env.yaml"}  # for `ray job submit`, checked at the end
SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI",
                "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN", "POSTGRES_PASSWORD")


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name not in NOT_MANIFESTS)


def documents() -> list[tuple[str, dict]]:
    """``(file:kind/name, document)`` for every object of every manifest file."""
    found = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((f"{path.name}:{doc.get('kind')}/{doc['metadata']['name']}", doc))
    return found


DOCUMENTS = documents()
IDS = [name for name, _ in DOCUMENTS]


def strict(schema: dict) -> dict:
    """A CRD schema as the API server applies it: object schemas that list ``properties``
    reject unknown fields (unless marked to keep them), and a ``required`` field that has a
    ``default`` may be omitted (the server fills it in before validating)."""
    schema = dict(schema)
    properties = schema.get("properties")
    if properties is not None:
        schema["properties"] = {key: strict(value) for key, value in properties.items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        schema["required"] = [key for key in schema.get("required", [])
                              if "default" not in properties.get(key, {})]
        if not schema["required"]:
            del schema["required"]
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(option) for option in schema[key]]
    return schema


def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """``(apiVersion, kind) -> validator`` for every served version of the vendored CRDs."""
    validators = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = strict(version["schema"]["openAPIV3Schema"])
                validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


VALIDATORS = crd_validators()


def validate(doc: dict) -> None:
    """Raise on the first way ``doc`` would be refused; unknown kinds are refused too."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in VALIDATORS:
        errors = sorted(VALIDATORS[key].iter_errors(doc), key=lambda e: list(e.absolute_path))
        if errors:
            raise jsonschema.ValidationError(
                f"{'.'.join(map(str, errors[0].absolute_path))}: {errors[0].message}")
        # The CRD leaves `metadata` to the server, which checks it as ObjectMeta: the same
        # ObjectMeta a ConfigMap has.
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap",
                                      "metadata": doc.get("metadata")}, KUBERNETES_VERSION,
                                     strict=True)
        if not doc["metadata"].get("name"):
            raise jsonschema.ValidationError("metadata.name is missing")
        return
    if key[0] and key[0].startswith("ray.io/"):
        raise ValueError(f"{key} is not in the vendored KubeRay CRDs")
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


REFUSED = (jsonschema.ValidationError, kubernetes_validate.utils.ValidationError,
           kubernetes_validate.utils.SchemaNotFoundError, ValueError)


def test_the_launch_files_are_there():
    kinds = {doc["kind"] for _, doc in DOCUMENTS}
    assert {"RayJob", "RayCluster", "Deployment", "Service", "Secret", "ConfigMap",
            "PersistentVolumeClaim"} <= kinds
    assert {key[1] for key in VALIDATORS} == {"RayJob", "RayCluster"}


@pytest.mark.parametrize("name, doc", DOCUMENTS, ids=IDS)
def test_manifest_is_valid(name, doc):
    validate(doc)


# Maps whose keys are free-form (any key is valid), so a misspelling inside them is no error.
FREE_FORM = {"labels", "annotations", "data", "stringData", "rayStartParams", "matchLabels",
             "selector", "requests", "limits", "nodeSelector"}


def deepest_key_path(node, path=()) -> tuple:
    """The path to the last schema-defined key of the most deeply nested mapping (lists
    followed too, free-form maps not entered)."""
    best = path
    if path and path[-1] in FREE_FORM:
        return best
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in children:
        candidate = deepest_key_path(child, path + (key,))
        if len(candidate) >= len(best) and isinstance(candidate[-1], str):
            best = candidate
    return best


def misspelled(doc: dict, path: tuple) -> dict:
    """A copy of ``doc`` with the key at ``path`` losing its last-but-one letter."""
    broken = copy.deepcopy(doc)
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    parent[key[:-2] + key[-1:] if len(key) > 2 else key + "x"] = parent.pop(key)
    return broken


def top_field(doc: dict) -> tuple:
    """The first field of ``spec``, or the body itself where it is free-form (Secret data)."""
    body = "spec" if "spec" in doc else next(k for k in doc if k not in ("apiVersion", "kind", "metadata"))
    inner = doc[body]
    if body in FREE_FORM or not isinstance(inner, dict) or not inner:
        return (body,)
    return (body, next(iter(inner)))


@pytest.mark.parametrize("name, doc", DOCUMENTS, ids=IDS)
@pytest.mark.parametrize("where", ["top", "deepest"])
def test_misspelled_field_is_refused(name, doc, where):
    path = top_field(doc) if where == "top" else deepest_key_path(doc)
    broken = misspelled(doc, path)
    with pytest.raises(REFUSED):
        validate(broken)


@pytest.mark.parametrize("name, doc", DOCUMENTS, ids=IDS)
def test_wrong_type_is_refused(name, doc):
    broken = copy.deepcopy(doc)
    broken["metadata"]["labels"] = ["not", "a", "mapping"]
    with pytest.raises(REFUSED):
        validate(broken)


def test_misspelled_entrypoint_is_refused():
    (rayjob,) = [doc for _, doc in DOCUMENTS if doc["kind"] == "RayJob"]
    broken = copy.deepcopy(rayjob)
    broken["spec"]["entrypont"] = broken["spec"].pop("entrypoint")
    with pytest.raises(jsonschema.ValidationError, match="entrypont"):
        validate(broken)


def test_worker_group_without_required_field_is_refused():
    (cluster,) = [doc for _, doc in DOCUMENTS if doc["kind"] == "RayCluster"]
    broken = copy.deepcopy(cluster)
    del broken["spec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="groupName"):
        validate(broken)


def pod_specs(doc: dict) -> list[dict]:
    """Every pod template spec inside a RayJob, RayCluster or Deployment."""
    spec = doc.get("spec", {})
    cluster = spec.get("rayClusterSpec", spec)
    if doc["kind"] in ("RayJob", "RayCluster"):
        groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
        return [group["template"]["spec"] for group in groups]
    if doc["kind"] == "Deployment":
        return [spec["template"]["spec"]]
    return []


@pytest.mark.parametrize("name, doc", [(n, d) for n, d in DOCUMENTS if pod_specs(d)],
                         ids=[n for n, d in DOCUMENTS if pod_specs(d)])
def test_credentials_and_endpoints_are_never_inline(name, doc):
    for pod in pod_specs(doc):
        for container in pod["containers"]:
            for variable in container.get("env", []):
                if variable["name"] in SECRET_NAMES:
                    assert "value" not in variable, f"{variable['name']} is inline in {name}"
    text = yaml.safe_dump(doc)
    assert "change-me" not in text


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_ray_pods_get_settings_shared_memory_and_token_auth(kind):
    for _, doc in DOCUMENTS:
        if doc["kind"] != kind:
            continue
        cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert cluster["authOptions"]["mode"] == "token"
        for pod in pod_specs(doc):
            (container,) = pod["containers"]
            sources = {next(iter(s.values()))["name"] for s in container["envFrom"]}
            assert sources == {"t2t-settings", "t2t-s3"}
            shm = {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"}
            (volume,) = [v for v in pod["volumes"] if v["name"] in shm]
            assert volume["emptyDir"]["medium"] == "Memory"


def test_pretraining_job_uses_gpu_workers_and_resumable_storage():
    (rayjob,) = [doc for _, doc in DOCUMENTS if doc["kind"] == "RayJob"]
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               * group["replicas"] for group in groups)
    entrypoint = rayjob["spec"]["entrypoint"]
    assert f"scaling.num_workers={gpus}" in entrypoint and "scaling.use_gpu=true" in entrypoint
    assert "run.storage_path=s3://" in entrypoint and "run.name=" in entrypoint
    assert rayjob["spec"]["backoffLimit"] >= 1


def test_autoscaling_cluster_scales_from_zero():
    (cluster,) = [doc for _, doc in DOCUMENTS if doc["kind"] == "RayCluster"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 < group["maxReplicas"]


def test_mlflow_server_uses_postgres_and_s3():
    (server,) = [doc for name, doc in DOCUMENTS if name == "mlflow.yaml:Deployment/mlflow"]
    args = server["spec"]["template"]["spec"]["containers"][0]["args"]
    assert any(a.startswith("--backend-store-uri=postgresql://") for a in args)
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    services = {doc["metadata"]["name"] for _, doc in DOCUMENTS if doc["kind"] == "Service"}
    assert {"mlflow", "mlflow-postgres"} <= services


def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load((K8S / "runtime_env.yaml").read_text())
    assert set(spec) <= RuntimeEnv.known_fields  # Ray takes unknown keys for plugins
    env = RuntimeEnv(**spec)  # checks the values of the known fields
    assert env.working_dir() == "."
    assert {".venv", ".git", "runs"} <= set(spec["excludes"])
