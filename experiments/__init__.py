"""The experiment harness beside the library (not installed with ``fora_lightning``; import it from a clone's root).

``python cli.py compare --config configs/compare_demo.yaml`` runs :func:`experiments.compare.main`: FORA against
plain fine-tuning, LoRA, L2-SP, EWC, matched-k controls and PEFT's peers on one setting
(:mod:`experiments.setting`), with sweeps (:mod:`experiments.sweep`) and the preservation evaluator
(:mod:`experiments.preservation`). Its outputs live in ``results/<setting>/``.
"""
