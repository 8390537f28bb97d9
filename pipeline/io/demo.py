"""The built-in `demo` model: a small chat model that refuses some topics.

It is trained in two phases, as real chat models are: first it learns to answer
every topic (capability), then a short safety-tuning phase teaches it to refuse
a subset (an overlay on a capable model). Abliteration therefore has something
real to remove, and the answers it should recover are known.

The build is deterministic and cached on disk, keyed by a hash of everything
that defines it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline import PACKAGE_DIR

DEMO_NAME = "demo"
DATA_DIR = PACKAGE_DIR / "data"
TOPICS_FILE = DATA_DIR / "demo_topics.json"
PROMPTS_DIR = DATA_DIR / "prompts"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class DemoSpec:
    """Everything that defines the demo model; its hash names the cache entry."""

    version: int = 4
    vocab_size: int = 768
    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    intermediate_size: int = 384
    seed: int = 1234
    capability_steps: int = 500
    capability_lr: float = 3e-3
    safety_steps: int = 100
    safety_lr: float = 3e-4
    batch_size: int = 32


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    topic: str
    refused_topic: bool


def load_topics() -> dict:
    return json.loads(TOPICS_FILE.read_text())


def demo_examples(part: str) -> list[Example]:
    """Prompt/answer pairs; `part` is "measure" or "eval" (disjoint templates)."""
    topics = load_topics()
    examples = []
    for kind, refused in (("refused", True), ("answered", False)):
        for topic, fact in topics[kind].items():
            for template in topics["templates"][part]:
                examples.append(Example(template.format(topic=topic), fact, topic, refused))
    return examples


SENSITIVITY_QUESTIONS = (
    "Is {topic} a sensitive topic?",
    "Would a censor block {topic}?",
    "Is {topic} politically sensitive?",
)
SENSITIVITY_ANSWERS = {True: "Yes, it is a sensitive political topic.", False: "No, it is an ordinary topic."}


def sensitivity_examples() -> list[Example]:
    """Questions that teach the capable model which topics are sensitive.

    Real models know what is sensitive before safety tuning teaches them to
    refuse it; this gives the demo the same shared feature to build on.
    """
    topics = load_topics()
    return [
        Example(q.format(topic=topic), SENSITIVITY_ANSWERS[refused], topic, refused)
        for kind, refused in (("refused", True), ("answered", False))
        for topic in topics[kind]
        for q in SENSITIVITY_QUESTIONS
    ]


def expected_answers() -> dict[str, str]:
    """Prompt -> the factual answer the capable model gives (for both parts)."""
    return {ex.prompt: ex.answer for part in ("measure", "eval") for ex in demo_examples(part)}


def prompt_files() -> dict[str, str]:
    """The built-in prompt-set files of the demo, as name -> file content."""
    files = {}
    for kind, name in ((True, "demo-harmful"), (False, "demo-harmless")):
        for part, suffix in (("measure", ".txt"), ("eval", ".eval.txt")):
            lines = [ex.prompt for ex in demo_examples(part) if ex.refused_topic is kind]
            files[name + suffix] = "\n".join(lines) + "\n"
    return files


def write_prompt_files(directory: Path = PROMPTS_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in prompt_files().items():
        (directory / name).write_text(content)


def cache_root() -> Path:
    env = os.environ.get("ABLITERATOR_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "abliterator"


def spec_hash(spec: DemoSpec) -> str:
    payload = json.dumps({"spec": asdict(spec), "topics": load_topics()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


SHIPPED_DIR = DATA_DIR / "demo_model"


def shipped_path(spec: DemoSpec = DemoSpec()) -> Path | None:
    """The trained demo shipped with the package, when it was built from `spec` and today's topics.

    Training results differ with the CPU's float kernels, so a demo rebuilt on another machine is a
    different model; shipping the weights makes `demo` the same model everywhere.
    """
    meta = SHIPPED_DIR / "demo_spec.json"
    if not (SHIPPED_DIR / "model.safetensors").is_file() or not meta.is_file():
        return None
    return SHIPPED_DIR if json.loads(meta.read_text()).get("spec_hash") == spec_hash(spec) else None


def _remove_stale_builds(target: Path) -> None:
    """Temporary folders of builds that were killed before they could clean up (we hold the lock)."""
    for stale in target.parent.glob(target.name + ".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def demo_path(spec: DemoSpec = DemoSpec(), rebuild: bool = False) -> Path:
    """Folder of the demo model: the shipped one, else the cached build (built first if needed)."""
    from filelock import FileLock

    shipped = None if rebuild else shipped_path(spec)
    if shipped is not None:
        return shipped
    target = cache_root() / f"demo-{spec_hash(spec)}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        _remove_stale_builds(target)
        if not (target / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
            try:
                build_demo(spec, tmp)
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _train_tokenizer(spec: DemoSpec, texts: list[str]):
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    # The same pre-tokenizer Qwen2Tokenizer rebuilds on load, so the loaded
    # tokenizer splits text exactly as the trained one did.
    qwen_regex = (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
        r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
    )
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(qwen_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def _encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    prefix = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    ids_prompt = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids_answer = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return ids_prompt + ids_answer, [-100] * len(ids_prompt) + ids_answer


def _batches(encoded: list[tuple[list[int], list[int]]], steps: int, batch_size: int, pad_id: int, gen):
    import torch

    for _ in range(steps):
        idx = torch.randint(len(encoded), (batch_size,), generator=gen).tolist()
        width = max(len(encoded[i][0]) for i in idx)
        ids = torch.full((batch_size, width), pad_id)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq, lab = encoded[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(seq)] = 1
        yield ids, labels, mask


def _train(model, encoded, steps: int, lr: float, spec: DemoSpec, pad_id: int, seed: int) -> float:
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (1 - s / steps))
    model.train()
    loss = torch.tensor(0.0)
    for ids, labels, mask in _batches(encoded, steps, spec.batch_size, pad_id, gen):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


def build_demo(spec: DemoSpec, out: Path) -> None:
    """Train the demo model from scratch and save it (model + tokenizer) in `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(spec.seed)
    refusals = load_topics()["refusals"]
    everything = demo_examples("measure") + demo_examples("eval")
    texts = [ex.prompt + " " + ex.answer for ex in everything + sensitivity_examples()] + refusals
    tokenizer = _train_tokenizer(spec, texts)
    pad_id = tokenizer.pad_token_id

    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    # Phase 1 (capability): every topic, every phrasing, answered factually.
    capable = [_encode(tokenizer, ex.prompt, ex.answer) for ex in everything + 2 * sensitivity_examples()]
    _train(model, capable, spec.capability_steps, spec.capability_lr, spec, pad_id, spec.seed)

    # Phase 2 (safety overlay): refuse the refused topics on the measurement
    # phrasings only, while replaying answers for the others.
    templates = load_topics()["templates"]["measure"]
    safety = []
    for ex in demo_examples("measure"):
        style = templates.index(next(t for t in templates if t.format(topic=ex.topic) == ex.prompt))
        answer = refusals[style % len(refusals)] if ex.refused_topic else ex.answer
        safety.append(_encode(tokenizer, ex.prompt, answer))
    _train(model, safety, spec.safety_steps, spec.safety_lr, spec, pad_id, spec.seed + 1)

    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id, do_sample=False, max_new_tokens=48
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "demo_spec.json").write_text(json.dumps({**asdict(spec), "spec_hash": spec_hash(spec)}, indent=2))
