"""The README and docs say what the code does: the settings table is complete, links resolve, the README's commands
and examples run as written (the demo's 30 s run is ``slow``: .ci/run runs it after the default suite)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fora_lightning.config import ForaConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_usage_lists_every_setting_as_the_fields_say():
    settings_doc = _script("settings_doc")
    usage = (ROOT / "docs" / "usage.md").read_text()
    assert settings_doc.main(["--check"]) == 0, "docs/usage.md is out of date: run python scripts/settings_doc.py"
    table = usage.split(settings_doc.BEGIN)[1].split(settings_doc.END)[0]
    names = {r["name"] for r in settings_doc.setting_rows()}
    assert {f.name for f in dataclasses.fields(ForaConfig)} <= {n.split(".")[0] for n in names}
    for name in names:
        assert f"| `{name}` |" in table


def test_the_settings_table_generator_notices_a_missing_row():
    settings_doc = _script("settings_doc")
    rows = settings_doc.setting_rows()
    full = settings_doc.render(rows)
    assert settings_doc.render(rows[1:]) != full  # a field without its row: --check fails
    text = settings_doc.updated(f"a\n{settings_doc.BEGIN}\nold\n{settings_doc.END}\nb", full)
    assert text == f"a\n{settings_doc.BEGIN}\n{full}\n{settings_doc.END}\nb"


def test_readme_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 200
    for page in (ROOT / "README.md", ROOT / "docs" / "README.md", ROOT / "docs" / "method.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
    for path in re.findall(r"`((?:configs|results|docs|scripts|benchmarks)/[\w./-]+)`", README):
        assert (ROOT / path).exists() or "<" in path, f"README names {path}, which does not exist"


def test_readme_quick_commands_are_what_ci_runs():
    (quick, *_) = _blocks(README, "bash")
    ci = (ROOT / ".ci" / "run").read_text()
    install = re.search(r'pip install -e "(\.\[[\w,]+\])"', quick).group(1)
    assert f'pip install -q -e "{install}"' in ci  # the README installs the extras CI installs
    assert "python cli.py fit --config configs/demo.yaml" in quick and "bash .ci/run" in quick
    assert "python -m pytest -q -m slow tests/test_docs.py" in ci  # ... and CI runs the demo as the README says


def _load_cli():
    spec = importlib.util.spec_from_file_location("fora_cli", ROOT / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_yaml_example_parses(tmp_path, capsys, monkeypatch):
    (example,) = _blocks(README, "yaml")
    path = tmp_path / "readme.yaml"
    path.write_text(example)
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        _load_cli().main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["config"]["target_modules"] == ["fc1", "fc2"]


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python block as written, on a 3-step budget (its 300 steps are the demo's: see below)."""
    (example,) = _blocks(README, "python")
    assert "max_steps=300" in example
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    code = example.replace("max_steps=300", "max_steps=3, enable_progress_bar=False, logger=False")
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["trainer"].global_step == 3 and namespace["fora"].subspaces


@pytest.mark.slow
def test_readme_demo_command_runs_as_written_and_prints_the_readme_numbers():
    """``python cli.py fit --config configs/demo.yaml`` in a subprocess, as a user types it (~30 s on 2 cores)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "cli.py", "fit", "--config", "configs/demo.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Epoch 4/-2" not in proc.stdout + proc.stderr
    runs = sorted((ROOT / "runs" / "demo" / "lightning_logs").glob("version_*/report.json"), key=os.path.getmtime)
    result = json.loads(runs[-1].read_text())
    kept, new = result["preserved"], result["new_task"]
    row = re.search(r"configs/demo.yaml` \| 100 % -> \*\*([\d.]+) %\*\* \| 0 % -> \*\*([\d.]+) %\*\*", README)
    assert (kept["n"], new["n"]) == (200, 300)  # the test sizes the README states
    assert (round(100 * kept["after"], 1), round(100 * new["after"], 1)) == (float(row[1]), float(row[2]))
