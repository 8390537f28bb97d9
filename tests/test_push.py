"""`python -m pipeline.push` as a real subprocess against the local Hub-protocol server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import RepositoryNotFoundError

from tests.hub_fixtures import ALICE_TOKEN, BOB_TOKEN
from tests.test_card import SAMPLE_EVAL, model_index_values

ROOT = Path(__file__).resolve().parent.parent
REPO_ID = "alice/tiny-abliterated"


def _tokenizer(folder: Path) -> None:
    """A tiny byte-level BPE tokenizer with a chat template, saved the transformers way."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Hello there, how are you?", "Tell me about the weather today."] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(folder)


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete output folder (no README.md): tiny llama in shards, tokenizer, recipe, evaluation."""
    from tests.tiny_models import save_tiny

    folder = save_tiny("llama", tmp_path_factory.mktemp("model") / "tiny-abliterated")
    _tokenizer(folder)
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1, "the sample should have several shards"
    # the recipe an abliteration of this model writes (recipe() and write_recipe() are what abliterate calls)
    from pipeline.edit.abliterate import EditConfig
    from pipeline.edit.architectures import num_layers_of
    from pipeline.edit.stages import recipe, strength_plan
    from pipeline.io.loading import LoadConfig, load_config
    from pipeline.io.output import write_recipe

    plan = strength_plan(EditConfig().placed(0.5), num_layers_of(load_config(folder)))
    layer = {"spec": "best", "index": 1, "fraction": 0.5}
    write_recipe(folder, recipe("demo", LoadConfig(), EditConfig().placed(0.5), layer, None, plan)
                 | {"command": "python -m pipeline abliterate demo --out out/tiny-abliterated"})
    (folder / "eval_results.json").write_text(json.dumps(SAMPLE_EVAL, indent=2))
    (folder / "strengths.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    return folder


@pytest.fixture
def folder(model_folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_folder, tmp_path / model_folder.name))


def push(folder: Path, *args: str, token: str | None = ALICE_TOKEN, endpoint: str | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ABLITERATOR_PUSH_BACKOFF_S": "0.05"}
    env.pop("HF_TOKEN", None)
    if token is not None:
        env["HF_TOKEN"] = token
    if endpoint is not None:
        env["HF_ENDPOINT"] = endpoint
    cmd = [sys.executable, "-m", "pipeline.push", str(folder), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    for secret in (ALICE_TOKEN, BOB_TOKEN):
        assert secret not in result.stdout and secret not in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_pushed(hub, folder: Path, repo_id: str = REPO_ID, revision: str = "main") -> dict[str, bytes]:
    remote = hub.files(repo_id, revision)
    local = local_files(folder)
    assert set(remote) == set(local) | {".gitattributes"}
    for path, data in local.items():
        assert remote[path] == data, f"{path} differs"
    for data in remote.values():
        assert ALICE_TOKEN.encode() not in data and BOB_TOKEN.encode() not in data
    return remote


def test_push_uploads_everything(hub, folder: Path) -> None:
    result = push(folder, "--repo-id", REPO_ID)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"{hub.url}/{REPO_ID}"
    remote = assert_pushed(hub, folder)
    assert "eval_results.json" in remote and "recipe.json" in remote
    assert any(p.endswith(".safetensors.index.json") for p in remote)
    card = ModelCard(remote["README.md"].decode())
    metadata = card.data.to_dict()
    assert model_index_values(metadata) == {
        ("refusal_rate", "demo-harmful", "eval"): SAMPLE_EVAL["refusal_rate"]["model"],
        ("kl_divergence", "demo-harmless", "eval"): SAMPLE_EVAL["kl_divergence"],
        ("perplexity", "reference-text", "full"): SAMPLE_EVAL["perplexity"]["model"],
    }
    assert f'model_id = "{REPO_ID}"' in card.text
    assert not hub.repo(REPO_ID).private
    # Pushing again is a no-op commit that leaves everything in place.
    assert push(folder, "--repo-id", REPO_ID).returncode == 0
    assert_pushed(hub, folder)


def test_bad_token_exits_3(hub, folder: Path) -> None:
    result = push(folder, "--repo-id", REPO_ID, token="hf_not_a_valid_token_000000000000000")
    assert result.returncode == 3, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "hf_not_a_valid" not in result.stderr
    assert ("model", REPO_ID) not in hub.repos


def test_no_token_exits_3(hub, folder: Path) -> None:
    result = push(folder, "--repo-id", REPO_ID, token=None)
    assert result.returncode == 3
    assert "HF_TOKEN" in result.stderr
    assert hub.requests_log == []


def test_someone_elses_namespace_exits_3(hub, folder: Path) -> None:
    result = push(folder, "--repo-id", REPO_ID, token=BOB_TOKEN)
    assert result.returncode == 3, result.stderr
    assert "alice" in result.stderr and ("model", REPO_ID) not in hub.repos
    # Bob may push into his own namespace but not into an organisation he is not in.
    assert push(folder, "--repo-id", "abliterators/tiny", token=BOB_TOKEN).returncode == 3
    assert push(folder, "--repo-id", "abliterators/tiny").returncode == 0  # alice is a member


def test_server_error_is_retried(hub, folder: Path) -> None:
    hub.fail_next(1, 500, path_contains="/commit/")
    result = push(folder, "--repo-id", REPO_ID)
    assert result.returncode == 0, result.stderr
    assert "retry 1/2" in result.stderr
    commits = [r for r in hub.requests_log if r[0] == "POST" and "/commit/" in r[1]]
    assert len(commits) == 2
    assert_pushed(hub, folder)


def test_interrupted_push_finishes_when_rerun(hub, folder: Path) -> None:
    hub.fail_next(3, 503, path_contains="/commit/")  # every attempt of the first run fails
    first = push(folder, "--repo-id", REPO_ID)
    assert first.returncode == 4, first.stderr
    assert first.stderr.strip().splitlines()[-1].startswith("error: uploading to")
    assert set(hub.files(REPO_ID)) == {".gitattributes"}
    uploaded = sum(1 for method, path in hub.requests_log if method == "PUT" and path.startswith("/_lfs/"))
    assert uploaded == len(list(folder.glob("*.safetensors"))) + 1  # shards + strengths.png
    hub.requests_log.clear()
    second = push(folder, "--repo-id", REPO_ID)
    assert second.returncode == 0, second.stderr
    assert not [r for r in hub.requests_log if r[0] == "PUT"], "the LFS objects were sent again"
    assert_pushed(hub, folder)


def test_server_down_exits_4(folder: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = push(folder, "--repo-id", REPO_ID, endpoint=f"http://127.0.0.1:{port}")
    assert result.returncode == 4, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: checking the token failed")


@pytest.mark.parametrize(("breakage", "message"), [
    ("no-weights", "no model weights"),
    ("pickle", "pickle files"),
    ("no-tokenizer", "no tokenizer"),
    ("no-recipe", "recipe.json"),
    ("no-eval", "eval_results.json"),
    ("missing-shard", "lists shards that are missing"),
    ("token-in-file", "contains your Hub token"),
])
def test_bad_folder_exits_2_without_requests(hub, folder: Path, breakage: str, message: str) -> None:
    shards = sorted(folder.glob("*.safetensors"))
    if breakage == "no-weights":
        for shard in shards:
            shard.unlink()
    elif breakage == "pickle":
        (folder / "training_args.bin").write_bytes(b"\x80\x04N.")
    elif breakage == "no-tokenizer":
        (folder / "tokenizer.json").unlink()
    elif breakage == "no-recipe":
        (folder / "recipe.json").unlink()
    elif breakage == "no-eval":
        (folder / "eval_results.json").unlink()
    elif breakage == "missing-shard":
        shards[0].unlink()
    elif breakage == "token-in-file":
        (folder / "notes.txt").write_text(f"HF_TOKEN={ALICE_TOKEN}\n")
    result = push(folder, "--repo-id", REPO_ID)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert hub.requests_log == []


def test_usage_errors_exit_2(hub, folder: Path) -> None:
    assert push(folder, "--repo-id", "no-owner").returncode == 2
    assert push(folder, "--repo-id", REPO_ID, "--create-pr", "--revision", "dev").returncode == 2
    assert push(folder).returncode == 2  # argparse: --repo-id is required
    assert push(folder, "--repo-id", REPO_ID, "--token", ALICE_TOKEN).returncode == 2  # no token flag
    assert hub.requests_log == []


def test_dry_run_sends_nothing(hub, folder: Path) -> None:
    result = push(folder, "--repo-id", REPO_ID, "--dry-run", "--private")
    assert result.returncode == 0, result.stderr
    assert hub.requests_log == []
    assert f"{hub.url}/{REPO_ID}" in result.stdout and "private" in result.stdout
    for name in ("config.json", "tokenizer.json", "recipe.json", "eval_results.json", "README.md"):
        assert name in result.stdout
    assert f"{len(local_files(folder)) + 1} files" in result.stdout
    assert not (folder / "README.md").exists()  # a dry run writes nothing either


def test_create_pr(hub, folder: Path) -> None:
    hub.seed(REPO_ID, {"README.md": b"---\nlicense: mit\n---\n# old\n"})
    result = push(folder, "--repo-id", REPO_ID, "--create-pr", "--commit-message", "Abliterated weights")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"{REPO_ID}/discussions/1")
    assert_pushed(hub, folder, revision="refs/pr/1")
    assert hub.files(REPO_ID)["README.md"] == b"---\nlicense: mit\n---\n# old\n"  # main untouched
    head = hub.repo(REPO_ID).resolve("refs/pr/1")
    assert head is not None and head.title == "Abliterated weights"


def test_revision_creates_the_branch(hub, folder: Path) -> None:
    result = push(folder, "--repo-id", REPO_ID, "--revision", "v1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"{REPO_ID}/tree/v1")
    assert_pushed(hub, folder, revision="v1")
    assert set(hub.files(REPO_ID)) == {".gitattributes"}


def test_private_is_invisible_to_others(hub, folder: Path) -> None:
    result = push(folder, "--repo-id", REPO_ID, "--private")
    assert result.returncode == 0, result.stderr
    assert hub.repo(REPO_ID).private
    assert HfApi(endpoint=hub.url, token=ALICE_TOKEN).model_info(REPO_ID).private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=BOB_TOKEN).model_info(REPO_ID)


def test_private_refuses_an_existing_public_repo(hub, folder: Path) -> None:
    hub.seed(REPO_ID, {"config.json": b"{}"})
    result = push(folder, "--repo-id", REPO_ID, "--private")
    assert result.returncode == 2 and "is public" in result.stderr
    assert "README.md" not in hub.files(REPO_ID)
