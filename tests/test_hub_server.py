"""The local Hub server of `tests/hub_server.py`, driven by the real `huggingface_hub` client and `transformers`.

In-process tests point the client at the server with `HubServer.patch_client()` (conftest.py sets
`HF_HUB_OFFLINE=1`, which the patch lifts); the transformers round trip runs in subprocesses started with
`HubServer.env()`, each with its own `HF_HOME`, so that the pull really downloads what the push uploaded.
"""

import json
import os
import subprocess
import sys
import textwrap
import urllib.request

import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url
from huggingface_hub.utils.sha import git_hash

from tests.hub_server import HubServer

BIG_SIZE = 3 * 1024 * 1024


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture(autouse=True)
def no_unknown_routes(hub):
    """Every request of every test hits an implemented route and none crashes the server."""
    yield
    assert hub.unhandled_requests == []
    assert hub.errors == []


@pytest.fixture
def api(hub):
    with hub.patch_client():
        yield HfApi(endpoint=hub.endpoint)


def _make_folder(path, text="hello hub\n", seed=0):
    (path / "weights").mkdir(parents=True)
    (path / "notes.txt").write_text(text)
    big = bytes((i * 7 + seed) % 251 for i in range(BIG_SIZE))
    (path / "weights" / "model.safetensors").write_bytes(big)
    return {"notes.txt": text.encode(), "weights/model.safetensors": big}


def test_upload_folder_then_snapshot_download(api, hub, tmp_path):
    api.create_repo("org/tiny", exist_ok=True)
    assert api.create_repo("org/tiny", exist_ok=True).repo_id == "org/tiny"  # already there: fine
    files = _make_folder(tmp_path / "src")

    commit = api.upload_folder(repo_id="org/tiny", folder_path=tmp_path / "src", commit_message="add files")

    cache = tmp_path / "cache"
    snapshot = snapshot_download("org/tiny", cache_dir=cache, endpoint=hub.endpoint)
    assert snapshot == str(cache / "models--org--tiny" / "snapshots" / commit.oid)
    assert (cache / "models--org--tiny" / "refs" / "main").read_text() == commit.oid
    for name, content in files.items():
        assert (tmp_path / "cache" / "models--org--tiny" / "snapshots" / commit.oid / name).read_bytes() == content

    assert sorted(api.list_repo_files("org/tiny")) == sorted(files)
    info = api.model_info("org/tiny", files_metadata=True)
    assert info.sha == commit.oid and info.private is False
    sizes = {s.rfilename: (s.size, s.blob_id, s.lfs) for s in info.siblings}
    assert sizes == {name: (len(content), git_hash(content), None) for name, content in files.items()}
    # The 3 MiB file went inline in the commit: no LFS batch call, no Xet token request.
    assert not [path for _, path in hub.requests if "xet" in path or "/info/lfs" in path]


def test_hf_hub_download_single_file(api, hub, tmp_path):
    api.create_repo("org/single")
    files = _make_folder(tmp_path / "src")
    commit = api.upload_folder(repo_id="org/single", folder_path=tmp_path / "src")

    path = hf_hub_download("org/single", "weights/model.safetensors", cache_dir=tmp_path / "cache")

    assert open(path, "rb").read() == files["weights/model.safetensors"]
    assert f"/snapshots/{commit.oid}/" in path
    # The cached blob is named after the ETag, the git blob sha1 of a regular file.
    assert os.path.basename(os.path.realpath(path)) == git_hash(files["weights/model.safetensors"])


