"""Pretraining objectives on raw text: ``mlm`` (BERT), ``clm`` (GPT) and ``span`` (T5).

All three read a corpus (:mod:`kiln.data.corpus`), tokenize it once into a cached memory-mapped
token stream and train on packed fixed-length blocks (``pretrain.seq_len``) with no padding. The
corruption (masking, span noise) is drawn in ``collate`` from a generator seeded by the batch's block
indices, so a batch is the same whenever it is drawn: evaluation is fixed and ``--resume`` is exact.

A trained run predicts for raw inputs as the matching transformers pipeline does on the exported
model: ``mlm`` fills masks (fill-mask), ``clm`` continues prompts (text-generation) and ``span`` fills
sentinels (text2text), the last two through the generation task's decoding.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar, TextIO

import numpy as np

from kiln.config import setting
from kiln.data.corpus import PackedBlocks, corpus_files, sample_texts, tokenize_corpus, unigram_order
from kiln.errors import KilnError
from kiln.tasks.base import Dataset, Task, generate_parameters, pad_inputs

log = logging.getLogger(__name__)

# Demo examples (kiln.json's "examples") come from the first documents of the corpus, cut to a few words.
EXAMPLE_DOCUMENTS = 5000
EXAMPLE_WORDS = 20


def _is_word(token: str) -> bool:
    """Letters, perhaps with punctuation around them: a sentence mostly of these is plain prose
    (not a WikiText heading ``= = Title = =`` or a table row)."""
    return token.strip(".,;:!?'\"()").isalpha()


def replace_longest_word(words: list[str], replacement: str) -> str:
    """The sentence with its longest word (the first of equals; punctuation around it kept) replaced,
    e.g. by a mask token: a content word rather than "the"."""
    cores = [word.strip(".,;:!?'\"()") for word in words]
    index = max(range(len(words)), key=lambda i: (len(cores[i]) if cores[i].isalpha() else 0, -i))
    replaced = list(words)
    replaced[index] = words[index].replace(cores[index], replacement, 1)
    return " ".join(replaced)


@dataclass
class PretrainSettings:
    """Pretraining objectives (mlm, clm, span) and the corpus pipeline."""

    seq_len: int = setting(128, "Tokens per packed training sequence.", flag="--seq-len", minimum=4)
    mask_prob: float = setting(0.15, "MLM: fraction of tokens selected for prediction.", above=0, maximum=1)
    mask_token_prob: float = setting(0.8, "MLM: of the selected tokens, the fraction replaced by [MASK].",
                                    minimum=0, maximum=1)
    random_token_prob: float = setting(0.1, "MLM: of the selected tokens, the fraction replaced by a random token.",
                                      minimum=0, maximum=1)
    whole_word: bool = setting(False, "MLM: select whole words (all their sub-tokens) instead of single tokens.")
    noise_density: float = setting(0.15, "Span corruption: fraction of tokens corrupted.", above=0, maximum=0.9)
    mean_span: float = setting(3.0, "Span corruption: mean length of a corrupted span.", minimum=1)
    paragraphs: bool = setting(False, "Text corpora: documents are blank-line-separated paragraphs, not lines.")
    max_tokens_per_char: float = setting(
        0.0, "Drop documents with more tokens per character than this (cramming's filter; 0: keep all).",
        minimum=0)
    curriculum: str = setting(
        "none", "Order of the training blocks: none (shuffled each epoch) or unigram (cramming's curriculum: "
        "most to least likely under the corpus's token frequencies, the same order every epoch).",
        choices=("none", "unigram"))
    fill_mask_top_k: int = setting(5, "MLM predict: candidates returned per mask (the fill-mask pipeline's top_k).",
                                   minimum=1)


class PretrainTask(Task):
    """Shared corpus handling; subclasses define blocks, corruption and the loss."""

    suffixes: ClassVar[tuple[str, ...]] = (".txt", ".jsonl", ".gz")
    main_metric: ClassVar[str] = "loss"
    pretraining: ClassVar[bool] = True
    settings_class: ClassVar[type | None] = PretrainSettings
    section: ClassVar[str] = "pretrain"

    def bind(self, tokenizer: Any) -> None:
        super().bind(tokenizer)
        self.special_ids = sorted(set(tokenizer.all_special_ids))  # never masked or corrupted
        self.vocab_size = len(tokenizer)

    def find_splits(self, data: str | Path) -> dict[str, Any]:
        return corpus_files(data)

    def read(self, path: Any, *, labelled: bool = True, stream: TextIO | None = None) -> Dataset:
        """A corpus to evaluate on (``labelled``), or inputs to predict for, one per line."""
        if not labelled:
            return self.read_inputs(path, stream)
        if stream is not None:
            raise KilnError(f"{self.name} models are evaluated on corpus files, not stdin")
        files = [Path(p) for p in path] if isinstance(path, list | tuple) else corpus_files(path)["train"]
        for file in files:
            if not file.is_file():
                raise KilnError("no such file", file)
        return Dataset(str(files[0]), [], extras={"files": files, "part": "all"})

    def holdout(self, train: Dataset) -> tuple[Dataset, Dataset]:
        """No validation files: hold out a deterministic fraction of *documents* while tokenizing."""
        extras = {**train.extras, "holdout": (self.config.data.validation_fraction, self.config.data.split_seed)}
        return (Dataset(train.path, [], extras={**extras, "part": "train"}),
                Dataset(train.path, [], extras={**extras, "part": "validation"}))

    def texts(self, dataset: Dataset) -> Iterator[str]:
        yield from sample_texts(dataset.extras["files"], self.settings.paragraphs)

    def read_inputs(self, path: str | Path, stream: TextIO | None = None) -> Dataset:
        """Inputs to predict for: lines of stdin or of a text file (blank ones skipped), or a JSONL
        file's ``text`` field (``--columns text=KEY`` for another), every row kept for the output."""
        from kiln.data.tables import decoded_lines, parse_columns, read_table, select_columns

        if stream is None and Path(str(path)).suffix.lower() == ".jsonl":
            table = read_table(path, fmt="jsonl")
            records = select_columns(table, {"text": ("text", "inputs", "prompt", "sentence")}, ["text"],
                                     parse_columns(self.config.data.columns))
            for record in records:
                if not isinstance(record["text"], str):
                    raise KilnError("the text must be a string", path, record["_line"])
            examples = [{"text": r["text"], "line": r["_line"]} for r in records]
            return Dataset(str(path), examples, table, extras={"format": "jsonl"})
        examples = [{"text": text, "line": n} for n, text in decoded_lines(path, stream) if text.strip()]
        if not examples:
            raise KilnError("no input lines", path)
        return Dataset(str(path), examples, extras={"format": "lines"})

    def parse_input(self, item: Any, line: int) -> Any:
        """A text (or ``{"text": ...}``): with the mask token (mlm), a prompt (clm), sentinels (span)."""
        text = item.get("text", item.get("inputs")) if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise KilnError(f"expected a text, got {type(text).__name__}", "<input>", line)
        return {"text": text, "line": line}

    # -- demo examples -----------------------------------------------------------------------
    def example_candidates(self, dataset: Dataset, count: int) -> Iterator[list[str]]:
        """The words of one plain short sentence per document of the dataset's corpus part (held-out
        documents when validation was split off), from the first few thousand documents only."""
        import re

        from kiln.data.corpus import holdout_document, iter_documents

        holdout, validation = dataset.extras.get("holdout"), dataset.extras.get("part") == "validation"
        documents = iter_documents(dataset.extras["files"], self.settings.paragraphs)
        for index, (_, _, text) in enumerate(documents):
            if index == EXAMPLE_DOCUMENTS:
                return
            if holdout and holdout_document(index, *holdout) != validation:
                continue
            for sentence in re.split(r"(?<=[.!?])\s+", text[:10_000]):  # a whole book may be one line
                words = sentence.split()
                if 6 <= len(words) <= 40 and sum(map(_is_word, words)) >= 0.8 * len(words):
                    yield words[:EXAMPLE_WORDS]
                    break

    def example_input(self, example: list[str]) -> str | None:
        """A prompt made from a sentence's words (each objective its own); None: none."""
        return None

    # -- blocks ------------------------------------------------------------------------------
    def separator(self, tokenizer: Any) -> int:
        """The token written after every document."""
        for name in ("sep_token_id", "eos_token_id"):
            if getattr(tokenizer, name, None) is not None:
                return getattr(tokenizer, name)
        raise KilnError("the tokenizer has neither a separator nor an end-of-text token")

    def block_layout(self, tokenizer: Any, seq_len: int) -> tuple[int, list[int], list[int]]:
        """``(block length, prefix, suffix)`` of a training block."""
        return seq_len, [], []

    def encode(self, dataset: Dataset, tokenizer: Any, max_length: int) -> Any:
        """Packed blocks of a corpus (training, evaluation), or one feature per input (predict)."""
        if "files" not in dataset.extras:
            return self.encode_inputs(dataset, tokenizer, max_length)
        return self.encode_corpus(dataset, tokenizer, max_length)

    def encode_inputs(self, dataset: Dataset, tokenizer: Any, max_length: int) -> list[dict]:
        """``{"input_ids", "example"}`` per input, tokenized as the matching HF pipeline does (with the
        tokenizer's special tokens, no truncation): too long an input is an error naming its line."""
        encoded = tokenizer([ex["text"] for ex in dataset.examples])
        features = []
        for i, (example, ids) in enumerate(zip(dataset.examples, encoded["input_ids"], strict=True)):
            if len(ids) > max_length:
                raise KilnError(f"the input is {len(ids)} tokens, longer than the model's {max_length}; "
                                "shorten it", dataset.path, example["line"])
            feature = {"input_ids": ids, "example": i}
            if "token_type_ids" in encoded:
                feature["token_type_ids"] = encoded["token_type_ids"][i]
            features.append(feature)
        return features

    def encode_corpus(self, dataset: Dataset, tokenizer: Any, max_length: int) -> Any:
        """The corpus part's packed blocks, tokenized once into the on-disk cache."""
        p = self.config.pretrain
        # Settings errors first: tokenizing a large corpus takes a while.
        if p.seq_len > max_length:
            raise KilnError(f"pretrain.seq_len {p.seq_len} is longer than the model allows ({max_length}: "
                            "train.max_length or the position embeddings)")
        length, prefix, suffix = self.block_layout(tokenizer, p.seq_len)
        holdout = dataset.extras.get("holdout")
        streams = tokenize_corpus(dataset.extras["files"], tokenizer, self.separator(tokenizer),
                                  paragraphs=p.paragraphs, max_tokens_per_char=p.max_tokens_per_char,
                                  holdout=tuple(holdout) if holdout else None)
        stream = streams[dataset.extras["part"]]
        blocks = PackedBlocks(stream.tokens, length, prefix, suffix)
        if len(blocks) == 0:
            raise KilnError(f"corpus has {len(stream.tokens)} tokens, fewer than one {length}-token block",
                            dataset.path)
        dataset.examples = range(len(blocks))  # type: ignore[assignment]  # n counts blocks
        return blocks

    def training_order(self, features: Any) -> np.ndarray | None:
        if self.settings.curriculum == "unigram":
            return unigram_order(features, self.vocab_size)
        return None

    def collate(self, features: Sequence[dict], pad_id: int, epoch: int | None = None) -> dict:
        """Corrupt packed blocks (seeded by the blocks, and by ``epoch`` in training), or pad inputs to
        predict for (features with an ``example``)."""
        if "example" in features[0]:
            return self.collate_inputs(features, pad_id)
        return self.collate_blocks(features, pad_id, epoch)

    def collate_blocks(self, features: Sequence[dict], pad_id: int, epoch: int | None = None) -> dict:
        """A batch of packed blocks with the objective's corruption and targets."""
        raise NotImplementedError

    def collate_inputs(self, features: Sequence[dict], pad_id: int) -> dict:
        """A batch of inputs to predict for; it holds no ``target_keys[0]``, so no loss is computed."""
        raise NotImplementedError

    def collate_training(self, features: Sequence[dict], pad_id: int, epoch: int) -> dict:
        return self.collate_blocks(features, pad_id, epoch=epoch)

    def _rng(self, features: Sequence[dict], epoch: int | None = None) -> np.random.Generator:
        """A generator fixed by the batch's blocks (and, in training, the epoch).

        Evaluation batches (``epoch`` None) are always corrupted the same way, so validation losses
        compare; a training batch gets fresh noise each epoch (dynamic masking), even when a fixed
        curriculum order repeats the same batches.
        """
        indices = np.asarray([f["index"] for f in features], dtype=np.int64)
        key = [self.config.train.seed, zlib.crc32(indices.tobytes())]
        return np.random.default_rng(key if epoch is None else [*key, 1, epoch])

    # -- predictions and metrics -------------------------------------------------------------
    def outputs(self, outputs: Any, batch: dict, model: Any = None) -> list[Any]:
        if self.target_keys[0] in batch:  # evaluation on a corpus: the loss is all there is
            return [None] * len(batch["input_ids"])
        return self.predict_outputs(outputs, batch, model)

    def predict_outputs(self, outputs: Any, batch: dict, model: Any) -> list[Any]:
        """Per-input outputs of a predict batch (top candidates, generated ids)."""
        raise NotImplementedError

    def decode(self, outputs: list[Any], features: list[dict], dataset: Dataset) -> list[Any]:
        if "files" in dataset.extras:  # a corpus: no per-example predictions
            return []
        predictions: list[Any] = [None] * len(dataset.examples)
        for output, feature in zip(outputs, features, strict=True):
            predictions[feature["example"]] = self.decode_input(output, feature, dataset.examples[feature["example"]])
        return predictions

    def decode_input(self, output: Any, feature: dict, example: dict) -> Any:
        """One input's prediction from its output."""
        raise NotImplementedError

    def metrics(self, predictions: list[Any], dataset: Dataset) -> dict[str, float]:
        return {}

    def loss_metrics(self, loss: float) -> dict[str, float]:
        import math

        return {"perplexity": math.exp(min(loss, 700))}

    def format(self, predictions: list[Any], dataset: Dataset) -> list[Any]:
        return predictions

    def write(self, dataset: Dataset, predictions: list[Any], stream: TextIO) -> None:
        """One line per input (the filled-in or generated text), or the JSONL rows with it added."""
        from kiln.data.tables import write_table

        if not predictions:  # a corpus (``evaluate -o``): nothing per example to write
            return
        columns = self.output_columns(predictions, dataset.table.format if dataset.table else "lines")
        if dataset.table is not None:
            write_table(dataset.table, columns, stream)
            return
        (texts,) = columns.values()
        stream.write("".join(text + "\n" for text in texts))


