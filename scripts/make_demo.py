"""Build the offline demo: a tiny Llama that knows a synthetic translation language, plus its data.

Writes into ``assets/demo/`` (seeded, deterministic on one machine):

- ``model/``: a word-level ``PreTrainedTokenizerFast`` and a small ``LlamaForCausalLM`` pretrained here on
  (a) the capability to keep, "translation": every source word maps to one target word and the first
  word moves to the end (``translate : tasu rili niba =`` -> ``fimog lifim bafar``), and (b) plain text
  in the new task's vocabulary (SCAN-like commands alone, action sequences alone), so the words exist
  but the command -> action mapping does not;
- ``translation/{train,validation,test}.jsonl`` (prompt/response) and ``translation/calibration.jsonl``:
  label-free calibration text, 256 prompts each followed by the pretrained model's *own* greedy
  continuation (no reference translation is read). No validation or test prompt starts with the same
  two source words as a calibration prompt, so held-out prompts never share a long identical prefix
  with calibration text;
- ``scan/{train,validation,test}.jsonl``: the new task, ``command : jump twice and walk left =`` ->
  ``JUMP JUMP LTURN WALK``, split by command;
- ``pretrain.json``: the pretraining settings, wall time and translation exact match on the test split.

Run: ``python scripts/make_demo.py`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fora_lightning.llm.generation import evaluate_exact_match, generate_greedy

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TAGS = ["translate", "command", ":", "="]
N_LEXICON = 32
MIN_WORDS, MAX_WORDS = 3, 8
PREFIX_WORDS = 2  # held-out prompts never share their first PREFIX_WORDS source words with a calibration prompt

VERBS = {"jump": "JUMP", "walk": "WALK", "run": "RUN", "look": "LOOK"}
TURNS = {"left": "LTURN", "right": "RTURN"}
REPEATS = {"twice": 2, "thrice": 3}
CONNECTIVES = ["and", "after"]


# ----------------------------------------------------------------------------------- the two tasks
def make_lexicon(rng: random.Random) -> dict[str, str]:
    """32 made-up source words (CVCV) mapped one-to-one to made-up target words (CVCVC)."""
    cons, vows = "bdfgklmnprstvz", "aeiou"
    cvcv = ["".join(p) for p in itertools.product(cons, vows, cons, vows)]
    cvcvc = ["".join(p) for p in itertools.product(cons, vows, cons, vows, cons)]
    return dict(zip(rng.sample(cvcv, N_LEXICON), rng.sample(cvcvc, N_LEXICON)))


def translate(words: list[str], lexicon: dict[str, str]) -> list[str]:
    """Word-by-word lexicon lookup, then the first word moves to the end."""
    mapped = [lexicon[w] for w in words]
    return mapped[1:] + mapped[:1]


def translation_prompt(words: list[str]) -> str:
    return "translate : " + " ".join(words) + " ="


def random_sentence(rng: random.Random, source_words: list[str]) -> list[str]:
    return [rng.choice(source_words) for _ in range(rng.randint(MIN_WORDS, MAX_WORDS))]


def scan_phrases() -> list[tuple[str, list[str]]]:
    """Every ``verb [left|right] [twice|thrice]`` phrase with its actions."""
    phrases = []
    for verb, turn, rep in itertools.product(VERBS, [None, *TURNS], [None, *REPEATS]):
        words = [verb] + ([turn] if turn else []) + ([rep] if rep else [])
        unit = ([TURNS[turn]] if turn else []) + [VERBS[verb]]
        phrases.append((" ".join(words), unit * (REPEATS[rep] if rep else 1)))
    return phrases


def scan_commands() -> list[tuple[str, str]]:
    """All commands ``P``, ``P and P`` (in order) and ``P after P`` (second phrase first): 2,628 pairs."""
    phrases = scan_phrases()
    pairs = [(c, a) for c, a in phrases]
    for (c1, a1), (c2, a2) in itertools.product(phrases, phrases):
        pairs.append((f"{c1} and {c2}", a1 + a2))
        pairs.append((f"{c1} after {c2}", a2 + a1))
    return [(c, " ".join(a)) for c, a in pairs]


def scan_prompt(command: str) -> str:
    return "command : " + command + " ="


# ----------------------------------------------------------------------------------- data files
def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def translation_splits(rng: random.Random, lexicon: dict[str, str], n_calib: int, n_heldout: int, n_train: int):
    """Calibration prompts, held-out validation/test pairs with disjoint 2-word prefixes, and train pairs."""
    source = sorted(lexicon)
    calib, calib_prefixes, seen = [], set(), set()
    while len(calib) < n_calib:
        s = random_sentence(rng, source)
        if tuple(s) not in seen:
            seen.add(tuple(s))
            calib.append(s)
            calib_prefixes.add(tuple(s[:PREFIX_WORDS]))
    heldout = []
    while len(heldout) < 2 * n_heldout:
        s = random_sentence(rng, source)
        if tuple(s[:PREFIX_WORDS]) not in calib_prefixes and tuple(s) not in seen:
            seen.add(tuple(s))
            heldout.append(s)
    train = []
    while len(train) < n_train:
        s = random_sentence(rng, source)
        if tuple(s) not in seen:
            train.append(s)

    def pairs(sents: list[list[str]]) -> list[dict[str, str]]:
        return [{"prompt": translation_prompt(s), "response": " ".join(translate(s, lexicon))} for s in sents]

    return (
        [translation_prompt(s) for s in calib],
        pairs(heldout[:n_heldout]),
        pairs(heldout[n_heldout:]),
        pairs(train),
        seen,
    )


def scan_splits(rng: random.Random, n_val: int, n_test: int) -> tuple[list, list, list]:
    pairs = scan_commands()
    rng.shuffle(pairs)
    records = [{"prompt": scan_prompt(c), "response": a} for c, a in pairs]
    return records[n_val + n_test :], records[:n_val], records[n_val : n_val + n_test]


# ----------------------------------------------------------------------------------- tokenizer and model
def build_tokenizer(lexicon: dict[str, str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over every word of both tasks; ``<s>`` is prepended to every text."""
    scan_words = [*VERBS, *TURNS, *REPEATS, *CONNECTIVES, *VERBS.values(), *TURNS.values()]
    words = SPECIALS + TAGS + sorted(lexicon) + sorted(lexicon.values()) + scan_words
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", words.index("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_model(tokenizer: PreTrainedTokenizerFast, hidden: int, layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def encode_batch(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> dict[str, torch.Tensor]:
    """``<s> text </s>``, right-padded; loss on every real token (plain language modelling)."""
    enc = tokenizer([t + " " + tokenizer.eos_token for t in texts], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def pretraining_texts(
    rng: random.Random, lexicon: dict[str, str], exclude: set, scan_pool: list[tuple[str, str]], n: int
):
    """A batch of pretraining lines: 70% translation pairs, 15% commands alone, 15% action sequences alone."""
    source = sorted(lexicon)
    texts = []
    for _ in range(n):
        u = rng.random()
        if u < 0.7:
            s = random_sentence(rng, source)
            while tuple(s) in exclude:
                s = random_sentence(rng, source)
            texts.append(translation_prompt(s) + " " + " ".join(translate(s, lexicon)))
        else:
            command, actions = rng.choice(scan_pool)
            texts.append(command if u < 0.85 else actions)
    return texts


def pretrain(model, tokenizer, lexicon, exclude, scan_pool, rng, steps: int, batch_size: int, lr: float) -> None:
    """AdamW with linear warmup and cosine decay; prints the loss now and then."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    model.train()
    for step in range(steps):
        batch = encode_batch(tokenizer, pretraining_texts(rng, lexicon, exclude, scan_pool, batch_size))
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # deterministic, and faster than 2 threads on a busy 2-core machine
    rng = random.Random(args.seed)
    lexicon = make_lexicon(rng)
    calib, t_val, t_test, t_train, t_seen = translation_splits(rng, lexicon, n_calib=256, n_heldout=200, n_train=2000)
    s_train, s_val, s_test = scan_splits(rng, n_val=200, n_test=300)
    out: Path = args.out
    for name, records in {
        "translation/validation.jsonl": t_val,
        "translation/test.jsonl": t_test,
        "translation/train.jsonl": t_train,
        "scan/train.jsonl": s_train,
        "scan/validation.jsonl": s_val,
        "scan/test.jsonl": s_test,
    }.items():
        write_jsonl(out / name, records)

    tokenizer = build_tokenizer(lexicon)
    model = build_model(tokenizer, args.hidden, args.layers)
    # Commands and action sequences appear as plain text; held-out translation sentences never do.
    scan_pool = [(r["prompt"][len("command : ") : -len(" =")], r["response"]) for r in s_train]
    start = time.perf_counter()
    pretrain(model, tokenizer, lexicon, t_seen, scan_pool, rng, args.steps, args.batch_size, args.lr)
    wall = time.perf_counter() - start

    test_prompts = [r["prompt"] for r in t_test]
    test_answers = [r["response"] for r in t_test]
    translation_em = evaluate_exact_match(model, tokenizer, test_prompts, test_answers).accuracy
    scan_em = evaluate_exact_match(
        model, tokenizer, [r["prompt"] for r in s_test], [r["response"] for r in s_test]
    ).accuracy
    print(f"translation exact match (test): {translation_em:.3f}   scan exact match (test): {scan_em:.3f}")
    # Label-free calibration: the capability's prompts with the model's own continuations.
    continuations = generate_greedy(model, tokenizer, calib)
    write_jsonl(
        out / "translation/calibration.jsonl", [{"prompt": p, "response": c} for p, c in zip(calib, continuations)]
    )

    model.generation_config.do_sample = False
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    summary = {
        "seed": args.seed,
        "model": {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "parameters": model.num_parameters()},
        "pretraining": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "wall_s": round(wall, 1)},
        "translation_exact_match_test": translation_em,
        "scan_exact_match_test": scan_em,
    }
    (out / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
