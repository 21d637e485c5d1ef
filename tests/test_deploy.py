"""
The deployment files stay valid and agree with each other and with monedge:
the Kubernetes manifests in C{deploy/kubernetes} (and the examples), the
Terraform in C{deploy/terraform}, the C{Dockerfile}, and the values
C{docs/deploy.md} quotes from them.

Everything here runs offline: manifests are checked against the Kubernetes
JSON schemas bundled with C{kubernetes_validate}, Terraform is parsed with
C{hcl2}, and the Dockerfile line by line.
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import hcl2
import kubernetes_validate  # type: ignore[import-untyped]
import yaml
from twisted.trial.unittest import SkipTest, SynchronousTestCase

import tests
from monedge.rules.convention import serviceFromKubernetesName
from monedge.rules.policy import DEFAULT_POLICY
from monedge.tap import Options

#: The repository root: the parent of the tests package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tests.__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
KUBERNETES = os.path.join(DEPLOY, "kubernetes")
EXAMPLES = os.path.join(DEPLOY, "examples")
OVERLAY = os.path.join(DEPLOY, "overlays", "example")
TERRAFORM = os.path.join(DEPLOY, "terraform")

#: The oldest Kubernetes version the manifests must be valid for.
OLDEST_KUBERNETES = "1.30"

#: The namespace the base installs into.
NAMESPACE = "monedge"

#: Kinds that have no namespace.
CLUSTER_SCOPED = frozenset({"Namespace", "ClusterRole", "ClusterRoleBinding"})

#: The only access monedge's ServiceAccount may have: (API group, resource)
#: to verbs.
READ_ONLY = frozenset({"get", "list", "watch"})
GRANTS = {
    ("", "services"): READ_ONLY,
    ("discovery.k8s.io", "endpointslices"): READ_ONLY,
}

#: The ports monedge listens on, as in monedge.tap's defaults.
PROXY_PORT = 30080
ADMIN_PORT = 30081


# Kubernetes manifests


def kubernetesVersions() -> list[str]:
    """
    The Kubernetes versions to validate against: the oldest supported and
    the newest whose schemas C{kubernetes_validate} bundles.
    """
    latest: str = kubernetes_validate.utils.latest_version()
    newest = ".".join(latest.split(".")[:2])
    return sorted({OLDEST_KUBERNETES, newest})


def yamlDocuments(path: str) -> list[dict[str, Any]]:
    """
    The non-empty YAML documents in C{path}.
    """
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def manifestFiles() -> list[str]:
    """
    The manifest file names in C{deploy/kubernetes}, without the
    kustomization.
    """
    return sorted(
        name
        for name in os.listdir(KUBERNETES)
        if name.endswith((".yaml", ".yml")) and name != "kustomization.yaml"
    )


def manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    """
    Every object in the base, with the file it is in.
    """
    for name in manifestFiles():
        for document in yamlDocuments(os.path.join(KUBERNETES, name)):
            yield name, document


def kustomization(directory: str = KUBERNETES) -> dict[str, Any]:
    """
    The kustomization.yaml of C{directory}.
    """
    (document,) = yamlDocuments(os.path.join(directory, "kustomization.yaml"))
    return document


def find(kind: str, name: str | None = None) -> dict[str, Any]:
    """
    The one object of C{kind} (and C{name}, if given) in the base.
    """
    found = [
        document
        for _, document in manifests()
        if document["kind"] == kind
        and (name is None or document["metadata"]["name"] == name)
    ]
    if len(found) != 1:
        raise AssertionError(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def podSpec() -> dict[str, Any]:
    """
    The monedge Deployment's pod spec.
    """
    spec: dict[str, Any] = find("Deployment", "monedge")["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    """
    The monedge container.
    """
    found: list[dict[str, Any]] = [
        c for c in podSpec()["containers"] if c["name"] == "monedge"
    ]
    (monedge,) = found
    return monedge


def flagsConfigMap() -> dict[str, Any]:
    """
    The ConfigMap the container's environment is read from.
    """
    (name,) = {
        e["valueFrom"]["configMapKeyRef"]["name"]
        for e in container().get("env", [])
        if "configMapKeyRef" in e.get("valueFrom", {})
    }
    return find("ConfigMap", name)


def environment(changes: dict[str, str] | None = None) -> dict[str, str]:
    """
    The container's environment as the kubelet would set it: literal values,
    and keys of the flags ConfigMap (which must exist: the references are
    not optional), with C{changes} made to the ConfigMap's data.
    """
    data = {**flagsConfigMap()["data"], **(changes or {})}
    env: dict[str, str] = {}
    for variable in container().get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
            continue
        reference = variable["valueFrom"]["configMapKeyRef"]
        if reference.get("optional", False):
            raise AssertionError(f"{variable['name']}: optional ConfigMap key")
        env[variable["name"]] = data[reference["key"]]
    return env


def expandedArgs(changes: dict[str, str] | None = None) -> list[str]:
    """
    The container's args with every C{$(VAR)} expanded from its environment
    (see L{environment}), as the kubelet expands them. An undefined variable
    is an error here (the kubelet would pass C{$(VAR)} through literally).
    """
    env = environment(changes)

    def expand(match: re.Match[str]) -> str:
        return env[match.group(1)]

    return [
        re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, a)
        for a in container()["args"]
    ]


class _ParseOnlyOptions(Options):
    """
    C{twistd monedge}'s options, parsed and validated in full.  Parsing
    connects no registry: its spec is kept in the configuration.
    """

    @property
    def registrySpec(self) -> str:
        """
        The C{--registry} spec parsed.
        """
        return self.config.registry


def parsedOptions() -> _ParseOnlyOptions:
    """
    The options monedge runs with in the Deployment, parsed by monedge's own
    option parser.
    """
    options = _ParseOnlyOptions()
    options.parseOptions(expandedArgs())
    return options


def preStopSeconds(container: dict[str, Any]) -> float:
    """
    How long a container's preStop hook delays SIGTERM: its sleep, or 0.
    """
    preStop = container.get("lifecycle", {}).get("preStop")
    if preStop is None:
        return 0.0
    if "sleep" in preStop:
        return float(preStop["sleep"]["seconds"])
    command = preStop.get("exec", {}).get("command", [])
    words = shlex.split(" ".join(command))
    if "sleep" in words:
        return float(words[words.index("sleep") + 1])
    raise AssertionError(f"preStop hook not understood: {preStop!r}")


def validate(test: SynchronousTestCase, path: str) -> None:
    """
    Every document in C{path} is valid, strictly (no unknown fields), for
    every Kubernetes version in L{kubernetesVersions}.
    """
    documents = yamlDocuments(path)
    test.assertTrue(documents, path)
    for document in documents:
        for version in kubernetesVersions():
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                test.fail(
                    f"{os.path.basename(path)}: {document['kind']}"
                    f" {document['metadata']['name']}: {where}: {e.message}"
                    f" (Kubernetes {version})"
                )


class ManifestTests(SynchronousTestCase):
    """
    deploy/kubernetes: valid, complete, least-privilege, and consistent with
    monedge's options and drain.
    """

    def test_schemas(self) -> None:
        """
        Every object in the base is valid against the Kubernetes schemas of
        the oldest supported version (1.30) and of the newest bundled one,
        with no unknown fields.
        """
        for name in manifestFiles():
            validate(self, os.path.join(KUBERNETES, name))

    def test_exampleSchemas(self) -> None:
        """
        The example service in deploy/examples is valid too, and its Service
        name is the route docs/deploy.md says it is.
        """
        path = os.path.join(EXAMPLES, "hello.yaml")
        validate(self, path)
        services = [d for d in yamlDocuments(path) if d["kind"] == "Service"]
        self.assertEqual(
            [serviceFromKubernetesName(s["metadata"]["name"]) for s in services],
            ["service.api.hello"],
        )

    def test_kustomizationListsEveryManifest(self) -> None:
        """
        kustomization.yaml lists every manifest file in deploy/kubernetes,
        and every file it lists exists there; it sets the namespace monedge.
        """
        document = kustomization()
        self.assertEqual(document["kind"], "Kustomization")
        self.assertEqual(document["namespace"], NAMESPACE)
        listed = document["resources"]
        self.assertEqual(len(listed), len(set(listed)), "listed twice")
        self.assertEqual(sorted(listed), manifestFiles())

    def test_namespaces(self) -> None:
        """
        Every namespaced object names the namespace monedge itself, so the
        files also apply without kustomize; the Namespace is in the base and
        enforces the restricted Pod Security profile.
        """
        for name, document in manifests():
            metadata = document["metadata"]
            if document["kind"] in CLUSTER_SCOPED:
                self.assertNotIn("namespace", metadata, name)
            else:
                self.assertEqual(metadata.get("namespace"), NAMESPACE, name)
        labels = find("Namespace", NAMESPACE)["metadata"]["labels"]
        self.assertEqual(labels["pod-security.kubernetes.io/enforce"], "restricted")

    def test_rbacReadOnly(self) -> None:
        """
        The only RBAC in the base is one ClusterRole granting get, list and
        watch on services (core) and endpointslices (discovery.k8s.io),
        nothing else, bound to the ServiceAccount the Deployment runs as.
        """
        roles = [d for _, d in manifests() if d["kind"] in ("Role", "ClusterRole")]
        self.assertEqual([r["kind"] for r in roles], ["ClusterRole"])
        grants: dict[tuple[str, str], set[str]] = {}
        for rule in roles[0]["rules"]:
            self.assertEqual(
                set(rule) - {"apiGroups", "resources", "verbs"}, set(), rule
            )
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    grants.setdefault((group, resource), set()).update(rule["verbs"])
        self.assertEqual(grants, GRANTS)

        bindings = [
            d
            for _, d in manifests()
            if d["kind"] in ("RoleBinding", "ClusterRoleBinding")
        ]
        self.assertEqual(len(bindings), 1)
        binding = bindings[0]
        self.assertEqual(
            binding["roleRef"],
            {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": roles[0]["metadata"]["name"],
            },
        )
        account = find("ServiceAccount")["metadata"]["name"]
        self.assertEqual(
            binding["subjects"],
            [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}],
        )
        self.assertEqual(podSpec()["serviceAccountName"], account)

    def test_deployment(self) -> None:
        """
        Two replicas whose selector matches their labels, rolled one at a
        time without dropping below two, with the placeholder image, and CPU
        and memory requests and limits.
        """
        deployment = find("Deployment", "monedge")
        spec = deployment["spec"]
        self.assertEqual(spec["replicas"], 2)
        labels = spec["template"]["metadata"]["labels"]
        for key, value in spec["selector"]["matchLabels"].items():
            self.assertEqual(labels[key], value)
        self.assertEqual(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0)
        self.assertEqual(container()["image"], "ghcr.io/monedge/monedge:0.1.0")
        for kind in ("requests", "limits"):
            self.assertEqual(
                set(container()["resources"][kind]), {"cpu", "memory"}, kind
            )

    def test_securityContext(self) -> None:
        """
        The container runs with a read-only root filesystem, as a numeric
        non-root user (the Dockerfile's), without privilege escalation, with
        every capability dropped and none added, under the RuntimeDefault
        seccomp profile, and with an emptyDir for /tmp.
        """
        pod = podSpec().get("securityContext", {})
        own = container()["securityContext"]

        def effective(key: str) -> Any:
            return own.get(key, pod.get(key))

        self.assertIs(own["readOnlyRootFilesystem"], True)
        self.assertIs(effective("runAsNonRoot"), True)
        self.assertIs(own["allowPrivilegeEscalation"], False)
        self.assertIsNot(own.get("privileged"), True)
        self.assertEqual(own["capabilities"]["drop"], ["ALL"])
        self.assertNotIn("add", own["capabilities"])
        self.assertEqual(effective("seccompProfile"), {"type": "RuntimeDefault"})
        user, group = dockerUser()
        self.assertEqual(effective("runAsUser"), user)
        self.assertEqual(effective("runAsGroup"), group)

        mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
        volumes = {v["name"]: v for v in podSpec()["volumes"]}
        self.assertIn("emptyDir", volumes[mounts["/tmp"]])

    def test_probes(self) -> None:
        """
        Readiness is /readyz and liveness /healthz, both over HTTP on the
        admin port 30081, which is the port monedge's --admin-port opens.
        """
        readiness = container()["readinessProbe"]["httpGet"]
        liveness = container()["livenessProbe"]["httpGet"]
        self.assertEqual(
            (readiness["path"], readiness["port"]), ("/readyz", ADMIN_PORT)
        )
        self.assertEqual((liveness["path"], liveness["port"]), ("/healthz", ADMIN_PORT))
        self.assertEqual(
            parsedOptions()["admin-port"], f"tcp:{ADMIN_PORT}:backlog=1024"
        )

    def test_flags(self) -> None:
        """
        The container's args, with $(VAR) expanded from the flags ConfigMap,
        are each --name=value and parse with twistd monedge's own options:
        the Kubernetes registry, the proxy on 30080, the admin on 30081.
        Every ConfigMap key is used by an environment variable named in the
        args.
        """
        for arg in container()["args"]:
            self.assertRegex(arg, r"^--[a-z][a-z-]*=")
        options = parsedOptions()
        self.assertEqual(options.registrySpec, "kubernetes")
        self.assertEqual(options["port"], f"tcp:{PROXY_PORT}:backlog=1024")

        data = flagsConfigMap()["data"]
        used = {
            e["valueFrom"]["configMapKeyRef"]["key"]
            for e in container()["env"]
            if "configMapKeyRef" in e.get("valueFrom", {})
        }
        self.assertEqual(set(data), used)
        args = " ".join(container()["args"])
        for variable in container()["env"]:
            self.assertIn(f"$({variable['name']})", args)

    def test_trustedHops(self) -> None:
        """
        Behind the ALB, monedge trusts exactly one hop: the ALB's
        X-Forwarded-For entry is the only place the client's address is.
        """
        self.assertEqual(parsedOptions()["trusted-hops"], 1)

    def test_trustedProxies(self) -> None:
        """
        The hop is believed only from the VPC's private range: a client
        that reaches a NodePort from outside it cannot choose its address,
        and Terraform outputs the VPC's CIDR to put there.
        """
        import ipaddress

        proxies = parsedOptions()["trusted-proxies"]
        self.assertEqual(len(proxies), 1)
        self.assertTrue(ipaddress.ip_network(proxies[0]).is_private)
        rules = parsedOptions()["forwarding"]
        self.assertFalse(rules.isTrusted(b"203.0.113.9"))
        output = Terraform().labelled("output")["monedge_trusted_proxies"]
        self.assertIn("data.aws_vpc.nodes.cidr_block", str(output["value"]))

    def test_gracePeriod(self) -> None:
        """
        terminationGracePeriodSeconds exceeds whatever delays SIGTERM
        (preStop) plus monedge's --drain-delay and --drain-timeout, as set
        through the ConfigMap, so the kubelet never kills a drain that is
        still within its timeout.
        """
        options = parsedOptions()
        needed = (
            preStopSeconds(container())
            + options["drain-delay"]
            + options["drain-timeout"]
        )
        self.assertGreater(podSpec()["terminationGracePeriodSeconds"], needed)

    def test_noPreStop(self) -> None:
        """
        There is no preStop hook: monedge keeps serving for --drain-delay
        after SIGTERM, so SIGTERM should reach it at once (the reasoning is
        in deployment.yaml).
        """
        self.assertNotIn("preStop", container().get("lifecycle", {}))
        self.assertGreater(parsedOptions()["drain-delay"], 0)

    def test_spread(self) -> None:
        """
        The replicas are kept on different nodes: a hard topology spread
        constraint on the node name (or required pod anti-affinity on it)
        selecting the Deployment's own pods.
        """
        labels = find("Deployment", "monedge")["spec"]["template"]["metadata"]["labels"]

        def selects(selector: dict[str, Any]) -> bool:
            return all(labels.get(k) == v for k, v in selector["matchLabels"].items())

        spread = [
            c
            for c in podSpec().get("topologySpreadConstraints", [])
            if c["topologyKey"] == "kubernetes.io/hostname"
            and c["whenUnsatisfiable"] == "DoNotSchedule"
            and c["maxSkew"] == 1
            and selects(c["labelSelector"])
        ]
        antiAffinity = [
            term
            for term in podSpec()
            .get("affinity", {})
            .get("podAntiAffinity", {})
            .get("requiredDuringSchedulingIgnoredDuringExecution", [])
            if term["topologyKey"] == "kubernetes.io/hostname"
            and selects(term["labelSelector"])
        ]
        self.assertTrue(spread or antiAffinity)

    def test_podDisruptionBudget(self) -> None:
        """
        A PodDisruptionBudget keeps at least one replica through voluntary
        disruptions, selecting exactly the Deployment's pods.
        """
        budget = find("PodDisruptionBudget")
        self.assertEqual(budget["spec"]["minAvailable"], 1)
        self.assertEqual(
            budget["spec"]["selector"],
            find("Deployment", "monedge")["spec"]["selector"],
        )

    def test_service(self) -> None:
        """
        The Service is a NodePort on 30080 (to the container's proxy port)
        and 30081 (to its admin port, for the ALB health check), selecting
        the Deployment's pods, with externalTrafficPolicy Cluster.
        """
        service = find("Service", "monedge")
        spec = service["spec"]
        self.assertEqual(spec["type"], "NodePort")
        self.assertEqual(spec["externalTrafficPolicy"], "Cluster")
        labels = find("Deployment", "monedge")["spec"]["template"]["metadata"]["labels"]
        for key, value in spec["selector"].items():
            self.assertEqual(labels[key], value)
        containerPorts = {p["name"]: p["containerPort"] for p in container()["ports"]}
        targets = {}
        for port in spec["ports"]:
            target = port["targetPort"]
            targets[port["nodePort"]] = containerPorts.get(target, target)
            self.assertEqual(port["port"], port["nodePort"])
        self.assertEqual(targets, {PROXY_PORT: PROXY_PORT, ADMIN_PORT: ADMIN_PORT})


# Terraform


def unquote(value: Any) -> Any:
    """
    An hcl2 value with the quotes python-hcl2 8 keeps around strings and
    labels removed, and its bookkeeping keys dropped.
    """
    if isinstance(value, dict):
        return {
            unquote(k): unquote(v)
            for k, v in value.items()
            if not (isinstance(k, str) and k.startswith("__"))
        }
    if isinstance(value, list):
        return [unquote(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def terraformFiles() -> list[str]:
    """
    The .tf files in deploy/terraform.
    """
    return sorted(n for n in os.listdir(TERRAFORM) if n.endswith(".tf"))


class Terraform:
    """
    Every .tf file in deploy/terraform, parsed with hcl2 and merged.
    """

    def __init__(self) -> None:
        self.blocks: dict[str, list[Any]] = {}
        for name in terraformFiles():
            with open(os.path.join(TERRAFORM, name)) as f:
                parsed = unquote(hcl2.load(f))
            for key, value in parsed.items():
                self.blocks.setdefault(key, []).extend(value)

    def labelled(self, kind: str) -> dict[str, Any]:
        """
        The C{variable} or C{output} blocks, by name.
        """
        result: dict[str, Any] = {}
        for block in self.blocks.get(kind, []):
            result.update(block)
        return result

    def resources(self, type: str) -> dict[str, Any]:
        """
        The resources of C{type}, by name.
        """
        result: dict[str, Any] = {}
        for block in self.blocks.get("resource", []):
            result.update(block.get(type, {}))
        return result

    def resource(self, type: str) -> dict[str, Any]:
        """
        The one resource of C{type}.
        """
        (body,) = self.resources(type).values()
        found: dict[str, Any] = body
        return found

    def locals(self) -> dict[str, Any]:
        """
        Every local value.
        """
        result: dict[str, Any] = {}
        for block in self.blocks.get("locals", []):
            result.update(block)
        return result

    def resolve(self, value: Any) -> Any:
        """
        A value, with a whole-value C{${var.X}} replaced by the variable's
        default and C{${local.X}} by the local's value.
        """
        if not isinstance(value, str):
            return value
        match = re.fullmatch(r"\$\{(var|local)\.([A-Za-z0-9_]+)\}", value)
        if match is None:
            return value
        kind, name = match.groups()
        if kind == "var":
            variable = self.labelled("variable")[name]
            if "default" not in variable:
                return value
            return self.resolve(variable["default"])
        return self.resolve(self.locals()[name])

    def oneBlock(self, body: dict[str, Any], name: str) -> dict[str, Any]:
        """
        The one nested block C{name} of a resource, its values resolved.
        """
        (block,) = body[name]
        return {k: self.resolve(v) for k, v in block.items()}


def reference(type: str, name: str, attribute: str) -> str:
    """
    How hcl2 shows a reference to another resource's attribute.
    """
    return f"${{{type}.{name}.{attribute}}}"


def seconds(value: float) -> str:
    """
    A number of seconds as the docs write it.
    """
    return f"{value:g} s"


class TerraformTests(SynchronousTestCase):
    """
    deploy/terraform: the ALB in front of the NodePort, lined up with
    monedge's ports, keep-alive and drain.
    """

    def setUp(self) -> None:
        self.tf = Terraform()

    def option(self, name: str) -> Any:
        """
        The value of monedge's option C{name} in the Deployment.
        """
        return parsedOptions()[name]

    def targetGroup(self) -> dict[str, Any]:
        """
        The target group of worker nodes.
        """
        return self.tf.resource("aws_lb_target_group")

    def healthCheck(self) -> dict[str, Any]:
        """
        The target group's health check, its values resolved.
        """
        return self.tf.oneBlock(self.targetGroup(), "health_check")

    def test_files(self) -> None:
        """
        The configuration is split as documented, and every file parses.
        """
        self.assertTrue(
            {"main.tf", "variables.tf", "outputs.tf", "versions.tf"}
            <= set(terraformFiles())
        )

    def test_providerPinned(self) -> None:
        """
        The AWS provider comes from hashicorp/aws with a pessimistic or exact
        version constraint, not an open-ended one.
        """
        (terraform,) = self.tf.blocks["terraform"]
        providers: dict[str, Any] = {}
        for block in terraform["required_providers"]:
            providers.update(block)
        aws = providers["aws"]
        self.assertEqual(aws["source"], "hashicorp/aws")
        self.assertRegex(aws["version"], r"^(~>|=)?\s*\d+\.\d+")

    def test_targetGroup(self) -> None:
        """
        The target group sends HTTP to the worker instances on port 30080,
        the Service's nodePort, and every worker autoscaling group is
        attached to it.
        """
        group = self.targetGroup()
        self.assertEqual(group["port"], PROXY_PORT)
        self.assertEqual(group["protocol"], "HTTP")
        self.assertEqual(group["target_type"], "instance")
        nodePorts = [p["nodePort"] for p in find("Service", "monedge")["spec"]["ports"]]
        self.assertIn(group["port"], nodePorts)
        (name,) = self.tf.resources("aws_lb_target_group")
        attachment = self.tf.resource("aws_autoscaling_attachment")
        self.assertEqual(
            attachment["lb_target_group_arn"],
            reference("aws_lb_target_group", name, "arn"),
        )

    def test_healthCheck(self) -> None:
        """
        The health check is HTTP GET /readyz on port "30081" (the admin
        nodePort), healthy only on 200.
        """
        check = self.healthCheck()
        self.assertEqual(check["port"], str(ADMIN_PORT))
        self.assertEqual(check["path"], "/readyz")
        self.assertEqual(check["matcher"], "200")
        self.assertEqual(check["protocol"], "HTTP")
        nodePorts = [p["nodePort"] for p in find("Service", "monedge")["spec"]["ports"]]
        self.assertIn(int(check["port"]), nodePorts)

    def test_healthCheckWithinDrainDelay(self) -> None:
        """
        The ALB marks a target unhealthy (interval x unhealthy threshold +
        timeout) before monedge's --drain-delay ends, and the timeout is
        below the interval.
        """
        check = self.healthCheck()
        self.assertLess(check["timeout"], check["interval"])
        notice = check["interval"] * check["unhealthy_threshold"] + check["timeout"]
        self.assertLess(notice, self.option("drain-delay"))
        self.assertGreaterEqual(check["unhealthy_threshold"], 2)

    def test_deregistrationDelay(self) -> None:
        """
        A node leaving the target group gives requests in flight at least
        monedge's --drain-timeout.
        """
        delay = self.tf.resolve(self.targetGroup()["deregistration_delay"])
        self.assertGreaterEqual(delay, self.option("drain-timeout"))

    def test_idleTimeout(self) -> None:
        """
        The ALB's idle_timeout is below monedge's --keepalive-timeout (the
        ConfigMap's value, or the default), so that the ALB never reuses a
        connection monedge is closing; and above the default per-service
        timeout and idle-timeout, so that monedge's own 504 comes first.
        """
        idle = self.tf.resolve(self.tf.resource("aws_lb")["idle_timeout"])
        self.assertLess(idle, self.option("keepalive-timeout"))
        self.assertGreater(idle, DEFAULT_POLICY.timeout)
        self.assertGreater(idle, DEFAULT_POLICY.idleTimeout)

    def test_monedgeVariables(self) -> None:
        """
        The Terraform's copies of monedge's settings (used by its
        preconditions) equal the values the Deployment runs with.
        """
        variables = self.tf.labelled("variable")
        for variable, option in [
            ("monedge_keepalive_timeout", "keepalive-timeout"),
            ("monedge_drain_delay", "drain-delay"),
            ("monedge_drain_timeout", "drain-timeout"),
        ]:
            self.assertEqual(variables[variable]["default"], self.option(option))

    def test_loadBalancer(self) -> None:
        """
        One internet-facing application load balancer in the given public
        subnets, behind its own security group, appending the client to
        X-Forwarded-For.
        """
        alb = self.tf.resource("aws_lb")
        self.assertEqual(alb["load_balancer_type"], "application")
        self.assertIs(alb["internal"], False)
        self.assertEqual(alb["subnets"], "${var.public_subnet_ids}")
        (group,) = self.tf.resources("aws_security_group")
        self.assertEqual(
            alb["security_groups"], [reference("aws_security_group", group, "id")]
        )
        self.assertEqual(alb["xff_header_processing_mode"], "append")

    def test_listeners(self) -> None:
        """
        HTTPS on 443 with the ACM certificate variable and a TLS 1.3/1.2
        policy forwards to the target group; HTTP on 80 only redirects to
        HTTPS with a 301.
        """
        listeners = {
            self.tf.resolve(body["port"]): body
            for body in self.tf.resources("aws_lb_listener").values()
        }
        self.assertEqual(set(listeners), {80, 443})
        (group,) = self.tf.resources("aws_lb_target_group")

        https = listeners[443]
        self.assertEqual(https["protocol"], "HTTPS")
        self.assertEqual(https["certificate_arn"], "${var.certificate_arn}")
        self.assertRegex(
            self.tf.resolve(https["ssl_policy"]), r"^ELBSecurityPolicy-TLS13-"
        )
        action = self.tf.oneBlock(https, "default_action")
        self.assertEqual(action["type"], "forward")
        self.assertEqual(
            action["target_group_arn"], reference("aws_lb_target_group", group, "arn")
        )

        http = listeners[80]
        self.assertEqual(http["protocol"], "HTTP")
        (action,) = http["default_action"]
        self.assertEqual(action["type"], "redirect")
        (redirect,) = action["redirect"]
        self.assertEqual(
            {k: self.tf.resolve(v) for k, v in redirect.items()},
            {"protocol": "HTTPS", "port": "443", "status_code": "HTTP_301"},
        )

    def test_securityGroups(self) -> None:
        """
        The ALB's group accepts only 80 and 443; the nodes' group gets
        exactly two rules, 30080 and 30081, each from the ALB's group only;
        the ALB may open connections only to those two ports on the nodes.
        """
        (group,) = self.tf.resources("aws_security_group")
        alb = reference("aws_security_group", group, "id")
        nodes = "${var.node_security_group_id}"

        def rules(type: str) -> list[dict[str, Any]]:
            return [
                {k: self.tf.resolve(v) for k, v in body.items()}
                for body in self.tf.resources(type).values()
            ]

        ingress = rules("aws_vpc_security_group_ingress_rule")
        egress = rules("aws_vpc_security_group_egress_rule")
        self.assertEqual(
            {r["from_port"] for r in ingress if r["security_group_id"] == alb},
            {80, 443},
        )
        toNodes = [r for r in ingress if r["security_group_id"] == nodes]
        self.assertEqual(
            sorted((r["from_port"], r["to_port"]) for r in toNodes),
            [(PROXY_PORT, PROXY_PORT), (ADMIN_PORT, ADMIN_PORT)],
        )
        for rule in toNodes:
            self.assertEqual(rule["referenced_security_group_id"], alb)
            self.assertNotIn("cidr_ipv4", rule)
        self.assertEqual({r["security_group_id"] for r in egress}, {alb})
        self.assertEqual(
            sorted((r["from_port"], r["to_port"]) for r in egress),
            [(PROXY_PORT, PROXY_PORT), (ADMIN_PORT, ADMIN_PORT)],
        )
        for rule in egress:
            self.assertEqual(rule["referenced_security_group_id"], nodes)
        self.assertEqual(
            self.tf.resources("aws_security_group_rule"), {}, "use the vpc_ rules"
        )
        for body in self.tf.resources("aws_security_group").values():
            self.assertNotIn("ingress", body)
            self.assertNotIn("egress", body)

    def test_variablesDescribed(self) -> None:
        """
        Every variable and every output has a description, and every output
        a value.
        """
        variables = self.tf.labelled("variable")
        outputs = self.tf.labelled("output")
        self.assertTrue(variables)
        for name, body in [*variables.items(), *outputs.items()]:
            self.assertTrue(str(body.get("description", "")).strip(), name)
        for name, body in outputs.items():
            self.assertIn("value", body, name)

    def test_outputs(self) -> None:
        """
        The outputs an operator needs exist: the ALB's DNS name and zone (for
        DNS) and the target group (for describe-target-health).
        """
        outputs = self.tf.labelled("output")
        self.assertTrue(
            {"alb_dns_name", "alb_zone_id", "target_group_arn"} <= set(outputs)
        )

    def test_variablesUsed(self) -> None:
        """
        Every variable is used somewhere, and everything used is declared.
        """
        text = "\n".join(
            open(os.path.join(TERRAFORM, name)).read() for name in terraformFiles()
        )
        used = set(re.findall(r"\bvar\.([A-Za-z0-9_]+)", text))
        self.assertEqual(used, set(self.tf.labelled("variable")))


# The Dockerfile


def dockerInstructions() -> list[tuple[str, str]]:
    """
    The Dockerfile's instructions, in order, as (KEYWORD, arguments), with
    comments dropped and continuation lines joined.
    """
    instructions: list[tuple[str, str]] = []
    pending = ""
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        for raw in f:
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            if line.startswith("#"):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line = pending + line
            pending = ""
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), " ".join(arguments.split())))
    return instructions


def dockerArguments(keyword: str) -> list[str]:
    """
    The arguments of every C{keyword} instruction, in order.
    """
    return [arguments for k, arguments in dockerInstructions() if k == keyword]


def dockerUser() -> tuple[int, int]:
    """
    The numeric user and group of the Dockerfile's last USER.
    """
    user, _, group = dockerArguments("USER")[-1].partition(":")
    return int(user), int(group or user)


def dockerIgnored() -> list[str]:
    """
    The patterns in .dockerignore.
    """
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


class DockerfileTests(SynchronousTestCase):
    """
    The Dockerfile (parsed, not built: there is no Docker engine in CI).
    """

    def index(self, predicate: Callable[[str, str], bool]) -> int:
        """
        The position of the one instruction matching C{predicate}.
        """
        found = [i for i, (k, a) in enumerate(dockerInstructions()) if predicate(k, a)]
        self.assertEqual(len(found), 1, found)
        return found[0]

    def test_base(self) -> None:
        """
        One stage, from debian:bookworm-slim, whose python3 (Debian's own
        3.11 build, the one scripts/python.sh picks and the benchmarks
        measure) is installed with its venv module; monedge is installed
        into a venv that is first on PATH, before the system's python.
        """
        self.assertEqual(dockerArguments("FROM"), ["debian:bookworm-slim"])
        setup = self.index(lambda k, a: k == "RUN" and "apt-get install" in a)
        arguments = dockerInstructions()[setup][1]
        self.assertIn("python3 python3-venv", arguments)
        self.assertIn("python3 -m venv /opt/monedge", arguments)
        install = self.index(
            lambda k, a: k == "RUN" and "pip install --no-cache-dir ." in a
        )
        self.assertLess(setup, install)
        env = " ".join(dockerArguments("ENV"))
        self.assertIn("PATH=/opt/monedge/bin:$PATH", env)

    def test_user(self) -> None:
        """
        The image runs as a numeric, non-zero user and group (so that the
        kubelet can check runAsNonRoot), the same the Deployment sets.
        """
        user, group = dockerUser()
        self.assertGreater(user, 0)
        self.assertGreater(group, 0)
        self.assertRegex(dockerArguments("USER")[-1], r"^\d+(:\d+)?$")

    def test_installThenPluginCache(self) -> None:
        """
        The package is installed with pip install --no-cache-dir ., then the
        twisted.plugins dropin cache is written while still root (the root
        filesystem is read-only at run time), then the user is switched.
        """
        install = self.index(
            lambda k, a: k == "RUN" and "pip install --no-cache-dir ." in a
        )
        cache = self.index(
            lambda k, a: (
                k == "RUN"
                and "from twisted.plugin import IPlugin, getPlugins" in a
                and "list(getPlugins(IPlugin))" in a
            )
        )
        user = self.index(lambda k, a: k == "USER")
        self.assertLess(install, cache)
        self.assertLess(cache, user)

    def test_entrypoint(self) -> None:
        """
        The entrypoint is twistd in the foreground with no pid file, running
        the monedge plugin, in exec form (so twistd is PID 1 and gets
        SIGTERM).
        """
        (entrypoint,) = dockerArguments("ENTRYPOINT")
        self.assertEqual(
            json.loads(entrypoint), ["twistd", "-n", "--pidfile=", "monedge"]
        )

    def test_exposeAndEnvironment(self) -> None:
        """
        The proxy and admin ports are exposed; Python writes no bytecode and
        does not buffer its output.
        """
        exposed = " ".join(dockerArguments("EXPOSE")).split()
        self.assertEqual(sorted(exposed), [str(PROXY_PORT), str(ADMIN_PORT)])
        env = " ".join(dockerArguments("ENV"))
        self.assertIn("PYTHONDONTWRITEBYTECODE=1", env)
        self.assertIn("PYTHONUNBUFFERED=1", env)

    def test_copiesWhatTheBuildNeeds(self) -> None:
        """
        Every COPY source exists and is not excluded by .dockerignore, and
        together they hold everything setup.cfg builds from: the packages it
        lists and the README its long description reads.
        """
        ignored = dockerIgnored()
        sources: list[str] = []
        for arguments in dockerArguments("COPY"):
            words = [w for w in arguments.split() if not w.startswith("--")]
            sources.extend(w.rstrip("/") for w in words[:-1])
        for source in sources:
            self.assertTrue(os.path.exists(os.path.join(ROOT, source)), source)
            for pattern in ignored:
                self.assertFalse(fnmatch.fnmatch(source, pattern), (source, pattern))

        setup = configparser.ConfigParser()
        setup.read(os.path.join(ROOT, "setup.cfg"))
        packages = setup["options"]["packages"].split()
        needed = [p.replace(".", "/") for p in packages] + ["setup.cfg", "README.md"]
        for path in needed:
            self.assertTrue(
                any(path == s or path.startswith(s + "/") for s in sources), path
            )

    def test_dockerignore(self) -> None:
        """
        .dockerignore keeps the venv, the git history, trial's scratch
        directories and benchmark results out of the build context.
        """
        ignored = dockerIgnored()
        for path in [".venv", ".git", "_trial_temp", "bench/results"]:
            self.assertTrue(
                any(fnmatch.fnmatch(path, pattern) for pattern in ignored), path
            )


# docs/deploy.md


def readDeployDoc() -> str:
    """
    The text of docs/deploy.md.
    """
    with open(os.path.join(ROOT, "docs", "deploy.md")) as f:
        return f.read()


def quotedFiles(text: str) -> dict[str, str]:
    """
    The fenced blocks after C{<!-- file: PATH -->}, by path.
    """
    pattern = re.compile(r"<!-- file: (\S+) -->\n```[a-z]*\n(.*?)```\n", re.DOTALL)
    return {m.group(1): m.group(2) for m in pattern.finditer(text)}


def markdownTable(text: str, name: str) -> list[list[str]]:
    """
    The body rows of the table after C{<!-- table: NAME -->}, as cells.
    """
    start = text.index(f"<!-- table: {name} -->")
    lines = text[start:].splitlines()[1:]
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


class DeployDocTests(SynchronousTestCase):
    """
    docs/deploy.md quotes the files and values as they are.
    """

    def test_quotedFiles(self) -> None:
        """
        Each file the doc quotes in full (the example overlay and the first
        service) is quoted exactly.
        """
        quoted = quotedFiles(readDeployDoc())
        self.assertEqual(
            sorted(quoted),
            [
                "deploy/examples/hello.yaml",
                "deploy/overlays/example/kustomization.yaml",
            ],
        )
        for path, block in quoted.items():
            with open(os.path.join(ROOT, path)) as f:
                self.assertEqual(block, f.read(), path)

    def test_timeoutTable(self) -> None:
        """
        The timeout table's values are the ones in the Deployment, the
        ConfigMap, the Terraform and monedge's policy defaults, and its
        arithmetic is right.
        """
        tf = Terraform()
        options = parsedOptions()
        check = tf.oneBlock(tf.resource("aws_lb_target_group"), "health_check")
        interval, timeout = check["interval"], check["timeout"]
        unhealthy, healthy = check["unhealthy_threshold"], check["healthy_threshold"]
        notice = interval * unhealthy + timeout
        spec = find("Deployment", "monedge")["spec"]
        grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
        drain = options["drain-delay"] + options["drain-timeout"]
        self.assertEqual(DEFAULT_POLICY.timeout, DEFAULT_POLICY.idleTimeout)

        expected = {
            "per-service `timeout` and `idle-timeout`": (
                seconds(DEFAULT_POLICY.timeout),
                "",
            ),
            "ALB `idle_timeout`": (
                seconds(tf.resolve(tf.resource("aws_lb")["idle_timeout"])),
                "",
            ),
            "`--keepalive-timeout`": (seconds(options["keepalive-timeout"]), ""),
            "ALB health check": (
                f"every {seconds(interval)}, {seconds(timeout)} timeout,"
                f" unhealthy after {unhealthy} failures,"
                f" healthy after {healthy} successes",
                f"{interval} × {unhealthy} + {timeout} = {seconds(notice)}",
            ),
            "`--drain-delay`": (
                seconds(options["drain-delay"]),
                f"ALB health check {seconds(notice)}",
            ),
            "`--drain-timeout`": (seconds(options["drain-timeout"]), ""),
            "`terminationGracePeriodSeconds`": (
                seconds(grace),
                f"({seconds(drain)})",
            ),
            "target group `deregistration_delay`": (
                seconds(
                    tf.resolve(
                        tf.resource("aws_lb_target_group")["deregistration_delay"]
                    )
                ),
                "",
            ),
            "`minReadySeconds`": (
                seconds(spec["minReadySeconds"]),
                f"({healthy} × {seconds(interval)})",
            ),
        }
        rows = {row[0]: row for row in markdownTable(readDeployDoc(), "timeouts")}
        self.assertEqual(sorted(rows), sorted(expected))
        for setting, (value, arithmetic) in expected.items():
            self.assertEqual(rows[setting][2], value, setting)
            self.assertIn(arithmetic, rows[setting][3], setting)
        self.assertGreaterEqual(spec["minReadySeconds"], healthy * interval)

    def test_exampleOverlay(self) -> None:
        """
        The example overlay builds on the base, replaces the base's image by
        its name (so the override applies), patches only objects that exist
        in the base, and adds only flags monedge accepts.
        """
        overlay = kustomization(OVERLAY)
        self.assertEqual(
            [os.path.normpath(os.path.join(OVERLAY, r)) for r in overlay["resources"]],
            [KUBERNETES],
        )
        imageName = container()["image"].rsplit(":", 1)[0]
        self.assertEqual([i["name"] for i in overlay["images"]], [imageName])

        added: list[str] = []
        changes: dict[str, str] = {}
        for patch in overlay["patches"]:
            target = patch["target"]
            base = find(target["kind"], target["name"])
            for operation in yaml.safe_load(patch["patch"]):
                path = operation["path"]
                if path.startswith("/data/"):
                    self.assertEqual(operation["op"], "replace")
                    self.assertIn(path[len("/data/") :], base["data"])
                    changes[path[len("/data/") :]] = str(operation["value"])
                elif path == "/spec/template/spec/containers/0/args/-":
                    self.assertEqual(base["kind"], "Deployment")
                    self.assertEqual(
                        base["spec"]["template"]["spec"]["containers"][0]["name"],
                        "monedge",
                    )
                    added.append(operation["value"])
                else:
                    self.fail(f"unexpected patch path {path}")
        options = _ParseOnlyOptions()
        options.parseOptions([*expandedArgs(changes), *added])
        self.assertEqual(options.registrySpec, "kubernetes")

    def test_exampleOverlayRenders(self) -> None:
        """
        Where kubectl is installed, C{kubectl kustomize} renders the example
        overlay (offline) into valid objects: the base's, with the image
        replaced and the extra flag appended.
        """
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise SkipTest("kubectl is not installed")
        rendered = subprocess.run(
            [kubectl, "kustomize", OVERLAY],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        documents = [d for d in yaml.safe_load_all(rendered) if d is not None]
        self.assertEqual(
            sorted((d["kind"], d["metadata"]["name"]) for d in documents),
            sorted((d["kind"], d["metadata"]["name"]) for _, d in manifests()),
        )
        for document in documents:
            kubernetes_validate.validate(document, OLDEST_KUBERNETES, strict=True)
        (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
        (renderedContainer,) = deployment["spec"]["template"]["spec"]["containers"]
        self.assertEqual(
            renderedContainer["image"], "registry.example.com/platform/monedge:0.1.0"
        )
        self.assertEqual(
            renderedContainer["args"][-1], "--host-tier=api.example.com=api"
        )
