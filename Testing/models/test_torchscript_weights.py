"""Reading TorchScript tensors without running the archive's code."""

from __future__ import annotations

import io
import pickle
import zipfile

import pytest
import torch
from monai.networks.nets import UNet

from medgen.errors import ModelError
from medgen.models.torchscript_weights import read_torchscript_tensors


def test_tensors_equal_those_torch_jit_load_gives(tmp_path):
    torch.manual_seed(0)
    network = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=1)
    network.eval()
    archive = tmp_path / "model.ts"
    torch.jit.script(network).save(str(archive))
    tensors = read_torchscript_tensors(archive)
    expected = torch.jit.load(str(archive), map_location="cpu").state_dict()
    assert sorted(tensors) == sorted(expected)
    assert all(torch.equal(tensors[name], expected[name]) and tensors[name].dtype == expected[name].dtype for name in expected)


class _TwoHalves(torch.nn.Module):
    """Two buffers that are views of one tensor: the archive stores one storage, the second view at offset 5."""

    def __init__(self):
        super().__init__()
        whole = torch.arange(10.0)
        self.register_buffer("first", whole[:5])
        self.register_buffer("second", whole[5:])

    def forward(self, x):
        return x + self.first.sum() + self.second.sum()


def test_tensors_that_share_a_storage_are_read_from_their_own_offsets(tmp_path):
    archive = tmp_path / "halves.ts"
    torch.jit.script(_TwoHalves()).save(str(archive))
    tensors = read_torchscript_tensors(archive)
    assert torch.equal(tensors["first"], torch.arange(5.0)) and torch.equal(tensors["second"], torch.arange(5.0, 10.0))


class _RunsCode:
    def __reduce__(self):
        return (exec, ("raise SystemExit('archive code ran')",))


def test_an_archive_whose_pickle_calls_functions_is_refused(tmp_path):
    archive = tmp_path / "evil.ts"
    with zipfile.ZipFile(archive, "w") as writer:
        writer.writestr("evil/data.pkl", pickle.dumps({"weight": _RunsCode()}, protocol=2))
    with pytest.raises(ModelError, match=r"refusing .*exec"):
        read_torchscript_tensors(archive)


def test_a_file_that_is_not_an_archive_is_refused(tmp_path):
    not_zip = tmp_path / "model.ts"
    not_zip.write_bytes(io.BytesIO(b"garbage" * 100).getvalue())
    with pytest.raises(ModelError, match="Could not read the tensors"):
        read_torchscript_tensors(not_zip)
