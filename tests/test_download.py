"""The dataset download against a local HTTP server on 127.0.0.1: complete, interrupted and failing."""

import http.server
import os
import threading

import pytest

from conftest import write_d4rl_file
from divo_utils import InputError, data


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Serves /good.hdf5 whole, /cut.hdf5 cut off mid-body, /text.hdf5 (not HDF5), 403 and 404."""
    folder = tmp_path_factory.mktemp("server")
    write_d4rl_file(folder / "good.hdf5")
    body = (folder / "good.hdf5").read_bytes()
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path == "/good.hdf5":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/cut.hdf5":  # promises the whole file, sends a third, closes
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 3])
                self.wfile.flush()
                self.close_connection = True
            elif self.path == "/text.hdf5":
                self.send_response(200)
                self.send_header("Content-Length", "9")
                self.end_headers()
                self.wfile.write(b"<html/>\n\n")
            else:
                self.send_error(403 if self.path == "/forbidden.hdf5" else 404)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", body, hits
    httpd.shutdown()
    httpd.server_close()


def test_complete_download_lands_in_place(server, tmp_path):
    url, body, _ = server
    dest = tmp_path / "cache" / "hopper_medium-v2.hdf5"
    data.download(f"{url}/good.hdf5", str(dest))
    assert dest.read_bytes() == body
    assert os.listdir(dest.parent) == [dest.name]  # no temporary file left
    assert data.load_d4rl_file(str(dest), 11, 3)["observations"].shape == (95, 11)


@pytest.mark.parametrize("name, reason", [
    ("cut.hdf5", "IncompleteRead"),
    ("text.hdf5", "OSError"),
    ("forbidden.hdf5", "HTTP Error 403"),
    ("missing.hdf5", "HTTP Error 404"),
])
def test_failed_download_leaves_nothing_and_says_what_to_do(server, tmp_path, name, reason):
    url, _, hits = server
    dest = tmp_path / "cache" / "hopper_medium-v2.hdf5"
    with pytest.raises(InputError, match=reason) as error:
        data.download(f"{url}/{name}", str(dest))
    assert f"/{name}" in hits
    assert "try again later" in str(error.value) and "--dataset-path" in str(error.value)
    assert os.listdir(dest.parent) == []  # neither the file nor a partial one


def test_unreachable_server(tmp_path):
    dest = tmp_path / "x.hdf5"
    with pytest.raises(InputError, match="could not download"):
        data.download("http://127.0.0.1:9/none.hdf5", str(dest), timeout=5)  # port 9: nothing listens
    assert not dest.exists()
