"""LoRA through peft: adapters on a frozen pretrained start, their checkpoints, and the merged export.

A LoRA run's model is a ``peft.PeftModel`` around the task's transformers model. What trains is the
adapters plus the weights the start did not have (the task's new head, kept whole through peft's
``modules_to_save``), so that is all a checkpoint holds: peft's ``adapter_config.json`` and
``adapter_model.safetensors``, beside kiln's state. The frozen start is named in ``kiln.json``
(``lora.base``) with the sha256 of its weights, checked whenever it is loaded again (a resume, the
export). The exported ``model/`` has the adapters merged: a plain transformers directory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln.config import LoraConfig
from kiln.errors import KilnError
from kiln.files import read_json
from kiln.model_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, verify_adapter

INSTALL = "--lora needs peft: pip install 'kiln-nlp[peft]' (or pip install peft)"
# Families peft has no default targets for (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING):
# their attention projections, as peft picks query and value for BERT.
EXTRA_TARGETS = {"distilbert": ["q_lin", "v_lin"], "modernbert": ["Wqkv"]}


def require_peft() -> Any:
    """The peft module, or a one-line KilnError saying how to install it."""
    try:
        import peft
    except ImportError:
        raise KilnError(INSTALL) from None
    return peft


def is_adapted(model: Any) -> bool:
    """Whether ``model`` (or the module a strategy wrapped) carries LoRA adapters."""
    return hasattr(getattr(model, "module", model), "peft_config")


def targets_for(model: Any, settings: LoraConfig) -> list[str]:
    """The module names to adapt: ``lora.targets``, else the family's default."""
    if settings.targets.strip():
        return [name.strip() for name in settings.targets.split(",") if name.strip()]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(model.config, "model_type", "")
    found = DEFAULTS.get(model_type) or EXTRA_TARGETS.get(model_type)
    if not found:
        raise KilnError(f"peft knows no default LoRA targets for model_type '{model_type}': name the modules, "
                        "e.g. --lora targets=q_proj,v_proj")
    return list(found)


def head_modules(model: Any, new_keys: Sequence[str]) -> list[str]:
    """The task head, trained whole beside the adapters: the modules around the pretrained body (a
    classifier, a span scorer), and those that own weights the start did not have (``classifier.weight``
    -> ``classifier``). A language model's output layer is not one: it is pretrained, and as large as
    the vocabulary (often the input embeddings themselves)."""
    base = getattr(model, "base_model", model)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = dict(model.named_modules())

    def holds_output(name: str) -> bool:  # the output layer, or a module around it (tied or pretrained)
        return name not in modules or any(m is output for m in modules[name].modules())

    body = {id(p) for p in base.parameters()}
    heads = set()
    if base is not model:
        for name, child in model.named_children():
            own = [p for p in child.parameters() if id(p) not in body]
            if child is not base and own and not holds_output(name):
                heads.add(name)
    heads |= {key.rsplit(".", 1)[0] for key in new_keys if "." in key and not holds_output(key.rsplit(".", 1)[0])}
    # A module inside another that trains whole trains with it.
    return sorted(h for h in heads if not any(h.startswith(other + ".") for other in heads))


def adapt(model: Any, settings: LoraConfig, new_keys: Sequence[str], base: Path) -> Any:
    """``model`` with LoRA adapters on its ``targets`` and its new modules trainable; the rest frozen."""
    peft = require_peft()
    targets = targets_for(model, settings)
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n.endswith(t) for n in names)]
    if missing:
        present = sorted({n.rsplit(".", 1)[-1] for n in names if n})
        raise KilnError(f"lora.targets: the model has no module named '{missing[0]}' (e.g. {', '.join(present[:6])})")
    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=targets, modules_to_save=head_modules(model, new_keys) or None, bias="none")
    adapted = peft.get_peft_model(model, config)
    adapted.peft_config["default"].base_model_name_or_path = str(base)  # adapter/ then loads on it
    return adapted


def describe(model: Any, settings: LoraConfig) -> str:
    """``LoRA r=8: 0.3 M of 22.7 M parameters train``, for the run summary."""
    trainable, total = getattr(model, "module", model).get_nb_trainable_parameters()

    def count(n: int) -> str:
        return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e6:.2f} M" if n >= 1e4 else f"{n:,}"

    return (f"LoRA r={settings.r}: {count(trainable)} of {count(total)} parameters train "
            f"({100 * trainable / total:.1f} %)")


