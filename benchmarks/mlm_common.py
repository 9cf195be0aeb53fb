"""Shared pieces of the MLM benchmarks: one evaluator for every contender, and the HF baseline.

The evaluator loads a saved model with ``AutoModelForMaskedLM`` (the same call for kiln's export
and HF Trainer's output), cuts ``valid.txt`` into 128-token blocks with the shared tokenizer, masks a
fixed 15 % (seed 0, 80/10/10) and reports the mean cross-entropy at the masked positions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

SEQ_LEN = 128
def valid_blocks(tokenizer: Any, path: Path, seq_len: int = SEQ_LEN) -> np.ndarray:
    """``[CLS] ... [SEP]`` blocks of ``seq_len`` tokens from the non-blank lines of ``path``."""
    from kiln.data.corpus import PackedBlocks, tokenize_corpus

    stream = tokenize_corpus([path], tokenizer, tokenizer.sep_token_id)["all"]
    blocks = PackedBlocks(stream.tokens, seq_len, [tokenizer.cls_token_id], [tokenizer.sep_token_id])
    return np.stack([blocks[i]["input_ids"] for i in range(len(blocks))])


def mlm_loss(model_dir: str | Path, tokenizer_dir: str | Path, valid: Path, batch: int = 64) -> float:
    """Mean masked-token cross-entropy of a saved model on ``valid`` (fixed 15 % mask, seed 0)."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from kiln.tasks.pretrain import mask_tokens

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    ids = valid_blocks(tokenizer, valid)
    corrupted, selected = mask_tokens(ids, np.random.default_rng(0), special_ids=tokenizer.all_special_ids,
                                      mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer), mask_prob=0.15)
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids), batch):
            x = torch.from_numpy(corrupted[start:start + batch])
            chosen = torch.from_numpy(selected[start:start + batch])
            logits = model(input_ids=x).logits[chosen]  # (M, V)
            target = torch.from_numpy(ids[start:start + batch])[chosen]
            total += float(torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum"))
            count += int(chosen.sum())
    return total / count


def hf_train_mlm(*, tokenizer_dir: str, train: Path, out: Path, hidden: int, layers: int, heads: int,
                 intermediate: int, batch: int, lr: float, max_steps: int, budget_s: float = 0.0,
                 bf16: bool = False, warmup_ratio: float = 0.0, best: bool = False) -> dict:
    """HF ``Trainer`` + ``DataCollatorForLanguageModeling`` on ``run_mlm``-style grouped 128-token blocks.

    With ``budget_s`` a callback stops training when the wall clock since ``train()`` began runs out;
    the linear schedule is sized to ``max_steps`` (the caller's estimate of the budget's steps).
    ``best``: HF's fastest switches, ``torch_compile=True`` and ``optim="adamw_torch_fused"``.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    lines = [line.strip() for line in train.read_text(encoding="utf-8").splitlines() if line.strip()]
    encoded = tokenizer(lines, return_special_tokens_mask=True)
    # run_mlm's group_texts: concatenate every tokenized line ([CLS] ... [SEP]) and cut 128-token blocks.
    flat = {k: [t for seq in v for t in seq] for k, v in encoded.items()}
    n = len(flat["input_ids"]) // SEQ_LEN * SEQ_LEN
    dataset = [{k: v[i:i + SEQ_LEN] for k, v in flat.items()} for i in range(0, n, SEQ_LEN)]
    set_seed(42)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                                       num_attention_heads=heads, intermediate_size=intermediate,
                                       pad_token_id=tokenizer.pad_token_id))

    class Budget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if budget_s and time.perf_counter() - self.start >= budget_s:
                control.should_training_stop = True

    args = TrainingArguments(
        output_dir=str(out / "hf-trainer"), per_device_train_batch_size=batch, learning_rate=lr,
        # transformers 5 has no warmup_ratio: a float warmup_steps below 1 is the ratio.
        max_steps=max_steps, warmup_steps=warmup_ratio, lr_scheduler_type="linear", seed=42, bf16=bf16,
        use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no", eval_strategy="no",
        logging_steps=10**9, dataloader_num_workers=0, disable_tqdm=True, torch_compile=best,
        optim="adamw_torch_fused" if best else "adamw_torch")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.15)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                      callbacks=[Budget()])
    result = trainer.train()
    model.save_pretrained(out / "hf-model")
    seconds = result.metrics["train_runtime"]
    tokens = result.global_step * batch * SEQ_LEN
    return {"steps": result.global_step, "train_seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "model": str(out / "hf-model"),
            "params": sum(p.numel() for p in model.parameters())}
