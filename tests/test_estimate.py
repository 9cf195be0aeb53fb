"""kiln estimate: exact parameter counts from the meta device, memory and FLOPs arithmetic, and
agreement with a real training run's memory."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

from kiln.cli import main
from kiln.errors import KilnError
from kiln.estimate import estimate


def test_t5_efficient_base_dl2(capsys):
    assert main(["estimate", "--profile", "t5-efficient-base-dl2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    counts = result["parameters"]
    assert counts["total"] == 128_508_672
    assert counts["embedding"] + counts["non_embedding"] == counts["total"]
    # The model card's 514.09 / 257.05 MB are file sizes (serialisation overhead included).
    assert result["weights_mb"] == {"fp32": 514.03, "fp16": 257.02}


@pytest.mark.parametrize(("profile", "count"), [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200),
    ("bert-base", 109_482_240), ("bert-large", 335_141_888), ("t5-efficient-base", 222_903_552),
])
def test_released_parameter_counts(profile, count):
    assert estimate(profile)["parameters"]["total"] == count


def test_tied_embeddings_counted_once():
    counts = estimate("t5-small")["parameters"]
    assert counts["embedding"] == 32128 * 512  # one shared table for encoder, decoder (and the LM head)


def test_memory_breakdown_follows_precision_and_optimizer():
    fp32 = estimate("bert-mini", seq_len=128, batch_size=8)
    bf16 = estimate("bert-mini", seq_len=128, batch_size=8, precision="bf16")
    adafactor = estimate("bert-mini", seq_len=128, batch_size=8, optimizer="adafactor")
    m32, m16 = fp32["training"]["memory_mb"], bf16["training"]["memory_mb"]
    assert m32["optimizer"] == pytest.approx(2 * m32["weights"], abs=0.02)
    assert m16["activations"] == pytest.approx(m32["activations"] / 2, abs=0.02)
    assert m16["mixed_precision_copies"] == pytest.approx(m32["weights"] / 2, abs=0.02)
    assert m32["mixed_precision_copies"] == 0
    assert 0 < adafactor["training"]["memory_mb"]["optimizer"] < m32["optimizer"] / 20
    assert sum(v for k, v in m32.items() if k != "total") == pytest.approx(m32["total"], abs=0.05)


def test_estimate_knows_exactly_the_optimizers_training_has():
    from kiln.config import OPTIMIZERS
    from kiln.estimate import OPTIMIZER_STATES

    assert set(OPTIMIZER_STATES) == set(OPTIMIZERS)
    with pytest.raises(KilnError, match="--optimizer must be one of adamw, adam, adafactor, radam; got 'sgd'"):
        estimate("bert-mini", seq_len=128, batch_size=8, optimizer="sgd")  # training has no sgd


def test_activations_follow_the_attention_width_the_gate_and_the_profiles_batch():
    from kiln.estimate import Shape, activation_bytes

    plain = Shape(layers=1, decoder_layers=0, hidden=8, ffn=32, heads=2, attention_width=8)
    wide = Shape(layers=1, decoder_layers=0, hidden=8, ffn=32, heads=2, attention_width=32)  # T5-xxl-like
    gated = Shape(layers=1, decoder_layers=0, hidden=8, ffn=32, heads=2, attention_width=8, gated=True)
    per_token = [activation_bytes(s, seq_len=1, batch_size=1, precision="fp32") // 4 for s in (plain, wide, gated)]
    assert per_token == [11 * 8 + 2 * 32, 7 * 8 + 4 * 32 + 2 * 32, 11 * 8 + 4 * 32]
    # crammed-bert trains 128 blocks of pretrain.seq_len tokens: the estimate uses what training would.
    result = estimate("crammed-bert", task="mlm")
    assert (result["training"]["batch_size"], result["training"]["seq_len"]) == (128, 128)


def test_flops_and_time():
    result = estimate("bert-base", seq_len=512, peak_tflops=100, mfu=0.5)
    non_embedding = result["parameters"]["non_embedding"]
    # PaLM's accounting: 6 N plus 12 x layers x seq x width for Q K^T and A V (forward + backward).
    assert result["flops_per_token"] == 6 * non_embedding + 12 * 12 * 512 * 768
    assert result["seconds_per_million_tokens"] == pytest.approx(1e6 * result["flops_per_token"] / 50e12, abs=0.01)


def test_unknown_profile_is_a_clean_error():
    with pytest.raises(KilnError, match="did you mean"):
        estimate("gpt3")
    with pytest.raises(KilnError, match="--seq-len must be positive, got -5"):
        estimate("bert-tiny", seq_len=-5)
    with pytest.raises(KilnError, match="unknown task 'bogus'"):
        estimate("bert-tiny", task="bogus")
    with pytest.raises(KilnError, match="does not build a valid model: The hidden size"):
        estimate("bert-tiny", overrides=["model.config.hidden_size=33"])


def test_estimate_agrees_with_a_real_training_run():
    """Estimated training memory within 25% of the peak RSS growth of three real AdamW steps."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "estimate_vs_rss.py"), "--profiles",
                          "bert-mini", "--batch-size", "16"], capture_output=True, text=True, check=True)
    row = out.stdout.strip().splitlines()[-1].split()
    assert row[0] == "bert-mini" and abs(float(row[3]) - 1) <= 0.25, out.stdout
