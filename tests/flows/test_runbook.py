"""Every command of docs/runbook.md, run as far as it can run offline.

The fenced ```bash blocks are read line by line (comments and `\\` continuations handled). Each
command must be one this test knows how to check, so a new command cannot slip in untested:

- `hierloc run ...`: validated for real (`--check` added when absent: nothing runs), the printed
  config equal to the preset with the command's overrides;
- `prefect deployment run NAME --params "{\\"cfg\\": $(hierloc ... --check)}"`: the inner command is
  run, the JSON the shell would pass is built from its output and validated as the flow's `cfg`
  parameter; NAME is a deployment of prefect.yaml; `prefect deployment run --help` knows `--params`;
- `hf download ...` (the documented network steps): `hf download --help` knows every option used;
- `make TARGET`: the Makefile has the target; `df`, `. .run/env`: shell built-ins and coreutils.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "docs" / "runbook.md"
BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
INNER = re.compile(r"\$\((hierloc [^)]*)\)")


def runbook_commands() -> list[str]:
    out = []
    for block in FENCE.findall(RUNBOOK.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                out.append(line)
    return out


COMMANDS = runbook_commands()


def test_the_runbook_has_the_steps_the_issue_asks_for():
    tools = {shlex.split(c)[0] if not c.startswith("HF_HUB_OFFLINE=") else shlex.split(c)[1] for c in COMMANDS}
    assert {"hf", "make", "hierloc", "prefect"} <= tools
    joined = "\n".join(COMMANDS)
    for needed in ("osv5m/osv5m", "--repo-type dataset", "make up", "configs/paper.json", "configs/fast.json",
                   "prefect deployment run"):
        assert needed in joined, needed


def _hierloc(args: list[str]) -> dict:
    assert args[0] == "run", f"runbook: only `hierloc run` is checked here, got {args}"
    if "--check" not in args:
        args = [*args, "--check"]
    args = [str(ROOT / a) if a.startswith("configs/") else a for a in args]  # the runbook runs from the project folder
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, (args, res.output)
    resolved = json.loads(res.stdout)
    preset = json.loads((ROOT / args[args.index("--config") + 1]).read_text())
    overrides = {"data_dir": "--data-dir", "work_dir": "--work-dir", "experiment": "--experiment"}
    for key, value in preset.items():
        flag = overrides.get(key)
        want = args[args.index(flag) + 1] if flag in args else value
        assert resolved[key] == want or isinstance(value, dict), (key, resolved[key], want)
    return resolved


def _help(argv: list[str], home: Path) -> str:
    res = subprocess.run(argv + ["--help"], cwd=home, capture_output=True, text=True, timeout=120,
                         env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200",
                              "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(home / "prefect"), "DO_NOT_TRACK": "true",
                              "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    assert res.returncode == 0, (argv, res.stderr[-2000:])
    return res.stdout


def _options(args: list[str]) -> set[str]:
    return {a.split("=")[0] for a in args if a.startswith("--")}


def _prefect(line: str, tmp_path: Path) -> None:
    inner = INNER.search(line)
    assert inner, f"runbook: the deployment run must take its cfg from `hierloc run ... --check`: {line}"
    resolved = _hierloc(shlex.split(inner.group(1))[1:])
    # what the shell passes: the words of the line, then $(...) in its word replaced by the command's
    # output (inside double quotes the output is not split or unquoted again)
    args = [a.replace("@INNER@", json.dumps(resolved, indent=2)) for a in
            shlex.split(line.replace(inner.group(0), "@INNER@"))]
    assert args[:3] == ["prefect", "deployment", "run"], args
    flow_name, deployment = args[3].split("/")
    params = json.loads(args[args.index("--params") + 1])
    from flows.params import PipelineConfig

    assert PipelineConfig.model_validate(params["cfg"]).model_dump(mode="json") == resolved
    yaml_text = (ROOT / "prefect.yaml").read_text()
    assert f"- name: {deployment}\n" in yaml_text
    entry = re.search(rf"- name: {re.escape(deployment)}\n(?:\s+.*\n)*?\s+entrypoint: (\S+)", yaml_text).group(1)
    module, func = entry.split(":")
    import importlib

    flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), func)
    assert flow.name == flow_name and "cfg" in flow.parameters.properties
    assert _options(args[4:]) <= set(re.findall(r"--[\w-]+", _help([str(BIN / "prefect"), "deployment", "run"], tmp_path)))


@pytest.mark.parametrize("line", COMMANDS)
def test_each_runbook_command_runs_as_far_as_it_can_offline(line, tmp_path):
    env_prefix = re.match(r"^((?:[A-Z_]+=\S*\s+)*)(.*)$", line)
    assert env_prefix.group(1).strip() in ("", "HF_HUB_OFFLINE=0"), line
    args = shlex.split(env_prefix.group(2))
    tool = args[0]
    if tool == "hierloc":
        _hierloc(args[1:])
    elif tool == "prefect":
        _prefect(env_prefix.group(2), tmp_path)
    elif tool == "hf":
        assert args[1] == "download" and env_prefix.group(1).strip() == "HF_HUB_OFFLINE=0", \
            "a network step says so: HF_HUB_OFFLINE=0 in front"
        assert _options(args[2:]) <= set(re.findall(r"--[\w-]+", _help([str(BIN / "hf"), "download"], tmp_path)))
    elif tool == "make":
        makefile = (ROOT / "Makefile").read_text()
        assert all(re.search(rf"^{re.escape(t)}:", makefile, re.M) for t in args[1:]), args
    elif tool == ".":
        assert args[1:] == [".run/env"]
        assert ".run/env" in (ROOT / "flows" / "services" / "manager.py").read_text()
    elif tool == "df":
        pass
    else:
        pytest.fail(f"docs/runbook.md: no check for the command {line!r}: add one to tests/flows/test_runbook.py")
