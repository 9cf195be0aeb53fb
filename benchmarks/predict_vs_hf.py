"""kiln predict against the transformers pipeline: the same exported model, the same inputs.

Reproduce (from the repository root)::

    kiln train sequence ../shared/data/glue/SST-2 -n sst2-minilm --init models/all-MiniLM-L6-v2 --epochs 1
    kiln train token ../shared/data/conll2003 -n ner-minilm --init models/all-MiniLM-L6-v2
    .venv/bin/python benchmarks/predict_vs_hf.py --sequence-run runs/sst2-minilm \\
        --token-run runs/ner-minilm --out predict_vs_hf.json

Two datasets, each with the run of its task (either may be left out):

* SST-2 ``dev.tsv`` (872 sentences) with a ``sequence`` run against
  ``pipeline("text-classification", model=RUN/model, device=-1, dtype=float32)``, called with
  ``truncation=True`` (without it a text past 512 tokens is an error; none of SST-2's is that long).
* CoNLL-2003 ``valid.txt`` (3,250 sentences) with a ``token`` run against
  ``pipeline("token-classification", ..., aggregation_strategy="first")``. The pipeline gets the text
  kiln's offsets point into: each sentence's CoNLL tokens joined by single spaces (what ``kiln
  predict --json`` reports ``start``/``end`` in). ``first`` is the strategy that matches kiln: a
  word's tag and score come from its first sub-token, an entity's score is the mean of its words'.
  (``simple`` tags every sub-token on its own, pieces kiln neither trains nor reads.)

Contenders, each in its own process (``workers.py``), one after the other:

* ``kiln``: ``kiln.load(RUN, precision="fp32")`` (the default), one warm-up ``predict`` of 64
  inputs, then timed what ``kiln predict RUN FILE --json`` does after loading: read the file,
  ``predict_dataset``, ``task.format`` (length-sorted token-budget batches; printing excluded).
* ``--kiln-variants bf16,compile``: kiln again in bf16 (``--precision bf16``: for CPUs with native
  bf16, AMX or AVX512-BF16, and GPUs) and with ``--compile on`` (fp32), each compared with kiln's
  fp32 outputs; the summary names the fastest kiln path against the pipeline's best.
* ``hf-pipeline`` at each ``--batch-sizes`` (1, 8, 32, 64): the pipeline built (not timed), one
  warm-up call on 64 inputs, then timed: read the file (the same parsing rules as kiln's reader) and
  one pipeline call on the whole list with ``batch_size`` (file-order batches padded to their longest).

Examples/s counts inputs (sentences) over that timed time; the table also shows how much of it was
reading the file. The goal: kiln ≥ 2x the pipeline at its best batch size. Every worker hashes its
input texts and the run stops if they differ from the others'.

Identical outputs, per pipeline row against kiln: sequence, the share of inputs with the same label
and the largest |score difference|; token, the share of sentences whose entity lists are the same
(type, start, end, hence the same words of the text) and the largest |score difference| over the
entities both found that hold no word the pipeline splits (those are printed apart: the pipeline
averages the pieces of such a word as words). Known reasons for differences, counted in the printout:

* Words with inner punctuation (CoNLL's ``1996-08-30``, ``Al-Ain``, ``'s``): kiln tags CoNLL tokens,
  each from its first sub-token, as it trained. The pipeline's ``first`` starts a new word at every
  sub-token without the ``##`` prefix, so ``Al-Ain`` becomes three words (``al``, ``-``, ``ain``),
  each tagged from a sub-token kiln never reads; an entity's end or type can differ there. The
  pipeline's ``is_split_into_words=True`` does not change this (it still cuts words at ``##``).
* ``word``: the pipeline's is its sub-tokens decoded (lowercased by an uncased tokenizer such as
  MiniLM's, spaces around punctuation); kiln's is the text between ``start`` and ``end``. Entities
  are therefore compared by span; the share with identical ``word`` strings is printed apart.
* Length: the pipeline truncates at the tokenizer's ``model_max_length`` (512) and drops the rest;
  kiln windows a long token input and predicts every word (and truncates a sequence input at its
  ``max_length``). No SST-2 or CoNLL-2003 input is that long; the printout counts them.
* Byte-level BPE (RoBERTa, GPT-2) tokenizers, not MiniLM's: kiln gives every word a leading space,
  the pipeline's text has none before its first word, so the first word's sub-tokens may differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workers import run_worker, serve_worker

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_SST2 = DATA / "glue" / "SST-2" / "dev.tsv"
DEFAULT_CONLL = DATA / "conll2003" / "valid.txt"
GOAL = 2.0  # kiln's examples/s over the pipeline's at its best batch size
WARMUP = 64  # inputs in each contender's warm-up call


# -- inputs (shared by the workers and the comparison) --------------------------------------------
def sst2_texts(path: str | Path) -> list[str]:
    """The ``sentence`` column of a GLUE TSV (split on tabs only, as kiln reads it)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    column = lines[0].split("\t").index("sentence")
    return [line.split("\t")[column] for line in lines[1:] if line.strip()]


