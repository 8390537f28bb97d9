"""Load a model and its tokenizer from a Hub id, a local folder, or `demo`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import HubError, UserError

log = logging.getLogger(__name__)

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


class LoadConfig(BaseModel):
    """How to load a model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto keeps the dtype the model was saved in."
    )
    device_map: str | None = Field(
        None, description="Device placement passed to from_pretrained, e.g. 'auto' to spread over several GPUs."
    )
    load_in_4bit: bool = Field(
        False, description="Load in 4-bit with bitsandbytes (to measure very large models; needs a GPU)."
    )
    trust_remote_code: bool = Field(False, description="Run the model repository's own Python code.")
    gguf_file: str | None = Field(
        None, description="GGUF file to load from a Hub repo or folder (dequantized); a MODEL ending in .gguf "
        "names the file itself."
    )


@dataclass
class Loaded:
    """A loaded model with where it came from."""

    model: Any
    tokenizer: Any
    model_id: str
    path: Path | None  # local folder holding the weights, when there is one
    source: dict | None = None  # how the weights were stored, when not as safetensors (GGUF file, type)


def is_demo(model_id: str) -> bool:
    from pipeline.io.demo import DEMO_NAME

    return model_id == DEMO_NAME


def is_gguf(model_id: str, cfg: LoadConfig = LoadConfig()) -> bool:
    """Whether the weights come from a GGUF file (a path ending in .gguf, or --gguf-file)."""
    return bool(cfg.gguf_file) or model_id.lower().endswith(".gguf")


def hub_errors(model_id: str, exc: Exception) -> UserError | None:
    """Translate a huggingface_hub / transformers exception into a one-line user error."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return UserError(f"model '{model_id}' is gated: accept its terms on the Hub and set HF_TOKEN")
    if isinstance(exc, RepositoryNotFoundError):
        return UserError(f"model '{model_id}' not found: check the id or path (a private model needs HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return UserError(f"revision not found for model '{model_id}': check --revision")
    if isinstance(exc, LocalEntryNotFoundError):
        return HubError(f"cannot reach the Hub to fetch '{model_id}': check the network or use a local folder")
    if isinstance(exc, HfHubHTTPError):
        return HubError(f"Hub error while fetching '{model_id}': {str(exc).splitlines()[0]}")
    return None


def local_path(model_id: str, cfg: LoadConfig = LoadConfig()) -> Path:
    """A local folder with the model's files: the demo cache, a folder, or a Hub snapshot."""
    from pipeline.io.demo import demo_path

    if is_gguf(model_id, cfg):
        raise UserError(
            f"'{model_id}' is a GGUF file: this command needs a safetensors model; abliterate it (or load it in "
            "`evaluate`/`directions`) first, which writes one"
        )
    if is_demo(model_id):
        return demo_path()
    path = Path(model_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"folder '{model_id}' has no config.json: is it a saved model?")
        return path
    if path.exists() or model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise UserError(f"model path '{model_id}' does not exist")
    from huggingface_hub import snapshot_download

    from pipeline.io.hub_token import check_access, read_token

    try:  # the job's own token (a Space visitor's, or anonymous): see pipeline/io/hub_token.py
        check_access(model_id, cfg.revision)
        return Path(snapshot_download(model_id, revision=cfg.revision, allow_patterns=WEIGHT_PATTERNS,
                                      token=read_token()))
    except Exception as exc:  # noqa: BLE001 - translated below, re-raised otherwise
        err = hub_errors(model_id, exc)
        if err is None:
            raise
        raise err from exc


def model_kwargs(cfg: LoadConfig) -> dict:
    """`from_pretrained` keyword arguments for `cfg` (dtype, device map, 4-bit quantization)."""
    import torch

    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    kwargs["dtype"] = "auto" if cfg.dtype == "auto" else getattr(torch, DTYPES[cfg.dtype])
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    if cfg.load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise UserError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes (GPU only)") from exc
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4"
        )
    return kwargs


def load_tokenizer(path: Path, cfg: LoadConfig = LoadConfig()):
    from transformers import AutoTokenizer

    from pipeline.io.chat import prepare_tokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from '{path}': the model folder needs its tokenizer files") from exc
    return prepare_tokenizer(tok)


def load_config(path: Path, cfg: LoadConfig = LoadConfig()):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except ValueError as exc:
        raise UserError(f"cannot read the model config in '{path}': {str(exc).splitlines()[0]}") from exc


def load_model(model_id: str, cfg: LoadConfig = LoadConfig()) -> Loaded:
    """Load model + tokenizer; the architecture must be in our residual-writer table."""
    from pipeline.edit.architectures import model_type_of, writers_for

    if is_gguf(model_id, cfg):
        from pipeline.io.gguf import load_gguf

        return load_gguf(model_id, cfg)
    path = local_path(model_id, cfg)
    writers_for(model_type_of(load_config(path, cfg)))  # fail early on an unknown architecture
    tokenizer = load_tokenizer(path, cfg)
    model = _from_pretrained(path, cfg, place=True)
    log.info("loaded %s (%s)", model_id, type(model).__name__)
    return Loaded(model=model, tokenizer=tokenizer, model_id=model_id, path=path)


def load_causal_lm(model_id: str, cfg: LoadConfig = LoadConfig(), place: bool = True):
    """The model alone, in eval mode, on the GPU when there is one (`place`) and no device map decides.

    No architecture-table check: tuning and steering work on every causal LM.
    """
    return _from_pretrained(local_path(model_id, cfg), cfg, place)


def _from_pretrained(path: Path, cfg: LoadConfig, place: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs(cfg))
    if place and not cfg.device_map and not cfg.load_in_4bit:
        import torch

        if torch.cuda.is_available():
            model.to("cuda")
    return model.eval()


def unquantized(cfg: LoadConfig) -> LoadConfig:
    """`cfg` without 4-bit loading: merging adapters and weight arithmetic need full-precision weights."""
    return cfg.model_copy(update={"load_in_4bit": False})


def free_memory() -> None:
    """Return a dropped model's memory now (before the next model loads), not at some later collection."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
