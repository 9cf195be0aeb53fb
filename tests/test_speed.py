"""The speed levers: torch.compile (and eager mode whenever it cannot work), eager attention for short
bf16 CPU training, and the profiler's categories."""

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import kiln
from kiln.training import compile as compiling

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def train(tiny_profile, data, name, tmp_path, **flags):
    return kiln.train("sequence", data, name=name, profile=str(tiny_profile), output_dir=tmp_path / "runs",
                      max_steps=4, precision="fp32", seed=3, **{"train.dropout": 0.0, **flags})


def trains_eagerly_after_one_warning(tiny_profile, sentiment_dir, tmp_path, caplog, reason):
    """Train with compile on: one warning naming ``reason``, and the weights of an eager run, bit for bit."""
    from safetensors.torch import load_file

    with caplog.at_level(logging.WARNING, logger="kiln"):
        run = train(tiny_profile, sentiment_dir, "compiled", tmp_path, compile="on")
    warnings = [r.getMessage() for r in caplog.records if "compile" in r.getMessage()]
    assert len(warnings) == 1 and reason in warnings[0] and "eagerly" in warnings[0]
    eager = train(tiny_profile, sentiment_dir, "eager", tmp_path, compile="off")
    compiled = load_file(run.model_dir / "model.safetensors")
    for name, tensor in load_file(eager.model_dir / "model.safetensors").items():
        assert torch.equal(compiled[name], tensor), name


def test_auto_compiles_long_cuda_runs_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compiling.wanted("auto", cuda, long_run=True)
    assert not compiling.wanted("auto", cuda, long_run=False)
    assert not compiling.wanted("auto", cpu, long_run=True)  # measured no faster on CPUs
    assert compiling.wanted("on", cpu, long_run=False) and not compiling.wanted("off", cuda, long_run=True)


