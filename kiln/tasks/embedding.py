"""Sentence embeddings, as sentence-transformers trains them: an encoder whose pooled output (mean, CLS
or max over the tokens) places sentences that mean alike close together by cosine similarity.

Two objectives, picked by the data (``embedding.loss`` forces one):

- **Scored pairs** (STS-B: ``sentence1``, ``sentence2``, ``score``): the cosine of the two embeddings
  regresses onto the score scaled to [0, 1] by the training set's range (sentence-transformers'
  ``CosineSimilarityLoss``). Metrics: Spearman and Pearson correlation of cosine and score.
- **Pairs** (``anchor``, ``positive``) or triplets (``+ negative``): in-batch negatives, a softmax over
  the cosines of each anchor to every positive (and hard negative) of the batch, times
  ``embedding.scale`` (``MultipleNegativesRankingLoss``). Metrics: recall@1, recall@10 and MRR@10 of
  each anchor's positive among all candidates of the evaluated set.

The saved model is a transformers ``AutoModel`` plus sentence-transformers' module files
(``modules.json``, ``1_Pooling/``), so ``SentenceTransformer(path)`` loads it as it is. ``kiln predict``
answers ``{"embedding": [...]}`` for a text and ``{"similarity": cos}`` for a pair; ``kiln serve`` adds
``POST /embed`` in text-embeddings-inference's shape.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TextIO

import numpy as np

from kiln.config import setting
from kiln.data import skip_empty
from kiln.data.tables import parse_columns, read_table, select_columns
from kiln.errors import KilnError, MissingLabels
from kiln.tasks.base import CardFacts, Dataset, Features, Form, Route, Task, pad_inputs, shorten

ROLES: dict[str, tuple[str, ...]] = {
    "anchor": ("anchor", "sentence1", "text1", "query", "sentence_a", "premise", "question", "text", "sentence"),
    "positive": ("positive", "sentence2", "text2", "document", "sentence_b", "hypothesis", "answer", "text_pair",
                 "pos"),
    "negative": ("negative", "hard_negative", "neg", "sentence3"),
    "score": ("score", "similarity", "relatedness_score", "label"),
}
POOLINGS = ("mean", "cls", "max")
RECALL_AT = (1, 10)


@dataclass
class EmbeddingSettings:
    """Sentence embeddings: pooling, the objective, and the scale of the contrastive softmax."""

    pooling: str = setting("auto", "How token vectors become one sentence vector; auto: the start's "
                                   "sentence-transformers pooling, else mean.", choices=("auto", *POOLINGS))
    normalize: bool | None = setting(None, "Unit-length embeddings (cosine = dot product); null: as the start's "
                                           "sentence-transformers modules say, else true. A per-call parameter.")
    loss: str = setting("auto", "Objective: cosine (scored pairs), contrastive (pairs or triplets, in-batch "
                                "negatives); auto: cosine when the training data has scores.",
                        choices=("auto", "cosine", "contrastive"))
    scale: float = setting(20.0, "Contrastive: cosine similarities are multiplied by this before the softmax "
                                 "(an inverse temperature).", above=0, maximum=1000)


def pool(hidden: Any, mask: Any, how: str) -> Any:
    """Sentence vectors ``(batch, width)`` from token vectors ``(batch, tokens, width)`` and their
    attention mask, in fp32, as sentence-transformers' ``Pooling`` computes them."""
    import torch

    hidden = hidden.float()
    if how == "cls":
        return hidden[:, 0]
    keep = mask.unsqueeze(-1).to(hidden.dtype)
    if how == "max":
        return hidden.masked_fill(keep == 0, -1e9).max(dim=1).values
    return (hidden * keep).sum(dim=1) / torch.clamp(keep.sum(dim=1), min=1e-9)


def contrastive_loss(anchors: Any, candidates: Any, scale: float) -> Any:
    """In-batch negatives, summed over the anchors: anchor ``i``'s positive is candidate ``i``; every
    other candidate (the other anchors' positives, any hard negatives after them) is a negative."""
    import torch
    import torch.nn.functional as F

    scores = F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T * scale
    return F.cross_entropy(scores, torch.arange(len(anchors), device=scores.device), reduction="sum")


def cosine_loss(first: Any, second: Any, targets: Any) -> Any:
    """Squared error between the pairs' cosine similarity and their targets, summed."""
    import torch.nn.functional as F

    return ((F.cosine_similarity(first, second, dim=-1) - targets) ** 2).sum()


