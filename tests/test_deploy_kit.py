"""The operator kit, checked offline: deploy/kubernetes, deploy/prometheus, deploy/grafana.

The Kubernetes manifests are rendered as kustomize would (the resources, the Secret
generated from secrets.env.example, the image tag) and validated against the API
schemas kubernetes-validate ships, for the oldest and newest Kubernetes it knows;
then the pod's settings (image ENV, ConfigMap, Secret) go through Tandem's own
config.load, and the policy is asserted on them: probes as docs/operations.md "Probes" says,
a grace period above SHUTDOWN_GRACE + PRE_DRAIN_DELAY, non-root, read-only root,
no capabilities, memory for MAX_SOCKETS connections. The alerting rules and the
scrape configuration go through `promtool check` and the rules' unit tests
(`promtool test rules`); the dashboard's queries through promtool's parser. Every
metric and label that the rules and the dashboard query is looked up on the
/metrics of real servers (SQLite; Redis, PostgreSQL and a failing store).
(The Dockerfile and docker-compose.yml: tests/test_deploy.py.)
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from helpers import ROOT, ServerFactory, http_get
from pg_servers import scratch_database
from prometheus_client.parser import text_string_to_metric_families
from redis_servers import RedisFactory
from test_deploy import dockerfile_stages, image_env

import config

KUBE = ROOT / "deploy" / "kubernetes"
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
RULES = PROMETHEUS / "tandem.rules.yml"
RULE_TESTS = PROMETHEUS / "tandem.test.yml"
SCRAPE_CONFIG = PROMETHEUS / "prometheus.yml"
DASHBOARD = GRAFANA / "tandem.json"

# The oldest Kubernetes the manifests are checked against (policy/v1 PDBs, seccompProfile
# fields); the newest is the newest kubernetes-validate ships.
OLDEST_KUBERNETES = "1.29"
# What kustomization.yaml may use: what `rendered()` below applies, nothing it would ignore.
KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "resources", "secretGenerator", "images"}
# docs/benchmarks.md: 21 KiB of RSS per held connection, and an empty server's ~70 MiB.
KIB_PER_CONNECTION = 21
EMPTY_SERVER_MIB = 72
PROMTOOL_MISSING = (
    "promtool is missing: it checks and unit-tests deploy/prometheus. Install Debian's package: "
    "apt-get install --no-install-recommends prometheus (./test.sh does when run as root)"
)


# --- kustomize, as far as the kit uses it ------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def kustomization() -> dict[str, Any]:
    data = load_yaml(KUBE / "kustomization.yaml")
    assert isinstance(data, dict)
    return data


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as kustomize's `envs` reads them (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            values[key.strip()] = value
    return values


def generated_secrets(kustomize: dict[str, Any]) -> list[dict[str, Any]]:
    """The secretGenerator's Secrets, from each env file's .example (the real one is the operator's)."""
    secrets = []
    for generator in kustomize.get("secretGenerator", []):
        assert set(generator) <= {"name", "envs", "type"}, generator
        data: dict[str, str] = {}
        for name in generator["envs"]:
            example = KUBE / f"{name}.example"
            assert example.is_file(), f"{name} is the operator's; {example.name} must be shipped beside it"
            for key, value in read_env_file(example).items():
                data[key] = base64.b64encode(value.encode()).decode()
        secrets.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": generator["name"]},
                "type": generator.get("type", "Opaque"),
                "data": data,
            }
        )
    return secrets


def rendered() -> list[dict[str, Any]]:
    """What `kustomize build deploy/kubernetes` gives (without the name hash of the Secret)."""
    kustomize = kustomization()
    assert set(kustomize) <= KUSTOMIZE_KEYS, f"the test renders only {sorted(KUSTOMIZE_KEYS)}"
    objects: list[dict[str, Any]] = []
    for name in kustomize["resources"]:
        objects.extend(doc for doc in yaml.safe_load_all((KUBE / name).read_text()) if doc)
    objects.extend(generated_secrets(kustomize))
    images = {image["name"]: image for image in kustomize.get("images", [])}
    for obj in objects:
        for container in pod_spec(obj).get("containers", []) if obj["kind"] == "Deployment" else []:
            image = images.get(container["image"])
            if image is not None:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objects


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@dataclass
class Kit:
    """The rendered objects and what the pod runs with."""

    objects: list[dict[str, Any]]
    deployment: dict[str, Any]
    container: dict[str, Any]
    env: dict[str, str]  # the image's ENV, the ConfigMap, the Secret, the container's env
    settings: config.Config


