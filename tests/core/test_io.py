"""detkit.io: atomic writes keep the umask's mode; hostile pickles are refused by name."""

import os
import pickle
import stat

import pytest
import torch

from detkit import io as dio
from detkit.errors import CheckpointError


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize(
    "write",
    [
        lambda p: dio.atomic_write_text(p, "x"),
        lambda p: dio.atomic_write_bytes(p, b"x"),
        lambda p: dio.atomic_torch_save({"w": torch.ones(1)}, p),
    ],
)
def test_atomic_writes_keep_the_umask_mode_not_mkstemp_0600(tmp_path, umask_022, write):
    path = tmp_path / "best.pt"
    write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # a teammate can read it
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_atomic_write_follows_a_stricter_umask(tmp_path):
    old = os.umask(0o077)
    try:
        dio.atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o600


def test_stale_temporaries_are_found(tmp_path):
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / "last.pt").write_bytes(b"whole")
    assert [p.name for p in dio.stale_temporaries(tmp_path)] == [".last.pt.abc123.tmp"]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def test_hostile_checkpoint_names_the_global_and_says_how_to_convert(tmp_path, capfd):
    path = tmp_path / "evil.pt"
    torch.save({"model": _RunsCode()}, path)
    with pytest.raises(CheckpointError) as info:
        dio.load_file(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert "refused" in msg and f"{os.name}.system" in msg.replace("posix", os.name)
    assert "weights_only=False will likely succeed" not in msg
    assert "torch.save only its tensors" in msg
    assert "should-never-run" not in capfd.readouterr().out


def test_hostile_raw_pickle_names_the_global(tmp_path, capfd):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_RunsCode(), protocol=4))
    with pytest.raises(CheckpointError, match=r"refused: .*system"):
        dio.load_file(path)
    assert "should-never-run" not in capfd.readouterr().out


def test_random_bytes_are_unreadable_not_hostile(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as info:
        dio.load_file(path)
    assert "will likely succeed" not in str(info.value)
