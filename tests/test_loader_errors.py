"""Bad checkpoints end in one clear error naming the file or tensor at fault.

Each case starts from a copy of the kimivl-tiny fixture (published layout) and breaks one thing.
"""

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mode_jax
from mode_jax.convert import safetensors_io
from mode_jax.convert.mapping import MappingError

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "kimivl-tiny"
WQKV = "vision_tower.encoder.blocks.0.wqkv.weight"
EXPERT = "language_model.model.layers.1.mlp.experts.3.down_proj.weight"


@pytest.fixture
def ckpt(tmp_path):
    """A writable copy of the fixture: (directory, tensors)."""
    shutil.copy(FIXTURE / "config.json", tmp_path / "config.json")
    shutil.copy(FIXTURE / "model.safetensors", tmp_path / "model.safetensors")
    return tmp_path, load_file(FIXTURE / "model.safetensors")


def _rewrite(directory, tensors):
    save_file(tensors, directory / "model.safetensors")


def _shard(directory, tensors):
    """Split into two shards with an index; returns the index path."""
    names = sorted(tensors)
    (directory / "model.safetensors").unlink()
    weight_map = {}
    for i, part in enumerate((names[:40], names[40:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, directory / file)
        weight_map.update({k: file for k in part})
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    return index


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint directory .*nowhere does not exist"):
        mode_jax.load(tmp_path / "nowhere")


def test_missing_config(ckpt):
    directory, _ = ckpt
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        mode_jax.load(directory)


def test_missing_shard_named_in_index(ckpt):
    directory, tensors = ckpt
    index = _shard(directory, tensors)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as err:
        mode_jax.load(directory)
    assert "model-00002-of-00002.safetensors" in str(err.value)
    assert index.name in str(err.value)


def test_index_lists_a_tensor_its_shard_lacks(ckpt):
    directory, tensors = ckpt
    index = _shard(directory, tensors)
    data = json.loads(index.read_text())
    data["weight_map"]["language_model.model.extra.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"model-00001-of-00002\.safetensors lacks 1 tensor.*"
                                         r"language_model\.model\.extra\.weight"):
        mode_jax.load(directory)


def test_unknown_model_type(ckpt):
    directory, _ = ckpt
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "llava"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'llava' is not supported; "
                                         r"supported: kimi_vl, deepseek_v3"):
        mode_jax.load(directory)


def test_wrong_tensor_shape(ckpt):
    directory, tensors = ckpt
    tensors[WQKV] = tensors[WQKV][:90]
    _rewrite(directory, tensors)
    with pytest.raises(MappingError) as err:
        mode_jax.load(directory)
    msg = str(err.value)
    assert WQKV in msg and "expected (32, 96), got (32, 90)" in msg
    assert str(directory) in msg


def test_nan_in_a_weight(ckpt):
    directory, tensors = ckpt
    tensors[EXPERT] = tensors[EXPERT].copy()
    tensors[EXPERT][5, 7] = np.nan
    _rewrite(directory, tensors)
    with pytest.raises(MappingError, match=rf"{EXPERT.replace('.', '[.]')}: 1 non-finite"):
        mode_jax.load(directory)


def test_unknown_and_missing_keys_listed_at_once(ckpt):
    directory, tensors = ckpt
    tensors["vision_tower.encoder.blocks.0.extra.weight"] = np.zeros(3, np.float32)
    tensors["language_model.model.layers.0.mlp.gate_proj.weights"] = tensors.pop(
        "language_model.model.layers.0.mlp.gate_proj.weight")
    del tensors["multi_modal_projector.linear_2.bias"]
    _rewrite(directory, tensors)
    with pytest.raises(MappingError) as err:
        mode_jax.load(directory)
    msg = str(err.value)
    for expected in ("source keys matching no rule (2)",
                     "vision_tower.encoder.blocks.0.extra.weight",
                     "language_model.model.layers.0.mlp.gate_proj.weights",
                     "model parameters not fully filled (2)",
                     "language_model.layers.0.mlp.gate_proj.kernel",
                     "multi_modal_projector.linear_2.bias"):
        assert expected in msg, f"{expected!r} missing from:\n{msg}"


def test_truncated_shard(ckpt):
    directory, _ = ckpt
    file = directory / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor .* does not fit"):
        mode_jax.load(directory)


def test_no_weights_and_ambiguous_weights(ckpt):
    directory, _ = ckpt
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors .*\.bin weights are not"):
        mode_jax.load(directory)
    save_file({"a": np.zeros(1, np.float32)}, directory / "a.safetensors")
    save_file({"b": np.zeros(1, np.float32)}, directory / "b.safetensors")
    with pytest.raises(FileNotFoundError, match="2 safetensors files but no model.safetensors"):
        safetensors_io.shard_map(directory)


def test_bad_arguments():
    with pytest.raises(TypeError, match="checkpoint directory or a transformers model, got int"):
        mode_jax.load(3)
    with pytest.raises(ValueError, match="dtype 'int32' is not supported"):
        mode_jax.load(FIXTURE, dtype=jnp.int32)
    with pytest.raises(ValueError, match="experts_impl must be 'sorted' or 'dense'"):
        mode_jax.load(FIXTURE, experts_impl="fast")


def _header_file(directory, header) -> pathlib.Path:
    """A safetensors file whose JSON header is `header` (and 8 bytes of data)."""
    raw = json.dumps(header).encode()
    file = directory / "model.safetensors"
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    return file


@pytest.mark.parametrize("header,needle", [
    ([1, 2], "header is a JSON list"),
    ({"w": {"dtype": "F32", "shape": [2]}}, "tensor w's header entry"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "tensor w's header entry"),
    ({"w": "F32"}, "tensor w's header entry"),
])
def test_malformed_safetensors_header(ckpt, header, needle):
    directory, _ = ckpt
    file = _header_file(directory, header)
    with pytest.raises(ValueError, match=needle):
        safetensors_io.read_header(file)
    with pytest.raises(ValueError, match=needle):
        mode_jax.load(directory)


def test_integer_weights_are_refused(ckpt):
    directory, tensors = ckpt
    tensors["language_model.lm_head.weight"] = tensors["language_model.lm_head.weight"].astype(
        np.int32)
    _rewrite(directory, tensors)
    with pytest.raises(MappingError, match=r"language_model\.lm_head\.weight: stored as int32"):
        mode_jax.load(directory)
