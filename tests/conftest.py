"""Shared fixtures: a prepared copy of the embedded digits dataset in a temporary folder, and a
local HTTP server."""
import contextlib
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_params(folder: Path, **sections) -> Path:
    """A params.yaml in `folder` with data_dir inside it and the given sections merged in."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data_dir"] = str(folder / "data")
    for name, values in sections.items():
        if isinstance(values, dict):
            params.setdefault(name, {}).update(values)
        else:
            params[name] = values
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """A folder holding params.yaml and data/prepared/digits.h5 (built once per test session)."""
    from dmgcli.params import load_params
    from stages.download import download
    from stages.preprocess import preprocess

    folder = tmp_path_factory.mktemp("digits")
    params = load_params(write_params(folder))
    download("digits", params.data_dir, params.download)
    preprocess("digits", params.data_dir, params.preprocess)
    return folder


@pytest.fixture
def workdir(digits_dir, tmp_path, monkeypatch):
    """A fresh folder sharing the prepared digits file; metrics and reports land in it."""
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    shutil.copy(digits_dir / "data" / "prepared" / "digits.h5", tmp_path / "data" / "prepared")
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@contextlib.contextmanager
def http_server(handler, **state):
    """A threaded HTTP server on 127.0.0.1 with `handler`; `state` becomes attributes the handler
    reads (files, requests, ...); .url is its address."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    for name, value in state.items():
        setattr(httpd, name, value)
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
