"""Import boundaries: ``core`` runs with torch + safetensors only; the public names load their stacks on first use.

Each boundary is checked in a fresh interpreter in which the forbidden packages look uninstalled: a meta-path
finder, installed before anything else is imported, refuses them, and their distribution metadata is hidden.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("lightning", "lightning_fabric", "lightning_utilities", "pytorch_lightning", "torchmetrics", "tqdm")
HF = ("transformers", "datasets", "huggingface_hub", "tokenizers", "peft", "accelerate")

BLOCKER = """
import importlib.abc, importlib.metadata, sys
BLOCKED = set({blocked!r})

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by tests/test_imports.py)", name=name)
        return None

sys.meta_path.insert(0, Blocked())
_from_name = importlib.metadata.Distribution.from_name.__func__

def _hidden(cls, name):  # also hide the distributions (torchmetrics decides on installed metadata)
    if name.replace("-", "_").lower() in BLOCKED:
        raise importlib.metadata.PackageNotFoundError(name)
    return _from_name(cls, name)

importlib.metadata.Distribution.from_name = classmethod(_hidden)

def loaded():
    return sorted({{n.split(".")[0] for n in sys.modules}} & BLOCKED)
"""


def run_isolated(body: str, blocked: tuple[str, ...]) -> dict:
    """Run ``body`` in a fresh interpreter with ``blocked`` unimportable; it prints one JSON object, returned."""
    code = BLOCKER.format(blocked=sorted(blocked)) + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_imports_and_runs_with_torch_and_safetensors_only():
    out = run_isolated(
        """
        import importlib, json, pkgutil
        try:
            import tqdm
            blocker_works = False
        except ImportError:
            blocker_works = True

        import torch
        from torch import nn
        import fora_lightning.core
        names = sorted(m.name for m in pkgutil.iter_modules(fora_lightning.core.__path__, "fora_lightning.core."))
        for name in names:
            importlib.import_module(name)

        from fora_lightning.core.covariance import collect_covariances
        from fora_lightning.core.projection import project
        from fora_lightning.core.subspace import SubspaceConfig, estimate_subspaces
        from fora_lightning.core.targets import find_targets
        from fora_lightning.core.reference import dense_pi

        gen = torch.Generator().manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4))
        mix = torch.randn(3, 8, generator=gen)  # layer-0 inputs span 3 of 8 directions
        batches = [torch.randn(5, 3, generator=gen) @ mix for _ in range(4)]
        targets = find_targets(model, ["0"])
        cov = collect_covariances(model, targets, batches, model, dtype=torch.float64)
        subs = estimate_subspaces({"0": model[0].weight.detach()}, SubspaceConfig(rank=3, weight_rank=2), cov)
        sub = subs["0"]
        x = torch.cat(batches).double()
        q = sub.basis.double()
        g = torch.randn(6, 8, generator=gen)
        pi = project(g, sub.basis, sub.u, sub.v, complement=sub.complement).double()
        ref = dense_pi(g.double(), q, sub.u.double(), sub.v.double())
        print(json.dumps({
            "blocker_works": blocker_works,
            "modules": names,
            "loaded": loaded(),
            "compat": "fora_lightning._compat" in sys.modules,
            "k": sub.k,
            "span_residual": float((x - (x @ q) @ q.T).norm() / x.norm()),
            "pi_error": float((pi - ref).norm() / ref.norm()),
        }))
        """,
        FRAMEWORKS + HF,
    )
    assert out["blocker_works"]
    expected = sorted(
        f"fora_lightning.core.{p.stem}" for p in (ROOT / "fora_lightning" / "core").glob("*.py") if p.stem != "__init__"
    )
    assert out["modules"] == expected
    assert out["loaded"] == [] and not out["compat"]
    assert out["k"] == 3
    assert out["span_residual"] < 1e-5  # the basis spans the calibration inputs
    assert out["pi_error"] < 1e-5  # the projection equals the dense float64 reference


def test_callbacks_import_without_the_hf_stack_and_the_llm_names_load_it_on_first_use():
    out = run_isolated(
        """
        import json
        import fora_lightning
        after_import = sorted({n.split(".")[0] for n in sys.modules} & {"torch", "lightning", "transformers", "datasets"})
        listed = set(fora_lightning.__all__) <= set(dir(fora_lightning))
        fora_lightning.FORA, fora_lightning.ForaModule, fora_lightning.ForaLoRA, fora_lightning.merge_lora
        import fora_lightning.lora, fora_lightning.baselines
        fora_lightning.lora.inject_fora_lora, fora_lightning.baselines.L2SP, fora_lightning.baselines.TrainTargetsOnly
        after_callbacks = loaded()
        try:
            fora_lightning.CausalLMModule
            llm = "imported"
        except ImportError as e:
            llm = e.name
        print(json.dumps({"after_import": after_import, "listed": listed, "after_callbacks": after_callbacks, "llm": llm}))
        """,
        HF,
    )
    assert out["after_import"] == []  # not even torch: `import fora_lightning` is free
    assert out["listed"]
    assert out["after_callbacks"] == []  # FORA, ForaModule, ForaLoRA and the baselines need no HF package
    assert out["llm"] == "transformers"  # touching CausalLMModule is what imports transformers


def test_touching_causal_lm_and_text_data_imports_transformers_and_datasets():
    out = run_isolated(
        """
        import json
        import fora_lightning
        seen = {}
        for name in ("FORA", "CausalLMModule", "TextDataModule"):
            getattr(fora_lightning, name)
            seen[name] = "datasets" in sys.modules
        seen["transformers"] = "transformers" in sys.modules
        print(json.dumps(seen))
        """,
        (),
    )
    # Lightning's own torchmetrics imports transformers when it is installed, so only `datasets` separates FORA here.
    assert out == {"FORA": False, "CausalLMModule": False, "TextDataModule": True, "transformers": True}


LAZY_PACKAGES = ("fora_lightning", "fora_lightning.llm", "fora_lightning.lora", "fora_lightning.baselines")


def _type_checking_imports(package: str) -> dict[str, str]:
    """``name -> module`` of the ``from m import name`` lines inside the package's ``if TYPE_CHECKING:`` block."""
    tree = ast.parse(Path(importlib.import_module(package).__file__).read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                out.update({alias.name: imp.module for alias in imp.names})
    return out


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_exports_match_all_dir_and_the_type_checking_block(package: str):
    pkg = importlib.import_module(package)
    exports = pkg._EXPORTS
    assert list(pkg.__all__) == list(exports)
    assert set(pkg.__all__) <= set(dir(pkg))
    assert _type_checking_imports(package) == dict(exports)
    for name, module in exports.items():
        assert getattr(pkg, name) is getattr(importlib.import_module(module), name)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        pkg.no_such_name  # noqa: B018


def test_submodules_are_attributes_of_their_lazy_package():
    out = run_isolated(
        """
        import json
        import fora_lightning
        first = "fora_lightning.llm.sources" in sys.modules
        sources = fora_lightning.llm.sources
        print(json.dumps({"before": first, "name": sources.__name__, "text_source": sources.TextSource is fora_lightning.TextSource}))
        """,
        (),
    )
    assert out == {"before": False, "name": "fora_lightning.llm.sources", "text_source": True}