def retrieval_metrics(anchors: np.ndarray, candidates: np.ndarray) -> dict[str, float]:
    """Recall@k and MRR@10 of anchor ``i``'s own candidate ``i`` among all candidates, by cosine."""
    a = anchors / np.maximum(np.linalg.norm(anchors, axis=1, keepdims=True), 1e-12)
    c = candidates / np.maximum(np.linalg.norm(candidates, axis=1, keepdims=True), 1e-12)
    scores = a @ c.T
    own = scores[np.arange(len(a)), np.arange(len(a))]
    ranks = 1 + (scores > own[:, None]).sum(axis=1)  # ties count in the anchor's favour
    found = {f"recall@{k}": float(np.mean(ranks <= k)) for k in RECALL_AT}
    found["mrr@10"] = float(np.mean(np.where(ranks <= 10, 1.0 / ranks, 0.0)))
    return found


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def _embed_inputs(payload: Any) -> tuple[list[Any], dict[str, Any]]:
    """text-embeddings-inference's ``/embed`` body: ``{"inputs": text or [texts], "normalize": true,
    "truncate": ...}``; kiln always truncates to the model's length."""
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise KilnError('the body is {"inputs": "a text" or ["texts", ...], "normalize": true}')
    unknown = sorted(set(payload) - {"inputs", "normalize", "truncate", "truncation_direction", "prompt_name"})
    if unknown:
        raise KilnError(f"unknown field '{unknown[0]}' (takes inputs, normalize, truncate)")
    inputs = payload["inputs"]
    items = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise KilnError("inputs must be a text or a list of texts")
    if payload.get("prompt_name") is not None:
        raise KilnError("this model has no prompts (prompt_name)")
    normalize = payload.get("normalize", True)
    if not isinstance(normalize, bool):
        raise KilnError("normalize must be true or false")
    return items, {"normalize": normalize}


def _embed_answer(predictions: list[Any], payload: Any) -> list[list[float]]:
    return [prediction["embedding"] for prediction in predictions]


