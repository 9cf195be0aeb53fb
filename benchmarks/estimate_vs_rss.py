"""``kiln estimate`` against reality: training memory estimate vs measured peak RSS growth on CPU.

    .venv/bin/python benchmarks/estimate_vs_rss.py [--profiles bert-tiny bert-mini bert-small] [--batch-size 32]

Each profile trains for a few AdamW steps (fp32, seq 128, random tokens) in a fresh subprocess. The
measured figure is the peak resident set size during training minus the RSS after imports, so it
covers weights, gradients, optimizer state, activations and the allocator's overhead. The ratio
estimate/measured is printed; the target is within 25%.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def current_rss() -> int:
    """Resident set size in bytes now (Linux ``/proc``; ``ru_maxrss`` only gives the peak)."""
    with open("/proc/self/status") as status:
        kilobytes = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kilobytes * 1024


def worker(profile: str, batch_size: int, seq_len: int) -> dict:
    import resource

    import torch
    from transformers import AutoModelForMaskedLM  # noqa: F401  (import cost before the baseline)

    from kiln.estimate import estimate
    from kiln.models import hf_config
    from kiln.profiles import load
    from kiln.tasks import get_task

    config = load(profile)
    task = get_task("sequence", config, {"problem_type": "classification", "labels": ["a", "b"]})

    def train_steps(model: object, steps: int, batch: int, vocab: int) -> None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
        for _ in range(steps):
            ids = torch.randint(5, vocab, (batch, seq_len))
            model(input_ids=ids, attention_mask=torch.ones_like(ids),
                  labels=torch.zeros(batch, dtype=torch.long)).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    # Warm up with a one-layer toy first: the first use of each kernel maps library code and
    # thread-pool buffers into RSS, a fixed runtime cost that is not the model's memory.
    toy = task.build_model(hf_config(config.model.type, {**config.model.config, "num_hidden_layers": 1,
                                                         "vocab_size": 100}, **task.model_kwargs()))
    train_steps(toy, 1, 2, 100)
    del toy
    baseline = current_rss()
    torch.manual_seed(0)
    model = task.build_model(hf_config(config.model.type, config.model.config, **task.model_kwargs()))
    if config.train.dropout is not None:  # as kiln's Trainer does: the profile's dropout wins
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = config.train.dropout
    train_steps(model, 3, batch_size, model.config.vocab_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    predicted = estimate(profile, seq_len=seq_len, batch_size=batch_size)["training"]["memory_mb"]
    return {"profile": profile, "measured_mb": round((peak - baseline) / 1e6, 1), "estimate_mb": predicted["total"],
            "activations_mb": predicted["activations"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["bert-tiny", "bert-mini", "bert-small"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch_size, args.seq_len)))
        return
    print(f"{'profile':<14}{'estimate MB':>12}{'measured MB':>13}{'ratio':>8}")
    for profile in args.profiles:
        out = subprocess.run([sys.executable, __file__, "--worker", profile, "--batch-size", str(args.batch_size),
                              "--seq-len", str(args.seq_len)], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        ratio = result["estimate_mb"] / result["measured_mb"]
        verdict = "ok" if abs(ratio - 1) <= 0.25 else "outside 25%"
        print(f"{profile:<14}{result['estimate_mb']:>12.1f}{result['measured_mb']:>13.1f}{ratio:>8.2f}  {verdict}")


if __name__ == "__main__":
    main()
