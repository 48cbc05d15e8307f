"""The local hub must satisfy the *real* ``huggingface_hub``/``transformers`` clients, not mocks of them."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import HfApi, ModelCard, ModelCardData, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

try:
    from tests.conftest_hub import local_hub
    from tests.hub_server import LocalHub
except ModuleNotFoundError:  # `tests/` itself on sys.path
    from conftest_hub import local_hub  # type: ignore[no-redef]  # noqa: F401
    from hub_server import LocalHub  # type: ignore[no-redef]

REPO = "me/demo"


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def test_client_endpoint_is_patched(local_hub: LocalHub) -> None:
    """Module-level clients built at import time must follow the fixture, not the env they were born with."""
    assert local_hub.url == constants.ENDPOINT
    assert huggingface_hub.hf_api.api.endpoint == local_hub.url
    assert huggingface_hub.hf_hub_url(REPO, "x.txt").startswith(local_hub.url + "/")
    assert HfApi().endpoint == local_hub.url


def test_create_repo_and_existence(local_hub: LocalHub) -> None:
    """create_repo returns the local URL, 409 maps to exist_ok, the initial commit makes `main` resolvable."""
    url = huggingface_hub.create_repo(REPO)
    assert url == f"{local_hub.url}/{REPO}" and url.repo_id == REPO
    assert huggingface_hub.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as err:
        huggingface_hub.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert huggingface_hub.repo_exists(REPO) and not huggingface_hub.repo_exists("me/missing")
    assert huggingface_hub.list_repo_files(REPO) == [".gitattributes"]
    assert huggingface_hub.model_info(REPO).sha == local_hub.commits(REPO)[0].oid


def test_writes_need_a_token(local_hub: LocalHub) -> None:
    """The fixture's dummy HF_TOKEN is what makes writes pass; without one the hub answers 401."""
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token=False).create_repo(REPO)
    assert err.value.response.status_code == 401
    assert local_hub.repo_ids() == []


def test_two_commits_keep_history(local_hub: LocalHub, tmp_path: Path) -> None:
    """Each commit gets a new sha; the older revision stays downloadable and listable."""
    api = HfApi()
    api.create_repo(REPO)
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id=REPO)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"v2")
    (folder / "sub" / "b.bin").write_bytes(bytes(range(256)))
    second = api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="second")

    assert first.oid != second.oid and len(second.oid) == 40
    assert [c.oid for c in local_hub.commits(REPO)][1:] == [first.oid, second.oid]
    assert api.model_info(REPO).sha == second.oid
    assert _read(hf_hub_download(REPO, "a.txt")) == b"v2"
    assert _read(hf_hub_download(REPO, "a.txt", revision=first.oid)) == b"v1"
    assert _read(hf_hub_download(REPO, "sub/b.bin")) == bytes(range(256))
    assert api.list_repo_files(REPO) == [".gitattributes", "a.txt", "sub/b.bin"]
    assert api.list_repo_files(REPO, revision=first.oid) == [".gitattributes", "a.txt"]
    assert [c.commit_id for c in api.list_repo_commits(REPO)][:2] == [second.oid, first.oid]
    old_snapshot = Path(api.snapshot_download(REPO, revision=first.oid))
    assert (old_snapshot / "a.txt").read_bytes() == b"v1" and not (old_snapshot / "sub").exists()
    assert (Path(api.snapshot_download(REPO)) / "sub" / "b.bin").read_bytes() == bytes(range(256))


def test_unchanged_upload_is_skipped(local_hub: LocalHub) -> None:
    """preupload returns the remote blob oid, so re-uploading identical bytes makes no commit (as on Hub)."""
    api = HfApi()
    api.create_repo(REPO)
    first = api.upload_file(path_or_fileobj=b"same", path_in_repo="a.txt", repo_id=REPO)
    again = api.upload_file(path_or_fileobj=b"same", path_in_repo="a.txt", repo_id=REPO)
    assert again.oid == first.oid and len(local_hub.commits(REPO)) == 2


def test_file_exists_tree_and_paths_info(local_hub: LocalHub) -> None:
    api = HfApi()
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"w", path_in_repo="dir/deep/w.txt", repo_id=REPO)
    assert api.file_exists(REPO, "dir/deep/w.txt") and not api.file_exists(REPO, "nope.txt")
    assert not api.file_exists("me/missing", "x")
    top = {entry.path for entry in api.list_repo_tree(REPO)}
    assert top == {".gitattributes", "dir"}
    assert [entry.path for entry in api.list_repo_tree(REPO, path_in_repo="dir/deep")] == ["dir/deep/w.txt"]
    infos = api.get_paths_info(REPO, ["dir/deep/w.txt", "dir", "ghost"])
    assert [(type(i).__name__, i.path) for i in infos] == [
        ("RepoFile", "dir/deep/w.txt"),
        ("RepoFolder", "dir"),
    ]


def test_delete_file_keeps_old_revision(local_hub: LocalHub) -> None:
    api = HfApi()
    api.create_repo(REPO)
    added = api.upload_file(path_or_fileobj=b"bye", path_in_repo="gone.txt", repo_id=REPO)
    api.delete_file("gone.txt", repo_id=REPO)
    assert "gone.txt" not in api.list_repo_files(REPO)
    assert local_hub.files(REPO, added.oid)["gone.txt"] == b"bye"
    with pytest.raises(EntryNotFoundError):
        api.delete_file("gone.txt", repo_id=REPO)


def test_misses_raise_the_client_error_types(local_hub: LocalHub) -> None:
    """X-Error-Code is what turns a 404 into the specific exception callers (transformers) catch."""
    huggingface_hub.create_repo(REPO)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.txt")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, ".gitattributes", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("me/missing", "config.json")


def test_model_card_push_validates_yaml(local_hub: LocalHub) -> None:
    huggingface_hub.create_repo(REPO)
    card = ModelCard.from_template(ModelCardData(license="mit", tags=["quept"]), model_description="Tiny.")
    card.push_to_hub(REPO)
    assert local_hub.validated_cards and local_hub.validated_cards[-1] == str(card)
    loaded = ModelCard.load(REPO)
    assert loaded.data.license == "mit" and loaded.data.tags == ["quept"]
    bad_card = b"---\nlicense: mit\n"  # create_commit validates README.md before uploading anything
    with pytest.raises(ValueError, match="not closed"):
        huggingface_hub.upload_file(path_or_fileobj=bad_card, path_in_repo="README.md", repo_id=REPO)


def test_transformers_push_and_load_round_trip(local_hub: LocalHub) -> None:
    """The path later tests rely on: push_to_hub then from_pretrained by repo id, identical logits."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    model.push_to_hub("me/tiny")
    assert "model.safetensors" in local_hub.files("me/tiny")

    loaded = AutoModelForCausalLM.from_pretrained("me/tiny").eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
