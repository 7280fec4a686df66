import io
import tarfile

import pytest

from fedmeta.cli import main
from fedmeta.data.download import DownloadError, dataset_paths, download

UNREACHABLE = "http://127.0.0.1:9/fed_emnist.tar.bz2"


def make_archive(path, files):
    with tarfile.open(path, "w:bz2") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"datasets/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path.as_uri()


def test_offline_download_names_the_url_and_the_files_to_place(tmp_path):
    with pytest.raises(DownloadError) as error:
        download("emnist", tmp_path, url=UNREACHABLE, progress=False)

    message = str(error.value)
    assert message.startswith(f"cannot fetch {UNREACHABLE}")
    assert f"put fed_emnist_train.h5 and fed_emnist_test.h5 there yourself" in message
    assert str(tmp_path / "emnist") in message
    assert not list((tmp_path / "emnist").iterdir())  # no partial file left behind


def test_download_extracts_the_pair_and_records_the_archive_checksum(tmp_path):
    url = make_archive(tmp_path / "fed_emnist.tar.bz2", {"fed_emnist_train.h5": b"train", "fed_emnist_test.h5": b"test"})

    paths = download("emnist", tmp_path / "cache", url=url, progress=False)

    assert paths["train"].read_bytes() == b"train" and paths["test"].read_bytes() == b"test"
    assert (tmp_path / "cache" / "emnist" / "fed_emnist.tar.bz2.sha256").is_file()
    assert dataset_paths("emnist", tmp_path / "cache" / "emnist") == (paths["train"], paths["test"])


def test_an_archive_that_changed_since_the_first_download_is_refused(tmp_path):
    url = make_archive(tmp_path / "fed_emnist.tar.bz2", {"fed_emnist_train.h5": b"a", "fed_emnist_test.h5": b"b"})
    paths = download("emnist", tmp_path / "cache", url=url, progress=False)
    paths["train"].unlink()
    make_archive(tmp_path / "cache" / "emnist" / "fed_emnist.tar.bz2",
                 {"fed_emnist_train.h5": b"tampered", "fed_emnist_test.h5": b"b"})

    with pytest.raises(DownloadError, match=r"fed_emnist.tar.bz2: sha256 \w+ does not match the expected"):
        download("emnist", tmp_path / "cache", url=url, progress=False)


def test_an_archive_without_the_expected_files_is_refused(tmp_path):
    url = make_archive(tmp_path / "fed_emnist.tar.bz2", {"other.h5": b"x"})

    with pytest.raises(DownloadError, match=r"has no fed_emnist_train.h5 \(has \['other.h5'\]\)"):
        download("emnist", tmp_path / "cache", url=url, progress=False)


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
