"""Trainers' loss closures with the batch on another device than their data, as on a GPU.

The shared trainer moves each batch of dataset indices to the model's device. A closure that indexes data kept on
the CPU with it works on a CPU machine and fails on a GPU ("indices should be either on cpu or on the same device
as the indexed tensor"). Without a GPU, each closure is called once more with its batch on the ``meta`` device
under a function mode that enforces that rule.
"""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.networks.nets import DiffusionModelUNet
from monai.utils import convert_to_tensor
from torch.overrides import TorchFunctionMode
from torch.utils.data import default_collate

from medgen_testing import oblique_affine


class CudaIndexRule(TorchFunctionMode):
    """A CPU tensor indexed by a tensor on another device fails, as CUDA indices into CPU tensors do."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__:
            indexed, index = args[0], args[1]
            for part in index if isinstance(index, tuple) else (index,):
                if isinstance(part, torch.Tensor) and part.device.type != "cpu" and indexed.device.type == "cpu":
                    raise AssertionError(f"a CPU tensor {tuple(indexed.shape)} indexed by a {part.device} batch")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def probe_closures(monkeypatch):
    """Patch ``train_diffusion`` where a module imported it: each loss closure first meets a ``meta`` batch."""
    probed = []

    def patch(module):
        real = module.train_diffusion

        def probing(model, loss_fn, dataset, optimizer, config, **options):
            batch = convert_to_tensor(default_collate([dataset[i] for i in range(config.batch_size)]), device="meta")
            with CudaIndexRule():
                try:
                    loss_fn(model, batch)
                except (RuntimeError, NotImplementedError, TypeError):
                    pass  # past the indexing: a CPU model cannot run a meta batch, which is not what is checked
            probed.append(module.__name__)
            return real(model, loss_fn, dataset, optimizer, config, **options)

        monkeypatch.setattr(module, "train_diffusion", probing)

    patch.probed = probed
    return patch


def _volumes(count: int, size: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand((1, size, size, size), generator=generator) for _ in range(count)]


def test_generator_fine_tuning(probe_closures, tmp_path):
    import medgen.adapt.generator as generator

    probe_closures(generator)
    unet = DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 8), attention_levels=(False, False),
                              num_res_blocks=1, norm_num_groups=8)
    generator.finetune_generator(unet, _volumes(2, 8), generator.GeneratorFinetuneConfig(steps=1, amp=False), checkpoint_dir=tmp_path,
                                 diffusion=generator.DiffusionSettings(num_train_timesteps=10))
    assert probe_closures.probed == ["medgen.adapt.generator"]


def test_paired_synthesis_vae_and_latent_ddpm(probe_closures, tmp_path):
    import medgen.synthesis.joint_ldm as joint_ldm
    from medgen.synthesis.prepare import prepare_pairs

    probe_closures(joint_ldm)
    affine = torch.from_numpy(oblique_affine())
    cases = []
    for index, image in enumerate(_volumes(2)):
        label = (image > 0.5).long()
        cases.append((f"c{index}", MetaTensor(image, affine=affine), MetaTensor(label, affine=affine)))
    pairs, labels = prepare_pairs(cases, shape=(16, 16, 16))
    config = joint_ldm.JointLDMConfig.tiny(vae_phase1_steps=1, vae_phase2_steps=0, ldm_steps=1, checkpoint_every=1)
    joint_ldm.train_joint_ldm(pairs, labels, tmp_path, config)
    assert probe_closures.probed == ["medgen.synthesis.joint_ldm"] * 3  # two VAE phases and the latent DDPM


def test_mask_conditioned_image_vae(probe_closures, tmp_path):
    import medgen.synthesis.maskgen_training as maskgen_training
    from medgen.progress import NullReporter
    from medgen.synthesis.maskgen_networks import MaskGenConfig

    probe_closures(maskgen_training)
    maskgen_training._vae_stage(torch.stack(_volumes(2)), MaskGenConfig.tiny(vae_steps=1), tmp_path, torch.device("cpu"), NullReporter())
    assert probe_closures.probed == ["medgen.synthesis.maskgen_training"]
