import pytest

from rnn_jax import files


def test_write_atomic_replaces_whole_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    files.write_atomic(path, "old\n")
    files.write_atomic(path, "new\n")
    assert path.read_text() == "new\n"

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(path, "lost\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left