def conll_texts(path: str | Path) -> list[str]:
    """Each CoNLL sentence as its tokens (first column) joined by spaces: a blank or ``-DOCSTART-``
    line ends a sentence, as in kiln's reader."""
    sentences, words = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("-DOCSTART-"):
            if words:
                sentences.append(" ".join(words))
            words = []
            continue
        words.append(line.split()[0])
    if words:
        sentences.append(" ".join(words))
    return sentences


def texts_of(task: str, path: str | Path, limit: int | None) -> list[str]:
    texts = sst2_texts(path) if task == "sequence" else conll_texts(path)
    return texts[:limit] if limit else texts


def digest(texts: list[str]) -> str:
    """A short hash of the inputs, to check that every contender saw the same ones."""
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


# -- workers -------------------------------------------------------------------------------------
def run_kiln(spec: dict) -> dict:
    import kiln

    model = kiln.load(spec["run"], precision=spec.get("precision", "fp32"), compile=spec.get("compile", "off"))
    model.predict(texts_of(spec["task"], spec["data"], spec["limit"])[:WARMUP])  # thread pools, allocations
    start = time.perf_counter()
    dataset = model.read(spec["data"], labelled=False)
    if spec["limit"]:
        dataset = dataclasses.replace(dataset, examples=dataset.examples[:spec["limit"]])
    read_seconds = time.perf_counter() - start
    outputs = model.task.format(model.predict_dataset(dataset), dataset)
    seconds = time.perf_counter() - start
    if spec["task"] == "sequence":
        texts = [ex["texts"][0] for ex in dataset.examples]
    else:
        texts = [" ".join(ex["words"]) for ex in dataset.examples]
    lengths = [len(ids) for ids in model.tokenizer(texts)["input_ids"]]
    return {"seconds": seconds, "read_seconds": read_seconds, "outputs": outputs, "digest": digest(texts),
            "batch": f"<={model.batch_tokens} tok", "max_length": model.max_length,
            "over_length": [i for i, n in enumerate(lengths) if n > model.max_length]}