def base_identity(base: Path) -> dict:
    """What ``kiln.json`` records of the frozen start: its directory and its weights' sha256."""
    return {"base": str(base), "sha256": _weights_sha256(base)}


def _weights_sha256(base: Path) -> str:
    import hashlib

    from kiln.model_files import WEIGHTS_FILE, WEIGHTS_INDEX_FILE
    from kiln.pretrained import sha256

    if (base / WEIGHTS_FILE).is_file():
        return sha256(base / WEIGHTS_FILE)
    if (base / WEIGHTS_INDEX_FILE).is_file():  # sharded: the hash of the shards' hashes, in order
        shards = sorted(set(read_json(base / WEIGHTS_INDEX_FILE, required=("weight_map",))["weight_map"].values()))
        return hashlib.sha256("".join(sha256(base / s) for s in shards).encode()).hexdigest()
    raise KilnError("LoRA needs the start's weights as safetensors, and this directory has none", base)


def check_base(identity: dict) -> Path:
    """The frozen start a LoRA run recorded, once its weights are the ones it trained on."""
    base = Path(identity["base"])
    if not base.is_dir():
        raise KilnError("the LoRA run's frozen start is gone: its adapters need it (restore the directory)", base)
    if _weights_sha256(base) != identity["sha256"]:
        raise KilnError("the LoRA run's frozen start has changed since the run trained on it; restore the "
                        "original weights", base)
    return base


def save_adapter(path: Path, model: Any, weights: dict | None = None) -> None:
    """A LoRA checkpoint's model files: peft's adapter files for ``model`` (``weights``: the full state
    dict a strategy gathered) and the adapted model's ``config.json`` (its labels, pad token, dropout)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    model = getattr(model, "module", model)
    state = get_peft_model_state_dict(model, state_dict=weights)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path / ADAPTER_WEIGHTS))
    config = model.peft_config["default"].to_dict()  # its sets (target_modules) are written sorted
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=sorted) + "\n")
    base = model.get_base_model()
    base.config.save_pretrained(path)
    if getattr(base, "generation_config", None) is not None and base.can_generate():
        base.generation_config.save_pretrained(path)


def load_adapter(model: Any, path: Path) -> None:
    """Load a checkpoint's adapter weights into the adapted ``model``: every trainable tensor must be
    there (a resume continues exactly where the checkpoint was)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    model = getattr(model, "module", model)
    verify_adapter(path)
    weights = load_file(str(path / ADAPTER_WEIGHTS))
    result: Any = set_peft_model_state_dict(model, weights)
    loaded = {name for name, param in model.named_parameters() if param.requires_grad} - set(result.missing_keys)
    expected = {name for name, param in model.named_parameters() if param.requires_grad}
    if result.unexpected_keys or loaded != expected:
        raise KilnError(f"does not hold this run's adapters (unexpected {sorted(result.unexpected_keys)[:2]}, "
                        f"missing {sorted(expected - loaded)[:2]})", path / ADAPTER_WEIGHTS)


def is_adapter_dir(path: Path) -> bool:
    """Whether ``path`` is a LoRA checkpoint (adapter files, no full weights)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapted_start(task: Any, checkpoint: Path, identity: dict) -> Any:
    """The recorded start of a LoRA checkpoint, checked, with the checkpoint's config (labels, pad
    token) and fresh adapters: :func:`load_adapter` puts the checkpoint's in."""
    from transformers import AutoConfig

    from kiln.config import config_from_dict
    from kiln.model_files import KILN_FILE

    base = check_base(identity)
    hf_config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    model = task.load_model(base, config=hf_config, ignore_mismatched_sizes=True)
    settings = config_from_dict(read_json(checkpoint / KILN_FILE, required=("config",))["config"]).lora
    return adapt(model, settings, task.new_keys, base)


def merged_model(task: Any, checkpoint: Path, identity: dict) -> Any:
    """The plain transformers model of a LoRA checkpoint: its adapters merged into the start."""
    adapted = adapted_start(task, checkpoint, identity)
    load_adapter(adapted, checkpoint)
    return adapted.merge_and_unload()
