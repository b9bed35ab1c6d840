"""The shipped Ray cluster configs pass Ray's own validation and keep the project's invariants.

Validation is what `ray up` does before it talks to a cloud (`commands._bootstrap_config`):
`prepare_config` (defaults, merged setup commands, per-type worker bounds; for the local
provider the on-prem node type) then `validate_config` (Ray's JSON schema and cross-field
checks). The AWS provider's own bootstrap (boto3, credentials, network) is not run; a fixture
fails any network connection.
"""

from __future__ import annotations

import copy
import re
import shlex
import socket
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
AWS = ROOT / "cluster.yaml"
ONPREM = ROOT / "cluster-onprem.yaml"
# Every cluster config the repo ships (tests/test_shipped_yaml.py requires cluster configs to be
# named like this), so a new one gets the generic checks below.
SHIPPED_CONFIGS = sorted(ROOT.glob("cluster*.yaml"))
CONFIGS = pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.stem)
DOCS = ROOT / "docs" / "cluster.md"
DASHBOARD_PORT = 8265
PROJECT_DIR = "~/lorasweep"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("cluster-config validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_up_checks(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def start_commands(config: dict) -> list[str]:
    return [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]


@CONFIGS
def test_config_passes_ray_validation(path):
    prepared = ray_up_checks(load(path))
    assert prepared["cluster_name"].startswith("lorasweep")
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize(
    ("path", "corrupt"),
    [
        (AWS, lambda c: c.__setitem__("max_worker", c.pop("max_workers"))),  # misspelled top-level key
        (AWS, lambda c: c.__setitem__("max_workers", "many")),
        (AWS, lambda c: c["available_node_types"]["gpu.a10g"]["resources"].__setitem__("GPU", "one")),
        (ONPREM, lambda c: c.__setitem__("setup_command", c.pop("setup_commands"))),
        (ONPREM, lambda c: c.__setitem__("head_start_ray_commands", "ray start --head")),
    ],
    ids=["aws-misspelled-key", "aws-max-workers-many", "aws-gpu-not-int", "onprem-misspelled-key", "onprem-commands-not-list"],
)
def test_corrupted_copy_fails_validation(path, corrupt):
    config = load(path)
    corrupt(config)
    with pytest.raises(jsonschema.ValidationError):
        ray_up_checks(config)


def test_aws_gpu_workers_autoscale_and_head_takes_no_trials():
    config = ray_up_checks(load(AWS))
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu, "no worker type declares GPU resources"
    for name, t in gpu.items():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, name
        assert t["resources"].get("CPU", 0) >= 1, name
    # Ray gives workers no IAM profile by default, and trials upload checkpoints to S3 from them.
    for name, t in workers.items():
        assert "IamInstanceProfile" in t["node_config"], f"{name}: no IAM instance profile for S3"
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu.values())


def test_onprem_lists_machines_and_ssh_auth():
    config = ray_up_checks(load(ONPREM))
    provider = config["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
    assert config["auth"]["ssh_user"] and config["auth"]["ssh_private_key"]


@CONFIGS
def test_nodes_install_the_project_from_its_mount(path):
    config = ray_up_checks(load(path))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed = ["pyproject.toml", pyproject["project"]["readme"], *packages]
    mounts = config["file_mounts"]
    for name in needed:
        remote = f"{PROJECT_DIR}/{name}"
        assert remote in mounts, f"{remote} is not in file_mounts"
        assert (ROOT / mounts[remote]).exists(), mounts[remote]
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        installs = [shlex.split(c) for c in commands if "pip install" in c]
        assert any("-e" in argv and argv[argv.index("-e") + 1] == PROJECT_DIR for argv in installs)


@CONFIGS
def test_cluster_ray_matches_installed_ray(path):
    text = path.read_text()
    pinned = set(re.findall(r"ray\[[a-z,]+\]==([0-9][\w.]*)", text))
    assert pinned == {ray.__version__}


@CONFIGS
def test_token_auth_on_every_node(path):
    config = ray_up_checks(load(path))
    assert AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE"  # the switch this Ray reads
    starts = start_commands(config)
    assert len(starts) == 2
    for command in starts:
        assert f"{AUTH_MODE_ENV_VAR}=token ray start" in command, command
    assert "~/.ray/auth_token" in config["file_mounts"]


def _opens_to_world(rule: dict, port: int) -> bool:
    protocol = str(rule.get("IpProtocol", "-1"))
    low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
    covers = protocol == "-1" or low in (-1, None) or low <= port <= high
    cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
    return covers and any(c in ("0.0.0.0/0", "::/0") for c in cidrs)


@CONFIGS
def test_dashboard_is_not_opened_to_the_world(path):
    config = ray_up_checks(load(path))
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    assert not [r for r in rules if _opens_to_world(r, DASHBOARD_PORT)]
    head_start = [c for c in config["head_start_ray_commands"] if "--head" in c]
    assert head_start and all("--dashboard-host=127.0.0.1" in c for c in head_start)
    code = [line.split("#", 1)[0] for line in path.read_text().splitlines()]
    assert not [line for line in code if str(DASHBOARD_PORT) in line or "0.0.0.0" in line]


@CONFIGS
def test_no_wandb_key_in_file(path):
    text = path.read_text()
    assert "WANDB_API_KEY" in text  # the comment that says where the key goes instead
    for match in re.finditer(r"WANDB_API_KEY\\?[\"']?\s*[:=]\s*\\?[\"']?([^\s\"'\\,}]*)", text):
        assert match.group(1) in ("", "$WANDB_API_KEY"), match.group(0)
    assert not re.search(r"\b[0-9a-f]{40}\b", text), "something shaped like a W&B API key"


def test_aws_and_onprem_are_shipped():
    assert AWS in SHIPPED_CONFIGS and ONPREM in SHIPPED_CONFIGS


def test_storage_is_documented():
    from sweeps.spec_schema import SweepSpec

    assert "storage" in SweepSpec.model_fields  # the key the texts below tell users to write
    aws, onprem, docs = AWS.read_text(), ONPREM.read_text(), DOCS.read_text()
    assert "storage: s3://" in aws and "IAM" in aws
    assert "storage: /mnt/lorasweep/sweeps" in onprem and "NFS" in onprem
    assert "storage: s3://" in docs and "storage: /mnt/lorasweep/sweeps" in docs
    assert "ray down cluster.yaml" in docs


@pytest.mark.parametrize("path", [AWS, ONPREM, DOCS], ids=lambda p: p.name)
def test_no_sweep_spec_key_that_the_schema_rejects(path):
    """`output:` is not a sweep spec key (the schema rejects it as unknown); the texts once said it."""
    from sweeps.spec_schema import SweepSpec

    assert "output" not in SweepSpec.model_fields
    said = [line for line in path.read_text().splitlines() if re.search(r"(?<![\w-])output:", line)]
    assert not said, said


def test_documented_job_submit_flags_exist():
    from ray.dashboard.modules.job.cli import submit

    docs = DOCS.read_text()
    block = docs[docs.index("ray job submit") :].split("```", 1)[0]
    used = set(re.findall(r"\s(--[a-z][a-z-]*)", block.split(" -- ", 1)[0]))
    known = {opt for param in submit.params for opt in param.opts}
    assert used and used <= known, used - known