def pipeline_split_words(tokenizer: Any, text: str) -> list[list[int]]:
    """The ``[start, end)`` of each space-separated word that the token-classification pipeline
    cuts into several words: it starts a word at every sub-token the tokenizer does not mark as a
    continuation (the ``##`` prefix; a fallback heuristic for tokenizers without one)."""
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    prefix = getattr(tokenizer.backend_tokenizer.model, "continuing_subword_prefix", None)
    starts = set()
    for token_id, (begin, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        token = tokenizer.convert_ids_to_tokens(token_id)
        # The pipeline's own tests (gather_pre_entities): "##" marks a continuation, else a heuristic.
        subword = (len(token) != len(text[begin:end]) if prefix
                   else begin > 0 and " " not in text[begin - 1:begin + 1])
        subword = subword and token_id != tokenizer.unk_token_id  # [UNK] always starts a word
        if not subword:
            starts.add(begin)
    spans, position = [], 0
    for word in text.split(" "):
        if any(position < s < position + len(word) for s in starts):
            spans.append([position, position + len(word)])
        position += len(word) + 1
    return spans


def run_pipeline(spec: dict) -> dict:
    import torch
    import transformers
    from transformers import pipeline

    transformers.logging.set_verbosity_error()
    model_dir = str(Path(spec["run"]) / "model")
    if spec["task"] == "sequence":
        pipe = pipeline("text-classification", model=model_dir, device=-1, dtype=torch.float32)
        call: dict[str, Any] = {"truncation": True}
    else:
        pipe = pipeline("token-classification", model=model_dir, device=-1, dtype=torch.float32,
                        aggregation_strategy=spec["aggregation"])
        call = {}
    batch_size = spec["batch_size"]
    pipe(texts_of(spec["task"], spec["data"], spec["limit"])[:WARMUP], batch_size=batch_size, **call)
    start = time.perf_counter()
    texts = texts_of(spec["task"], spec["data"], spec["limit"])
    read_seconds = time.perf_counter() - start
    raw = pipe(texts, batch_size=batch_size, **call)
    seconds = time.perf_counter() - start
    if spec["task"] == "sequence":
        outputs: list[Any] = [{"label": r["label"], "score": float(r["score"])} for r in raw]
    else:  # numpy scalars to plain numbers, for JSON
        outputs = [[{"entity_group": g["entity_group"], "score": float(g["score"]), "word": g["word"],
                     "start": int(g["start"]), "end": int(g["end"])} for g in groups] for groups in raw]
    tokenizer = pipe.tokenizer
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    result = {"seconds": seconds, "read_seconds": read_seconds, "outputs": outputs, "digest": digest(texts),
              "batch": str(batch_size),
              "max_length": tokenizer.model_max_length,
              "over_length": [i for i, n in enumerate(lengths) if n > tokenizer.model_max_length]}
    if spec["task"] == "token":
        result["split_words"] = [pipeline_split_words(tokenizer, text) for text in texts]
    return result


# -- comparison ----------------------------------------------------------------------------------
def compare_sequence(kiln: list[dict], other: list[dict]) -> dict:
    pairs = list(zip(kiln, other, strict=True))
    return {"agreement": sum(a["label"] == b["label"] for a, b in pairs) / len(pairs),
            "max_score_diff": max(abs(a["score"] - b["score"]) for a, b in pairs)}


def span_key(group: dict) -> tuple[str, int, int]:
    return group["entity_group"], group["start"], group["end"]


def overlaps(start: int, end: int, spans: list[list[int]]) -> bool:
    return any(s < end and start < e for s, e in spans)


def compare_token(texts: list[str], kiln: list[list[dict]], other: dict) -> dict:
    """Entity lists compared by span. Scores are compared on the entities both found, apart for those
    holding a word the pipeline splits: there its entity score averages more words than kiln's."""
    same = matched = same_words = 0
    diff = diff_split = 0.0
    differing = []
    for index, (text, ours, theirs) in enumerate(zip(texts, kiln, other["outputs"], strict=True)):
        assert all(g["word"] == text[g["start"]:g["end"]] for g in ours), "kiln's word is not its span"
        if [span_key(g) for g in ours] == [span_key(g) for g in theirs]:
            same += 1
        else:
            differing.append(index)
        by_key = {span_key(g): g for g in theirs}
        for group in ours:
            twin = by_key.get(span_key(group))
            if twin is None:
                continue
            matched += 1
            same_words += group["word"] == twin["word"]  # kiln's: the text; the pipeline's: decoded sub-tokens
            delta = abs(group["score"] - twin["score"])
            if overlaps(group["start"], group["end"], other["split_words"][index]):
                diff_split = max(diff_split, delta)
            else:
                diff = max(diff, delta)
    return {"agreement": same / len(texts), "max_score_diff": diff, "max_score_diff_split_words": diff_split,
            "entities_both_found": matched, "word_agreement": same_words / max(matched, 1),
            "differing": differing}


def explain_token(texts: list[str], kiln: list[list[dict]], other: dict, over_length: set[int]) -> dict:
    """Sort the sentences whose entity lists differ by cause: every differing entity touches a word
    the pipeline splits; the input is past a length limit; neither (unexplained)."""
    counts = {"split_words": 0, "over_length": 0, "unexplained": 0}
    examples = []
    for index in other["differing"]:
        ours, theirs = kiln[index], other["outputs"][index]
        changed = set(map(span_key, ours)) ^ set(map(span_key, theirs))
        spans = other["split_words"][index]
        if index in over_length:
            cause = "over_length"
        elif changed and all(overlaps(start, end, spans) for _, start, end in changed):
            cause = "split_words"
        else:
            cause = "unexplained"
        counts[cause] += 1
        if len(examples) < 3:
            examples.append({"index": index, "cause": cause, "text": texts[index],
                             "kiln": [list(k) for k in map(span_key, ours)],
                             "pipeline": [list(k) for k in map(span_key, theirs)]})
    return {**counts, "examples": examples}


def bench(name: str, task: str, run: str, data: Path, args: argparse.Namespace) -> dict:
    """Run every contender on one dataset, print its table, return its summary."""
    texts = texts_of(task, data, args.limit)
    common = {"task": task, "run": run, "data": str(data), "limit": args.limit, "aggregation": args.aggregation}
    rows = [{"contender": "kiln", **run_worker(__file__, {**common, "contender": "kiln", "label": f"{name} kiln"})}]
    for variant in args.kiln_variants:  # kiln's faster paths: bf16 (native-bf16 CPUs, GPUs), torch.compile
        spec = {**common, "contender": "kiln", "label": f"{name} kiln {variant}",
                **({"precision": "bf16"} if variant == "bf16" else {"compile": "on"})}
        rows.append({"contender": f"kiln-{variant}", **run_worker(__file__, spec)})
    for size in args.batch_sizes:
        spec = {**common, "contender": "hf-pipeline", "batch_size": size, "label": f"{name} hf-pipeline b={size}"}
        rows.append({"contender": "hf-pipeline", "batch_size": size, **run_worker(__file__, spec)})
    for row in rows:
        if row["digest"] != digest(texts):
            raise SystemExit(f"{name}: {row['contender']} read other inputs than the comparison")
        row["examples_per_s"] = len(texts) / row["seconds"]
    kiln = rows[0]
    variants = [r for r in rows[1:] if r["contender"].startswith("kiln-")]
    pipes = [r for r in rows[1:] if r["contender"] == "hf-pipeline"]
    best = max(pipes, key=lambda r: r["examples_per_s"])
    for row in pipes + variants:
        if task == "sequence":
            row.update(compare_sequence(kiln["outputs"], row["outputs"]))
        elif row in pipes:
            row.update(compare_token(texts, kiln["outputs"], row))
        else:  # a kiln variant against kiln in fp32: the same reader, so entity lists compare directly
            same = sum([span_key(g) for g in a] == [span_key(g) for g in b]
                       for a, b in zip(kiln["outputs"], row["outputs"], strict=True))
            row["agreement"] = same / len(texts)
    ratio = kiln["examples_per_s"] / best["examples_per_s"]
    fastest = max([kiln, *variants], key=lambda r: r["examples_per_s"])
    fastest_ratio = fastest["examples_per_s"] / best["examples_per_s"]

    unit = "sentences" if task == "sequence" else "sentences (CoNLL)"
    print(f"\n{name}: {data} ({len(texts)} {unit}), run {run}")
    print(f"{'contender':<12} {'batch':>14} {'examples/s':>11} {'vs best pipe':>13} {'of it, read':>12} "
          f"{'same as kiln':>13} {'max |Δscore|':>13}")
    for row in rows:
        agree = f"{row['agreement']:.2%}" if "agreement" in row else "—"
        delta = f"{row['max_score_diff']:.1e}" if "max_score_diff" in row else "—"
        print(f"{row['contender']:<12} {row['batch']:>14} {row['examples_per_s']:>11.1f} "
              f"{row['examples_per_s'] / best['examples_per_s']:>12.2f}x {row['read_seconds']:>11.3f}s "
              f"{agree:>13} {delta:>13}")
    verdict = "met" if ratio >= GOAL else f"MISSED by {1 - ratio / GOAL:.0%}"
    print(f"goal kiln >= {GOAL:.0f}x the pipeline's best (batch {best['batch_size']}): {ratio:.2f}x, {verdict}")
    if variants:
        print(f"fastest kiln path ({fastest['contender']}): {fastest_ratio:.2f}x the pipeline's best")
    what = "labels" if task == "sequence" else "entity lists (type, start, end)"
    print(f"'same as kiln': share of inputs with the same {what}; max |Δscore| over "
          f"{'all inputs' if task == 'sequence' else 'the entities both found that hold no word the pipeline splits'}")

    over = set(kiln["over_length"]) | set(best["over_length"])
    summary: dict[str, Any] = {
        "data": str(data), "run": run, "n": len(texts), "goal": GOAL, "ratio_vs_best": ratio,
        "goal_met": ratio >= GOAL, "best_pipeline_batch_size": best["batch_size"],
        "fastest_kiln": fastest["contender"], "fastest_ratio_vs_best": fastest_ratio,
        "over_length": {"kiln_max_length": kiln["max_length"], "kiln": len(kiln["over_length"]),
                        "pipeline_max_length": best["max_length"], "pipeline": len(best["over_length"])},
        "contenders": [{k: v for k, v in row.items() if k not in ("outputs", "split_words", "differing")}
                       for row in rows],
    }
    print(f"inputs past kiln's max_length {kiln['max_length']}: {len(kiln['over_length'])}"
          f" ({'windowed' if task == 'token' else 'truncated'}); past the pipeline's "
          f"{best['max_length']}: {len(best['over_length'])} (truncated, the rest unpredicted)")
    if task == "token":
        causes = explain_token(texts, kiln["outputs"], best, over)
        summary["differences"] = causes
        split = sum(bool(spans) for spans in best["split_words"])
        print(f"entity lists differ in {len(best['differing'])} of {len(texts)} sentences (batch "
              f"{best['batch_size']}): {causes['split_words']} at a word the pipeline splits (e.g. "
              f"'Al-Ain' -> al, -, ain, each tagged from a sub-token kiln never reads; {split} sentences "
              f"hold such a word), {causes['over_length']} past a length limit, "
              f"{causes['unexplained']} otherwise")
        for example in causes["examples"]:
            print(f"  [{example['index']}] {example['cause']}: {example['text'][:100]!r}\n"
                  f"      kiln {example['kiln']}\n      pipe {example['pipeline']}")
        print(f"max |Δscore| over the entities both found that hold a word the pipeline splits: "
              f"{best['max_score_diff_split_words']:.1e} (the pipeline averages the pieces as words)")
        print(f"'word' strings identical: {best['word_agreement']:.2%} of the {best['entities_both_found']} entities "
              "both found (the pipeline's is its sub-tokens decoded: lowercased by an uncased tokenizer, "
              "spaces around punctuation; kiln's is the text of the span)")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequence-run", help="a trained kiln sequence run on SST-2 (runs/NAME)")
    parser.add_argument("--token-run", help="a trained kiln token run on CoNLL-2003 (runs/NAME)")
    parser.add_argument("--sst2", type=Path, default=DEFAULT_SST2, help="SST-2 dev.tsv")
    parser.add_argument("--conll", type=Path, default=DEFAULT_CONLL, help="CoNLL-2003 valid.txt")
    parser.add_argument("--limit", type=int, default=None, help="only the first N inputs (a smoke test)")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64],
                        help="the pipeline's batch sizes, comma-separated (default 1,8,32,64)")
    parser.add_argument("--aggregation", default="first", choices=["simple", "first", "average", "max"],
                        help="the token pipeline's aggregation_strategy (default first: kiln's rule)")
    parser.add_argument("--kiln-variants", type=lambda s: [v for v in s.split(",") if v], default=[],
                        help="kiln's faster paths to time too, comma-separated: bf16, compile")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        serve_worker(args.worker, {"kiln": run_kiln, "hf-pipeline": run_pipeline})
        return
    if not args.sequence_run and not args.token_run:
        parser.error("give --sequence-run, --token-run or both")
    results: dict[str, Any] = {
        "command": " ".join(sys.argv), "cpu_count": os.cpu_count(), "processor": platform.processor(),
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers", "kiln-nlp")},
    }
    if args.sequence_run:
        results["sst2"] = bench("SST-2 dev", "sequence", args.sequence_run, args.sst2, args)
    if args.token_run:
        results["conll"] = bench("CoNLL-2003 valid", "token", args.token_run, args.conll, args)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