def test_compile_without_a_compiler_warns_once_and_trains_eagerly(tiny_profile, sentiment_dir, tmp_path,
                                                                   monkeypatch, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    trains_eagerly_after_one_warning(tiny_profile, sentiment_dir, tmp_path, caplog, "no C++ compiler")


def test_a_model_that_fails_to_compile_trains_eagerly(tiny_profile, sentiment_dir, tmp_path, monkeypatch, caplog):
    """A compile error at the first step (dynamo or inductor) is one warning; that step runs again eagerly,
    so the run ends with the weights an eager run has, bit for bit."""
    from torch._dynamo.exc import Unsupported

    class FailsToCompile(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner  # as torch.compile's wrapper holds what it compiled

        def forward(self, **inputs):
            raise Unsupported("graph break in an unsupported op")

    monkeypatch.setattr(compiling, "compile_module", lambda module, device: FailsToCompile(module))
    trains_eagerly_after_one_warning(tiny_profile, sentiment_dir, tmp_path, caplog, "Unsupported")


def test_a_model_error_is_not_taken_for_a_compile_error():
    from torch._dynamo.exc import Unsupported

    assert compiling.compile_failed(Unsupported("x"))
    assert not compiling.compile_failed(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not compiling.compile_failed(torch.OutOfMemoryError("out of memory"))


def test_compile_watch_counts_shapes_and_their_extra_seconds(monkeypatch):
    clock = iter([0.0, 30.0, 30.0, 31.0, 31.0, 32.0, 32.0, 52.0])
    monkeypatch.setattr(compiling.time, "perf_counter", lambda: next(clock))
    watch = compiling.CompileWatch()
    a, b = {"input_ids": torch.zeros(2, 8)}, {"input_ids": torch.zeros(4, 16)}
    for batches in ([a], [a], [a], [b]):  # a new shape at the first and the last step
        watch.begin(batches)
        watch.end()
    assert len(watch.shapes) == 2
    assert watch.seconds() == pytest.approx((30 - 1) + (20 - 1))  # beyond the ordinary 1 s step
    assert watch.summary().startswith("compiled 2 shapes in 48s")


def test_compiled_training_exports_what_transformers_reproduces(tiny_profile, sentiment_dir,
                                                                                 tmp_path, caplog):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with caplog.at_level(logging.INFO, logger="kiln"):
        run = train(tiny_profile, sentiment_dir, "compiled", tmp_path, compile="on")
    assert any("compiled" in r.getMessage() and "shape" in r.getMessage() for r in caplog.records)
    texts = ["the film is wonderful .", "every scene is dull ."]
    predictor = kiln.load(run.path)
    ours = [p["score"] for p in predictor.predict(texts)]
    tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(run.model_dir).eval()
    with torch.no_grad():
        probs = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits.softmax(-1).max(-1).values
    torch.testing.assert_close(torch.tensor(ours), probs, rtol=0, atol=1e-5)
    compiled = kiln.load(run.path, compile="on")  # predict/serve --compile on
    assert compiled.module is not None
    torch.testing.assert_close(torch.tensor([p["score"] for p in compiled.predict(texts)]), probs, rtol=0, atol=1e-5)


@pytest.mark.slow  # two compiled runs (about 40 s); compiled training itself is in the default run
def test_a_second_compiled_run_starts_warm(tiny_profile, sentiment_dir, tmp_path, caplog):
    train(tiny_profile, sentiment_dir, "compiled", tmp_path, compile="on")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kiln"):
        train(tiny_profile, sentiment_dir, "compiled-again", tmp_path, compile="on")
    assert any("warm" in r.getMessage() for r in caplog.records)


def test_eager_attention_for_short_bf16_cpu_training_is_the_same_math():
    from transformers import BertConfig, BertForSequenceClassification

    from kiln.models import EAGER_ATTENTION_MAX_LEN, training_attention

    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, attn_implementation="sdpa")
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(1, 60, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    cpu = torch.device("cpu")
    assert training_attention(model, cpu, "fp32", 12) is None
    assert training_attention(model, cpu, "bf16", EAGER_ATTENTION_MAX_LEN + 1) is None
    assert training_attention(model, torch.device("cuda"), "bf16", 12) is None
    assert model.config._attn_implementation == "sdpa"
    assert training_attention(model, cpu, "bf16", 12) == "eager"
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_profile_categories():
    from profile_step import categorise, split_profile

    assert categorise("aten::mm", ["kiln.backward"]) == "matmul"
    assert categorise("aten::addmm", ["kiln.forward", "aten::linear"]) == "matmul"
    assert categorise("aten::_scaled_dot_product_flash_attention_for_cpu", []) == "attention"
    assert categorise("aten::bmm", []) == "attention"
    assert categorise("aten::copy_", ["kiln.forward", "aten::_to_copy"]) == "dtype casts"
    assert categorise("aten::copy_", ["kiln.optimizer"]) == "optimizer"
    assert categorise("aten::_fused_adamw_", ["Optimizer.step#AdamW.step"]) == "optimizer"
    assert categorise("aten::_log_softmax", []) == "loss/head"
    assert categorise("aten::native_layer_norm", []) == "norms/element-wise"
    assert categorise("aten::index_select", ["kiln.collate"]) == "collate/data"
    assert categorise("kiln.collate", []) == "collate/data"  # the collate's own Python time

    def event(name, self_us, parent=None):
        return SimpleNamespace(name=name, self_cpu_time_total=self_us, cpu_parent=parent)

    forward = event("kiln.forward", 5)
    events = [forward, event("aten::mm", 60, forward), event("aten::copy_", 10, forward)]
    totals, by_op = split_profile(events, wall_us=100)
    assert totals["matmul"] == 60 and totals["dtype casts"] == 10
    assert totals["python/framework"] == 5 + (100 - 75)  # the range's own time and the unaccounted rest
    assert sum(totals.values()) == 100 and by_op["matmul"] == {"aten::mm": 60}
    json.dumps(totals)


def test_predict_falls_back_to_eager_when_compiling_fails(tiny_profile, sentiment_dir, tmp_path, monkeypatch,
                                                          caplog):
    from torch._dynamo.exc import Unsupported

    run = train(tiny_profile, sentiment_dir, "run", tmp_path)
    texts = ["the film is wonderful .", "every scene is dull ."]
    eager = kiln.load(run.path).predict(texts)

    def fails(**inputs):
        raise Unsupported("graph break in an unsupported op")

    monkeypatch.setattr(compiling, "compile_module", lambda module, device: fails)
    predictor = kiln.load(run.path, compile="on")
    with caplog.at_level(logging.WARNING, logger="kiln"):
        assert predictor.predict(texts) == eager
        assert predictor.predict(texts) == eager
    assert predictor.module is None
    assert len([r for r in caplog.records if "compile" in r.getMessage()]) == 1
