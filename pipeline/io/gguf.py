"""GGUF input: a local `.gguf` file or one file of a Hub repo, dequantized into an ordinary model.

transformers reads GGUF itself (with the `gguf` package). Asked to dequantize, it builds plain
`nn.Linear` weights; on the path that keeps GGUF blocks packed it instead attaches a quantizer that
makes `save_pretrained` refuse the model. We always ask for dense weights and then drop whatever
quantization bookkeeping is left, through the quantizer's own `remove_quantization_config`, so the
edited model saves as ordinary safetensors. Everything after loading is unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.io.loading import DTYPES, LoadConfig, Loaded, hub_errors

log = logging.getLogger(__name__)


def gguf_file(model_id: str, cfg: LoadConfig) -> Path:
    """The local path of the GGUF file: the MODEL itself, a file in a folder, or a Hub download."""
    path = Path(model_id).expanduser()
    if model_id.lower().endswith(".gguf"):
        if cfg.gguf_file:
            raise UserError("give either a .gguf MODEL or --gguf-file, not both")
        if not path.is_file():
            raise UserError(f"GGUF file '{model_id}' does not exist")
        return path
    name = str(cfg.gguf_file)
    if path.is_dir():
        if not (path / name).is_file():
            raise UserError(f"folder '{model_id}' has no GGUF file '{name}': check --gguf-file")
        return path / name
    if path.exists() or model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise UserError(f"model path '{model_id}' does not exist")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from pipeline.io.hub_token import check_access, read_token

    try:  # the job's own token (a Space visitor's, or anonymous): see pipeline/io/hub_token.py
        check_access(model_id, cfg.revision)
        return Path(hf_hub_download(model_id, name, revision=cfg.revision, token=read_token()))
    except EntryNotFoundError as exc:
        raise UserError(f"model '{model_id}' has no file '{name}': check --gguf-file") from exc
    except Exception as exc:  # noqa: BLE001 - translated below, re-raised otherwise
        err = hub_errors(model_id, exc)
        if err is None:
            raise
        raise err from exc


def describe(path: Path) -> dict[str, Any]:
    """What the recipe and card say about a GGUF source: file name, architecture, quantization type."""
    import struct

    import gguf
    from transformers.integrations.gguf import read_gguf_metadata

    # transformers' header reader skips the vocabulary arrays: 0.03 s on Qwen2.5's 151k tokens, where
    # gguf.GGUFReader parses them all (7 s).
    try:
        metadata, _ = read_gguf_metadata(str(path))
    except (ValueError, OSError, IndexError, KeyError, struct.error) as exc:
        raise UserError(f"'{path.name}' is not a readable GGUF file ({str(exc).splitlines()[0][:120]})") from exc
    file_type = metadata.get("general.file_type")
    try:
        quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quant = f"type {file_type}"
    return {
        "format": "gguf",
        "file": path.name,
        "quantization": quant,
        "architecture": metadata.get("general.architecture"),
        "size": path.stat().st_size,
    }


def _dense_only(model: Any) -> None:
    """Drop the GGUF quantizer once every weight is a plain tensor, so the model saves normally."""
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise UserError(f"the GGUF weights stayed packed ({packed[0]}, ...): cannot edit them")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def load_gguf(model_id: str, cfg: LoadConfig) -> Loaded:
    """Load a GGUF model dequantized to cfg.dtype (float32 for `auto`) with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from pipeline.edit.architectures import model_type_of, writers_for
    from pipeline.io.chat import prepare_tokenizer

    if cfg.load_in_4bit:
        raise UserError("--load-in-4bit does not apply to a GGUF file: it is dequantized on load (use --dtype)")
    path = gguf_file(model_id, cfg)
    folder, name = str(path.parent), path.name
    source = describe(path)
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError) as exc:
        raise UserError(
            f"transformers cannot read the GGUF file '{name}' (architecture {source['architecture']}): "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    writers_for(model_type_of(config))  # fail early on an architecture we cannot edit
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(folder, gguf_file=name))
    dtype = torch.float32 if cfg.dtype == "auto" else getattr(torch, DTYPES[cfg.dtype])
    kwargs: dict[str, Any] = {"dtype": dtype, "quantization_config": GgufConfig(dequantize=True)}
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    # The parsed config is passed on: from_pretrained would parse the GGUF file's metadata again.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, **kwargs)
    _dense_only(model)
    model.eval()
    if not cfg.device_map and torch.cuda.is_available():
        model.to("cuda")
    log.info("loaded %s from GGUF (%s, %s)", model_id, source["architecture"], source["quantization"])
    return Loaded(model=model, tokenizer=tokenizer, model_id=model_id, path=None, source=source)
