"""Parameter-efficient fine-tuning of 3D networks behind one API.

Methods (by name): ``tenvoo-l``, ``tenvoo-q`` (tensor-network adapters, hand-written), ``lora``, ``ia3``
(Hugging Face peft), ``bitfit``, ``affine-norm``, ``adaptformer``, ``linear-probe``, ``spatial-adapter``, ``full``.

    model = inject(unet, "tenvoo-l", preset="tenvoo-paper")
    trainable_parameters(model); describe(model)
    save_adapter(model, "adapter/"); load_adapter(fresh_unet, "adapter/")
    plain = merge(model)
"""

from medgen.peft.adapter_io import load_adapter, save_adapter
from medgen.peft.inject import inject
from medgen.peft.merge import merge
from medgen.peft.methods import METHODS
from medgen.peft.presets import PRESETS
from medgen.peft.report import describe, trainable_parameters, trains_whole_model
from medgen.peft.tenvoo_conv import TenVOOConv3d
from medgen.peft.tenvoo_factors import TENVOO_FACTORS, factorize
from medgen.peft.tenvoo_linear import TenVOOLinear

__all__ = [
    "METHODS",
    "PRESETS",
    "TENVOO_FACTORS",
    "TenVOOConv3d",
    "TenVOOLinear",
    "describe",
    "factorize",
    "inject",
    "load_adapter",
    "merge",
    "save_adapter",
    "trainable_parameters",
    "trains_whole_model",
]
