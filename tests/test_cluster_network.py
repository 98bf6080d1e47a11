"""The NetworkPolicies of cluster/k8s/, evaluated offline: who reaches whom, on which port.

``kubernetes-validate`` checks their schema (tests/test_cluster_k8s.py); here their meaning.
``reaches`` follows the NetworkPolicy API (networking.k8s.io/v1): a pod selected by any
policy with Ingress in its policyTypes takes only what some rule of such a policy allows; a
rule's peers are ORed, a peer's namespaceSelector and podSelector ANDed, a podSelector alone
means the policy's own namespace; an ipBlock is taken to match everyone (conservative). The
pods are the ones the manifests make (``rendered_pods``: KubeRay's labels included), in the
namespace ``t2t``, plus strangers: another pod of the namespace, a pod of another namespace
wearing our labels, the KubeRay operator and an impostor with its labels elsewhere.

Each expectation of ``EXPECTED`` must hold, and every broken copy in ``BREAKAGES`` must break
at least one of them. CNI specifics (traffic from the node, such as kubelet probes, and
``kubectl port-forward``, which enters through the pod's own network namespace) are outside
the model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest

from test_cluster_k8s import DOCUMENTS, rendered_pods

NAMESPACE = "t2t"
OPERATOR_NAMESPACE = "kuberay-system"


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict = field(hash=False)
    ports: dict = field(default_factory=dict, hash=False)  # port name -> number


def our_pods() -> dict[str, Pod]:
    pods = {}
    for name, pod in rendered_pods():
        ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"]
                 for p in c.get("ports", []) if "name" in p}
        pods[name] = Pod(name, NAMESPACE, pod["metadata"]["labels"], ports)
    return pods


PODS = our_pods()
STRANGERS = {
    "neighbour": Pod("neighbour", NAMESPACE, {"app": "notebook"}),
    # Another team's namespace, its pods labelled exactly like ours.
    "lookalike-worker": Pod("lookalike-worker", "other-team",
                            dict(PODS["t2t-pretrain-vit14-gpu"].labels)),
    "lookalike-mlflow-client": Pod("lookalike-mlflow-client", "other-team",
                                   {"app.kubernetes.io/name": "t2t-dist",
                                    "app.kubernetes.io/component": "pretrain"}),
    "operator": Pod("operator", OPERATOR_NAMESPACE, {"app.kubernetes.io/name": "kuberay-operator"}),
    "operator-impostor": Pod("operator-impostor", "other-team",
                             {"app.kubernetes.io/name": "kuberay-operator"}),
    # A second pretraining job in our namespace: a copy of the RayJob under another name.
    "other-job-worker": Pod("other-job-worker", NAMESPACE,
                            {**PODS["t2t-pretrain-vit14-gpu"].labels,
                             "app.kubernetes.io/instance": "t2t-pretrain-vit16",
                             "ray.io/cluster": "t2t-pretrain-vit16-abcde"}),
}
EVERYONE = {**PODS, **STRANGERS}


def selects(selector: dict | None, labels: dict) -> bool:
    """A metav1.LabelSelector; an empty one selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[operator]
        if not ok:
            return False
    return True


def peer_matches(peer: dict, source: Pod, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        return True
    if "namespaceSelector" in peer:
        namespace_ok = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source.namespace})
    else:
        namespace_ok = source.namespace == policy_namespace
    return namespace_ok and ("podSelector" not in peer or selects(peer["podSelector"], source.labels))


def port_matches(rule_port: dict, target: Pod, port: int) -> bool:
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    wanted = rule_port.get("port")
    if wanted is None:
        return True
    number = target.ports.get(wanted) if isinstance(wanted, str) else wanted
    return number is not None and number <= port <= rule_port.get("endPort", number)