def _stack(features: Sequence[dict]) -> np.ndarray:
    return np.stack([np.asarray(f["input_ids"], dtype=np.int64) for f in features])


# -- mlm -------------------------------------------------------------------------------------
def _components(node: Any) -> Iterator[dict]:
    """Every ``{"type": ...}`` component in a tokenizer.json section (Sequences included)."""
    if isinstance(node, dict):
        if "type" in node:
            yield node
        for value in node.values():
            yield from _components(value)
    elif isinstance(node, list):
        for value in node:
            yield from _components(value)


def word_marker(tokenizer: Any) -> tuple[str, bool]:
    """``(marker, marks word starts)`` of a tokenizer's subword pieces.

    WordPiece (and BPE trained with a prefix) marks continuations (``##``); Metaspace (SentencePiece
    style, also spelled as a ``Replace`` of spaces by ``▁``) and byte-level BPE mark word starts
    (``▁`` / ``Ġ``). Anything else cannot be split into words: a one-line error, not silent
    whole-row masking.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    prefix = spec["model"].get("continuing_subword_prefix")
    if prefix:
        return prefix, False
    for part in ("pre_tokenizer", "normalizer", "decoder"):
        for component in _components(spec.get(part)):
            kind = component["type"]
            if kind == "Metaspace":
                return component.get("replacement", "▁"), True
            if kind == "Replace" and component.get("content") == "▁":
                return "▁", True
            if kind == "ByteLevel":
                return "Ġ", True
    raise KilnError(f"whole-word masking needs a tokenizer that marks word boundaries (WordPiece, "
                    f"SentencePiece or byte-level BPE); this one is {spec['model']['type']} without markers")


def word_continuations(tokenizer: Any) -> np.ndarray:
    """``continues[id]``: token ``id`` continues the previous token's word (for whole-word masking)."""
    marker, marks_starts = word_marker(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    flags = [t.startswith(marker) != marks_starts for t in tokens]
    return np.asarray([f and i not in special for i, f in enumerate(flags)], dtype=bool)


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, *, special_ids: Sequence[int], mask_id: int,
                vocab_size: int, mask_prob: float, mask_token_prob: float = 0.8, random_token_prob: float = 0.1,
                continues: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of ``ids`` (B, T): returns ``(corrupted ids, selected)``, both (B, T).

    Each non-special token (or, with ``continues``, each whole word) is selected with probability
    ``mask_prob``; a selected token becomes ``[MASK]`` (``mask_token_prob``), a random token
    (``random_token_prob``) or stays itself (the rest).
    """
    candidates = ~np.isin(ids, special_ids)
    if continues is None:
        selected = (rng.random(ids.shape) < mask_prob) & candidates
    else:
        # A word starts at every token that does not continue one (or follows a special token).
        previous_special = np.concatenate([np.ones((ids.shape[0], 1), bool), ~candidates[:, :-1]], axis=1)
        starts = ~continues[ids] | previous_special
        word = np.cumsum(starts, axis=1)  # (B, T) word number within the row
        chosen = rng.random((ids.shape[0], ids.shape[1] + 1)) < mask_prob
        selected = np.take_along_axis(chosen, word, axis=1) & candidates
    draw = rng.random(ids.shape)
    corrupted = ids.copy()
    to_mask = selected & (draw < mask_token_prob)
    to_random = selected & (draw >= mask_token_prob) & (draw < mask_token_prob + random_token_prob)
    corrupted[to_mask] = mask_id
    corrupted[to_random] = rng.integers(0, vocab_size, size=int(to_random.sum()))
    return corrupted, selected


def _mlm_parts(model: Any) -> tuple[Any, Any] | None:
    """``(encoder, head)`` of a transformers masked-LM model, for logits at chosen positions only."""
    kind = model.config.model_type
    if kind == "bert":
        return model.bert, model.cls
    if kind in ("roberta", "xlm-roberta", "camembert"):
        return model.roberta, model.lm_head
    if kind == "modernbert":
        return model.model, lambda h: model.decoder(model.head(h))
    if kind == "distilbert":
        return model.distilbert, lambda h: model.vocab_projector(
            model.vocab_layer_norm(model.activation(model.vocab_transform(h))))
    return None


def sparse_mlm_module(model: Any) -> Any:
    """Wrap a masked-LM so the vocabulary projection runs at the masked positions only.

    The projection to a 30k vocabulary is the largest matmul of a small BERT; with 15 % masking
    this saves ~85 % of it (and of the logits' memory). Families without a known head layout fall
    back to full logits, gathered at the same positions.
    """
    import torch

    class SparseMaskedLM(torch.nn.Module):
        def __init__(self, inner: Any):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, masked_positions: Any, token_type_ids: Any = None,
                    attention_mask: Any = None) -> Any:
            extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            from transformers.modeling_outputs import MaskedLMOutput

            # A ModelOutput (a pytree), so that hooks on the outputs (FSDP's) see the logits.
            parts = _mlm_parts(self.inner)
            if parts is None:
                logits = self.inner(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
                return MaskedLMOutput(logits=logits.flatten(0, 1).index_select(0, masked_positions))
            encoder, head = parts
            hidden = encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)[0]  # (B, T, H)
            selected = hidden.flatten(0, 1).index_select(0, masked_positions)  # (M, H)
            return MaskedLMOutput(logits=head(selected))  # (M, V)

    return SparseMaskedLM(model)


class MaskedLMTask(PretrainTask):
    """BERT-style masked language modelling with a sparse prediction head."""

    name: ClassVar[str] = "mlm"
    auto_model: ClassVar[str] = "AutoModelForMaskedLM"
    pipeline_tag: ClassVar[str] = "fill-mask"
    demo: ClassVar[dict[str, str]] = {"input": "text", "label": "Text with a mask", "hint": "mask",
                                      "render": "fill-mask"}
    export_outputs: ClassVar[tuple[str, ...]] = ("logits",)
    default_profile: ClassVar[str] = "crammed-bert-mini"

    def block_layout(self, tokenizer: Any, seq_len: int) -> tuple[int, list[int], list[int]]:
        start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        end = self.separator(tokenizer)
        if tokenizer.mask_token_id is None:
            raise KilnError("mlm needs a tokenizer with a mask token (BERT or RoBERTa style)")
        return seq_len, [start] if start is not None else [], [end]

    def bind(self, tokenizer: Any) -> None:
        super().bind(tokenizer)
        self.mask_id = tokenizer.mask_token_id  # None: block_layout and encode_inputs say so, in their words
        self.continues = word_continuations(tokenizer) if self.settings.whole_word else None

    def example_input(self, example: list[str]) -> str | None:
        """The sentence with its longest word replaced by the tokenizer's mask token (fill-mask)."""
        mask = getattr(self.tokenizer, "mask_token", None)
        return replace_longest_word(example, mask) if mask else None

    def training_module(self, model: Any) -> Any:
        return sparse_mlm_module(model)

    def collate_blocks(self, features: Sequence[dict], pad_id: int, epoch: int | None = None) -> dict:
        import torch

        p = self.config.pretrain
        ids = _stack(features)  # (B, T)
        corrupted, selected = mask_tokens(
            ids, self._rng(features, epoch), special_ids=self.special_ids, mask_id=self.mask_id,
            vocab_size=self.vocab_size, mask_prob=p.mask_prob, mask_token_prob=p.mask_token_prob,
            random_token_prob=p.random_token_prob, continues=self.continues)
        positions = np.flatnonzero(selected)  # (M,) into the flattened (B*T,) sequence
        return {"input_ids": torch.from_numpy(corrupted), "masked_positions": torch.from_numpy(positions),
                "labels": torch.from_numpy(ids.reshape(-1)[positions])}

    def model_inputs(self, batch: dict) -> dict:
        # Packed blocks have input_ids only; padded predict batches add attention_mask (and
        # token_type_ids for a model that takes them).
        return {**super().model_inputs(batch), "masked_positions": batch["masked_positions"]}

    def loss(self, outputs: Any, batch: dict) -> Any:
        import torch.nn.functional as F

        return F.cross_entropy(outputs.logits.float(), batch["labels"], reduction="sum")

    def loss_units(self, batch: dict) -> int:
        return int(batch["labels"].numel())

    # -- fill-mask prediction ----------------------------------------------------------------
    def parameters(self) -> dict[str, str]:
        return {"top_k": "pretrain.fill_mask_top_k"}

    def encode_inputs(self, dataset: Dataset, tokenizer: Any, max_length: int) -> list[dict]:
        if tokenizer.mask_token_id is None:
            raise KilnError("this model's tokenizer has no mask token, so it cannot fill masks")
        features = super().encode_inputs(dataset, tokenizer, max_length)
        for feature in features:
            if self.mask_id not in feature["input_ids"]:
                raise KilnError(f"no {tokenizer.mask_token} token in the input; put one where a word is to be "
                                "filled in", dataset.path, dataset.examples[feature["example"]]["line"])
        return features

    def collate_inputs(self, features: Sequence[dict], pad_id: int) -> dict:
        import torch

        batch = pad_inputs(features, pad_id)
        # The head runs at the mask tokens only, as in training: (M,) into the flattened (B*T,) batch.
        positions = np.flatnonzero(batch["input_ids"].numpy() == self.mask_id)
        batch["masked_positions"] = torch.from_numpy(positions)
        return batch

    def predict_outputs(self, outputs: Any, batch: dict, model: Any) -> list[Any]:
        """Per input, ``(scores, token ids)`` of the top ``pretrain.fill_mask_top_k`` tokens at each
        mask, from the softmax over the vocabulary in fp32 (what the fill-mask pipeline computes)."""
        probabilities = outputs.logits.float().softmax(dim=-1)  # (M, V), masks in batch order
        top_k = min(self.settings.fill_mask_top_k, probabilities.shape[-1])
        scores, tokens = (t.cpu().tolist() for t in probabilities.topk(top_k))
        counts = (batch["input_ids"] == self.mask_id).sum(dim=1).tolist()  # masks per input
        bounds = np.cumsum([0, *counts]).tolist()
        return [list(zip(scores[a:b], tokens[a:b], strict=True)) for a, b in pairwise(bounds)]

    def decode_input(self, output: Any, feature: dict, example: dict) -> dict:
        """``{"masks": [candidates per mask], "filled": text}``: each candidate as the fill-mask
        pipeline writes it (its ``sequence`` fills that mask only, and keeps the special tokens when
        there are other masks); ``filled`` puts every mask's top token in (the plain output)."""
        tokenizer = self.tokenizer
        ids = np.asarray(feature["input_ids"])
        positions = np.flatnonzero(ids == self.mask_id)
        single = len(positions) == 1

        def text(tokens: np.ndarray, skip_special: bool) -> str:
            return tokenizer.decode(tokens[tokens != tokenizer.pad_token_id].tolist(), skip_special_tokens=skip_special)

        masks = []
        for position, (scores, tokens) in zip(positions, output, strict=True):
            candidates = []
            for score, token in zip(scores, tokens, strict=True):
                filled = ids.copy()
                filled[position] = token
                candidates.append({"score": score, "token": token, "token_str": tokenizer.decode([token]),
                                   "sequence": text(filled, single)})
            masks.append(candidates)
        best = ids.copy()
        best[positions] = [tokens[0] for _, tokens in output]
        return {"masks": masks, "filled": text(best, True)}

    def format(self, predictions: list[Any], dataset: Dataset) -> list[Any]:
        """The fill-mask pipeline's answer per input: the candidates, or a list per mask for several."""
        return [p["masks"][0] if len(p["masks"]) == 1 else p["masks"] for p in predictions]

    def output_columns(self, predictions: list[Any], fmt: str) -> dict[str, list[Any]]:
        return {"sequence": [p["filled"] for p in predictions]}


# -- prediction by generation (clm, span) ----------------------------------------------------
class GenerativePretrainTask(PretrainTask):
    """clm and span predict by generating text. The decoding is the generation task's, reused as it
    is: the ``generate.*`` settings as ``generate()`` arguments, the prompt batching and the call."""

    needs_pad_token: ClassVar[bool] = False
    generates: ClassVar[bool] = True

    # Predict batches go to generate(); a corpus batch is labelled, so evaluation still runs forward.
    outputs_need_forward: ClassVar[bool] = False
    decoding_state: dict

    def parameters(self) -> dict[str, str]:
        return generate_parameters()

    def build_model(self, hf_config: Any) -> Any:
        return self._remember_decoding(super().build_model(hf_config))

    def load_model(self, path: str | Path, **kwargs: Any) -> Any:
        return self._remember_decoding(super().load_model(path, **kwargs))

    def adopt(self, model: Any) -> Any:
        return self._remember_decoding(model)

    def _remember_decoding(self, model: Any) -> Any:
        """Keep the token ids decoding needs, and write the run's decoding into the model's generation
        config (saved as ``generation_config.json``): ``generate()`` on the exported model then
        decodes as ``kiln predict`` does."""
        config = model.config
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        self.decoding_state = {"decoder_only": not config.is_encoder_decoder, "pad": pad,
                               "decoder_start": getattr(config, "decoder_start_token_id", None)}
        self.decoding().set_generation_config(model)
        return model

    def decoding(self) -> Any:
        """The generation task's decoding for this model, under the current ``generate.*`` settings."""
        from kiln.tasks.generation import GenerationTask

        return GenerationTask(self.config, dict(self.decoding_state))

    def predict_outputs(self, outputs: Any, batch: dict, model: Any) -> list[Any]:
        return self.decoding().outputs(outputs, batch, model)  # the generated token ids per input

    def format(self, predictions: list[Any], dataset: Dataset) -> list[Any]:
        """The pipeline's answer per input: ``[{"generated_text": ...}]``."""
        return [[{"generated_text": text}] for text in predictions]

    def output_columns(self, predictions: list[Any], fmt: str) -> dict[str, list[Any]]:
        return {"generated_text": list(predictions)}


# -- clm -------------------------------------------------------------------------------------
class CausalLMTask(GenerativePretrainTask):
    """GPT-style next-token prediction on packed blocks."""

    name: ClassVar[str] = "clm"
    auto_model: ClassVar[str] = "AutoModelForCausalLM"
    pipeline_tag: ClassVar[str] = "text-generation"
    demo: ClassVar[dict[str, str]] = {"input": "text", "label": "Prompt", "render": "generated"}
    default_profile: ClassVar[str] = "gpt2"
    init_profile: ClassVar[str] = "_causal"
    target_keys: ClassVar[tuple[str, ...]] = ("input_ids",)  # the text is its own target

    def collate_blocks(self, features: Sequence[dict], pad_id: int, epoch: int | None = None) -> dict:
        import torch

        return {"input_ids": torch.from_numpy(_stack(features))}

    def example_input(self, example: list[str]) -> str | None:
        """The first few words of the sentence, to continue (text generation)."""
        return " ".join(example[:min(8, len(example) // 2)])

    def model_inputs(self, batch: dict) -> dict:
        return {"input_ids": batch["input_ids"]}

    def loss(self, outputs: Any, batch: dict) -> Any:
        import torch.nn.functional as F

        logits = outputs.logits[:, :-1].float()  # position t predicts token t + 1
        return F.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, 1:].flatten(), reduction="sum")

    def loss_units(self, batch: dict) -> int:
        ids = batch["input_ids"]
        return int(ids.shape[0] * (ids.shape[1] - 1))

    # -- text-generation prediction ----------------------------------------------------------
    def encode_inputs(self, dataset: Dataset, tokenizer: Any, max_length: int) -> list[dict]:
        """Prompts tokenized as the text-generation pipeline does. An empty prompt starts from the
        beginning-of-text token (where the pipeline's ``generate()`` starts); a long one keeps its
        last tokens, leaving ``generate.max_new_tokens`` positions (the pipeline's "hole" strategy)."""
        max_new = self.config.generate.max_new_tokens
        room = max_length - max_new
        if room < 1:
            raise KilnError(f"generate.max_new_tokens {max_new} leaves no room for a prompt in this model's "
                            f"{max_length} positions; lower it (--generate max_new_tokens=N)")
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        features, cut = [], 0
        for i, ids in enumerate(tokenizer([ex["text"] for ex in dataset.examples])["input_ids"]):
            if not ids:
                if start is None:
                    raise KilnError("empty prompt", dataset.path, dataset.examples[i]["line"])
                ids = [start]
            if len(ids) > room:
                ids, cut = ids[-room:], cut + 1
            features.append({"input_ids": ids, "prompt_ids": ids, "example": i})
        if cut:
            log.warning(f"{cut} prompt(s) cut to their last {room} tokens, leaving generate.max_new_tokens "
                        f"({max_new}) of the model's {max_length} positions for the continuation")
        return features

    def collate_inputs(self, features: Sequence[dict], pad_id: int) -> dict:
        batch = self.decoding().collate(features, pad_id)
        # The left-padded prompts only: a batch holding input_ids (clm's target key) counts as labelled.
        return {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"]}

    def decode_input(self, output: Any, feature: dict, example: dict) -> str:
        """The continuation, after the prompt as given unless ``generate.return_full_text`` is off
        (the text-generation pipeline's ``return_full_text``)."""
        text = self.tokenizer.decode(output, skip_special_tokens=True)
        return example["text"] + text if self.config.generate.return_full_text else text


# -- span ------------------------------------------------------------------------------------
def span_lengths(raw_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """T5: ``(inputs length, targets length)`` after corrupting ``raw_length`` tokens (eos included)."""
    noise = round(raw_length * noise_density)
    spans = round(noise / mean_span)
    return raw_length - noise + spans + 1, noise + spans + 1


def raw_length_for(inputs_length: int, noise_density: float, mean_span: float) -> int:
    """The longest raw block whose corrupted input fits ``inputs_length`` (T5's recipe)."""
    raw = inputs_length
    while span_lengths(raw + 1, noise_density, mean_span)[0] <= inputs_length:
        raw += 1
    return raw


def noise_spans(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """``(noise tokens, noise spans)`` that :func:`random_spans_noise_mask` draws for ``length``."""
    noise = min(max(round(length * noise_density), 1), length - 1)
    return noise, max(round(min(noise, length - noise) / mean_span), 1)


def random_spans_noise_mask(length: int, noise_density: float, mean_span: float,
                            rng: np.random.Generator) -> np.ndarray:
    """T5's noise mask: ``round(length * density)`` noise tokens in ``round(noise / mean_span)`` spans,
    alternating with non-noise spans, starting with non-noise. Returns a bool (length,) array."""
    noise, spans = noise_spans(length, noise_density, mean_span)

    def segment(items: int, segments: int) -> np.ndarray:
        first = np.zeros(items, dtype=bool)
        first[rng.permutation(items - 1)[:segments - 1] + 1] = True
        return np.bincount(np.cumsum(first), minlength=segments)

    interleaved = np.stack([segment(length - noise, spans), segment(noise, spans)], axis=1).reshape(-1)
    starts = np.zeros(length, dtype=np.int64)
    starts[np.cumsum(interleaved)[:-1]] = 1
    return np.cumsum(starts) % 2 == 1


class SpanCorruptionTask(GenerativePretrainTask):
    """T5 span corruption: noise spans become sentinels in the input; the target spells them out."""

    name: ClassVar[str] = "span"
    auto_model: ClassVar[str] = "AutoModelForSeq2SeqLM"
    pipeline_tag: ClassVar[str] = "text2text-generation"
    demo: ClassVar[dict[str, str]] = {"input": "text", "label": "Text with sentinels", "hint": "sentinel",
                                      "render": "generated"}
    default_profile: ClassVar[str] = "t5-efficient-tiny"
    target_keys: ClassVar[tuple[str, ...]] = ("labels",)

    def bind(self, tokenizer: Any) -> None:
        super().bind(tokenizer)
        vocab = tokenizer.get_vocab()
        self.sentinels = [vocab[f"<extra_id_{i}>"] for i in range(1000) if f"<extra_id_{i}>" in vocab]
        self.eos = tokenizer.eos_token_id

    def block_layout(self, tokenizer: Any, seq_len: int) -> tuple[int, list[int], list[int]]:
        p = self.config.pretrain
        if not self.sentinels:
            raise KilnError("span corruption needs a T5-style tokenizer with <extra_id_N> sentinels")
        raw = raw_length_for(seq_len, p.noise_density, p.mean_span)
        spans = noise_spans(raw, p.noise_density, p.mean_span)[1]
        if spans > len(self.sentinels):  # every block has this many spans: say so before training
            raise KilnError(f"pretrain.seq_len {seq_len} makes {spans} noise spans per block, more than the "
                            f"tokenizer's {len(self.sentinels)} sentinel tokens; lower pretrain.seq_len")
        return raw, [], []

    def build_model(self, hf_config: Any) -> Any:
        self.decoder_start = hf_config.decoder_start_token_id
        return super().build_model(hf_config)

    def load_model(self, path: str | Path, **kwargs: Any) -> Any:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("num_labels", "id2label", "label2id")}
        return self.adopt(super().load_model(path, **kwargs))

    def adopt(self, model: Any) -> Any:
        self.decoder_start = model.config.decoder_start_token_id
        return super().adopt(model)

    def example_input(self, example: list[str]) -> str | None:
        """The sentence with its longest word replaced by the first sentinel, ``<extra_id_0>``, for
        the model to fill in (when the tokenizer has it)."""
        if self.tokenizer is None or "<extra_id_0>" not in self.tokenizer.get_vocab():
            return None
        return replace_longest_word(example, "<extra_id_0>")

    def corrupt(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """One raw block -> ``(input ids, target ids)``, each ending in eos."""
        p = self.config.pretrain
        noise = random_spans_noise_mask(len(ids), p.noise_density, p.mean_span, rng)
        inputs, targets, span = [], [], -1
        for position, token in enumerate(ids.tolist()):
            starts = noise[position] and (position == 0 or not noise[position - 1])
            if starts:
                span += 1
            if noise[position]:
                if starts:
                    inputs.append(self.sentinels[span])
                    targets.append(self.sentinels[span])
                targets.append(token)
            else:
                inputs.append(token)
        return [*inputs, self.eos], [*targets, self.eos]

    def collate_blocks(self, features: Sequence[dict], pad_id: int, epoch: int | None = None) -> dict:
        import torch

        rng = self._rng(features, epoch)
        pairs = [self.corrupt(np.asarray(f["input_ids"]), rng) for f in features]
        width = max(len(i) for i, _ in pairs)
        target_width = max(len(t) for _, t in pairs)
        inputs = np.full((len(pairs), width), pad_id, dtype=np.int64)
        mask = np.zeros_like(inputs)
        labels = np.full((len(pairs), target_width), -100, dtype=np.int64)
        decoder = np.full((len(pairs), target_width), pad_id, dtype=np.int64)
        start = pad_id if self.decoder_start is None else self.decoder_start
        for row, (source, target) in enumerate(pairs):
            inputs[row, :len(source)] = source
            mask[row, :len(source)] = 1
            labels[row, :len(target)] = target
            decoder[row, :len(target)] = [start, *target[:-1]]  # teacher forcing, shifted right
        return {"input_ids": torch.from_numpy(inputs), "attention_mask": torch.from_numpy(mask),
                "decoder_input_ids": torch.from_numpy(decoder), "labels": torch.from_numpy(labels)}

    def model_inputs(self, batch: dict) -> dict:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}

    def loss(self, outputs: Any, batch: dict) -> Any:
        import torch.nn.functional as F

        logits = outputs.logits.float()
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum", ignore_index=-100)

    def loss_units(self, batch: dict) -> int:
        return int((batch["labels"] != -100).sum())

    # -- text2text prediction ----------------------------------------------------------------
    def parameters(self) -> dict[str, str]:
        # The output never repeats the input, so return_full_text would change nothing.
        return {k: v for k, v in super().parameters().items() if k != "return_full_text"}

    def collate_inputs(self, features: Sequence[dict], pad_id: int) -> dict:
        return self.decoding().collate(features, pad_id)  # encoder inputs and the decoder's start token

    def decode_input(self, output: Any, feature: dict, example: dict) -> str:
        """The generated text as transformers 4's text2text-generation pipeline wrote it: special
        tokens (sentinels included) dropped, tokenization spaces not cleaned up."""
        return self.tokenizer.decode(output, skip_special_tokens=True, clean_up_tokenization_spaces=False)
