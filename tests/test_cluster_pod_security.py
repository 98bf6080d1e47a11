"""Every pod cluster/k8s/ ships meets Pod Security "restricted" and passes a policy scanner.

The pods are the ones the API server will see (``rendered_pods``: Deployments' and Jobs'
templates, and what KubeRay makes of a RayJob or RayCluster: head with its autoscaler,
workers with their init container, the job submitter). Three checks, each of which must
refuse a deliberately broken copy:

- Pod Security Standard "restricted" (Kubernetes 1.32), written out from
  https://kubernetes.io/docs/concepts/security/pod-security-standards/ (what a namespace
  labelled ``pod-security.kubernetes.io/enforce: restricted`` admits);
- this project's rules on top: read-only root filesystems with /tmp on an emptyDir, the fixed
  uid the image creates (cluster/Dockerfile), pulls re-checked (imagePullPolicy Always);
- checkov's Kubernetes checks (a separate tool environment: its pins conflict with
  constraints.txt), every finding we accept named with its reason in ``ACCEPTED``.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from test_cluster_k8s import DOCUMENTS, KUBERNETES_VERSION, ROOT, rendered_pods

PODS = rendered_pods()
POD_IDS = [name for name, _ in PODS]
IMAGE_UIDS = {"registry.example.com/t2t-dist:0.1.0": 10001,  # cluster/Dockerfile, target train
              "registry.example.com/t2t-dist-mlflow:0.1.0": 10001,  # target mlflow
              "postgres:17.6": 999}  # the official image's `postgres` user


def containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"], *spec.get("ephemeralContainers", [])]


# Pod Security Standards, Kubernetes 1.32: the baseline controls, then restricted's.
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


def restricted_violations(spec: dict) -> list[str]:
    """What keeps ``spec`` (a PodSpec) out of a namespace enforcing "restricted"."""
    found = []
    pod_context = spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            found.append(f"{field}: true")
    for sysctl in pod_context.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"sysctl {sysctl['name']}")
    for volume in spec.get("volumes", []):
        kind = next(key for key in volume if key != "name")
        if kind not in RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {kind}")
    if pod_context.get("runAsUser") == 0:
        found.append("pod runAsUser: 0")
    if pod_context.get("seccompProfile", {}).get("type") == "Unconfined":
        found.append("pod seccompProfile Unconfined")
    for container in containers(spec):
        context, where = container.get("securityContext", {}), f"container {container['name']}"
        if context.get("privileged"):
            found.append(f"{where}: privileged")
        if context.get("windowsOptions", {}).get("hostProcess") or \
                pod_context.get("windowsOptions", {}).get("hostProcess"):
            found.append(f"{where}: hostProcess")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{where}: hostPort")
        if context.get("procMount", "Default") != "Default":
            found.append(f"{where}: procMount {context['procMount']}")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation is not false")
        if not (context.get("runAsNonRoot") or (pod_context.get("runAsNonRoot")
                                                and context.get("runAsNonRoot") is not False)):
            found.append(f"{where}: runAsNonRoot is not true")
        if context.get("runAsUser") == 0:
            found.append(f"{where}: runAsUser 0")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where}: seccompProfile {seccomp}")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{where}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{where}: capabilities add {capabilities['add']}")
    return found


def project_violations(spec: dict) -> list[str]:
    """Our rules beyond "restricted": a read-only root with a writable /tmp, the image's own
    fixed uid, pulls that re-check the registry (a cached private image is no shortcut for
    another tenant's pod on the node)."""
    found = []
    uid = spec.get("securityContext", {}).get("runAsUser")
    empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
    for container in containers(spec):
        context, where = container.get("securityContext", {}), f"container {container['name']}"
        if context.get("readOnlyRootFilesystem") is not True:
            found.append(f"{where}: readOnlyRootFilesystem is not true")
        if not any(m["mountPath"] == "/tmp" and m["name"] in empty_dirs
                   for m in container.get("volumeMounts", [])):
            found.append(f"{where}: no emptyDir at /tmp")
        if context.get("runAsUser", uid) != IMAGE_UIDS.get(container["image"]):
            found.append(f"{where}: runs as uid {context.get('runAsUser', uid)}, "
                         f"its image's user is {IMAGE_UIDS.get(container['image'])}")
        if container.get("imagePullPolicy") != "Always":
            found.append(f"{where}: imagePullPolicy {container.get('imagePullPolicy')}")
    return found


def test_every_pod_we_ship_is_rendered():
    names = set(POD_IDS)
    assert {"mlflow", "mlflow-postgres", "mlflow-user", "t2t-pretrain-vit14-headgroup",
            "t2t-pretrain-vit14-gpu", "t2t-pretrain-vit14-submitter", "t2t-interactive-headgroup",
            "t2t-interactive-gpu", "t2t-interactive-cpu"} == names
    head = dict(PODS)["t2t-interactive-headgroup"]["spec"]
    assert [c["name"] for c in head["containers"]] == ["ray-head", "autoscaler"]
    assert [c["name"] for c in dict(PODS)["t2t-pretrain-vit14-gpu"]["spec"]["initContainers"]] \
        == ["wait-gcs-ready"]


@pytest.mark.parametrize("name, pod", PODS, ids=POD_IDS)
def test_rendered_pod_is_a_valid_pod(name, pod):
    import kubernetes_validate

    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name, pod", PODS, ids=POD_IDS)
def test_pod_meets_pod_security_restricted(name, pod):
    assert restricted_violations(pod["spec"]) == []


@pytest.mark.parametrize("name, pod", PODS, ids=POD_IDS)
def test_pod_meets_our_rules(name, pod):
    assert project_violations(pod["spec"]) == []


def test_uids_are_the_ones_the_dockerfile_creates():
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    for stage, image in (("mlflow", "registry.example.com/t2t-dist-mlflow:0.1.0"),
                         ("train", "registry.example.com/t2t-dist:0.1.0")):
        body = re.search(rf"^FROM \S+ AS {stage}\n(.*?)(?=^FROM |\Z)", text, flags=re.M | re.S).group(1)
        assert re.findall(r"^USER (\d+)$", body, flags=re.M)[-1] == str(IMAGE_UIDS[image])
        assert f"--uid {IMAGE_UIDS[image]} " in body


def ray_gpu_worker() -> dict:
    return copy.deepcopy(dict(PODS)["t2t-pretrain-vit14-gpu"])


def first(pod: dict) -> dict:
    return pod["spec"]["containers"][0]


# (what breaks, how, which check must see it: restricted / ours / checkov's ID)
BREAKAGES = {
    "escalation": (lambda p: first(p)["securityContext"].update(allowPrivilegeEscalation=True),
                   "restricted", "CKV_K8S_20"),
    "root": (lambda p: (p["spec"]["securityContext"].pop("runAsNonRoot"),
                        p["spec"]["securityContext"].update(runAsUser=0)),
             "restricted", "CKV_K8S_23"),
    "capabilities": (lambda p: first(p)["securityContext"].pop("capabilities"),
                     "restricted", "CKV_K8S_37"),
    "net-raw": (lambda p: first(p)["securityContext"]["capabilities"].update(add=["NET_RAW"]),
                "restricted", "CKV_K8S_25"),
    "seccomp": (lambda p: p["spec"]["securityContext"].pop("seccompProfile"),
                "restricted", "CKV_K8S_31"),
    "privileged": (lambda p: first(p)["securityContext"].update(privileged=True),
                   "restricted", "CKV_K8S_16"),
    "host-network": (lambda p: p["spec"].update(hostNetwork=True), "restricted", "CKV_K8S_19"),
    "host-path": (lambda p: p["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
                  "restricted", None),
    "writable-root": (lambda p: first(p)["securityContext"].update(readOnlyRootFilesystem=False),
                      "ours", "CKV_K8S_22"),
    "low-uid": (lambda p: p["spec"]["securityContext"].update(runAsUser=1001), "ours", "CKV_K8S_40"),
    "cached-image": (lambda p: first(p).update(imagePullPolicy="IfNotPresent"), "ours", "CKV_K8S_15"),
    "token-mounted": (lambda p: p["spec"].pop("automountServiceAccountToken"), None, "CKV_K8S_38"),
}


def broken(breakage: str) -> dict:
    pod = ray_gpu_worker()
    BREAKAGES[breakage][0](pod)
    pod["metadata"]["name"] = f"broken-{breakage}"
    return pod


@pytest.mark.parametrize("breakage", [b for b, (_, where, _) in BREAKAGES.items() if where])
def test_broken_copy_is_refused(breakage):
    check = {"restricted": restricted_violations, "ours": project_violations}[BREAKAGES[breakage][1]]
    assert check(ray_gpu_worker()["spec"]) == []
    assert check(broken(breakage)["spec"]) != []


# checkov ------------------------------------------------------------------------------------

CHECKOV = (os.environ.get("CHECKOV") or shutil.which("checkov", path=str(ROOT / ".venv" / "checkov" / "bin"))
           or shutil.which("checkov"))
CHECKOV_VERSION = (3, 3)  # the oldest we checked the findings against: 3.3.30

# Every checkov finding we accept: (check, resource pattern) -> why. Anything else fails.
ACCEPTED = {
    ("CKV_K8S_21", "*"):
        "The default namespace should not be used: the manifests name no namespace; it is "
        "chosen at `kubectl apply -n`.",
    ("CKV_K8S_43", "*"):
        "Image should use digest: images are named by release tag (registry.example.com "
        "placeholders, postgres:17.6); pin digests where the images are pushed. "
        "imagePullPolicy Always makes every start re-check the tag with the registry.",
    ("CKV_K8S_35", "*"):
        "Prefer secrets as files over environment variables: every client we run reads its "
        "credentials from the environment only (MLflow's MLFLOW_TRACKING_*, boto3's AWS_*, "
        "libpq's PGPASSWORD, the postgres image's POSTGRES_*, KubeRay's RAY_AUTH_TOKEN). The "
        "manifests hold Secret references, never values, and a process's environment is "
        "readable by its own uid only (unlike its command line).",
    ("CKV_K8S_8", "Pod.*.t2t-*"):
        "Liveness probe: KubeRay adds liveness and readiness probes to the Ray containers "
        "itself (raylet and GCS health); the submitter runs once to completion.",
    ("CKV_K8S_9", "Pod.*.t2t-*"):
        "Readiness probe: as CKV_K8S_8, KubeRay adds them; the submitter serves nothing.",
    ("CKV_K8S_38", "Pod.*.t2t-interactive-headgroup"):
        "Service account token mounted: the in-tree autoscaler beside the head scales the "
        "cluster through the Kubernetes API with the head's service account (KubeRay's RBAC). "
        "Every other pod sets automountServiceAccountToken: false.",
    ("CKV_K8S_40", "Deployment.*.mlflow-postgres"):
        "High UID: the official postgres image's own user is uid 999 (runAsNonRoot, no "
        "capabilities); another uid needs the image's nss_wrapper path.",
}


def accepted(check_id: str, resource: str) -> bool:
    return any(check == check_id and fnmatch.fnmatch(resource, pattern)
               for check, pattern in ACCEPTED)


@pytest.fixture(scope="module")
def checkov_findings(tmp_path_factory) -> dict:
    """One checkov run over the built-in objects as written and the rendered KubeRay pods
    (checkov does not read RayJob/RayCluster), plus a broken copy per BREAKAGES entry."""
    if CHECKOV is None:
        pytest.skip("checkov not installed: python -m venv .venv/checkov && "
                    ".venv/checkov/bin/pip install 'checkov>=3.3.30' (its pins conflict with "
                    "constraints.txt, so it lives in its own environment)")
    version = subprocess.run([CHECKOV, "--version"], capture_output=True, text=True, timeout=120)
    assert tuple(map(int, version.stdout.split(".")[:2])) >= CHECKOV_VERSION, version.stdout
    folder = tmp_path_factory.mktemp("checkov")
    objects = [doc for _, doc in DOCUMENTS if doc["kind"] not in ("RayJob", "RayCluster")]
    objects += [pod for _, pod in PODS
                if pod["metadata"]["labels"].get("app.kubernetes.io/created-by") == "kuberay-operator"]
    objects += [broken(name) for name, (_, _, check) in BREAKAGES.items() if check]
    (folder / "manifests.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))
    result = subprocess.run([CHECKOV, "--directory", str(folder), "--framework", "kubernetes",
                             "--output", "json", "--compact", "--skip-download"],
                            capture_output=True, text=True, timeout=300, cwd=folder,
                            env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "HOME": str(folder)})
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["summary"]["parsing_errors"] == 0, result.stderr[-2000:]
    return report


def is_broken(resource: str) -> bool:
    return ".broken-" in resource


def test_checkov_finds_nothing_we_have_not_accepted(checkov_findings):
    failed = [(c["check_id"], c["resource"]) for c in checkov_findings["results"]["failed_checks"]
              if not is_broken(c["resource"])]
    passed = [c for c in checkov_findings["results"]["passed_checks"] if not is_broken(c["resource"])]
    unexplained = [f"{check} {resource}" for check, resource in failed if not accepted(check, resource)]
    assert unexplained == []
    unused = [key for key in ACCEPTED if not any(check == key[0] and fnmatch.fnmatch(resource, key[1])
                                                 for check, resource in failed)]
    assert unused == [], "accepted findings checkov no longer reports: drop them"
    resources = {resource for _, resource in failed} | {c["resource"] for c in passed}
    for name, _ in PODS:  # every pod was scanned (as itself or through its Deployment/Job)
        assert any(resource.split(".")[2] == name for resource in resources), name
    print(f"\ncheckov: {len(passed)} passed, {len(failed)} failed and accepted "
          f"({len(ACCEPTED)} accepted findings), {len(resources)} resources")


@pytest.mark.parametrize("breakage", [b for b, (_, _, check) in BREAKAGES.items() if check])
def test_checkov_refuses_a_broken_copy(checkov_findings, breakage):
    check = BREAKAGES[breakage][2]
    failed = {(c["check_id"], c["resource"]) for c in checkov_findings["results"]["failed_checks"]}
    passed = {(c["check_id"], c["resource"]) for c in checkov_findings["results"]["passed_checks"]}
    assert (check, "Pod.default.t2t-pretrain-vit14-gpu") in passed  # the original passes it
    assert (check, f"Pod.default.broken-{breakage}") in failed
