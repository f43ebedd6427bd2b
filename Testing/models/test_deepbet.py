"""deepbet's LinkNet3d: the eager rebuild equals the shipped TorchScript, is cached as safetensors, takes adapters."""

from __future__ import annotations

import json
from importlib import metadata

import pytest
import torch
from torch import nn

import medgen.models.deepbet

from medgen.errors import BadInputError
from medgen.models import deepbet_preprocess, deepbet_spec, load_deepbet, load_model
from medgen.models.deepbet import deepbet_archive_path, deepbet_intensity_range
from medgen.models.linknet3d import LinkNet3d

try:
    metadata.distribution("deepbet")
    HAVE_DEEPBET = True
except metadata.PackageNotFoundError:
    HAVE_DEEPBET = False
needs_deepbet = pytest.mark.skipif(not HAVE_DEEPBET, reason="deepbet==1.0.2 (the pretrained weights) is not installed")

#: the smallest input LinkNet3d accepts: multiples of 32, and 2 voxels per axis at the deepest stage
SMALLEST_VOLUME = (1, 1, 64, 64, 64)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@needs_deepbet
@pytest.mark.parametrize("which", ["bbox", "full"])
def test_eager_module_equals_the_torchscript_archive(cache_dir, which):
    eager = load_deepbet(which)
    scripted = torch.jit.load(str(deepbet_archive_path(which)), map_location="cpu").eval()
    volume = torch.randn(*SMALLEST_VOLUME, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = scripted(volume)
        assert (eager(volume) - expected).abs().max() <= 1e-5
    assert expected.shape == (1, 2, 64, 64, 64)
    assert not eager.training
    assert sum(p.numel() for p in eager.parameters()) == 2_126_258


@needs_deepbet
def test_conversion_is_cached_as_a_model_folder(cache_dir, monkeypatch):
    first = load_deepbet("bbox")
    folder = cache_dir / "models" / "deepbet-1.0.2-bbox"
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]

    def refuse_archive(*args, **kwargs):
        raise AssertionError("the cached safetensors must be used, not the TorchScript archive")

    monkeypatch.setattr(medgen.models.deepbet, "read_torchscript_tensors", refuse_archive)
    second = load_deepbet("bbox")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    _, spec = load_model(folder)
    assert spec.preprocessing.patch_size == [128, 128, 128]
    assert spec.preprocessing.intensity["method"] == "deepbet"
    assert spec.provenance["archive_sha256"]


@needs_deepbet
def test_damaged_cache_is_rebuilt(cache_dir):
    load_deepbet("bbox")
    weights = cache_dir / "models" / "deepbet-1.0.2-bbox" / "model.safetensors"
    weights.write_bytes(b"broken")
    assert isinstance(load_deepbet("bbox"), LinkNet3d)
    assert weights.stat().st_size > 8_000_000


@needs_deepbet
def test_a_cache_converted_from_another_archive_is_converted_again(cache_dir, monkeypatch):
    """The cache records the SHA-256 of the archive it came from; after the archive changes (another deepbet wheel
    of the same version), the cache is converted again rather than used."""
    load_deepbet("bbox")
    record_path = cache_dir / "models" / "deepbet-1.0.2-bbox" / "model.json"
    record = json.loads(record_path.read_text())
    archive_sha256 = record["provenance"]["archive_sha256"]
    record["provenance"]["archive_sha256"] = "0" * 64
    record_path.write_text(json.dumps(record))
    conversions = []
    real_convert = medgen.models.deepbet._convert_archive
    monkeypatch.setattr(medgen.models.deepbet, "_convert_archive", lambda *args: conversions.append(args) or real_convert(*args))
    assert isinstance(load_deepbet("bbox"), LinkNet3d)
    assert len(conversions) == 1
    assert json.loads(record_path.read_text())["provenance"]["archive_sha256"] == archive_sha256


def test_layers_are_plain_modules_that_lora_can_wrap():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    network = LinkNet3d().eval()
    convolutions = [m for m in network.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    assert len(convolutions) == 35 and all(type(m) in (nn.Conv3d, nn.ConvTranspose3d) for m in convolutions)
    volume = torch.randn(*SMALLEST_VOLUME, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = network(volume)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=r".*double_conv\.[03]")
    adapted = peft.get_peft_model(network, config)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    # 16 Conv3d layers, each with LoRA A (4 x in x 3^3) and B (out x 4)
    assert trainable == 95_424
    with torch.no_grad():
        assert torch.equal(adapted(volume), before)  # LoRA B starts at zero: identity at init


def test_preprocess_follows_deepbets_normalisation():
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand(70, 90, 60, generator=generator) * 1000.0
    volume[0, 0, 0] = float("nan")
    network_input = deepbet_preprocess(volume)
    assert network_input.shape == (1, 1, 128, 128, 128) and network_input.dtype == torch.float32
    assert torch.isfinite(network_input).all()
    assert network_input.mean().item() == pytest.approx(0.449, abs=1e-4)
    assert network_input.std().item() == pytest.approx(0.226, abs=1e-4)
    low, high = deepbet_intensity_range(volume)
    assert 0.0 < low < 10.0 and 990.0 < high < 1000.0  # 0.5 % / 99.5 % quantiles of U(0, 1000)
    # voxels beyond the clipping range all map to the same (largest) value
    brightest = network_input.flatten().max()
    assert (network_input == brightest).float().mean().item() == pytest.approx(0.005, abs=0.002)
    full_input = deepbet_preprocess(volume[None], size=(64, 64, 64), intensity_range=(low, high))
    assert full_input.shape == (1, 1, 64, 64, 64)


def test_the_clipping_range_is_taken_on_the_volume_resized_to_128_cubed():
    """deepbet takes its 0.5 % / 99.5 % quantiles after a nearest-neighbour resize to 128³: a two-voxel volume becomes
    two halves of 0 and 1, whose quantiles are those values (on the two voxels alone they would interpolate to 0.005
    and 0.995)."""
    assert deepbet_intensity_range(torch.tensor([0.0, 1.0]).view(2, 1, 1)) == (0.0, 1.0)


def test_preprocess_rejects_constant_and_multichannel_volumes():
    with pytest.raises(BadInputError, match="needs contrast"):
        deepbet_preprocess(torch.ones(32, 32, 32))
    with pytest.raises(BadInputError, match=r"found shape \(2, 32, 32, 32\)"):
        deepbet_preprocess(torch.rand(2, 32, 32, 32))


def test_spec_describes_both_networks():
    assert deepbet_spec("full").preprocessing.patch_size == [256, 256, 256]
    assert deepbet_spec("bbox").class_names == ["background", "brain"]
    with pytest.raises(BadInputError, match="Unknown deepbet network"):
        deepbet_spec("tiny")