class EmbeddingTask(Task):
    """Embed sentences; train on scored pairs or on pairs with in-batch negatives."""

    name: ClassVar[str] = "embedding"
    settings_class: ClassVar[type | None] = EmbeddingSettings
    section: ClassVar[str] = "embedding"
    suffixes: ClassVar[tuple[str, ...]] = (".tsv", ".csv", ".jsonl", ".txt")
    target_keys: ClassVar[tuple[str, ...]] = ("targets",)
    auto_model: ClassVar[str] = "AutoModel"
    pipeline_tag: ClassVar[str] = "sentence-similarity"
    request_forms: ClassVar[tuple[Form, ...]] = (Form(("text",), optional=("text_pair",)),
                                                 Form(("sentence1", "sentence2")))
    string_means: ClassVar[str] = "a sentence to embed"
    describer: ClassVar[str] = "labelled-text"
    demo: ClassVar[dict[str, str]] = {"input": "pair", "label": "Sentences", "render": "json"}
    routes: ClassVar[tuple[Route, ...]] = (
        Route("/embed", "Embed texts (text-embeddings-inference's request and answer)", _embed_inputs,
              _embed_answer),)

    @classmethod
    def card_facts(cls, hf_config: dict) -> CardFacts:
        return CardFacts(cls.auto_model, cls.pipeline_tag, notes=[
            "A sentence-transformers model too: `SentenceTransformer(path)` loads it with its pooling "
            "(`1_Pooling/config.json`) and, when it normalizes, unit-length vectors.",
            "Compare sentences by the cosine of their embeddings."])

    @property
    def main_metric(self) -> str:  # type: ignore[override]
        return "spearman" if self.objective == "cosine" else "recall@1"

    @property
    def objective(self) -> str:
        return self.state.get("objective", "cosine")

    @property
    def normalize(self) -> bool:
        given = self.settings.normalize
        return bool(self.state.get("normalize", True) if given is None else given)

    # -- reading -----------------------------------------------------------------------------
    def read(self, path: str | Path, *, labelled: bool = True, stream: TextIO | None = None) -> Dataset:
        known = {alias for aliases in ROLES.values() for alias in aliases}
        table = read_table(path, lambda cells: bool({c.lower() for c in cells} & known), stream=stream,
                           fmt="tsv" if stream else None)
        positional = {1: ["anchor"], 2: ["anchor", "positive"], 3: ["anchor", "positive", "score"]}
        records = select_columns(table, ROLES, required=["anchor", "positive"] if labelled else ["anchor"],
                                 columns=parse_columns(self.config.data.columns), positional=positional)
        examples = [self._example(record, table.path, labelled) for record in records]
        if not labelled:
            return Dataset(str(path), examples, table)
        examples, kept = skip_empty(path, examples, self._empty, table)
        scored = {example["score"] is not None for example in examples}
        if len(scored) > 1:
            first = next(example for example in examples if example["score"] is None)
            raise KilnError("this row has no score but others have one: give every pair a score, or none",
                            path, first["line"])
        if len({len(example["texts"]) for example in examples}) > 1:
            first = next(example for example in examples if len(example["texts"]) != len(examples[0]["texts"]))
            raise KilnError("this row has a different number of texts from the first (pairs and triplets "
                            "mixed): give every row a negative, or none", path, first["line"])
        return Dataset(str(path), examples, kept)

    def _example(self, record: dict, path: str, labelled: bool) -> dict:
        line = record["_line"]
        texts = []
        for role in ("anchor", "positive", "negative"):
            value = record.get(role)
            if value is None or (role != "anchor" and not labelled and value == ""):
                continue
            if not isinstance(value, str):
                raise KilnError(f"'{role}' must be a string, got {value!r}", path, line)
            texts.append(value)
        score = record.get("score")
        if score is not None and str(score).strip():
            try:
                score = float(score)
            except (TypeError, ValueError):
                raise KilnError(f"score {score!r} is not a number (name a third text column 'negative' for "
                                "triplets)", path, line) from None
            if not math.isfinite(score):
                raise KilnError(f"score {score!r} is not a finite number", path, line)
        else:
            score = None
        if labelled and len(texts) < 2:
            raise MissingLabels("a training row needs two texts (anchor and positive, or sentence1 and "
                                "sentence2)", path, line)
        return {"texts": tuple(texts), "score": score, "label": None if score is None else f"{score:g}",
                "labelled": labelled, "line": line}

    @staticmethod
    def _empty(example: dict) -> str | None:
        return "an empty text" if not all(text.strip() for text in example["texts"]) else None

    def parse_input(self, item: Any, line: int) -> Any:
        if isinstance(item, dict):
            first = item.get("text", item.get("sentence1"))
            second = item.get("text_pair", item.get("sentence2"))
            texts: list[Any] = [first] if second is None else [first, second]
        elif isinstance(item, (list, tuple)):
            texts = list(item)
        else:
            texts = str(item).split("\t")
        if not 1 <= len(texts) <= 2 or not all(isinstance(text, str) for text in texts):
            raise KilnError("an input is a text, or a pair of texts to compare", "<input>", line)
        return {"texts": tuple(texts), "score": None, "label": None, "labelled": False, "line": line}

    def example_input(self, example: dict) -> Any:
        texts = [shorten(text) for text in example["texts"][:2]]
        if not all(texts):
            return None
        return {"sentence1": texts[0], "sentence2": texts[1]} if len(texts) == 2 else texts[0]

    def texts(self, dataset: Dataset) -> Iterator[str]:
        for example in dataset.examples:
            yield from example["texts"]

    def fit(self, train: Dataset) -> None:
        scores = [example["score"] for example in train.examples if example["score"] is not None]
        chosen = self.settings.loss
        if chosen == "cosine" and not scores:
            raise KilnError("embedding.loss=cosine needs scored pairs (a score column)", train.path)
        self.state["objective"] = chosen if chosen != "auto" else "cosine" if scores else "contrastive"
        if self.objective == "cosine":
            low, high = min(scores), max(scores)
            if high == low:
                raise KilnError(f"every score is {low:g}: scored pairs need different scores", train.path)
            self.state["score_range"] = [low, high]

    def check(self, dataset: Dataset) -> None:
        scored = any(example["score"] is not None for example in dataset.examples)
        if self.objective == "cosine" and not scored:
            raise MissingLabels("the model trains on scored pairs, and this file's pairs have no score",
                                dataset.path)
        if self.objective == "contrastive" and scored:
            raise KilnError("the model trains on pairs without scores (in-batch negatives), and this file "
                            "scores its pairs: evaluate it with pairs as it was trained", dataset.path)

    def parameters(self) -> dict[str, str]:
        return {"normalize": "embedding.normalize"}

    # -- model -------------------------------------------------------------------------------
    def build_model(self, hf_config: Any) -> Any:
        model = super().build_model(hf_config)
        self._settle(None, model)
        return model

    def load_model(self, path: str | Path, **kwargs: Any) -> Any:
        kwargs.pop("ignore_mismatched_sizes", None)  # a bare encoder has no head to resize
        model = super().load_model(path, **kwargs)
        self._settle(Path(path), model)
        return model

    def _settle(self, start: Path | None, model: Any) -> None:
        """Pooling, normalization and length, once for a run: the settings', else the start's
        sentence-transformers modules', else mean pooling and unit vectors."""
        modules = _read_json(start / "modules.json") if start else None
        pooling = _read_json(start / "1_Pooling" / "config.json") if start else None
        sbert = _read_json(start / "sentence_bert_config.json") if start else None
        if "pooling" not in self.state:
            chosen = self.settings.pooling
            if chosen == "auto" and isinstance(pooling, dict):
                chosen = next((how for how in POOLINGS if pooling.get(f"pooling_mode_{how}_token")
                               or pooling.get(f"pooling_mode_{how}_tokens") or pooling.get("pooling_mode") == how),
                              "auto")
            self.state["pooling"] = chosen if chosen != "auto" else "mean"
        if "normalize" not in self.state:
            named = [str(m.get("type", "")) for m in modules] if isinstance(modules, list) else None
            given = self.settings.normalize
            self.state["normalize"] = given if given is not None else (
                any(name.endswith("Normalize") for name in named) if named is not None else True)
        positions = getattr(model.config, "max_position_embeddings", None) or self.config.train.max_length
        limit = min(self.config.train.max_length, positions)
        if isinstance(sbert, dict) and isinstance(sbert.get("max_seq_length"), int):
            limit = min(limit, sbert["max_seq_length"])
        self.state.setdefault("max_seq_length", limit)
        self.state["dimension"] = int(model.config.hidden_size)

    def head_description(self, model: Any) -> str:
        return "an encoder"

    def model_files(self) -> dict[str, str]:
        """sentence-transformers' module files, in the layout every version of it reads."""
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if self.state.get("normalize", True):
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        how = self.state.get("pooling", "mean")
        pooling = {"word_embedding_dimension": self.state.get("dimension", 0),
                   "pooling_mode_cls_token": how == "cls", "pooling_mode_mean_tokens": how == "mean",
                   "pooling_mode_max_tokens": how == "max", "pooling_mode_mean_sqrt_len_tokens": False}
        settings = {"max_seq_length": self.state.get("max_seq_length", 512), "do_lower_case": False}
        config: dict[str, Any] = {"similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": None}

        def text(value: Any) -> str:
            return json.dumps(value, indent=2) + "\n"

        return {"modules.json": text(modules), "1_Pooling/config.json": text(pooling),
                "sentence_bert_config.json": text(settings), "config_sentence_transformers.json": text(config)}

    # -- features and batches ----------------------------------------------------------------
    def encode(self, dataset: Dataset, tokenizer: Any, max_length: int) -> list[dict]:
        """One feature per example with each of its texts' token ids; its length for the token budget
        is its texts' count times the longest of them."""
        limit = min(max_length, self.state.get("max_seq_length", max_length))
        flat = [text for example in dataset.examples for text in example["texts"]]
        encoded = tokenizer(flat, truncation=True, max_length=limit, return_attention_mask=False) if flat \
            else {"input_ids": []}
        features = Features.grouped(encoded, [len(example["texts"]) for example in dataset.examples], "text_")
        for feature, example in zip(features, dataset.examples, strict=True):
            if example["labelled"] and self.objective == "cosine":
                low, high = self.state["score_range"]
                feature["target"] = (example["score"] - low) / (high - low)
            elif example["labelled"]:
                feature["target"] = None  # in-batch negatives: the target is the anchor's own positive
        return features

    def collate(self, features: Sequence[dict], pad_id: int) -> dict:
        """Every text of the batch in one padded tensor, role by role (all anchors, then all positives,
        then all negatives), and ``text_index`` ``(batch, texts)``: where each feature's texts are
        (-1: a feature with fewer)."""
        import torch

        most = max(len(feature["text_input_ids"]) for feature in features)
        rows: list[dict] = []
        index = np.full((len(features), most), -1, dtype=np.int64)
        for role in range(most):
            for number, feature in enumerate(features):
                if role < len(feature["text_input_ids"]):
                    index[number, role] = len(rows)
                    rows.append({key.removeprefix("text_"): feature[key][role]
                                 for key in ("text_input_ids", "text_token_type_ids") if key in feature})
        batch = pad_inputs(rows, pad_id)
        batch["text_index"] = torch.from_numpy(index)
        if features[0].get("target") is not None:  # scored pairs: the scaled score
            batch["targets"] = torch.tensor([feature["target"] for feature in features], dtype=torch.float32)
        elif "target" in features[0]:  # pairs: anchor i's positive is candidate i
            batch["targets"] = torch.arange(len(features))
        return batch

    def _vectors(self, outputs: Any, batch: dict) -> Any:
        mask = batch["attention_mask"].to(outputs.last_hidden_state.device)
        return pool(outputs.last_hidden_state, mask, self.state.get("pooling", "mean"))

    def loss(self, outputs: Any, batch: dict) -> Any:
        vectors = self._vectors(outputs, batch)
        index = batch["text_index"].to(vectors.device)
        if self.objective == "cosine":
            return cosine_loss(vectors[index[:, 0]], vectors[index[:, 1]], batch["targets"].to(vectors.device))
        candidates = vectors[index[:, 1:].T.reshape(-1)]  # positives, then hard negatives
        return contrastive_loss(vectors[index[:, 0]], candidates, self.settings.scale)

    def loss_units(self, batch: dict) -> int:
        return len(batch["text_index"])

    def outputs(self, outputs: Any, batch: dict, model: Any = None) -> list[Any]:
        vectors = self._vectors(outputs, batch).cpu().numpy()
        return [vectors[row[row >= 0]] for row in batch["text_index"].numpy()]

    # -- predictions and metrics -------------------------------------------------------------
    def decode(self, outputs: list[Any], features: list[dict], dataset: Dataset) -> list[Any]:
        predictions = []
        for vectors in outputs:
            if self.normalize:
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            prediction: dict[str, Any] = {"vectors": vectors}
            if len(vectors) > 1:
                prediction["similarity"] = _cosine(vectors[0], vectors[1])
            predictions.append(prediction)
        return predictions

    def metrics(self, predictions: list[Any], dataset: Dataset) -> dict[str, float]:
        from kiln.metrics.classification import regression_metrics

        if self.objective == "cosine":
            scores = [example["score"] for example in dataset.examples]
            found = regression_metrics(scores, [p["similarity"] for p in predictions])
            return {"spearman": found["spearman"], "pearson": found["pearson"]}
        anchors = np.stack([p["vectors"][0] for p in predictions])
        candidates = np.concatenate([np.stack([p["vectors"][role] for p in predictions])
                                     for role in range(1, len(predictions[0]["vectors"]))])
        return retrieval_metrics(anchors, candidates)

    def metric_names(self) -> list[str]:
        names = ["spearman", "pearson"] if self.objective == "cosine" else \
            [*(f"recall@{k}" for k in RECALL_AT), "mrr@10"]
        return [*names, *super().metric_names()]

    def format(self, predictions: list[Any], dataset: Dataset) -> list[Any]:
        return [{"similarity": p["similarity"]} if "similarity" in p else
                {"embedding": [float(x) for x in p["vectors"][0]]} for p in predictions]

    def output_columns(self, predictions: list[Any], fmt: str) -> dict[str, list[Any]]:
        columns: dict[str, list[Any]] = {}
        if any("similarity" in p for p in predictions):
            columns["similarity"] = [round(p["similarity"], 6) if "similarity" in p else "" for p in predictions]
        if any("similarity" not in p for p in predictions):
            vectors = [[round(float(x), 6) for x in p["vectors"][0]] for p in predictions]
            columns["embedding"] = vectors if fmt == "jsonl" else [json.dumps(v) for v in vectors]
        return columns


def _read_json(path: Path) -> Any:
    """A sentence-transformers file of the start, or None when it has none (or an unreadable one)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
