import functools
import hashlib
import http.server
import io
import tarfile
import threading

import pytest

from fedmeta.cli import main
from fedmeta.data.download import DownloadError, dataset_paths, default_cache_dir, download

UNREACHABLE = "http://127.0.0.1:9/fed_emnist.tar.bz2"
PAIR = {"fed_emnist_train.h5": b"train", "fed_emnist_test.h5": b"test"}


def make_archive(path, files):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:bz2") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"datasets/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path.as_uri()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """A local http server over ``tmp_path / "served"``; yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_offline_download_names_the_url_and_the_files_to_place(tmp_path):
    with pytest.raises(DownloadError) as error:
        download("emnist", tmp_path, url=UNREACHABLE, progress=False)

    message = str(error.value)
    assert message.startswith(f"cannot fetch {UNREACHABLE} (")
    assert message.endswith(f"; download it elsewhere and put fed_emnist_train.h5 and fed_emnist_test.h5 "
                            f"(or fed_emnist.tar.bz2) in {tmp_path / 'emnist'}/")
    assert "\n" not in message
    assert not list((tmp_path / "emnist").iterdir())  # no partial file left behind


def test_download_over_http_extracts_the_pair_and_records_the_archive_checksum(tmp_path, http_root):
    folder, base = http_root
    make_archive(folder / "mirror.tar.bz2", PAIR)
    cache = tmp_path / "cache"

    paths = download("emnist", cache, url=f"{base}/mirror.tar.bz2", progress=False)

    assert paths["train"].read_bytes() == b"train" and paths["test"].read_bytes() == b"test"
    digest = hashlib.sha256((folder / "mirror.tar.bz2").read_bytes()).hexdigest()
    assert (cache / "emnist" / "fed_emnist.tar.bz2.sha256").read_text() == f"{digest}  fed_emnist.tar.bz2\n"
    assert dataset_paths("emnist", cache / "emnist") == (paths["train"], paths["test"])


def test_files_already_in_the_cache_are_used_without_the_network(tmp_path):
    url = make_archive(tmp_path / "fed_emnist.tar.bz2", PAIR)
    first = download("emnist", tmp_path / "cache", url=url, progress=False)

    again = download("emnist", tmp_path / "cache", url=UNREACHABLE, progress=False)

    assert again == first


def test_an_archive_that_changed_since_the_first_download_is_refused(tmp_path):
    url = make_archive(tmp_path / "fed_emnist.tar.bz2", PAIR)
    paths = download("emnist", tmp_path / "cache", url=url, progress=False)
    paths["train"].unlink()
    (tmp_path / "cache" / "emnist" / "fed_emnist.tar.bz2").unlink()
    make_archive(tmp_path / "fed_emnist.tar.bz2", {**PAIR, "fed_emnist_train.h5": b"tampered"})

    with pytest.raises(DownloadError, match=r"fed_emnist.tar.bz2: sha256 \w+ does not match the expected \w+ "
                                            r"\(from fed_emnist.tar.bz2.sha256 if not published\)"):
        download("emnist", tmp_path / "cache", url=url, progress=False)

    assert not paths["train"].exists()


def test_an_archive_without_the_expected_files_is_refused_and_no_checksum_recorded(tmp_path):
    url = make_archive(tmp_path / "fed_emnist.tar.bz2", {"other.h5": b"x"})

    with pytest.raises(DownloadError, match=r"has no fed_emnist_train.h5 \(has \['other.h5'\]\)"):
        download("emnist", tmp_path / "cache", url=url, progress=False)

    assert not (tmp_path / "cache" / "emnist" / "fed_emnist.tar.bz2.sha256").exists()


def test_a_corrupt_archive_is_refused(tmp_path):
    (tmp_path / "fed_emnist.tar.bz2").write_bytes(b"not bzip2")

    with pytest.raises(DownloadError, match=r"fed_emnist.tar.bz2: not a readable tar.bz2 archive"):
        download("emnist", tmp_path / "cache", url=(tmp_path / "fed_emnist.tar.bz2").as_uri(), progress=False)


def test_an_archive_put_in_the_cache_by_hand_is_extracted(tmp_path):
    make_archive(tmp_path / "cache" / "shakespeare" / "shakespeare.tar.bz2",
                 {"shakespeare_train.h5": b"a", "shakespeare_test.h5": b"b"})

    paths = download("shakespeare", tmp_path / "cache", url=UNREACHABLE, progress=False)

    assert paths["test"].read_bytes() == b"b"


def test_the_cache_dir_defaults_to_fedmeta_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path))

    assert default_cache_dir() == tmp_path


def test_dataset_paths_accept_the_leaf_built_file_names(shared_data):
    train, test = dataset_paths("emnist", shared_data / "femnist")

    assert (train.name, test.name) == ("femnist_train.h5", "femnist_test.h5")


def test_dataset_paths_list_what_they_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no emnist files \(fed_emnist_train.h5 \+ fed_emnist_test.h5 or "
                                                r"femnist_train.h5 \+ femnist_test.h5\); run `fedmeta data download"):
        dataset_paths("emnist", tmp_path)


def test_unknown_dataset_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar'; choose one of \['emnist', 'shakespeare'\]"):
        download("cifar", tmp_path)


def test_cli_download_offline_exits_2_with_one_line(tmp_path, capsys):
    code = main(["data", "download", "emnist", "--cache-dir", str(tmp_path), "--url", UNREACHABLE])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"fedmeta: error: cannot fetch {UNREACHABLE}") and err.count("\n") == 1
