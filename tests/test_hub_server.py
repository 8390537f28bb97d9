"""The local Hub server (tests/hub_server.py) against the real huggingface_hub client.

conftest.py points HF_ENDPOINT at the server before huggingface_hub is imported, so these
calls run in-process and over loopback only.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.numpy import load_file, save_file

from tests.hub_fixtures import ALICE_TOKEN, BOB_TOKEN, ORG
from tests.hub_server import HubServer

README = """---
license: apache-2.0
tags:
- abliterated
---
# Tiny model

A card for tests.
"""


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Refuse, and fail the test on, any name lookup other than loopback (even if swallowed)."""
    real_getaddrinfo = socket.getaddrinfo
    offenders: list[str] = []

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in LOOPBACK:
            offenders.append(str(host))
            raise OSError(f"test tried to reach {host!r}: only loopback is allowed")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    yield
    assert not offenders, f"non-loopback hosts contacted: {sorted(set(offenders))}"


@pytest.fixture
def alice() -> HfApi:
    return HfApi(token=ALICE_TOKEN)


@pytest.fixture
def bob() -> HfApi:
    return HfApi(token=BOB_TOKEN)


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 8}))
    (folder / "README.md").write_text(README)
    rng = np.random.default_rng(0)
    save_file({"weight": rng.standard_normal(3 * 1024 * 1024, dtype=np.float32)}, str(folder / "model.safetensors"))
    assert (folder / "model.safetensors").stat().st_size > 12 * 1024 * 1024
    return folder


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and ".cache" not in p.parts}


def test_whoami(hub: HubServer, alice: HfApi) -> None:
    me = alice.whoami()
    assert me["name"] == "alice"
    assert [org["name"] for org in me["orgs"]] == [ORG]
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_not_a_real_token").whoami()
    assert err.value.response.status_code == 401
    assert not isinstance(err.value, RepositoryNotFoundError)


def test_create_repo_and_exist_ok(hub: HubServer, alice: HfApi) -> None:
    url = alice.create_repo("alice/tiny")
    assert url.repo_id == "alice/tiny" and url.repo_type == "model"
    with pytest.raises(HfHubHTTPError) as err:
        alice.create_repo("alice/tiny")
    assert err.value.response.status_code == 409
    assert alice.create_repo("alice/tiny", exist_ok=True).repo_id == "alice/tiny"
    dataset_url = alice.create_repo("alice/tiny", repo_type="dataset")  # other type, other repo
    assert dataset_url.repo_type == "dataset"
    assert alice.list_repo_files("alice/tiny") == [".gitattributes"]  # like the real Hub


def test_upload_folder_lfs_roundtrip(hub: HubServer, alice: HfApi, model_folder: Path, tmp_path: Path) -> None:
    alice.create_repo("alice/tiny")
    info = alice.upload_folder(repo_id="alice/tiny", folder_path=model_folder, commit_message="Add model")
    local = _local_files(model_folder)

    remote = hub.files("alice/tiny")
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local
    head = hub.repo("alice/tiny").commits[info.oid]
    assert head.files["model.safetensors"].lfs and not head.files["config.json"].lfs
    assert ("POST", "/alice/tiny.git/info/lfs/objects/batch") in hub.requests_log
    assert ("POST", "/api/validate-yaml") in hub.requests_log

    assert sorted(alice.list_repo_files("alice/tiny")) == sorted([".gitattributes", *local])
    model = alice.model_info("alice/tiny", files_metadata=True)
    assert model.sha == info.oid and model.private is False
    assert model.card_data is not None and model.card_data.license == "apache-2.0"
    lfs = {s.rfilename: s.lfs for s in model.siblings}["model.safetensors"]
    assert lfs is not None and lfs.size == len(local["model.safetensors"])
    assert alice.repo_info("alice/tiny", revision=info.oid).sha == info.oid

    out = tmp_path / "snapshot"
    snapshot_download("alice/tiny", local_dir=out, token=ALICE_TOKEN)
    assert {k: v for k, v in _local_files(out).items() if k != ".gitattributes"} == local
    cached = hf_hub_download("alice/tiny", "model.safetensors", cache_dir=tmp_path / "cache")
    assert Path(cached).read_bytes() == local["model.safetensors"]
    assert load_file(cached)["weight"].shape == (3 * 1024 * 1024,)

    # Re-uploading unchanged files is a no-op on the client side (preupload returns the remote oids).
    again = alice.upload_folder(repo_id="alice/tiny", folder_path=model_folder)
    assert again.oid == info.oid


def test_upload_file_delete_and_errors(hub: HubServer, alice: HfApi, tmp_path: Path) -> None:
    alice.create_repo("alice/small", repo_type="dataset")
    alice.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data/x.csv", repo_id="alice/small",
                      repo_type="dataset")
    assert hub.files("alice/small", repo_type="dataset")["data/x.csv"] == b"a,b\n1,2\n"
    assert {f.path for f in alice.list_repo_tree("alice/small", repo_type="dataset")} == {"data", ".gitattributes"}
    path = hf_hub_download("alice/small", "data/x.csv", repo_type="dataset", cache_dir=tmp_path)
    assert Path(path).read_bytes() == b"a,b\n1,2\n"
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/small", "missing.csv", repo_type="dataset", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        alice.dataset_info("alice/small", revision="nope")
    with pytest.raises(RepositoryNotFoundError):
        alice.model_info("alice/small")  # wrong type
    alice.create_branch("alice/small", branch="dev", repo_type="dataset")
    alice.delete_file("data/x.csv", repo_id="alice/small", repo_type="dataset")
    assert "data/x.csv" not in hub.files("alice/small", repo_type="dataset")
    assert "data/x.csv" in hub.files("alice/small", revision="dev", repo_type="dataset")