def kit() -> Kit:
    objects = rendered()
    deployment = one(objects, "Deployment")
    containers = pod_spec(deployment)["containers"]
    assert len(containers) == 1, "one container: Tandem"
    container = containers[0]
    env = {k: v for k, v in image_env(dockerfile_stages()[-1]).items() if k in config_names()}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            secret = one(objects, "Secret", source["secretRef"]["name"])
            env.update({k: base64.b64decode(v).decode() for k, v in secret["data"].items()})
    for item in container.get("env", []):
        env[item["name"]] = item["value"]
    return Kit(objects, deployment, container, env, config.load(env, dotenv=None))


def config_names() -> set[str]:
    return {setting.name for setting in config.SETTINGS}


def secret_settings() -> set[str]:
    """Settings that config.py keeps out of repr(): secrets, or URLs that carry passwords."""
    return {f.name.upper() for f in dataclasses.fields(config.Config) if not f.repr}


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or a Service's port, by number or by the container port's name."""
    for declared in container.get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            return int(declared["containerPort"])
    raise AssertionError(f"port {port!r} is not a port of the container")


def quantity_bytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)([KMGT]i)?", quantity)
    assert match, f"memory quantity {quantity!r}: a number with Ki, Mi, Gi or Ti"
    power = "_KMGT".index(match.group(2)[0]) if match.group(2) else 0
    return int(match.group(1)) << (10 * power)


# --- Kubernetes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, kubernetes_validate.latest_version()])
def test_manifests_match_the_kubernetes_api_schemas(version: str) -> None:
    objects = rendered()
    assert sorted(o["kind"] for o in objects) == [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "Service",
    ]
    problems = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path) or "/"
            problems.append(f"{obj['kind']} {obj['metadata']['name']} at {path}: {error.message}")
    assert not problems, f"Kubernetes {version}:\n" + "\n".join(problems)


def test_kustomization_lists_every_manifest_and_keeps_secrets_out_of_git() -> None:
    kustomize = kustomization()
    manifests = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomize["resources"]) == sorted(manifests), "every manifest in resources, and no other"
    env_files = [name for generator in kustomize["secretGenerator"] for name in generator["envs"]]
    ignored = (KUBE / ".gitignore").read_text().split()
    for name in env_files:
        assert name in ignored, f"{name} holds real secrets: deploy/kubernetes/.gitignore must list it"
        assert not (KUBE / name).exists() or name in ignored
    tags = [image["newTag"] for image in kustomize["images"]]
    assert tags and "latest" not in tags, "a pinned image tag"


def test_settings_split_between_the_configmap_and_the_secret() -> None:
    objects = rendered()
    names = config_names()
    secret_names = secret_settings()
    assert {"REDIS_URL", "DATABASE_URL", "HASH_KEY", "METRICS_TOKEN"} <= secret_names, secret_names
    configmap = one(objects, "ConfigMap")["data"]
    assert set(configmap) <= names, f"not settings: {sorted(set(configmap) - names)}"
    assert not set(configmap) & secret_names, f"secrets in the ConfigMap: {sorted(set(configmap) & secret_names)}"
    example = read_env_file(KUBE / "secrets.env.example")
    assert set(example) <= secret_names, f"not secrets: {sorted(set(example) - secret_names)}"
    assert {"REDIS_URL", "HASH_KEY", "METRICS_TOKEN"} <= set(example)
    for key, value in example.items():
        assert "change-this" in value, f"{key} in secrets.env.example must be a placeholder, never a real value"
    container = pod_spec(one(objects, "Deployment"))["containers"][0]
    literal = {item["name"] for item in container.get("env", [])}
    assert not literal & secret_names, f"secrets written into the Deployment: {sorted(literal & secret_names)}"
    refs = container["envFrom"]
    assert {"configMapRef": {"name": one(objects, "ConfigMap")["metadata"]["name"]}} in refs
    assert {"secretRef": {"name": one(objects, "Secret")["metadata"]["name"]}} in refs


def test_pod_settings_pass_tandems_own_checks_and_share_redis() -> None:
    settings = kit().settings  # config.load raises ConfigError on a bad value
    assert settings.redis_url is not None, "two replicas pair clients only through Redis: REDIS_URL"
    from urllib.parse import urlsplit

    assert urlsplit(config.seed_urls(settings.redis_url)[0]).password, "REDIS_URL with the Redis password"
    assert settings.metrics_token, "METRICS_TOKEN: Prometheus scrapes with it (deploy/prometheus/prometheus.yml)"
    assert settings.log_format == "json"


def recommended_probes() -> dict[str, Any]:
    """The YAML block of docs/operations.md "Probes" (livenessProbe, readinessProbe, terminationGracePeriodSeconds)."""
    section = (ROOT / "docs" / "operations.md").read_text().split("\n## Probes\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, "docs/operations.md Probes has a yaml block"
    data = yaml.safe_load(block.group(1))
    assert isinstance(data, dict)
    return data


def test_probes_follow_the_docs_and_the_grace_period_covers_a_drain() -> None:
    k = kit()
    spec = pod_spec(k.deployment)
    recommended = recommended_probes()
    for probe in ("livenessProbe", "readinessProbe"):
        ours, theirs = k.container[probe], recommended[probe]
        assert ours["httpGet"]["path"] == theirs["httpGet"]["path"], probe
        assert container_port(k.container, ours["httpGet"]["port"]) == k.settings.port == theirs["httpGet"]["port"]
        for key in ("periodSeconds", "timeoutSeconds", "failureThreshold"):
            if key in theirs:
                assert ours.get(key) == theirs[key], f"{probe}.{key}: docs/operations.md says {theirs[key]}"
    startup = k.container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health/live"
    # READY_TIMEOUT: "keep it below the probe's own timeout".
    assert k.container["readinessProbe"]["timeoutSeconds"] > k.settings.ready_timeout
    grace = spec["terminationGracePeriodSeconds"]
    drain = k.settings.shutdown_grace + k.settings.pre_drain_delay
    assert grace > drain, f"terminationGracePeriodSeconds {grace} <= SHUTDOWN_GRACE + PRE_DRAIN_DELAY ({drain})"
    assert grace > config.DEFAULTS.shutdown_grace, "above SHUTDOWN_GRACE's default too"
    assert grace >= recommended["terminationGracePeriodSeconds"]
    # The endpoints stop sending clients before the sockets close.
    assert k.settings.pre_drain_delay >= k.container["readinessProbe"]["periodSeconds"]


def test_deployment_runs_two_locked_down_replicas_that_roll_without_losing_capacity() -> None:
    k = kit()
    spec = k.deployment["spec"]
    pod = pod_spec(k.deployment)
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False, "no TANDEM_*/REDIS_* variables injected by Kubernetes"
    uid = int(re.search(r"--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))  # type: ignore[union-attr]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == uid != 0
    assert security["runAsGroup"] != 0
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    container = k.container["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert container.get("privileged", False) is False
    assert container["capabilities"] == {"drop": ["ALL"]}, "every capability dropped, none added"
    # A read-only root: every place Tandem (or Python) writes is an emptyDir.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in k.container["volumeMounts"]}
    for path in (str(k.settings.data_dir), "/tmp"):
        assert path in mounts and "emptyDir" in mounts[path], f"{path} must be a writable emptyDir"
        assert mounts[path]["emptyDir"].get("sizeLimit"), f"{path}: a sizeLimit"
    resources = k.container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    assert k.settings.max_sockets > 0, "MAX_SOCKETS: a cap the memory limit can hold"
    needed = EMPTY_SERVER_MIB * 2**20 + k.settings.max_sockets * KIB_PER_CONNECTION * 1024
    limit = quantity_bytes(resources["limits"]["memory"])
    assert limit >= needed, f"memory limit {limit} B < {needed} B for MAX_SOCKETS={k.settings.max_sockets}"
    assert k.container["image"].split(":")[-1] not in ("", "latest")


def test_services_and_disruption_budget_select_the_pods() -> None:
    k = kit()
    labels = k.deployment["spec"]["template"]["metadata"]["labels"]
    assert k.deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = {s["metadata"]["name"]: s for s in k.objects if s["kind"] == "Service"}
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert container_port(k.container, port["targetPort"]) == k.settings.port
    pods = services["tandem-pods"]["spec"]
    assert pods["clusterIP"] == "None" and pods["publishNotReadyAddresses"] is True, "Prometheus sees unready pods"
    pdb = one(k.objects, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= pdb["minAvailable"] < k.deployment["spec"]["replicas"], "one pod at a time may go, never all"


# --- PromQL: the metrics and labels an expression reads ---------------------------------------------


@dataclass(frozen=True)
class Selector:
    metric: str | None
    matchers: tuple[tuple[str, str, str], ...]  # (label, =|!=|=~|!~, value)


@dataclass
class Reads:
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)  # labels of by/without/on/ignoring/group_*

    @property
    def metrics(self) -> set[str]:
        return {s.metric for s in self.selectors if s.metric}


AGGREGATIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end"}
TOKEN = re.compile(
    r"""
    (?P<space>\s+)
    |(?P<comment>\#[^\n]*)
    |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<range>\[[^\]]*\])
    |(?P<number>(?:0[xX][0-9a-fA-F]+|\d*\.?\d+(?:[eE][+-]?\d+)?)[a-zA-Z]*)
    |(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    |(?P<punct>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}@])
    """,
    re.X,
)


def tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    at = 0
    while at < len(expr):
        match = TOKEN.match(expr, at)
        assert match, f"cannot read PromQL at {expr[at : at + 30]!r} in {expr!r}"
        kind = match.lastgroup or ""
        if kind not in ("space", "comment"):
            out.append((kind, match.group()))
        at = match.end()
    return out


def unquote(literal: str) -> str:
    if literal.startswith("`"):
        return literal[1:-1]
    return str(json.loads('"' + literal[1:-1].replace('\\"', '"').replace('"', '\\"') + '"'))


def promql_reads(expr: str) -> Reads:
    """Every vector selector (metric and label matchers) and grouping label in `expr`."""
    toks = tokens(expr)
    reads = Reads()
    i = 0

    def matchers(start: int) -> tuple[tuple[tuple[str, str, str], ...], int]:
        found: list[tuple[str, str, str]] = []
        j = start + 1  # past "{"
        while toks[j][1] != "}":
            if toks[j][1] == ",":
                j += 1
                continue
            (kind, label), (_, op), (vkind, value) = toks[j], toks[j + 1], toks[j + 2]
            assert kind == "ident" and op in ("=", "!=", "=~", "!~") and vkind == "string", toks[j : j + 3]
            found.append((label, op, unquote(value)))
            j += 3
        return tuple(found), j + 1

    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "punct" and text == "{":
            found, i = matchers(i)
            names = [value for label, op, value in found if label == "__name__" and op == "="]
            reads.selectors.append(Selector(names[0] if names else None, found))
            continue
        if kind != "ident":
            i += 1
            continue
        word = text.lower()
        if word in GROUPING:
            i += 1
            if following == "(":
                i += 1
                while toks[i][1] != ")":
                    if toks[i][0] == "ident":
                        reads.grouping.add(toks[i][1])
                    i += 1
                i += 1
            continue
        if word in KEYWORDS or following == "(" or (word in AGGREGATIONS and following.lower() in GROUPING):
            i += 1  # a keyword, a function or an aggregation
            continue
        if following == "{":
            found, i = matchers(i + 1)
            reads.selectors.append(Selector(text, found))
        else:
            reads.selectors.append(Selector(text, ()))
            i += 1
    return reads


@pytest.mark.parametrize(
    ("expr", "metrics", "grouping"),
    [
        ("up", {"up"}, set()),
        ('sum by (job, le) (rate(a_bucket{job="t", op!~"x|y"}[5m]))', {"a_bucket"}, {"job", "le"}),
        ("a > 0.8 * 10000 # MAX_SOCKETS\n", {"a"}, set()),
        ("(a == 0) unless on (job, instance) (b == 1)", {"a", "b"}, {"job", "instance"}),
        ('absent(a{job="t"} == 1)', {"a"}, set()),
        ("sum without (instance) (rate(c[1h] offset 5m)) / ignoring(x) group_left d", {"c", "d"}, {"instance", "x"}),
        ('{__name__="e", job="t"} or vector(0)', {"e"}, set()),
        ("histogram_quantile(0.99, sum(rate(h_bucket[$__rate_interval])) by (le))", {"h_bucket"}, {"le"}),
        ("max_over_time(g[1h:5m]) and bool f", {"g", "f"}, set()),
        ('count(x{a="}{,"}) * 1e3', {"x"}, set()),
    ],
)
def test_promql_reads_finds_every_metric_and_grouping_label(expr: str, metrics: set[str], grouping: set[str]) -> None:
    reads = promql_reads(expr)
    assert reads.metrics == metrics
    assert reads.grouping == grouping


# --- Prometheus: rules, their unit tests, the scrape configuration ---------------------------------


def promtool(*args: str, cwd: Path = PROMETHEUS, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail(PROMTOOL_MISSING)
    return subprocess.run([binary, *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120)


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"] if "alert" in rule]


def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_every_alert_is_unit_tested_firing_and_quiet_and_says_what_to_do() -> None:
    rules = alert_rules()
    covered = {
        "user-facing": {
            "TandemInstanceDown",
            "TandemNotReady",
            "TandemStoreErrors",
            "TandemStoreSlow",
            "TandemEventLoopLag",
            "TandemRateLimitRefusalsSpiking",
            "TandemArchiveRowsDropped",
            "TandemConnectionsNearLimit",
        }
    }
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names are unique"
    assert covered["user-facing"] <= set(names), covered["user-facing"] - set(names)
    cases = [case for test in load_yaml(RULE_TESTS)["tests"] for case in test.get("alert_rule_test", [])]
    assert load_yaml(RULE_TESTS)["rule_files"] == [RULES.name]
    for rule in rules:
        name = rule["alert"]
        fired = [c for c in cases if c["alertname"] == name and c.get("exp_alerts")]
        quiet = [c for c in cases if c["alertname"] == name and not c.get("exp_alerts")]
        assert fired, f"{name}: no unit test in {RULE_TESTS.name} where it fires"
        assert quiet, f"{name}: no unit test in {RULE_TESTS.name} where it stays quiet"
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        for selector in promql_reads(rule["expr"]).selectors:
            assert ("job", "=", "tandem") in selector.matchers, f'{name}: {selector.metric} without job="tandem"'


def test_thresholds_that_follow_a_setting_equal_the_deployed_value() -> None:
    settings = kit().settings
    by_name = {s.name: s for s in config.SETTINGS}
    found = {}
    for rule in alert_rules():
        for number, name in re.findall(r"([\d.]+)\s*#\s*([A-Z][A-Z0-9_]*)", rule["expr"]):
            assert name in by_name, f"{rule['alert']}: # {name} is not a setting"
            deployed = getattr(settings, by_name[name].field)
            assert float(number) == float(deployed), f"{rule['alert']}: {number} but {name} is {deployed}"
            found[name] = deployed
    assert {"MAX_SOCKETS", "ARCHIVE_QUEUE_SIZE", "LIVENESS_MAX_LAG"} <= set(found), found


def test_scrape_configuration_passes_promtool_and_finds_the_pods(tmp_path: Path) -> None:
    scrape = load_yaml(SCRAPE_CONFIG)
    assert RULES.name in scrape["rule_files"]
    (job,) = [job for job in scrape["scrape_configs"] if job["job_name"] == "tandem"]
    token = Path(job["authorization"]["credentials_file"])
    # promtool opens the credentials file: check a copy that points at one of ours.
    (tmp_path / "token").write_text("x" * 32)
    text = SCRAPE_CONFIG.read_text().replace(str(token), str(tmp_path / "token"))
    (tmp_path / SCRAPE_CONFIG.name).write_text(text)
    shutil.copy(RULES, tmp_path / RULES.name)
    result = promtool("check", "config", SCRAPE_CONFIG.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    k = kit()
    (sd,) = job["dns_sd_configs"]
    assert sd["port"] == k.settings.port
    pods = one(k.objects, "Service", "tandem-pods")
    assert all(name.startswith(f"{pods['metadata']['name']}.") for name in sd["names"]), sd["names"]


# --- Grafana ---------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(board: dict[str, Any]) -> dict[str, str]:
    """PromQL by where it is: panel targets, annotations and (the selector of) label_values variables."""
    queries = {}
    for panel in panels(board):
        for target in panel.get("targets", []):
            queries[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for annotation in board["annotations"]["list"]:
        if "expr" in annotation:
            queries[f"annotation {annotation['name']!r}"] = annotation["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
            assert match, f"variable {variable['name']}: {query}"
            queries[f"variable {variable['name']!r}"] = match.group(1)
    return queries


GRAFANA_VARIABLES = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h", "job": "tandem", "instance": ".*"}


def test_dashboard_is_well_formed_and_every_query_parses(tmp_path: Path) -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    taken: set[tuple[int, int]] = set()
    for panel in panels(board):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("description"), f"panel {panel['title']!r}: a description"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
    titles = " ".join(panel["title"].lower() for panel in panels(board))
    for topic in ("connections", "sessions", "messages / s", "latency", "errors", "store", "archive"):
        assert topic in titles, f"no panel on {topic}"
    # promtool parses each query as a recording rule, Grafana's variables filled in.
    rules = []
    for n, expr in enumerate(dashboard_queries(board).values()):
        filled = re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VARIABLES[m.group(1)], expr)
        rules.append({"record": f"dashboard:query_{n}", "expr": filled})
    (tmp_path / "dashboard.rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    result = promtool("check", "rules", "dashboard.rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- every metric queried, on a live /metrics -------------------------------------------------------

# Series Prometheus makes itself, not Tandem; labels it adds at scrape time (prometheus.yml).
SYNTHETIC = {"up", "ALERTS"}
TARGET_LABELS = {"job", "instance", "namespace"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


@dataclass
class Exposed:
    """Sample names on /metrics and, per name, each label's values."""

    labels: dict[str, dict[str, set[str]]] = field(default_factory=dict)

    def add(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            names = [family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))]
            for name in names:  # families with no sample yet still count as exposed
                self.labels.setdefault(name, {})
            for sample in family.samples:
                values = self.labels.setdefault(sample.name, {})
                for label, value in sample.labels.items():
                    values.setdefault(label, set()).add(value)