def reaches(source: Pod, target: Pod, port: int, policies: list[dict]) -> bool:
    """Whether ``source`` may open a TCP connection to ``target``:``port`` (ingress side)."""
    isolating = [p for p in policies
                 if p["metadata"].get("namespace", NAMESPACE) == target.namespace
                 and selects(p["spec"]["podSelector"], target.labels)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not isolating:
        return True
    for policy in isolating:
        for rule in policy["spec"].get("ingress", []):
            peers, ports = rule.get("from"), rule.get("ports")
            if (not peers or any(peer_matches(peer, source, NAMESPACE) for peer in peers)) and \
                    (not ports or any(port_matches(p, target, port) for p in ports)):
                return True
    return False


def policies(documents=None) -> list[dict]:
    return [doc for _, doc in (DOCUMENTS if documents is None else documents)
            if doc["kind"] == "NetworkPolicy"]


MLFLOW_CLIENTS = ["t2t-pretrain-vit14-headgroup", "t2t-pretrain-vit14-gpu", "t2t-interactive-headgroup",
                  "t2t-interactive-gpu", "t2t-interactive-cpu", "mlflow-user",
                  "other-job-worker"]  # our other pretraining job logs to MLflow too
RAY_PORTS = [6379, 8265, 10001, 8080, 52365, 12345]  # GCS, dashboard, client, metrics, agent, a worker


def expectations() -> list[tuple[str, str, int, bool]]:
    """``(source, target, port, allowed)``: the issue's rules, spelled out."""
    expected = []
    # Only our job and cluster pods (and the Job that manages the training user) reach MLflow.
    for source in EVERYONE:
        expected.append((source, "mlflow", 5000, source in MLFLOW_CLIENTS))
    # Only MLflow reaches PostgreSQL.
    for source in EVERYONE:
        expected.append((source, "mlflow-postgres", 5432, source == "mlflow"))
    # A Ray cluster's pods only from its own pods (and the operator, on the head's dashboard).
    clusters = {"t2t-pretrain-vit14": ["t2t-pretrain-vit14-headgroup", "t2t-pretrain-vit14-gpu",
                                       "t2t-pretrain-vit14-submitter"],
                "t2t-interactive": ["t2t-interactive-headgroup", "t2t-interactive-gpu",
                                    "t2t-interactive-cpu"]}
    for members in clusters.values():
        head = members[0]
        for target in members:
            for source in EVERYONE:
                for port in RAY_PORTS:
                    allowed = source in members or (source == "operator" and target == head
                                                    and port == 8265)
                    expected.append((source, target, port, allowed))
    # The Job's pod listens on nothing: nothing reaches it.
    for source in EVERYONE:
        expected.append((source, "mlflow-user", 8080, False))
    return expected


def broken_expectations(documents=None) -> list[str]:
    found = policies(documents)
    return [f"{source} -> {target}:{port} should be {'allowed' if allowed else 'refused'}"
            for source, target, port, allowed in expectations()
            if reaches(EVERYONE[source], EVERYONE[target], port, found) != allowed]


def test_every_pod_we_ship_is_selected_by_a_policy():
    for name, pod in PODS.items():
        assert any(selects(p["spec"]["podSelector"], pod.labels) for p in policies()), name


def test_the_policies_do_what_the_issue_asks():
    assert broken_expectations() == []


def test_the_model_itself():
    """The evaluator on the API's own examples: no policy lets all in; an empty ingress
    rule lets all in; an empty podSelector peer means the policy's namespace only."""
    web = Pod("web", NAMESPACE, {"app": "web"}, {"http": 80})
    client = Pod("client", NAMESPACE, {"app": "client"})
    outsider = Pod("outsider", "elsewhere", {"app": "client"})
    deny_all = {"metadata": {"name": "d"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    allow_all = {"metadata": {"name": "a"}, "spec": {"podSelector": {}, "ingress": [{}]}}
    same_namespace = {"metadata": {"name": "n"}, "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                      "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": "http"}]}]}}
    assert reaches(client, web, 80, []) and not reaches(client, web, 80, [deny_all])
    assert reaches(outsider, web, 80, [deny_all, allow_all])
    assert reaches(client, web, 80, [same_namespace]) and not reaches(client, web, 81, [same_namespace])
    assert not reaches(outsider, web, 80, [same_namespace])
    egress_only = {"metadata": {"name": "e"}, "spec": {"podSelector": {}, "policyTypes": ["Egress"]}}
    assert reaches(outsider, web, 80, [egress_only])


def policy(documents, name: str) -> dict:
    (found,) = [doc for _, doc in documents if doc["kind"] == "NetworkPolicy" and doc["metadata"]["name"] == name]
    return found


def first_peer(documents, name: str) -> dict:
    return policy(documents, name)["spec"]["ingress"][0]["from"][0]


BREAKAGES = {
    # Anyone may reach MLflow: the rule's peers are gone.
    "mlflow-from-anyone": lambda d: policy(d, "mlflow")["spec"]["ingress"][0].pop("from"),
    # Our labels from any namespace reach MLflow.
    "mlflow-any-namespace": lambda d: first_peer(d, "mlflow").update(namespaceSelector={}),
    # The component list loses its meaning: every t2t-dist pod (the submitter too).
    "mlflow-any-component": lambda d: first_peer(d, "mlflow")["podSelector"].pop("matchExpressions"),
    # A typo in the selected labels: PostgreSQL is selected by no policy, so open to all.
    "postgres-unselected": lambda d: policy(d, "mlflow-postgres")["spec"]["podSelector"]
    ["matchLabels"].update({"app.kubernetes.io/component": "mlflow-dbb"}),
    # The whole namespace reaches PostgreSQL.
    "postgres-from-namespace": lambda d: first_peer(d, "mlflow-postgres").update(podSelector={}),
    # Only egress restricted: ingress to MLflow unrestricted.
    "mlflow-egress-only": lambda d: policy(d, "mlflow")["spec"].update(policyTypes=["Egress"]),
    # The operator rule without its port: the operator reaches the GCS too.
    "operator-any-port": lambda d: policy(d, "t2t-pretrain-vit14-ray-operator")["spec"]["ingress"][0].pop("ports"),
    # The operator's pod label from any namespace.
    "operator-any-namespace": lambda d: first_peer(d, "t2t-interactive-ray-operator").pop("namespaceSelector"),
    # Every t2t-dist pod reaches the pretraining cluster (another job's workers too).
    "ray-by-app-name": lambda d: first_peer(d, "t2t-pretrain-vit14-ray").update(
        podSelector={"matchLabels": {"app.kubernetes.io/name": "t2t-dist"}}),
    # An ipBlock for "the cluster network" lets everyone in.
    "ray-ip-block": lambda d: policy(d, "t2t-interactive-ray")["spec"]["ingress"][0]["from"].append(
        {"ipBlock": {"cidr": "10.0.0.0/8"}}),
    # A policy deleted.
    "no-postgres-policy": lambda d: d.remove(next(item for item in d if item[1]["kind"] == "NetworkPolicy"
                                                  and item[1]["metadata"]["name"] == "mlflow-postgres")),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_broken_copy_is_refused(breakage):
    documents = copy.deepcopy(DOCUMENTS)
    BREAKAGES[breakage](documents)
    assert broken_expectations(documents) != []
