"""The ``local_hub`` pytest fixture: a :class:`LocalHub` that the real ``huggingface_hub`` client talks to.

Usage (from ``tests/conftest.py`` or a test module)::

    pytest_plugins = ["tests.conftest_hub"]          # or: from tests.conftest_hub import local_hub

    def test_push(local_hub):
        model.push_to_hub("me/tiny")                 # goes to local_hub.url
        assert len(local_hub.commits("me/tiny")) == 2

Why setting ``HF_ENDPOINT`` is not enough
-----------------------------------------
``huggingface_hub`` reads its environment **once, at import time**, into module constants, and several
objects capture those constants when they are built. Once anything in the test session has imported
``huggingface_hub`` (transformers and peft do so on import), changing ``os.environ`` has no effect on:

* ``huggingface_hub.constants.ENDPOINT`` and ``HUGGINGFACE_CO_URL_TEMPLATE`` (the ``/resolve/`` URL template
  used by ``hf_hub_download``/``file_exists``; ``hf_hub_url`` only rewrites URLs that start with ``ENDPOINT``,
  so both must change together), ``HF_URL_HOSTS`` and ``utils._http._HUB_ORIGINS`` (which hosts count as
  "the Hub" when following redirects / forwarding the auth header);
* ``huggingface_hub.hf_api.api``: the module-level ``HfApi()`` behind ``huggingface_hub.create_repo``,
  ``upload_file``, ``ModelCard.push_to_hub``... Its ``endpoint`` attribute was fixed when it was created;
* ``transformers.utils.hub._hf_api``: transformers' own lazily created, cached ``HfApi`` used by
  ``push_to_hub``/``from_pretrained``; reset to ``None`` so it is rebuilt against the local hub;
* ``from ... import ENDPOINT`` copies in ``huggingface_hub.cli.auth`` and ``utils._git_credential``, and
  ``HF_HUB_CACHE``/``HF_ASSETS_CACHE`` copies in ``utils._cache_manager``/``utils._cache_assets``;
* ``datasets.config`` (``HF_ENDPOINT``, ``HUB_DATASETS_URL``, offline flags, cache paths) and transformers'
  ``HF_MODULES_CACHE`` copies, all computed at import from the environment of that moment;
* the cache/token paths (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN_PATH``...), ``HF_HUB_OFFLINE`` (checked by
  an httpx event hook on every request) and ``HF_HUB_DISABLE_XET``. Xet must be off: with ``hf_xet``
  installed, ``upload_folder`` switches to a Xet-only pipelined upload that bypasses ``/preupload``.
* fsspec caches ``HfFileSystem`` instances (with their endpoint), so that cache is cleared.

All of these are patched with ``monkeypatch`` (undone after each test) and the env vars are set too, for
code imported later and for subprocesses.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

try:
    from tests.hub_server import LocalHub
except ModuleNotFoundError:  # `tests/` itself is on sys.path (plain `pytest`, no package layout)
    from hub_server import LocalHub  # type: ignore[no-redef]

DUMMY_TOKEN = "hf_local_hub_dummy_token"


def _set_env(monkeypatch: pytest.MonkeyPatch, url: str, home: Path) -> None:
    """Environment for code that reads it later (fresh imports, subprocesses)."""
    env = {
        "HF_ENDPOINT": url,
        "HF_TOKEN": DUMMY_TOKEN,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_MODULES_CACHE": str(home / "modules"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in (
        "TRANSFORMERS_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HUGGINGFACE_CO_STAGING",
    ):
        monkeypatch.delenv(name, raising=False)


def _patch_hf_constants(monkeypatch: pytest.MonkeyPatch, url: str, home: Path) -> None:
    """Constants ``huggingface_hub`` computed from the environment when it was imported."""
    from huggingface_hub import constants

    values = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {urlsplit(url).hostname},
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in values.items():
        monkeypatch.setattr(constants, name, value, raising=False)


def _patch_endpoint_copies(monkeypatch: pytest.MonkeyPatch, url: str, home: Path) -> None:
    """Objects and ``from constants import X`` copies that captured the endpoint or cache paths."""
    import huggingface_hub.hf_api
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", url)
    monkeypatch.setattr(hf_http, "_HUB_ORIGINS", hf_http._HUB_ORIGINS | {hf_http._url_origin(url)})
    optional = {
        "huggingface_hub.cli.auth": {"ENDPOINT": url},
        "huggingface_hub.utils._git_credential": {"ENDPOINT": url},
        "huggingface_hub.utils._cache_manager": {"HF_HUB_CACHE": str(home / "hub")},
        "huggingface_hub.utils._cache_assets": {"HF_ASSETS_CACHE": str(home / "assets")},
        "transformers.utils.hub": {"_hf_api": None, "HF_MODULES_CACHE": str(home / "modules")},
        "transformers.dynamic_module_utils": {"HF_MODULES_CACHE": str(home / "modules")},
        "datasets.config": _datasets_config(url, home),
    }
    for module_name, attributes in optional.items():
        module = sys.modules.get(module_name)
        for name, value in attributes.items() if module is not None else ():
            monkeypatch.setattr(module, name, value, raising=False)


def _datasets_config(url: str, home: Path) -> dict[str, object]:
    """``datasets.config`` keeps its own import-time copies of the endpoint, offline flag and cache paths."""
    datasets_cache = home / "datasets"
    return {
        "HF_ENDPOINT": url,
        "HUB_DATASETS_URL": url + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_HUB_OFFLINE": False,
        "HF_DATASETS_OFFLINE": False,
        "HF_CACHE_HOME": str(home),
        "HF_DATASETS_CACHE": datasets_cache,
        "HF_MODULES_CACHE": home / "modules",
        "DOWNLOADED_DATASETS_PATH": datasets_cache / "downloads",
        "EXTRACTED_DATASETS_PATH": datasets_cache / "downloads" / "extracted",
    }


def _forget_cached_clients() -> None:
    """Drop client objects built during a test, which point at a hub that is about to disappear."""
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None:
        transformers_hub._hf_api = None  # type: ignore[attr-defined]
    hf_fs = sys.modules.get("huggingface_hub.hf_file_system")
    if hf_fs is not None:
        hf_fs.HfFileSystem.clear_instance_cache()


def point_hf_clients_at(monkeypatch: pytest.MonkeyPatch, url: str, home: Path) -> None:
    """Make ``huggingface_hub`` (and transformers) use ``url`` as the Hub and ``home`` as HF_HOME."""
    _set_env(monkeypatch, url, home)
    _patch_hf_constants(monkeypatch, url, home)
    _patch_endpoint_copies(monkeypatch, url, home)
    _forget_cached_clients()


@pytest.fixture
def local_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    """A fresh, empty :class:`LocalHub`; the Hub clients point at it and caches live under ``tmp_path``."""
    with LocalHub() as hub:
        point_hf_clients_at(monkeypatch, hub.url, tmp_path / "hf_home")
        yield hub
        _forget_cached_clients()
