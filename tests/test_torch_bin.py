"""read_torch_bin against files torch itself writes (zip and legacy layouts), hand-made legacy streams
(storage views, big-endian), hostile pickles and damaged files; and that it never imports torch."""

import collections
import io
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from distillm_jax.models.torch_bin import UnsafePickleError, read_torch_bin

FORMATS = {"zip": True, "legacy": False}


def save(obj, path, fmt: str = "zip") -> str:
    torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
    return str(path)


def assert_same(got: np.ndarray, want: torch.Tensor) -> None:
    want = want.detach()
    if want.dtype == torch.bfloat16:  # bit-exact: compare the raw 16-bit patterns
        got, want = got.view(np.int16), want.view(torch.int16)
    want = want.numpy()
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    floats = {d: torch.randn(3, 4, generator=g).to(d) for d in (torch.float32, torch.float16, torch.float64)}
    ints = {
        d: torch.randint(-100, 100, (5,), generator=g).to(d) for d in (torch.int64, torch.int32, torch.int16)
    }
    w = torch.arange(20.0).reshape(4, 5)
    return {
        **{str(d): t for d, t in {**floats, **ints}.items()},
        "bfloat16": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "int8": torch.randint(-128, 128, (7,), generator=g, dtype=torch.int8),
        "uint8": torch.randint(0, 256, (7,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(6, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "transposed": torch.randn(3, 5, generator=g).t(),
        "bf16_transposed": torch.randn(3, 5, generator=g).to(torch.bfloat16).t(),
        "rows": w[1:],  # "rows" and "column" share one storage, at an offset and with a stride
        "column": w[:, 2],
        "empty": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype_and_layout(tmp_path, fmt):
    tensors = every_dtype()
    out = read_torch_bin(save(tensors, tmp_path / "t.bin", fmt))
    assert list(out) == list(tensors)
    for name, t in tensors.items():
        assert_same(out[name], t)
    assert out["rows"].base is not None and not out["rows"].flags.writeable  # a view of the mapped file


def test_dtypes_torch_pickles_as_untyped_storage(tmp_path):
    """uint16 and float8 go through _rebuild_tensor_v3 with an UntypedStorage and a torch.<dtype> global."""
    tensors = {
        "u16": torch.arange(12).to(torch.uint16).reshape(3, 4)[:, 1:],
        "f8": torch.randn(5).to(torch.float8_e4m3fn),
    }
    out = read_torch_bin(save(tensors, tmp_path / "t.bin"))
    np.testing.assert_array_equal(out["u16"], tensors["u16"].to(torch.int32).numpy())
    np.testing.assert_array_equal(out["f8"].view(np.uint8), tensors["f8"].view(torch.uint8).numpy())


@pytest.mark.parametrize("fmt", FORMATS)
def test_hf_model_state_dict(tmp_path, fmt):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    state = GPT2LMHeadModel(config).state_dict()  # an OrderedDict with _metadata; lm_head ties to wte
    out = read_torch_bin(save(state, tmp_path / "pytorch_model.bin", fmt))
    assert list(out) == list(state)
    for name, t in state.items():
        assert_same(out[name], t)


class _Tensor:
    """Pickles as torch's tensor rebuild call over a hand-made persistent id (legacy stream)."""

    def __init__(self, pid, offset, size, stride, hooks=None):
        self.pid, self.args = pid, (offset, size, stride, False, hooks or collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (_Pid(self.pid), *self.args)


class _Pid:
    def __init__(self, pid):
        self.pid = pid


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Pid) else None


def legacy_stream(path, obj, storages: dict[str, np.ndarray], little: bool = True) -> str:
    """torch's legacy layout written by hand: magic, protocol, sys_info, the object, keys, storages."""
    order, f = "<" if little else ">", io.BytesIO()
    for x in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": little}):
        pickle.dump(x, f, protocol=2)
    _Pickler(f, protocol=2).dump(obj)
    pickle.dump(list(storages), f, protocol=2)
    for arr in storages.values():
        f.write(struct.pack(order + "q", arr.size) + arr.astype(arr.dtype.newbyteorder(order)).tobytes())
    path.write_bytes(f.getvalue())
    return str(path)


@pytest.mark.parametrize("little", [True, False])
def test_legacy_storage_views_and_byte_order(tmp_path, little):
    view = ("storage", torch.FloatStorage, "root", "cpu", 10, ("v", 4, 5))  # elements 4..8 of "root"
    whole = ("storage", torch.FloatStorage, "root", "cpu", 10, None)
    obj = {"a": _Tensor(view, 1, (2, 2), (1, 2)), "b": _Tensor(whole, 0, (3,), (3,))}
    path = legacy_stream(tmp_path / "t.bin", obj, {"root": np.arange(10, dtype=np.float32)}, little)
    out = read_torch_bin(path)
    np.testing.assert_array_equal(out["a"], [[5.0, 7.0], [6.0, 8.0]])
    np.testing.assert_array_equal(out["b"], [0.0, 3.0, 6.0])
    if little:  # torch agrees (it cannot read big-endian legacy files on a little-endian host)
        for name, t in torch.load(path, weights_only=True).items():
            assert_same(out[name], t)


class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "module"])
def test_refuses_code(tmp_path, fmt, payload):
    pwned = tmp_path / "pwned"
    evil = {
        "os.system": _Call(os.system, f"touch {pwned}"),
        "builtins.eval": _Call(eval, f"open({str(pwned)!r}, 'w')"),
        "module": torch.nn.Linear(2, 2),
    }[payload]
    path = save({"w": torch.ones(2), "x": evil}, tmp_path / "t.bin", fmt)
    with pytest.raises(UnsafePickleError) as e:
        read_torch_bin(path)
    msg = str(e.value)
    named = {"os.system": ("os.system", "posix.system"), "builtins.eval": ("builtins.eval",)}
    assert any(n in msg for n in named.get(payload, ("torch.nn.modules.linear.Linear",))), msg
    assert "\n" not in msg and msg.startswith(path) and isinstance(e.value, ValueError)
    assert not pwned.exists()


@pytest.mark.parametrize(
    "obj",
    [
        {"x": _Tensor(("storage", "FloatStorage", "k", "cpu", 4), 0, (4,), (1,))},  # a string, not the class
        {"x": _Tensor(("blob", torch.FloatStorage, "k", "cpu", 4), 0, (4,), (1,))},
        {"x": _Tensor(("storage", torch.FloatStorage, "k", "cpu", 4, None), 0, (5,), (1,))},  # past the end
        {"x": _Tensor(("storage", torch.FloatStorage, "k", "cpu", 4, None), 0, (4,), (1,), {0: 1})},  # hooks
        [1, 2],
    ],
    ids=["storage-type", "pid-tag", "out-of-bounds", "hooks", "not-a-dict"],
)
def test_refuses_malformed(tmp_path, obj):
    path = legacy_stream(tmp_path / "t.bin", obj, {"k": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="corrupt PyTorch checkpoint"):
        read_torch_bin(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("keep", [100, -10])
def test_truncated(tmp_path, fmt, keep):
    good = tmp_path / "good.bin"
    save({"w": torch.randn(64, 64), "b": torch.zeros(3)}, good, fmt)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(good.read_bytes()[:keep])
    with pytest.raises(ValueError, match=r"^corrupt PyTorch checkpoint") as e:
        read_torch_bin(str(bad))
    assert "\n" not in str(e.value)


def test_does_not_import_torch(tmp_path):
    path = save(every_dtype(), tmp_path / "t.bin")
    code = (
        "import sys; from distillm_jax.models.torch_bin import read_torch_bin; "
        f"out = read_torch_bin({path!r}); assert len(out) == {len(every_dtype())}; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "PYTHONPATH": root})


def test_refuses_what_is_not_a_state_dict(tmp_path):
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        read_torch_bin(save([torch.ones(2)], tmp_path / "t.bin"))
    with pytest.raises(ValueError, match="'m' is a dict, not a tensor"):
        read_torch_bin(save({"m": {"w": torch.ones(2)}}, tmp_path / "t.bin"))