def test_private_repo_invisible_to_others(hub: HubServer, alice: HfApi, bob: HfApi, tmp_path: Path) -> None:
    alice.create_repo("alice/secret", private=True)
    alice.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="alice/secret")
    assert alice.model_info("alice/secret").private is True
    for api in (bob, HfApi(token=False)):
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("alice/secret")
        with pytest.raises(RepositoryNotFoundError):
            api.list_repo_files("alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "config.json", token=BOB_TOKEN, cache_dir=tmp_path)
    assert hf_hub_download("alice/secret", "config.json", token=ALICE_TOKEN, cache_dir=tmp_path)


def test_bob_cannot_write_to_alice(hub: HubServer, alice: HfApi, bob: HfApi) -> None:
    with pytest.raises(HfHubHTTPError) as err:
        bob.create_repo("alice/by-bob")
    assert err.value.response.status_code == 403
    alice.create_repo("alice/public")
    with pytest.raises(HfHubHTTPError) as err:
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/public")
    assert err.value.response.status_code == 403
    assert bob.list_repo_files("alice/public") == [".gitattributes"]  # public: readable
    with pytest.raises(HfHubHTTPError) as err:
        bob.create_repo(f"{ORG}/by-bob")
    assert err.value.response.status_code == 403


def test_org_namespace_writable_by_member(hub: HubServer, alice: HfApi) -> None:
    url = alice.create_repo(f"{ORG}/shared", repo_type="dataset")
    assert url.repo_id == f"{ORG}/shared"
    alice.upload_file(path_or_fileobj=b"hello", path_in_repo="hello.txt", repo_id=f"{ORG}/shared",
                      repo_type="dataset")
    assert hub.files(f"{ORG}/shared", repo_type="dataset")["hello.txt"] == b"hello"


def test_create_pr(hub: HubServer, alice: HfApi, tmp_path: Path) -> None:
    alice.create_repo("alice/pr")
    info = alice.upload_file(path_or_fileobj=b"proposal", path_in_repo="new.txt", repo_id="alice/pr",
                             create_pr=True)
    assert info.pr_revision == "refs/pr/1" and info.pr_num == 1
    assert "new.txt" not in hub.files("alice/pr")
    assert hub.files("alice/pr", revision="refs/pr/1")["new.txt"] == b"proposal"
    path = hf_hub_download("alice/pr", "new.txt", revision="refs/pr/1", cache_dir=tmp_path)
    assert Path(path).read_bytes() == b"proposal"
    second = alice.upload_file(path_or_fileobj=b"more", path_in_repo="more.txt", repo_id="alice/pr", create_pr=True)
    assert second.pr_revision == "refs/pr/2"


def test_client_retries_5xx_where_it_uses_backoff(hub: HubServer, alice: HfApi, tmp_path: Path) -> None:
    """preupload, LFS batch/PUT/verify, tree listing and the download HEAD retry; commit does not."""
    alice.create_repo("alice/flaky")
    hub.fail_next(1, 503, path_contains="/preupload/")
    alice.upload_file(path_or_fileobj=b"ok", path_in_repo="a.txt", repo_id="alice/flaky")
    assert [p for m, p in hub.requests_log if "/preupload/" in p] == ["/api/models/alice/flaky/preupload/main"] * 2
    assert hub.files("alice/flaky")["a.txt"] == b"ok"

    hub.fail_next(1, 500, path_contains="/_lfs/")  # the LFS PUT
    alice.upload_file(path_or_fileobj=b"\0binary", path_in_repo="b.bin", repo_id="alice/flaky")
    assert hub.files("alice/flaky")["b.bin"] == b"\0binary"

    hub.fail_next(1, 502, path_contains="/resolve/")  # hf_hub_download re-tries the HEAD with backoff
    path = hf_hub_download("alice/flaky", "a.txt", cache_dir=tmp_path)
    assert Path(path).read_bytes() == b"ok"
    assert [m for m, p in hub.requests_log if p.endswith("/resolve/main/a.txt")] == ["HEAD", "HEAD", "GET"]

    hub.fail_next(1, 500, path_contains="/commit/")
    with pytest.raises(HfHubHTTPError) as err:
        alice.upload_file(path_or_fileobj=b"lost", path_in_repo="c.txt", repo_id="alice/flaky")
    assert err.value.response.status_code == 500
    assert "c.txt" not in hub.files("alice/flaky")


def test_load_dataset_from_parquet(hub: HubServer, alice: HfApi, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    # datasets would otherwise look up datasets-server.<HF_ENDPOINT host> (parquet export)
    # and HEAD s3.amazonaws.com (download counter); both fail harmlessly but leave loopback.
    monkeypatch.setattr(datasets.config, "USE_PARQUET_EXPORT", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
    table = pa.table({"prompt": ["a", "b", "c"], "label": [0, 1, 0]})
    pq.write_table(table, tmp_path / "train.parquet")
    alice.create_repo("alice/ds", repo_type="dataset")
    alice.upload_file(path_or_fileobj=tmp_path / "train.parquet", path_in_repo="data/train-00000.parquet",
                      repo_id="alice/ds", repo_type="dataset")
    ds = datasets.load_dataset("alice/ds", split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.to_dict() == {"prompt": ["a", "b", "c"], "label": [0, 1, 0]}
