"""Every manifest under cluster/k8s/ against the API it will meet, offline.

No API server runs here, so: KubeRay objects (RayJob, RayCluster) against the
``openAPIV3Schema`` of KubeRay's CRDs (tests/data/kuberay-crds/, vendored), made strict the way
the API server is (unknown fields rejected, ``default``s applied before ``required``);
built-in kinds (Deployment, Service, Secret, ConfigMap, PVC) with ``kubernetes-validate`` in
strict mode. A deliberately broken copy of each manifest must fail. CEL rules
(``x-kubernetes-validations``) are not evaluated. ``rendered_pods`` gives the pods the
manifests make (KubeRay's included) to the pod-security and network tests; no Secret value
reaches a command line once the kubelet has expanded ``$(VAR)``s.
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
                "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN",
                "POSTGRES_PASSWORD", "PGPASSWORD", "MLFLOW_AUTH_ADMIN_USERNAME",
                "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                "T2T_MLFLOW_USERNAME", "T2T_MLFLOW_PASSWORD")


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
    if doc["kind"] in ("Deployment", "Job"):
        return [spec["template"]["spec"]]
    return []


RAY_CLUSTER_SUFFIX = "-x7k2q"  # KubeRay names a RayJob's cluster <RayJob name>-<random>


def rendered_pods(documents: list[tuple[str, dict]] | None = None) -> list[tuple[str, dict]]:
    """``(name, v1 Pod)`` for every pod the manifests make, as the API server will see it.

    Deployments and Jobs: their templates. RayJob and RayCluster: what KubeRay makes of each
    group (ray-operator/controllers/ray/common/pod.go, job.go, v1.5-1.7): the template's
    labels over KubeRay's own (``ray.io/node-type``, ``ray.io/cluster`` ... not overridable),
    the autoscaler container beside the head (image of the head, ``autoscalerOptions``'
    securityContext, resources and mounts, plus KubeRay's log volume at /tmp/ray), the
    ``wait-gcs-ready`` init container of workers (the Ray container's image, securityContext,
    env and mounts), and a RayJob's submitter pod (``submitterPodTemplate``). Left out: the
    probes and environment KubeRay adds, which change nothing a policy checks.
    """
    pods = []
    for name, doc in DOCUMENTS if documents is None else documents:
        spec = doc.get("spec", {})
        if doc["kind"] in ("Deployment", "Job"):
            template = spec["template"]
            pods.append((doc["metadata"]["name"], {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": doc["metadata"]["name"],
                             "labels": dict(template["metadata"].get("labels", {}))},
                "spec": copy.deepcopy(template["spec"])}))
        if doc["kind"] not in ("RayJob", "RayCluster"):
            continue
        cluster = spec.get("rayClusterSpec", spec)
        cluster_name = doc["metadata"]["name"] + (RAY_CLUSTER_SUFFIX if doc["kind"] == "RayJob" else "")
        groups = [("head", "headgroup", cluster["headGroupSpec"])] + [
            ("worker", group["groupName"], group) for group in cluster.get("workerGroupSpecs", [])]
        for node_type, group_name, group in groups:
            template = copy.deepcopy(group["template"])
            labels = {"ray.io/is-ray-node": "yes", "app.kubernetes.io/name": "kuberay",
                      "app.kubernetes.io/created-by": "kuberay-operator",
                      **template.get("metadata", {}).get("labels", {}),
                      "ray.io/cluster": cluster_name, "ray.io/node-type": node_type,
                      "ray.io/group": group_name}
            pod = template["spec"]
            ray_container = pod["containers"][0]
            if node_type == "head" and cluster.get("enableInTreeAutoscaling"):
                options = cluster.get("autoscalerOptions", {})
                pod.setdefault("volumes", []).append({"name": "ray-logs", "emptyDir": {}})
                ray_container.setdefault("volumeMounts", []).append(
                    {"name": "ray-logs", "mountPath": "/tmp/ray"})
                pod["containers"].append({
                    "name": "autoscaler", "image": options.get("image", ray_container["image"]),
                    "imagePullPolicy": options.get("imagePullPolicy", "IfNotPresent"),
                    "command": ["/bin/bash", "-lc", "--"], "args": ["ray kuberay-autoscaler"],
                    "resources": options.get("resources", {}),
                    "volumeMounts": [*options.get("volumeMounts", []),
                                     {"name": "ray-logs", "mountPath": "/tmp/ray"}],
                    **({"securityContext": options["securityContext"]}
                       if "securityContext" in options else {})})
            if node_type == "worker":
                pod.setdefault("initContainers", []).append({
                    "name": "wait-gcs-ready", "image": ray_container["image"],
                    "imagePullPolicy": ray_container.get("imagePullPolicy", "IfNotPresent"),
                    "command": ["/bin/bash", "-lc", "--"], "args": ["ray health-check"],
                    "resources": {"requests": {"cpu": "200m", "memory": "256Mi"},
                                  "limits": {"cpu": "200m", "memory": "256Mi"}},
                    **{key: copy.deepcopy(ray_container[key])
                       for key in ("securityContext", "env", "envFrom", "volumeMounts")
                       if key in ray_container and key != "envFrom"}})
            pods.append((f"{doc['metadata']['name']}-{group_name}", {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{doc['metadata']['name']}-{group_name}", "labels": labels},
                "spec": pod}))
        if doc["kind"] == "RayJob" and spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
            template = copy.deepcopy(spec.get("submitterPodTemplate") or {"spec": {"containers": [
                {"name": "ray-job-submitter", "image": cluster["headGroupSpec"]["template"]["spec"]
                 ["containers"][0]["image"]}], "restartPolicy": "Never"}})
            labels = {**template.get("metadata", {}).get("labels", {}),
                      "ray.io/originated-from-cr-name": doc["metadata"]["name"],
                      "ray.io/originated-from-crd": "RayJob",
                      "app.kubernetes.io/created-by": "kuberay-operator"}
            pods.append((f"{doc['metadata']['name']}-submitter", {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{doc['metadata']['name']}-submitter", "labels": labels},
                "spec": template["spec"]}))
    return pods


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
            assert sources == {"t2t-settings", "t2t-s3", "mlflow-training"}
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


def mlflow_container() -> dict:
    (server,) = [doc for name, doc in DOCUMENTS if name == "mlflow.yaml:Deployment/mlflow"]
    return server["spec"]["template"]["spec"]["containers"][0]


def test_mlflow_server_uses_postgres_s3_and_basic_auth():
    import configparser

    container = mlflow_container()
    args = container["args"]
    assert "--app-name=basic-auth" in args
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    assert not any(a.startswith("--backend-store-uri") for a in args)  # the URI comes from env
    env = {variable["name"]: variable for variable in container["env"]}
    # psycopg2 named: SQLAlchemy 2.1 would pick psycopg 3, which the image lacks.
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == "postgresql+psycopg2://mlflow-postgres:5432"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-postgres",
                                                              "key": "POSTGRES_PASSWORD"}
    assert {"name": "mlflow-admin"} in [source.get("secretRef") for source in container["envFrom"]]
    # The auth settings: mounted where MLFLOW_AUTH_CONFIG_PATH points, users in PostgreSQL.
    (config_map,) = [doc for name, doc in DOCUMENTS if name == "mlflow.yaml:ConfigMap/mlflow-auth"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "auth-config")
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == f"{mount['mountPath']}/basic_auth.ini"
    ini = configparser.ConfigParser()
    ini.read_string(config_map["data"]["basic_auth.ini"])
    assert ini["mlflow"]["database_uri"] == env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert "admin_password" not in ini["mlflow"]
    services = {doc["metadata"]["name"] for _, doc in DOCUMENTS if doc["kind"] == "Service"}
    assert {"mlflow", "mlflow-postgres"} <= services


def test_training_user_job_logs_in_as_admin_to_manage_the_training_user():
    (job,) = [doc for name, doc in DOCUMENTS if name == "mlflow.yaml:Job/mlflow-user"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in container["env"]
           if "secretKeyRef" in v.get("valueFrom", {})}
    assert env["MLFLOW_TRACKING_PASSWORD"] == {"name": "mlflow-admin", "key": "MLFLOW_AUTH_ADMIN_PASSWORD"}
    assert env["T2T_MLFLOW_PASSWORD"] == {"name": "mlflow-training", "key": "MLFLOW_TRACKING_PASSWORD"}
    assert container["command"][-1] == "/opt/mlflow/mlflow_user.py"
    assert "COPY cluster/k8s/mlflow_user.py /opt/mlflow/mlflow_user.py" in \
        (ROOT / "cluster" / "Dockerfile").read_text()


def example_secrets() -> dict[str, str]:
    """Every key of every Secret in secrets.example.yaml, with a distinct test value."""
    values = {}
    for doc in yaml.safe_load_all((K8S / "secrets.example.yaml").read_text()):
        for key in doc["stringData"]:
            values[f"{doc['metadata']['name']}/{key}"] = f"t2t-test-{doc['metadata']['name']}-{key}"
    return values


def container_environment(container: dict, secrets: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it, Secrets read from ``secrets``
    (``"secret/key" -> value``), ConfigMaps left as placeholders, ``$(VAR)`` expanded."""
    env = {}
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            prefix = source["secretRef"]["name"] + "/"
            env.update({k[len(prefix):]: v for k, v in secrets.items() if k.startswith(prefix)})
    for variable in container.get("env", []):
        reference = variable.get("valueFrom", {}).get("secretKeyRef")
        if reference:
            env[variable["name"]] = secrets[f"{reference['name']}/{reference['key']}"]
        elif "value" in variable:
            env[variable["name"]] = expand(variable["value"], env)
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in command, args and env values."""
    import re

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def command_lines(pod: dict, secrets: dict[str, str]) -> list[str]:
    """Every command line the pod's containers run (expanded as the kubelet does), probes'
    included: what `ps` on the node and the pod's status show."""
    lines = []
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        env = container_environment(container, secrets)
        lines.append(" ".join(expand(part, env) for part in
                              [*container.get("command", []), *container.get("args", [])]))
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            command = container.get(probe, {}).get("exec", {}).get("command", [])
            lines.append(" ".join(expand(part, env) for part in command))
    return lines


def secrets_on_command_lines(documents) -> list[str]:
    secrets = example_secrets()
    found = []
    for name, pod in rendered_pods(documents):
        for line in command_lines(pod["spec"], secrets):
            found += [f"{name}: {key}" for key, value in secrets.items() if value in line]
    for name, doc in documents:  # the manifests themselves: what `kubectl get -o yaml` shows
        if doc["kind"] != "Secret":
            text = yaml.safe_dump(doc)
            found += [f"{name}: {key}" for key, value in secrets.items() if value in text]
            if doc["kind"] == "RayJob":  # KubeRay puts the entrypoint on the submitter's command line
                found += [f"{name}: $({v}) in the entrypoint" for v in SECRET_NAMES
                          if f"$({v})" in doc["spec"]["entrypoint"] or f"${v}" in doc["spec"]["entrypoint"]]
    return found


def test_no_secret_reaches_a_command_line():
    """With a distinct value in every Secret key, no command line, probe or manifest holds one
    once the kubelet has expanded ``$(VAR)``s (the old MLflow args expanded the database
    password into the server's command line)."""
    assert secrets_on_command_lines(DOCUMENTS) == []


def test_a_password_expanded_into_args_is_found():
    broken = copy.deepcopy(DOCUMENTS)
    server = next(doc for name, doc in broken if name == "mlflow.yaml:Deployment/mlflow")
    server["spec"]["template"]["spec"]["containers"][0]["args"].append(
        "--backend-store-uri=postgresql://$(PGUSER):$(PGPASSWORD)@mlflow-postgres:5432/$(PGDATABASE)")
    assert "mlflow: mlflow-postgres/POSTGRES_PASSWORD" in secrets_on_command_lines(broken)


def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load((K8S / "runtime_env.yaml").read_text())
    assert set(spec) <= RuntimeEnv.known_fields  # Ray takes unknown keys for plugins
    env = RuntimeEnv(**spec)  # checks the values of the known fields
    assert env.working_dir() == "."
    assert {".venv", ".git", "runs"} <= set(spec["excludes"])
