"""optuna-dashboard on a finished sweep's study journal: started on localhost, the study read back
through its HTTP API is the sweep's study (README: "Watching a sweep live")."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sweeps.search import JOURNAL_FILE, RAY_TRIAL_ATTR, load_study


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_optuna_dashboard_serves_the_sweeps_study(report_sweep):
    spec, _ = report_sweep
    journal = spec.output_dir / "study" / JOURNAL_FILE
    exe = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    assert exe, "optuna-dashboard is not installed (pip install -e '.[dev]')"
    port = _free_port()
    proc = subprocess.Popen([exe, str(journal), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"optuna-dashboard did not start: {proc.stdout.read() if proc.poll() is not None else 'timeout'}")
                time.sleep(0.5)
        (summary,) = [s for s in studies if s["study_name"] == spec.name]
        detail = _get(f"{base}/api/studies/{summary['study_id']}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    study = load_study(spec.output_dir / "study", spec.name)
    served = {t["number"]: t for t in detail["trials"]}
    assert sorted(served) == [t.number for t in study.trials] and len(served) == spec.search.num_trials
    for t in study.trials:
        got = served[t.number]
        assert got["state"].lower() == t.state.name.lower()
        assert {p["name"]: p["param_internal_value"] for p in got["params"]} == pytest.approx(
            {k: t.distributions[k].to_internal_repr(v) for k, v in t.params.items()})
        assert {a["key"]: a["value"] for a in got["user_attrs"]}[RAY_TRIAL_ATTR] == t.user_attrs[RAY_TRIAL_ATTR]
        assert {v["step"]: v["value"] for v in got["intermediate_values"]} == pytest.approx(t.intermediate_values)
        if t.values is not None:
            assert got["values"] == pytest.approx(t.values)
