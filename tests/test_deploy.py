"""Deployment files: Ray's own schema, KubeRay manifests, Dockerfile, and that they agree.

Nothing here needs AWS, Kubernetes or Docker: the files are parsed and checked for the fields
that decide where work runs, what image runs it, and that secrets are only referenced.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from jobkit import REPO

from pipeline.config import JobConfig, build_config, load_config

CLUSTER_YAML = REPO / "ray_cluster.yaml"
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
EXAMPLE_JOB = DEPLOY / "job.example.yaml"


def ray_schema() -> dict[str, Any]:
    spec = importlib.util.find_spec("ray")
    assert spec and spec.submodule_search_locations
    path = Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    docs = []
    for f in sorted(KUBERAY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def by_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def node_types(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return cluster["available_node_types"]


def workers(cluster: dict[str, Any], resource: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in node_types(cluster).items()
            if k != cluster["head_node_type"] and v["resources"].get(resource, 0) > 0}


def group_resources(group: dict[str, Any]) -> dict[str, float]:
    """rayStartParams.resources is a JSON object inside a quoted string: '"{\\"x\\": 1}"'."""
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return template["spec"]["containers"]


def walk(node: Any) -> list[Any]:
    out = [node]
    if isinstance(node, dict):
        for v in node.values():
            out += walk(v)
    elif isinstance(node, list):
        for v in node:
            out += walk(v)
    return out


def configmap_job(manifests: list[dict[str, Any]]) -> JobConfig:
    return build_config(yaml.safe_load(by_kind(manifests, "ConfigMap")["data"]["job.yaml"]))


# ---- ray_cluster.yaml -------------------------------------------------------------------------


def test_cluster_config_is_valid_for_ray(cluster: dict[str, Any]) -> None:
    jsonschema.validate(cluster, ray_schema())
    # What `ray up` runs before launching anything: defaults filled in, then Ray's own checks
    # beyond the schema (head type exists, bounds...). Private API, hence after the schema.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(json.loads(json.dumps(cluster))))
    assert cluster["provider"]["type"] == "aws"


def test_cluster_shape_head_idle_spot_tilers_gpu_encoders(cluster: dict[str, Any]) -> None:
    head = node_types(cluster)[cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0
    assert not {"tiler", "encoder"} & set(head["resources"])

    tilers = workers(cluster, "tiler")
    assert tilers
    for name, t in tilers.items():
        assert t["resources"].get("GPU", 0) == 0, name
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name

    encoders = workers(cluster, "encoder")
    instance_types = {e["node_config"]["InstanceType"] for e in encoders.values()}
    assert {"g6e.xlarge", "g6e.12xlarge", "p5.48xlarge"} <= instance_types
    for name, e in encoders.items():
        assert e["resources"]["GPU"] >= 1, name

    total_max = 0
    for name, t in node_types(cluster).items():
        if name == cluster["head_node_type"]:
            continue
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        total_max += t["max_workers"]
    assert 0 < cluster["max_workers"] <= total_max
    assert cluster["docker"]["image"] and ":" in cluster["docker"]["image"]


@pytest.mark.parametrize("source", ["job.example.yaml", "ConfigMap"])
def test_job_files_route_work_to_declared_resources(source: str, cluster: dict[str, Any],
                                                    manifests: list[dict[str, Any]]) -> None:
    cfg = load_config(EXAMPLE_JOB) if source == "job.example.yaml" else configmap_job(manifests)
    assert cfg.ray.tiler_resource and cfg.ray.encoder_resource

    # Cluster launcher: the names exist, on the right kind of node, with room for one unit.
    tilers = workers(cluster, cfg.ray.tiler_resource)
    encoders = workers(cluster, cfg.ray.encoder_resource)
    assert tilers and encoders
    assert all(t["resources"].get("GPU", 0) == 0 for t in tilers.values())
    assert all(e["resources"]["GPU"] >= 1 for e in encoders.values())
    assert all(t["resources"]["CPU"] >= cfg.ray.tiling_cpus for t in tilers.values())
    assert all(e["resources"]["CPU"] >= cfg.ray.encoder_cpus * e["resources"]["GPU"]
               for e in encoders.values())
    gpus = sum(e["resources"]["GPU"] * e["max_workers"] for e in encoders.values())
    assert max(m.actors for m in cfg.models) <= gpus  # one GPU per encoder actor

    # KubeRay: the same names on the groups, and pods big enough for one task / actor.
    rc = by_kind(manifests, "RayCluster")["spec"]
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    tiler = [g for g in groups.values() if cfg.ray.tiler_resource in group_resources(g)]
    encoder = [g for g in groups.values() if cfg.ray.encoder_resource in group_resources(g)]
    assert len(tiler) == 1 and len(encoder) == 1
    enc_limits = containers(encoder[0]["template"])[0]["resources"]["limits"]
    assert float(enc_limits["cpu"]) >= cfg.ray.encoder_cpus
    assert max(m.actors for m in cfg.models) <= encoder[0]["maxReplicas"] * int(
        enc_limits["nvidia.com/gpu"])
    assert float(containers(tiler[0]["template"])[0]["resources"]["limits"]["cpu"]) >= \
        cfg.ray.tiling_cpus

    # Offline clusters: weights staged in object storage are pinned by checksum.
    for m in cfg.models:
        if m.weights.startswith("s3://"):
            assert m.sha256, m.id


# ---- KubeRay -----------------------------------------------------------------------------------


def test_kuberay_cluster_groups(manifests: list[dict[str, Any]], cluster: dict[str, Any]
                                ) -> None:
    rc = by_kind(manifests, "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["rayVersion"] == importlib.metadata.version("ray")
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert not group_resources(head)
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert group_resources(groups["tiler"]) == {"tiler": 1}
    assert group_resources(groups["encoder"]) == {"encoder": 1}
    for name, g in groups.items():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
        limits = containers(g["template"])[0]["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert (gpus >= 1) == (name == "encoder"), name
    # The head mounts the job ConfigMap where the entrypoints look for it.
    head_pod = head["template"]["spec"]
    cm = by_kind(manifests, "ConfigMap")["metadata"]["name"]
    vol = [v["name"] for v in head_pod["volumes"] if v.get("configMap", {}).get("name") == cm]
    mounts = {m["name"]: m["mountPath"] for m in containers(head["template"])[0]["volumeMounts"]}
    assert vol and mounts[vol[0]] == "/app/config"


def test_every_image_is_the_project_image(manifests: list[dict[str, Any]],
                                          cluster: dict[str, Any]) -> None:
    images = {c["image"] for m in manifests for node in walk(m) if isinstance(node, dict)
              and "containers" in node for c in node["containers"]}
    assert images == {cluster["docker"]["image"]}


def test_rayjob_runs_one_job_on_the_same_cluster_spec(manifests: list[dict[str, Any]]) -> None:
    job = by_kind(manifests, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["entrypoint"] == "python -m pipeline run /app/config/job.yaml"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["rayClusterSpec"] == by_kind(manifests, "RayCluster")["spec"]


def test_nightly_schedule(manifests: list[dict[str, Any]]) -> None:
    cron = by_kind(manifests, "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    script = containers({"spec": pod})[0]["args"][0]
    assert "--submission-id" in script and "date -u" in script
    assert "python -m pipeline run /app/config/job.yaml" in script
    rc = by_kind(manifests, "RayCluster")["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in containers({"spec": pod})[0]["env"]}
    assert env["RAY_ADDRESS"] == f"http://{rc}-head-svc:8265"


def test_nightly_submitter_submits_once_per_night(manifests: list[dict[str, Any]],
                                                  tmp_path: Path) -> None:
    """Run the CronJob's script twice against a stand-in `ray` CLI: one submission, same id."""
    cron = by_kind(manifests, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = cron["containers"][0]["args"][0]
    fake = tmp_path / "ray"
    # The stand-in keeps submitted ids in a file; `status` answers like Ray does.
    fake.write_text(
        "#!/bin/bash\n"
        f'db={tmp_path}/jobs; echo "$@" >> {tmp_path}/calls\n'
        'case "$1 $2" in\n'
        '  "job status") grep -qx "$3" "$db" 2>/dev/null || exit 1;'
        ' echo "Status for job \'$3\': SUCCEEDED";;\n'
        '  "job submit") id=$(sed -n "s/.*--submission-id \\([^ ]*\\).*/\\1/p" <<< "$*");'
        ' grep -qx "$id" "$db" 2>/dev/null && exit 1; echo "$id" >> "$db";;\n'
        "esac\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    for _ in range(2):  # the night's run, then a re-trigger of the same night
        proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    submits = [c for c in calls if c.startswith("job submit")]
    assert len(submits) == 1, calls
    ids = set(re.findall(r"wsi-nightly-\d{8}", "\n".join(calls)))
    assert len(ids) == 1
    assert f"--run-id {ids.pop()}" in submits[0]


def test_secrets_are_only_referenced(manifests: list[dict[str, Any]]) -> None:
    assert not [m for m in manifests if m["kind"] == "Secret"]
    referenced = set()
    for m in manifests:
        for node in walk(m):
            if not (isinstance(node, dict) and "name" in node and
                    ("value" in node or "valueFrom" in node)):
                continue
            if re.search(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|CREDENTIAL", node["name"]):
                assert "value" not in node, f"{node['name']} has a literal value"
                assert node["valueFrom"]["secretKeyRef"]["name"], node
                referenced.add(node["name"])
    assert {"HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= referenced
    literal = re.compile(r"hf_[A-Za-z0-9]{30,}|(AKIA|ASIA)[A-Z0-9]{16}|"
                         r"aws_secret_access_key\s*[=:]\s*\S+", re.I)
    files = [CLUSTER_YAML, *DEPLOY.rglob("*")]
    for f in files:
        if f.is_file():
            assert not literal.search(f.read_text()), f"secret-like literal in {f}"


# ---- Dockerfile ----------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_base_user_and_installs() -> None:
    steps = dockerfile()
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    base = args["RAY_IMAGE"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cu(\d+)", base)
    assert m, base
    assert m.group(1) == importlib.metadata.version("ray")
    assert (int(m.group(2)), int(m.group(3))) == (3, 11)
    assert ("FROM", "${RAY_IMAGE}") in steps
    users = [a for k, a in steps if k == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    runs = " ".join(a for k, a in steps if k == "RUN")
    assert re.search(r"pip install [^&]*\.\s", runs + " "), "the package is not installed"
    assert "openslide-bin" in runs
    copied = " ".join(a for k, a in steps if k == "COPY")
    assert "pipeline" in copied and "pyproject.toml" in copied
    assert not [a for k, a in steps if k in {"ENV", "ARG"} and
                re.search(r"TOKEN|SECRET|ACCESS_KEY", a)]


def test_deploy_readme_covers_the_path_to_a_nightly_run() -> None:
    text = (DEPLOY / "README.md").read_text()
    for must in ("docker build", "sha256sum", "ray up ray_cluster.yaml", "ray job submit",
                 "ray job logs", "runs/", "nightly-cronjob.yaml",
                 # the sizing rule carries measured tiling rates and the command behind them
                 "cores_per_GPU(m)", "bench/tiling.py", "C (tiles/s per core)"):
        assert must in text, must
    # Files it points to exist.
    refs = [r for r in re.findall(r"\]\(([^)#]+)\)", text) if "://" not in r]
    assert len(refs) >= 5
    for ref in refs:
        assert (DEPLOY / ref).resolve().exists(), ref


def test_dockerfile_app_dir_belongs_to_the_user_and_one_cuda_stack() -> None:
    steps = dockerfile()
    # /app is made and chowned as root before USER ray; WORKDIR comes after (a WORKDIR made
    # under USER ray is root-owned on builders without BuildKit).
    i_root = steps.index(("USER", "root"))
    i_chown = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "chown 1000:100 /app"
                   in a)
    i_user = steps.index(("USER", "ray"))
    i_workdir = steps.index(("WORKDIR", "/app"))
    assert i_root < i_chown < i_user < i_workdir
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    base_cuda = re.search(r"-cu(\d+)$", args["RAY_IMAGE"]).group(1)
    assert args["TORCH_INDEX"].rstrip("/").endswith(f"/cu{base_cuda}")
    torch_install = next(a for k, a in steps if k == "RUN" and "${TORCH_PINS}" in a)
    assert "--index-url ${TORCH_INDEX}" in torch_install


def test_head_profile_lets_the_autoscaler_start_workers(cluster: dict[str, Any]) -> None:
    types = node_types(cluster)
    head = types[cluster["head_node_type"]]["node_config"]["IamInstanceProfile"]["Arn"]
    nodes = {t["node_config"]["IamInstanceProfile"]["Arn"]
             for n, t in types.items() if n != cluster["head_node_type"]}
    assert head not in nodes and len(nodes) == 1
    policy = json.loads((DEPLOY / "aws" / "head-policy.json").read_text())
    actions = {a for st in policy["Statement"] for a in
               ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags",
            "ec2:DescribeInstances", "iam:PassRole"} <= actions
    node_role = next(iter(nodes)).rsplit("/", 1)[-1]
    passrole = next(st for st in policy["Statement"] if st["Action"] == "iam:PassRole")
    assert passrole["Resource"].endswith(f"role/{node_role}")


def _qty(v: str) -> float:
    units = {"Gi": 2**30, "Mi": 2**20, "G": 1e9, "M": 1e6, "m": 1e-3}
    for u, f in units.items():
        if v.endswith(u):
            return float(v[: -len(u)]) * f
    return float(v)


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_tiler_pods_fit_a_16_cpu_32_gib_node(manifests: list[dict[str, Any]], kind: str) -> None:
    """~15.5 CPU and ~28 GiB of a c7i.4xlarge are allocatable to pods (kubelet and system
    reservations): a pod asking more stays Pending."""
    doc = by_kind(manifests, kind)
    spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    tiler = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "tiler")
    req = containers(tiler["template"])[0]["resources"]["requests"]
    assert _qty(str(req["cpu"])) <= 15.5 and _qty(req["memory"]) <= 28 * 2**30
