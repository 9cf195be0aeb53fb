"""Text generation: seq2seq (BART, mBART, T5) and decoder-only (GPT-2).

Seq2seq models read the source with the encoder and learn the target with the decoder. Decoder-only
models train on ``source <eos> target <eos>`` with the loss on the target tokens only; a file with
a source column only means plain language-model fine-tuning. Outputs come from transformers'
``generate()`` with the run's decoding settings (``generate.*``).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TextIO

import numpy as np

from kiln.config import setting
from kiln.data import SPLIT_ALIASES, skip_empty
from kiln.data.tables import decoded_lines, parse_columns, read_table, select_columns
from kiln.errors import KilnError, MissingLabels
from kiln.tasks.base import CardFacts, Dataset, Form, Task, generate_parameters, pad_inputs, shorten

ROLES = {"source": ("source", "source_sequence", "src", "input", "text"),
         "target": ("target", "target_sequence", "tgt", "output", "summary"),
         "source_language": ("source_language", "src_lang"),
         "target_language": ("target_language", "tgt_lang")}


def language_code(language: str, codes: Sequence[str]) -> str | None:
    """The mBART code for a language: ``en`` -> ``en_XX``, ``de`` -> ``de_DE``; codes pass through."""
    if language in codes:
        return language
    return next((c for c in codes if c.split("_")[0] == language.lower()), None)


@dataclass
class GenerationSettings:
    """Sequence-to-sequence generation (decoding itself is the generate section)."""

    # Where kiln 0.1 kept these: saved runs, YAML files and -c still take the old keys.
    formerly: ClassVar[dict[str, str]] = {"pair": "data.pair"}

    pair: str = setting("", "Language pair of parallel files, e.g. 'en-de' for train.en + train.de.",
                        flag="--pair")


class GenerationTask(Task):
    """Generate a target text from a source text."""

    outputs_need_forward: ClassVar[bool] = False  # outputs come from generate(), not the forward pass
    needs_pad_token: ClassVar[bool] = False
    name: ClassVar[str] = "generation"
    settings_class: ClassVar[type | None] = GenerationSettings
    section: ClassVar[str] = "generation"
    suffixes: ClassVar[tuple[str, ...]] = (".tsv", ".jsonl", ".csv")
    main_metric: ClassVar[str] = "loss"
    default_profile: ClassVar[str] = "t5-tiny"
    init_profile: ClassVar[str] = "_generation"
    request_forms: ClassVar[tuple[Form, ...]] = (Form(("source",), optional=("source_language", "target_language")),)
    string_means: ClassVar[str] = "the source text"
    prediction_fields: ClassVar[dict[str, type] | None] = {"generated_text": str}
    describer: ClassVar[str] = "parallel-text"
    demo: ClassVar[dict[str, str]] = {"input": "source", "label": "Source text", "render": "generated"}
    generates: ClassVar[bool] = True

    @classmethod
    def card_facts(cls, hf_config: dict) -> CardFacts:
        if not hf_config.get("is_encoder_decoder"):
            return CardFacts("AutoModelForCausalLM", "text-generation", notes=[
                "The prompt is the source text followed by the end-of-text token; `generate()` then writes the "
                "target. `generation_config.json` holds the decoding that `kiln predict` uses."])
        return CardFacts("AutoModelForSeq2SeqLM", "text2text-generation", notes=[
            "`generation_config.json` holds the decoding that `kiln predict` uses, so `generate()` decodes alike."])

    @property
    def auto_model(self) -> str:  # type: ignore[override]
        return "AutoModelForCausalLM" if self.state.get("decoder_only") else "AutoModelForSeq2SeqLM"

    # -- reading -----------------------------------------------------------------------------
    def find_splits(self, data: str | Path) -> dict[str, Path]:
        """With ``--pair SRC-TGT`` a directory holds ``SPLIT.SRC`` + ``SPLIT.TGT`` (Multi30k layout)."""
        pair = self.settings.pair
        path = Path(data)
        if not pair or not path.is_dir():
            return super().find_splits(data)
        source, _, target = pair.partition("-")
        if not source or not target:
            raise KilnError(f"--pair expects SRC-TGT (e.g. en-de), got '{pair}'")
        found: dict[str, Path] = {}
        for split, aliases in SPLIT_ALIASES.items():
            candidates = sorted(p for p in path.glob(f"*.{source}")
                                if p.stem.lower() in aliases or (split == "test" and p.stem.startswith("test")))
            for candidate in candidates:
                if candidate.with_suffix(f".{target}").is_file():
                    found.setdefault(split, candidate)
        if "train" not in found:
            raise KilnError(f"no train.{source} + train.{target} pair in this directory", path)
        return found

    def read(self, path: str | Path, *, labelled: bool = True, stream: TextIO | None = None) -> Dataset:
        pair = self.settings.pair
        path_obj = Path(str(path))
        if stream is not None:
            lines = decoded_lines(path, stream)
            examples = [{"source": text, "target": None, "line": n} for n, text in lines if text.strip()]
            if not examples:
                raise KilnError("no input lines", path)
            return Dataset(str(path), examples, extras={"format": "lines"})
        if pair and path_obj.suffix == f".{pair.partition('-')[0]}":
            return self._read_parallel(path_obj, labelled)
        known = {alias for aliases in ROLES.values() for alias in aliases}
        table = read_table(path, lambda cells: bool({c.lower() for c in cells} & known))
        required = ["source", "target"] if labelled else ["source"]
        records = select_columns(table, ROLES, required, parse_columns(self.config.data.columns),
                                 positional={1: ["source"], 2: ["source", "target"]})
        examples = []
        for record in records:
            source, target = record.get("source"), record.get("target")
            if not isinstance(source, str) or (target is not None and not isinstance(target, str)):
                raise KilnError("source and target must be strings", table.path, record["_line"])
            example = {"source": source, "target": target, "line": record["_line"]}
            for key in ("source_language", "target_language"):
                if record.get(key):
                    example[key] = str(record[key])
            examples.append(example)
        if not labelled:  # predict keeps every row: its output lines up with the input
            return Dataset(str(path), examples, table)
        examples, kept = skip_empty(path, examples, self._empty, table)
        return Dataset(str(path), examples, kept)

    @staticmethod
    def _empty(example: dict) -> str | None:
        """Why a labelled example has nothing to learn from: a blank source, or a blank target
        (a missing target is language modelling on the source, not an empty one)."""
        if not example["source"].strip():
            return "an empty source"
        target = example["target"]
        return "an empty target" if target is not None and not target.strip() else None

    def _read_parallel(self, source_path: Path, labelled: bool) -> Dataset:
        target_path = source_path.with_suffix(f".{self.settings.pair.partition('-')[2]}")
        sources = decoded_lines(source_path)
        if not sources:
            raise KilnError("file is empty", source_path, 1)
        targets = decoded_lines(target_path) if target_path.is_file() else None
        if targets is None and labelled:
            raise MissingLabels("no target file beside it", target_path)
        if targets is not None and len(targets) != len(sources):
            raise KilnError(f"{len(sources)} source lines but {len(targets)} target lines in {target_path}",
                            source_path, min(len(sources), len(targets)) + 1)
        source_language, _, target_language = self.settings.pair.partition("-")
        examples = [{"source": text, "target": targets[i][1] if targets else None, "line": number,
                     "source_language": source_language, "target_language": target_language}
                    for i, (number, text) in enumerate(sources)]
        if labelled:
            examples, _ = skip_empty(source_path, examples, self._empty)
        return Dataset(str(source_path), examples, extras={"format": "lines"})

    def parse_input(self, item: Any, line: int) -> Any:
        if isinstance(item, dict):
            return {"source": str(item.get("source", item.get("source_sequence", ""))), "target": None,
                    "line": line, **{k: str(item[k]) for k in ("source_language", "target_language") if k in item}}
        return {"source": str(item), "target": None, "line": line}

    def example_input(self, example: dict) -> Any:
        """The source text; ``{"source", "source_language", "target_language"}`` when the model uses
        language codes (mBART) and the example's differ from the run's defaults (``fit``)."""
        if not example["source"].strip():
            return None
        source = shorten(example["source"])
        keys = ("source_language", "target_language")
        coded = self.tokenizer is not None and self._languages(self.tokenizer)
        if coded and any(example.get(key) and example[key] != self.state.get(key) for key in keys):
            return {"source": source, **{key: example[key] for key in keys if example.get(key)}}
        return source

    def fit(self, train: Dataset) -> None:
        """Remember the most common source/target language: the default for inputs without one."""
        for key in ("source_language", "target_language"):
            counts = Counter(ex[key] for ex in train.examples if ex.get(key))
            if counts:
                self.state[key] = counts.most_common(1)[0][0]

    def texts(self, dataset: Dataset) -> Iterator[str]:
        for example in dataset.examples:
            yield example["source"]
            if example["target"]:
                yield example["target"]

    def parameters(self) -> dict[str, str]:
        return generate_parameters()

    def eval_cap(self) -> int:
        """Decoding is slow: evaluate on at most this many validation examples during training."""
        return self.config.generate.eval_samples

    # -- model -------------------------------------------------------------------------------
    def build_model(self, hf_config: Any) -> Any:
        self.state["decoder_only"] = not getattr(hf_config, "is_encoder_decoder", False)
        return self._remember(super().build_model(hf_config))

    def load_model(self, path: str | Path, **kwargs: Any) -> Any:
        from transformers import AutoConfig

        from kiln.model_files import verify_model_dir

        verify_model_dir(Path(path))  # before AutoConfig reads config.json (super() checks again)
        self.state["decoder_only"] = not AutoConfig.from_pretrained(path, local_files_only=True).is_encoder_decoder
        kwargs = {k: v for k, v in kwargs.items() if k not in ("num_labels", "id2label", "label2id")}
        return self._remember(super().load_model(path, **kwargs))

    def adopt(self, model: Any) -> Any:
        return self._remember(model)

    def _remember(self, model: Any) -> Any:
        config = model.config
        if config.is_encoder_decoder and getattr(config, "decoder_start_token_id", None) is None:
            # Training and generate() must start the decoder alike; generate() would fall back to
            # bos. </s> is BART's and mBART-50's choice, and saving it keeps transformers in step.
            config.decoder_start_token_id = config.eos_token_id
        self.state["decoder_start"] = getattr(config, "decoder_start_token_id", None)
        self.state["pad"] = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        self.set_generation_config(model)
        return model

    def set_generation_config(self, model: Any) -> None:
        """Write the run's decoding (``generate.*``) into the model's ``GenerationConfig``, which is
        saved as ``generation_config.json``: ``generate()`` and pipelines then decode as ``kiln
        predict`` does (greedy or beam search; the decoder-only prompt is the source followed by the
        end-of-text token). What a loaded checkpoint's config says beyond kiln's settings (BART's
        forced BOS/EOS, say) stays, and applies to both alike."""
        config = model.config
        settings = {"pad_token_id": self.state["pad"], **self.generation_kwargs()}
        if config.is_encoder_decoder:
            settings["decoder_start_token_id"] = config.decoder_start_token_id
        model.generation_config.update(**settings)

    # -- features and batches ----------------------------------------------------------------
    def _languages(self, tokenizer: Any) -> dict[str, int]:
        """Language-code token ids when a seq2seq tokenizer has them (mBART), else empty."""
        from kiln.tokenizers import MBART_CODES

        if self.state.get("decoder_only"):
            return {}
        vocab = tokenizer.get_vocab()
        return {code: vocab[code] for code in MBART_CODES if code in vocab}

    def _language_ids(self, example: dict, key: str, codes: dict[str, int], dataset: Dataset) -> list[int]:
        """``[code id]`` for the example's language (or the run's default); a target one is required."""
        language = example.get(key) or self.state.get(key)
        if not language:
            if key == "source_language":
                return []
            raise KilnError(f"this model needs a {key} (an mBART code such as en_XX, or en)",
                            dataset.path, example["line"])
        code = language_code(language, list(codes))
        if code is None:
            raise KilnError(f"unknown {key} '{language}'; this model knows {', '.join(codes)}",
                            dataset.path, example["line"])
        return [codes[code]]

    def encode(self, dataset: Dataset, tokenizer: Any, max_length: int) -> list[dict]:
        # Language codes are used when the tokenizer has them and the data or the run names languages.
        named = self.state.get("target_language") or any(ex.get("target_language") for ex in dataset.examples)
        codes = self._languages(tokenizer) if named else {}
        # mBART: source = <src_code> text </s>, target = <tgt_code> text </s> (mBART-50 layout).
        budget = max_length - 2 if codes else max_length
        options = {"truncation": True, "max_length": budget, "return_attention_mask": False}
        if codes:
            options["add_special_tokens"] = False
        decoder_only = self.state.get("decoder_only")
        sources = tokenizer([ex["source"] for ex in dataset.examples], **options)["input_ids"]
        targets = [ex["target"] for ex in dataset.examples]
        has_targets = all(t is not None for t in targets)
        # A decoder-only target continues the prompt: no BOS (or other special) in front of it.
        target_options = {**options, "add_special_tokens": False} if decoder_only else options
        encoded_targets = tokenizer(targets, **target_options)["input_ids"] if has_targets else None
        eos = tokenizer.eos_token_id
        features = []
        for i, source in enumerate(sources):
            if decoder_only:
                prompt = [*source[:max_length - 1], eos]  # what generation starts from
                if encoded_targets is not None:
                    # Prompt and answer share max_length: a long source is cut to leave the answer
                    # (and its closing eos) at least half of it, so no example trains on nothing.
                    answer = [*encoded_targets[i], eos]
                    answer = answer[:max(max_length // 2, max_length - 1 - len(source))]
                    cut = [*source[:max_length - 1 - len(answer)], eos]
                    ids, labels = cut + answer, [-100] * len(cut) + answer
                else:  # no target: plain language modelling on the text
                    ids, labels = prompt, prompt
                # The prompt leaves room in the positions for the answer (max_new_tokens, up to
                # half of them), as training leaves a target at least half.
                room = min(self.config.generate.max_new_tokens, max_length // 2)
                feature = {"input_ids": ids, "prompt_ids": [*source[:max_length - 1 - room], eos], "example": i}
                if dataset.examples[i]["target"] is not None or not has_targets:
                    feature["labels"] = labels
            elif codes:
                example = dataset.examples[i]
                forced = self._language_ids(example, "target_language", codes, dataset)
                source_code = self._language_ids(example, "source_language", codes, dataset)
                feature = {"input_ids": [*source_code, *source, eos], "forced": forced, "example": i}
                if encoded_targets is not None:
                    feature["labels"] = [*forced, *encoded_targets[i], eos]
            else:
                feature = {"input_ids": source, "example": i}
                if encoded_targets is not None:
                    feature["labels"] = encoded_targets[i]
            features.append(feature)
        return features

    def collate(self, features: Sequence[dict], pad_id: int) -> dict:
        import torch

        pad = pad_id if self.state.get("pad") is None else self.state["pad"]
        batch = pad_inputs(features, pad, per_token={"labels": -100} if self.state.get("decoder_only") else None)
        if self.state.get("decoder_only"):
            longest = max(len(f["prompt_ids"]) for f in features)  # left-padded prompts for generate()
            prompts = np.full((len(features), longest), pad, dtype=np.int64)
            prompt_mask = np.zeros_like(prompts)
            for row, feature in enumerate(features):
                n = len(feature["prompt_ids"])
                prompts[row, longest - n:] = feature["prompt_ids"]
                prompt_mask[row, longest - n:] = 1
            batch["prompt_ids"], batch["prompt_mask"] = torch.from_numpy(prompts), torch.from_numpy(prompt_mask)
            return batch
        start = pad if self.state.get("decoder_start") is None else self.state["decoder_start"]
        # The decoder's forced prefix: the start token, then (mBART) the target language code.
        prefix = np.array([[start, *f.get("forced", [])] for f in features], dtype=np.int64)
        batch["decoder_prefix"] = torch.from_numpy(prefix)
        if "labels" in features[0]:
            longest = max(len(f["labels"]) for f in features)
            targets = np.full((len(features), longest), pad, dtype=np.int64)
            labels = np.full((len(features), longest), -100, dtype=np.int64)
            for row, feature in enumerate(features):
                n = len(feature["labels"])
                targets[row, :n] = feature["labels"]
                labels[row, len(feature.get("forced", [])):n] = feature["labels"][len(feature.get("forced", [])):]
            # Teacher forcing: the decoder reads the target shifted right behind the start token.
            # A forced token (language code) is read but never a loss term: generate() forces it too.
            decoder_inputs = np.concatenate([prefix[:, :1], targets[:, :-1]], axis=1)
            batch["labels"] = torch.from_numpy(labels)
            batch["decoder_input_ids"] = torch.from_numpy(decoder_inputs)
        return batch

    def model_inputs(self, batch: dict) -> dict:
        keys = ("input_ids", "attention_mask", "decoder_input_ids")
        return {k: v for k, v in batch.items() if k in keys}

    def loss(self, outputs: Any, batch: dict) -> Any:
        import torch.nn.functional as F

        logits, labels = outputs.logits.float(), batch["labels"]  # (B, T, V), (B, T)
        if self.state.get("decoder_only"):  # position t predicts token t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)

    def loss_units(self, batch: dict) -> int:
        labels = batch["labels"][:, 1:] if self.state.get("decoder_only") else batch["labels"]
        return int((labels != -100).sum())

    def generation_kwargs(self) -> dict:
        g = self.config.generate
        kwargs: dict[str, Any] = {"max_new_tokens": g.max_new_tokens, "num_beams": g.num_beams,
                                  "do_sample": g.do_sample}
        if g.num_beams > 1:
            kwargs["length_penalty"] = g.length_penalty
        if g.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = g.no_repeat_ngram_size
        if g.do_sample:
            kwargs.update(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
        return kwargs

    def outputs(self, outputs: Any, batch: dict, model: Any = None) -> list[Any]:
        import torch

        from kiln.models import max_positions

        if self.config.generate.do_sample:
            torch.manual_seed(self.config.generate.seed)
        pad = self.state.get("pad")
        # Past its position embeddings a model fails (GPT-2, BART: an IndexError) or, with relative
        # positions (T5), writes on: the output stops where the positions end.
        positions = max_positions(model.config)
        kwargs = self.generation_kwargs()
        if type(model).__name__.startswith("FSDP"):  # sharded weights: every rank runs every decoding step
            kwargs["synced_gpus"] = True
        if self.state.get("decoder_only"):
            prompts = batch["prompt_ids"]
            kwargs["max_new_tokens"] = max(1, min(kwargs["max_new_tokens"], positions - prompts.shape[1]))
            generated = model.generate(input_ids=prompts, attention_mask=batch["prompt_mask"], pad_token_id=pad,
                                       **kwargs)[:, prompts.shape[1]:]
        else:
            prefix = batch["decoder_prefix"]  # (B, 1 + forced): max_new_tokens counts a forced code, as
            # forced_bos_token_id does in transformers
            kwargs["max_new_tokens"] = max(1, min(kwargs["max_new_tokens"], positions) - prefix.shape[1] + 1)
            generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       decoder_input_ids=prefix, pad_token_id=pad, **kwargs)[:, prefix.shape[1]:]
        return [row.tolist() for row in generated.cpu()]

    # -- predictions and metrics -------------------------------------------------------------
    def decode(self, outputs: list[Any], features: list[dict], dataset: Dataset) -> list[Any]:
        tokenizer = self.tokenizer
        texts = [""] * len(dataset.examples)
        for ids, feature in zip(outputs, features, strict=True):
            texts[feature["example"]] = tokenizer.decode(ids, skip_special_tokens=True).strip()
        return texts

    def metric_names(self) -> list[str]:
        from kiln.metrics.generation import ROUGE_KEYS

        return ["bleu", "chrf", *ROUGE_KEYS, "exact_match", *super().metric_names()]

    def metrics(self, predictions: list[Any], dataset: Dataset) -> dict[str, float]:
        from kiln.metrics.generation import generation_metrics

        return generation_metrics(predictions, [ex["target"] for ex in dataset.examples])

    def loss_metrics(self, loss: float) -> dict[str, float]:
        return {"perplexity": math.exp(min(loss, 700))}

    def format(self, predictions: list[Any], dataset: Dataset) -> list[Any]:
        return [{"generated_text": text} for text in predictions]

    def write(self, dataset: Dataset, predictions: list[Any], stream: TextIO) -> None:
        if dataset.table is None:
            stream.write("".join(text + "\n" for text in predictions))
        elif dataset.table.format == "jsonl":
            for row, text in zip(dataset.table.rows, predictions, strict=True):
                stream.write(json.dumps({**row, "generated_text": text}, ensure_ascii=False) + "\n")  # type: ignore[dict-item]
        else:
            super().write(dataset, predictions, stream)

    def output_columns(self, predictions: list[Any], fmt: str) -> dict[str, list[Any]]:
        return {"generated_text": list(predictions)}