def test_resolve_headers_and_range(api, hub, tmp_path):
    api.create_repo("org/headers")
    content = bytes(range(256)) * 40
    commit = api.upload_file(path_or_fileobj=content, path_in_repo="dir/data.bin", repo_id="org/headers")
    url = hf_hub_url("org/headers", "dir/data.bin", endpoint=hub.endpoint)

    metadata = get_hf_file_metadata(url)
    assert (metadata.commit_hash, metadata.etag, metadata.size) == (commit.oid, git_hash(content), len(content))
    assert metadata.xet_file_data is None

    request = urllib.request.Request(url, headers={"Range": "bytes=100-199"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 100-199/{len(content)}"
        assert response.read() == content[100:200]


def test_old_revision_stays_downloadable(api, hub, tmp_path):
    api.create_repo("org/history")
    first = api.upload_file(path_or_fileobj=b"version 1", path_in_repo="config.json", repo_id="org/history")
    second = api.upload_file(path_or_fileobj=b"version 2", path_in_repo="config.json", repo_id="org/history")
    assert first.oid != second.oid
    cache = tmp_path / "cache"

    def read(revision=None):
        with open(hf_hub_download("org/history", "config.json", revision=revision, cache_dir=cache), "rb") as f:
            return f.read()

    assert read() == b"version 2"
    assert read(first.oid) == b"version 1"
    assert read(second.oid) == b"version 2"
    old_snapshot = snapshot_download("org/history", revision=first.oid, cache_dir=tmp_path / "cache2")
    assert open(os.path.join(old_snapshot, "config.json"), "rb").read() == b"version 1"
    assert api.model_info("org/history", revision=first.oid).sha == first.oid
    assert api.model_info("org/history").sha == second.oid


def test_delete_and_tree_listing(api, hub, tmp_path):
    api.create_repo("org/tree")
    _make_folder(tmp_path / "src")
    api.upload_folder(repo_id="org/tree", folder_path=tmp_path / "src")

    top = {(type(e).__name__, e.path) for e in api.list_repo_tree("org/tree")}
    assert top == {("RepoFile", "notes.txt"), ("RepoFolder", "weights")}
    infos = api.get_paths_info("org/tree", ["weights", "notes.txt", "missing"])
    assert [(type(e).__name__, e.path) for e in infos] == [("RepoFolder", "weights"), ("RepoFile", "notes.txt")]

    api.delete_file("notes.txt", repo_id="org/tree")
    assert api.list_repo_files("org/tree") == ["weights/model.safetensors"]
    api.delete_folder("weights", repo_id="org/tree")
    assert api.list_repo_files("org/tree") == []
    with pytest.raises(RemoteEntryNotFoundError):
        api.delete_file("notes.txt", repo_id="org/tree")


def test_errors_map_to_client_exceptions(api, hub, tmp_path):
    api.create_repo("org/errors")
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="org/errors")
    cache = tmp_path / "cache"

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/does-not-exist", "config.json", cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/errors", "config.json", revision="no-such-branch", cache_dir=cache)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("org/errors", "missing.json", cache_dir=cache)
    assert api.file_exists("org/errors", "config.json") and not api.file_exists("org/errors", "missing.json")
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("org/errors")  # exists, and exist_ok is False
    assert conflict.value.response.status_code == 409
    with pytest.raises(HfHubHTTPError) as unauthorized:
        HfApi(endpoint=hub.endpoint, token="hf_wrong").create_repo("org/nope")
    assert unauthorized.value.response.status_code == 401


def test_private_repo_needs_the_token(api, hub):
    api.create_repo("org/secret", private=True)
    api.upload_file(path_or_fileobj=b"hidden", path_in_repo="a.txt", repo_id="org/secret")

    assert api.model_info("org/secret").private is True
    assert api.repo_exists("org/secret")
    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    assert not anonymous.repo_exists("org/secret")
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info("org/secret")


def test_patch_client_patches_and_restores(hub, tmp_path):
    import huggingface_hub

    before = (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE, os.environ.get("HF_ENDPOINT"))
    with hub.patch_client(hf_home=tmp_path / "home"):
        assert constants.ENDPOINT == hub.endpoint and not constants.is_offline_mode()
        # Module-level functions (no endpoint, no token, no cache_dir) reach the server too.
        huggingface_hub.create_repo("patched", exist_ok=True)  # namespace of the token's user
        huggingface_hub.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="test-user/patched")
        path = hf_hub_download("test-user/patched", "x.txt")
        assert path.startswith(str(tmp_path / "home" / "hub"))
        assert huggingface_hub.whoami()["name"] == "test-user"
    after = (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE, os.environ.get("HF_ENDPOINT"))
    assert after == before


PUSH = """
import json, sys
import torch, transformers

torch.manual_seed(0)
config = transformers.LlamaConfig(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1,
)
model = transformers.LlamaForCausalLM(config).eval()
model.push_to_hub("org/tiny-llama")
with torch.no_grad():
    logits = model(torch.tensor([[1, 5, 9, 13, 2, 63]])).logits
json.dump(logits.tolist(), open(sys.argv[1], "w"))
"""

# Started before the push so that its slow imports overlap with it; it loads once told so on stdin.
PULL = """
import json, sys
import torch, transformers

sys.stdin.readline()
model = transformers.AutoModelForCausalLM.from_pretrained("org/tiny-llama").eval()
with torch.no_grad():
    logits = model(torch.tensor([[1, 5, 9, 13, 2, 63]])).logits
json.dump(logits.tolist(), open(sys.argv[1], "w"))
"""


def _start(code, *args, env, cwd):
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finish(process, stdin=""):
    try:
        stdout, stderr = process.communicate(stdin, timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, f"subprocess failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"


def test_transformers_push_to_hub_then_from_pretrained(hub, tmp_path):
    pushed, pulled = tmp_path / "pushed.json", tmp_path / "pulled.json"
    pull = _start(PULL, pulled, env=hub.env(hf_home=tmp_path / "home_pull"), cwd=tmp_path)
    try:
        _finish(_start(PUSH, pushed, env=hub.env(hf_home=tmp_path / "home_push"), cwd=tmp_path))
    except BaseException:
        pull.kill()
        pull.communicate()
        raise
    _finish(pull, "go\n")

    assert json.loads(pulled.read_text()) == json.loads(pushed.read_text())  # bit-exact logits
    snapshots = tmp_path / "home_pull" / "hub" / "models--org--tiny-llama" / "snapshots"
    (snapshot,) = snapshots.iterdir()
    assert {"config.json", "model.safetensors"} <= {p.name for p in snapshot.iterdir()}
    assert ("GET", f"/org/tiny-llama/resolve/{snapshot.name}/model.safetensors") in hub.requests