def scrape(url: str, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, _, body = http_get(f"{url}/metrics", headers)
    assert status == 200, body
    text = body.decode()
    # promtool's linter: names, units, HELP and TYPE as Prometheus expects them.
    lint = promtool("check", "metrics", cwd=ROOT, stdin=text)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    return text


def problems(where: str, expr: str, exposed: Exposed) -> list[str]:
    found = []
    reads = promql_reads(expr)
    used_labels: set[str] = set(TARGET_LABELS)
    for selector in reads.selectors:
        name = selector.metric
        if name is None or name in SYNTHETIC:
            continue
        if name not in exposed.labels:
            found.append(f"{where}: {name} is not on /metrics")
            continue
        live = exposed.labels[name]
        used_labels |= set(live)
        for label, op, value in selector.matchers:
            if label in TARGET_LABELS or label == "__name__":
                continue
            if label not in live:
                found.append(f"{where}: {name} has no label {label} (it has {sorted(live)})")
            elif op == "=" and "$" not in value and value not in live[label]:
                found.append(f"{where}: {name}{{{label}={value!r}}}: values are {sorted(live[label])}")
            elif op == "=~" and re.fullmatch(r"[\w|]+", value):
                missing = [v for v in value.split("|") if v not in live[label]]
                if missing:
                    found.append(f"{where}: {name}{{{label}=~{value!r}}}: no {missing} in {sorted(live[label])}")
    unknown = reads.grouping - used_labels
    if unknown and reads.metrics - SYNTHETIC:
        found.append(f"{where}: grouping by {sorted(unknown)}, which no metric of the query has")
    return found


def test_every_metric_the_rules_and_the_dashboard_query_is_on_a_live_metrics(
    tandem_factory: ServerFactory, private_redis: RedisFactory
) -> None:
    token = "metrics-token-" + "t" * 20
    exposed = Exposed()
    texts = []
    embedded = tandem_factory()
    texts.append(scrape(embedded.http))
    redis = private_redis(password="redis-password-1234")
    with scratch_database() as database:
        shared = tandem_factory(REDIS_URL=redis.url(), DATABASE_URL=database, MIGRATE_ON_START="1", METRICS_TOKEN=token)
        texts.append(scrape(shared.http, token))
        # Redis gone: the store's operations fail and tandem_store_errors_total gets its samples.
        redis.stop()
        deadline = time.monotonic() + 20
        while "tandem_store_errors_total{" not in texts[-1] and time.monotonic() < deadline:
            time.sleep(0.5)
            texts.append(scrape(shared.http, token))
        shared.kill()
    assert "tandem_store_errors_total{" in texts[-1], "no store error within 20 s of stopping Redis"
    for text in texts:
        exposed.add(text)
    queries = {f"rule {rule['alert']}": rule["expr"] for rule in alert_rules()}
    queries.update(dashboard_queries(dashboard()))
    found = [problem for where, expr in queries.items() for problem in problems(where, expr, exposed)]
    assert not found, "\n".join(found)
    queried = {name for expr in queries.values() for name in promql_reads(expr).metrics}
    assert {"tandem_archive_rows_total", "tandem_redis_listener_restarts_total", "tandem_store_errors_total"} <= queried
