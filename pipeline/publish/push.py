"""Upload an output folder to the Hugging Face Hub: `python -m pipeline.push DIR --repo-id OWNER/NAME`.

The folder is checked before any network call (config, safetensors weights and no
pickles, tokenizer, recipe.json, eval_results.json, a card that renders). The token
comes from `HF_TOKEN` or the saved login (`hf auth login`), never from a flag. All Hub
calls go through one `HfApi`; `upload_folder` skips files the Hub already has, so
re-running an interrupted push finishes it.

Exit codes: 0 success, 2 bad folder or usage, 3 authentication or permission,
4 Hub or network error (after retries). Failures print one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

from pipeline.errors import AuthError, HubError, UserError

if TYPE_CHECKING:
    from huggingface_hub import HfApi

T = TypeVar("T")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tekken.json")
REQUIRED_FILES = ("config.json", "recipe.json", "eval_results.json")
IGNORE_PATTERNS = [".*", "*/.*", "*.lock"]  # hidden files and folders (temp files, caches), lock files
SCAN_LIMIT = 50 * 1024 * 1024  # files scanned for a leaked token: every non-weight file up to this size
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
ATTEMPTS_ENV, BACKOFF_ENV = "ABLITERATOR_PUSH_ATTEMPTS", "ABLITERATOR_PUSH_BACKOFF_S"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{30,}")


@dataclass(frozen=True)
class UploadFile:
    path: str  # relative, POSIX
    size: int


def scrub(text: str, token: str | None = None) -> str:
    """`text` on one line, without the token (or anything that looks like a Hub token)."""
    if token:
        text = text.replace(token, "***")
    return " ".join(_TOKEN_LIKE.sub("hf_***", text).split())


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise UserError(f"invalid --repo-id {repo_id!r}: expected OWNER/NAME (letters, digits, '-', '_', '.')")
    return repo_id


def upload_files(folder: Path) -> list[UploadFile]:
    """The files `upload_folder` will send, with the same filtering."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.glob("**/*")) if p.is_file()}
    kept = filter_repo_objects(files, ignore_patterns=IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS)
    return [UploadFile(rel, files[rel].stat().st_size) for rel in kept]


def check_folder(folder: Path) -> list[UploadFile]:
    """Check an output folder offline; returns the files to upload (README.md may still be missing)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    files = upload_files(folder)
    names = {f.path for f in files}
    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UserError(f"{folder} holds pickle files, which can run code when loaded: {', '.join(pickles)}; "
                        "save the weights as safetensors and delete them")
    missing = [n for n in REQUIRED_FILES if n not in names]
    if missing:
        hints = {"config.json": "not a model folder", "recipe.json": "run an edit or tuning stage into it",
                 "eval_results.json": "evaluate it: abliterate without --no-eval"}
        raise UserError(f"{folder} lacks {', '.join(missing)} ({'; '.join(hints[n] for n in missing)})")
    weights = [n for n in names if n.endswith(".safetensors") and "/" not in n and not n.startswith("directions")]
    if not weights:
        raise UserError(f"{folder} holds no model weights (*.safetensors)")
    for index in (n for n in names if n.endswith(".safetensors.index.json") and "/" not in n):
        shards = _index_shards(folder / index)
        absent = sorted(s for s in shards if s not in names)
        if absent:
            raise UserError(f"{folder / index} lists shards that are missing: {', '.join(absent[:5])}")
    if not names & set(TOKENIZER_FILES):
        raise UserError(f"{folder} holds no tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    return files


def _index_shards(path: Path) -> set[str]:
    import json

    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        return {str(v) for v in weight_map.values()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a valid safetensors index: {type(err).__name__}") from None


def check_no_token(folder: Path, files: list[UploadFile], token: str) -> None:
    """Refuse to upload a file that contains the token (a recipe that recorded it, a stray log)."""
    needle = token.encode()
    for f in files:
        if f.path.endswith(".safetensors") or f.size > SCAN_LIMIT:
            continue
        if needle in (folder / f.path).read_bytes():
            raise UserError(f"{folder / f.path} contains your Hub token; remove it before pushing")


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(err: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError):
        return _status(err) in RETRY_STATUS
    # `huggingface_hub.utils.httpx` is the client module the library itself uses (httpx2 in
    # huggingface_hub 2), exported publicly under one name across major versions.
    from huggingface_hub.utils import httpx

    return isinstance(err, (httpx.TransportError, ConnectionError, TimeoutError))


def with_retries(call: Callable[[], T], what: str) -> T:
    """`call()`, retried with exponential backoff on 5xx, 408/429 and connection errors."""
    attempts = max(1, int(os.environ.get(ATTEMPTS_ENV) or 3))
    wait = float(os.environ.get(BACKOFF_ENV) or 2.0)
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as err:
            if attempt == attempts or not _is_transient(err):
                raise
            print(f"{what} failed ({_describe(err)}); retry {attempt}/{attempts - 1} in {wait:g} s", file=sys.stderr)
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def _describe(err: BaseException) -> str:
    status = _status(err)
    server = getattr(err, "server_message", None)
    if status is not None:
        return f"HTTP {status}" + (f": {server}" if server else "")
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def hub_error(err: Exception, what: str, token: str | None) -> UserError:
    """A huggingface_hub / network exception as AuthError (3) or HubError (4), scrubbed."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    detail = scrub(_describe(err), token)
    if isinstance(err, RepositoryNotFoundError):
        return AuthError(f"{what}: repository not found or not accessible with this token ({detail})")
    if isinstance(err, HfHubHTTPError) and _status(err) in (401, 403):
        hint = "the token is invalid or expired" if _status(err) == 401 else "this token may not write there"
        return AuthError(f"{what}: permission denied, {hint} ({detail})")
    return HubError(f"{what} failed: {detail}")


def _token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise AuthError("no Hub token: set HF_TOKEN (a write token) or run `hf auth login`")
    return token


def writable_namespaces(api: HfApi) -> tuple[str, set[str]]:
    """The token's user name and the namespaces it may write to (itself and its organisations)."""
    me = with_retries(lambda: api.whoami(), "checking the token")
    name = str(me.get("name") or "")
    return name, {name} | {str(org.get("name")) for org in me.get("orgs") or [] if org.get("name")}


def check_namespace(repo_id: str, user: str, allowed: set[str]) -> None:
    """AuthError unless `repo_id`'s owner is one of `allowed`: asked before any long job or upload."""
    namespace = repo_id.split("/")[0]
    if namespace not in allowed:
        raise AuthError(f"{user} cannot publish to {repo_id!r} (no write access to {namespace!r}): use your name "
                        f"or one of your organisations ({', '.join(sorted(a for a in allowed if a))})")


def push_folder(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                create_pr: bool = False, commit_message: str | None = None, api: HfApi | None = None) -> str:
    """Upload `folder` to `repo_id`; returns the repo URL (branch URL, or PR URL with create_pr).

    Raises UserError (2), AuthError (3) or HubError (4) with a one-line, token-free message.
    """
    from huggingface_hub import HfApi

    from pipeline.publish import card

    folder = Path(folder)
    check_repo_id(repo_id)
    if create_pr and revision:
        raise UserError("--create-pr opens a pull request against main: do not combine it with --revision")
    files = check_folder(folder)
    if not (folder / "README.md").is_file():
        card.render_card(folder, repo_id)  # offline: a bad recipe fails before any network call
    token = api.token if api is not None and isinstance(api.token, str) else _token()
    check_no_token(folder, files, token)
    api = api or HfApi(token=token)

    step = "checking the token"
    try:
        check_namespace(repo_id, *writable_namespaces(api))
        if not (folder / "README.md").is_file():
            step = "writing the model card"
            card.write_card(folder, repo_id, api)
            check_no_token(folder, upload_files(folder), token)
        step = f"creating {repo_id}"
        url = str(with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True), step))
        if private and not with_retries(lambda: api.model_info(repo_id), step).private:
            raise UserError(f"{repo_id} already exists and is public: --private cannot apply; "
                            "make it private on the Hub first, or push without --private")
        if revision:
            step = f"creating branch {revision}"
            with_retries(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), step)
        step = f"uploading to {repo_id}"
        files = upload_files(folder)
        print(f"uploading {len(files)} files ({_size(sum(f.size for f in files))}) to {repo_id}"
              f"{f' ({revision})' if revision else ''}{' as a pull request' if create_pr else ''}", file=sys.stderr)
        info = with_retries(lambda: api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr or None,
            commit_message=commit_message or f"Upload {folder.name} with Abliterator",
            ignore_patterns=list(IGNORE_PATTERNS)), step)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - every Hub/network failure becomes one line
        raise hub_error(err, step, token) from None
    if create_pr and getattr(info, "pr_url", None):
        return str(info.pr_url)
    return f"{url.rstrip('/')}/tree/{revision}" if revision else url


def dry_run(folder: Path, repo_id: str, *, private: bool, revision: str | None, create_pr: bool) -> str:
    """What a push would upload and where, without any network call."""
    from huggingface_hub import constants

    from pipeline.publish import card

    files = check_folder(folder)
    lines = [f"{'size':>10}  file"]
    lines += [f"{_size(f.size):>10}  {f.path}" for f in files]
    total = sum(f.size for f in files)
    if not (folder / "README.md").is_file():
        readme = len(card.render_card(folder, repo_id).encode())
        lines.append(f"{_size(readme):>10}  README.md (rendered from recipe.json and eval_results.json)")
        total, count = total + readme, len(files) + 1
    else:
        count = len(files)
    target = f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"
    where = f"branch {revision}" if revision else ("a pull request against main" if create_pr else "branch main")
    lines.append(f"{count} files, {_size(total)} in all")
    lines.append(f"dry run: would upload to {target} ({where}, {'private' if private else 'public'}); nothing was sent")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse that never echoes a token (e.g. `--token hf_...` in an unrecognised-arguments error)."""

    def error(self, message: str) -> NoReturn:
        from huggingface_hub import get_token

        if "--token" in message:
            message = re.sub(r"--token[= ]\S+", "--token ***", message)
            message += " (the token comes from HF_TOKEN or the saved login, never from a flag)"
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {scrub(message, get_token())}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m pipeline.push",
        description="Upload an output folder (weights, tokenizer, recipe, evaluation, card) to the Hugging Face Hub. "
        "The token comes from HF_TOKEN or the saved login (`hf auth login`).",
        epilog="exit codes: 0 success, 2 bad folder or usage, 3 authentication or permission, 4 Hub or network error",
    )
    p.add_argument("folder", type=Path, metavar="DIR", help="output folder to upload")
    p.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="Hub model repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", metavar="BRANCH", help="branch to push to (created from main if missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    p.add_argument("--commit-message", metavar="TEXT", help="commit title")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded and where, send nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    token = None
    try:
        check_repo_id(args.repo_id)
        if args.dry_run:
            if args.create_pr and args.revision:
                raise UserError("--create-pr opens a pull request against main: do not combine it with --revision")
            print(dry_run(args.folder, args.repo_id, private=args.private, revision=args.revision,
                          create_pr=args.create_pr))
            return 0
        from huggingface_hub import get_token

        token = get_token()
        url = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                          create_pr=args.create_pr, commit_message=args.commit_message)
    except UserError as err:
        print(f"error: {scrub(str(err), token)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted: run the same command again to finish the upload", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - never a traceback
        print(f"error: unexpected {type(err).__name__}: {scrub(str(err), token)}", file=sys.stderr)
        return 4
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
