import time

import pytest
import torch
from tiny_models import tiny_llava

from fitprune.fingerprint import fingerprint


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, _ = tiny_llava(seed=0)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    return model, path


def test_same_checkpoint_same_fingerprint(saved, tmp_path):
    model, path = saved
    assert fingerprint(path) == fingerprint(path)
    assert fingerprint(path).startswith("fp-")
    other, _ = tiny_llava(seed=0)
    assert fingerprint(model) == fingerprint(other)  # same weights, separately built


def test_weights_or_config_change_the_fingerprint(saved, tmp_path):
    model, path = saved
    other, _ = tiny_llava(seed=1)
    other.save_pretrained(tmp_path / "b")
    assert fingerprint(tmp_path / "b") != fingerprint(path)
    assert fingerprint(other) != fingerprint(model)
    with torch.no_grad():
        other.lm_head.weight[0, 0] += 1.0
    other.save_pretrained(tmp_path / "c")
    assert fingerprint(tmp_path / "c") != fingerprint(tmp_path / "b")


def test_large_file_is_cheap(tmp_path):
    big = tmp_path / "model.safetensors"
    with big.open("wb") as f:  # 1 GiB sparse file: only the edges are read
        f.write((16).to_bytes(8, "little") + b'{"__metadata__":{}}'[:16])
        f.seek((1 << 30) - 1)
        f.write(b"\0")
    start = time.perf_counter()
    fp = fingerprint(tmp_path)
    assert time.perf_counter() - start < 1.0
    assert fp.startswith("fp-")


def test_missing_or_empty_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fingerprint(tmp_path / "nope")
    with pytest.raises(ValueError, match="no weight files"):
        fingerprint(tmp_path)
