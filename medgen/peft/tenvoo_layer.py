"""Shared machinery of the TenVOO layers: cores, their frozen initial copy, and the precise weight update.

Hand-written: no library implements TenVOO. The layer keeps the base weight W0 untouched (spec tenvoo.md §3.7,
quirk Q2) and adds ΔW(θ) − ΔW(θ0), where θ are the trainable cores and θ0 their frozen copy at initialisation.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from medgen.errors import BadInputError

#: initialisations of spec §3.5: all cores random with a frozen copy (compat default), or the last core zeroed too
INIT_MODES = ("sum_opposite_freeze_one", "last_layer_zero")


class FrozenCores(nn.Module):
    """The cores θ0 at initialisation, held as persistent buffers so an adapter file can restore them.

    Args:
        cores: the freshly initialised trainable cores; their values are copied.
    """

    def __init__(self, cores: nn.ParameterDict) -> None:
        super().__init__()
        for key, core in cores.items():
            self.register_buffer(key, core.detach().clone())

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The frozen cores by key, in the order of the trainable cores."""
        return dict(self.named_buffers(recurse=False))


def _no_autocast(device: torch.device):
    """Disable autocast around the contraction: the update is a small difference of O(1) tensors (spec Q13)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _write_marks(tensors) -> tuple:
    """(tensor, (version counter, storage address)) pairs: a cache key that changes on any tracked in-place write,
    copy or ``.to()``, and when ``.data`` is replaced (``p.data = ...``, ``vector_to_parameters``).

    In-place writes through ``.data`` (``p.data.mul_(2)``) change neither; call ``TenVOOLayer.clear_caches`` after
    them. Comparing values instead would cost a device synchronisation per layer and forward.
    """
    return tuple((tensor, (tensor._version, tensor.data_ptr())) for tensor in tensors)


def _own_version(tensor: torch.Tensor) -> int | None:
    """The version counter of ``tensor``; None for inference tensors, which have none (and are read-only outside
    inference mode)."""
    return None if tensor.is_inference() else tensor._version


def _same_key(cached: tuple, current: tuple) -> bool:
    """Whether two cache keys ``(mode, write marks)`` have equal modes and name the same tensors with the same
    marks (:func:`_write_marks`).

    Tensors are compared by identity: ``==`` would compare values, and a freed buffer's address can be reused.
    """
    (cached_mode, cached_tensors), (mode, tensors) = cached, current
    return cached_mode == mode and len(cached_tensors) == len(tensors) and all(
        old is new and old_marks == marks for (old, old_marks), (new, marks) in zip(cached_tensors, tensors)
    )


def fp32_matmul_is_ieee(device: torch.device) -> bool:
    """Whether float32 matmuls on ``device`` run in IEEE float32 (the user enabled no TF32 / bf16 shortcut).

    The flags are only read, never set: they are process-wide, and torch >= 2.9 raises when the legacy
    ``allow_tf32`` getter is used after the new ``fp32_precision`` API. Devices other than CPU and CUDA answer False
    (float64 is then used, as before).
    """
    if device.type not in ("cpu", "cuda"):
        return False
    matmul = torch.backends.cuda.matmul if device.type == "cuda" else getattr(torch.backends.mkldnn, "matmul", None)
    if matmul is None or not hasattr(matmul, "fp32_precision"):  # torch < 2.9: one global switch
        return torch.get_float32_matmul_precision() == "highest"
    precision = matmul.fp32_precision
    if precision == "none":  # not set for this backend: the generic setting applies
        precision = torch.backends.fp32_precision
    return precision in ("ieee", "none")


@functools.lru_cache(maxsize=None)
def _order(labels: str, wanted: str) -> tuple[int, ...] | None:
    """Axes of a tensor shaped (G, *labels) in the order (G, *wanted); None when that is already their order."""
    order = (0, *(1 + labels.index(label) for label in wanted))
    return None if order == tuple(range(len(order))) else order


@functools.lru_cache(maxsize=None)
def _pair_plan(equation: str) -> tuple:
    """Permutations and free-axis counts of a two-operand contraction (see :func:`contract_pair`)."""
    inputs, output = equation.split("->")
    first, second = inputs.split(",")
    shared = [label for label in first if label in second]
    first_free = [label for label in first if label not in shared]
    second_free = [label for label in second if label not in shared]
    if sorted(output) != sorted(first_free + second_free):
        raise ValueError(f"contract_pair takes a plain pairwise contraction, got {equation!r}")
    product_labels = "".join(first_free + second_free)
    return (
        _order(first, "".join(first_free + shared)),
        _order(second, "".join(shared + second_free)),
        len(first_free),
        len(second_free),
        _order(product_labels, output),
    )


def contract_pair(equation: str, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``torch.einsum("…" + equation)`` for a plain contraction (every shared label summed) of two stacks of G
    tensors, as one batched matmul; ``first`` and ``second`` are (G, *labels), the result is (G, *output labels).

    Why not einsum: the TenVOO factors are tiny, so on a GPU their cost is the number of dispatched ops, and
    ``torch.einsum`` adds a dozen view ops per call around its bmm; here it is at most two permutes, two reshapes (a
    copy only where a permute made an operand non-contiguous), one bmm, one view and one permute.
    """
    first_order, second_order, first_free, second_free, output_order = _pair_plan(equation)
    if first_order is not None:
        first = first.permute(first_order)
    if second_order is not None:
        second = second.permute(second_order)
    first_shape, second_shape = first.shape[1 : 1 + first_free], second.shape[second.dim() - second_free :]
    groups = first.shape[0]
    first_matrix = first.reshape(groups, math.prod(first_shape), -1)
    product = torch.bmm(first_matrix, second.reshape(groups, -1, math.prod(second_shape)))
    product = product.view(groups, *first_shape, *second_shape)
    return product if output_order is None else product.permute(output_order)


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(G, ...) stack of G equally shaped tensors; a view when G == 1."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _update_operands(
    left: torch.Tensor, right: torch.Tensor, left0: torch.Tensor, right0: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """[L − L0, L0] and [R; R − R0] in ``dtype``, whose product is L R − L0 R0 (any leading axes).

    L R − L0 R0 = (L − L0) R + L0 (R − R0): the differences are exact in float64 and both terms scale with the
    trained change, not with ΔW = O(1), so one float32 product of these stacked factors keeps the error relative to
    the update (spec Q13) and never forms the two large O(1) tensors.
    """
    return torch.cat([left - left0, left0], dim=-1).to(dtype), torch.cat([right, right - right0], dim=-2).to(dtype)


def uniform_bound_4d(shape: tuple[int, ...]) -> float:
    """Kaiming-uniform bound with the ReLU gain for a 4-D core, whose fan-in is the product of its last two axes."""
    return math.sqrt(6.0 / (shape[-2] * shape[-1]))


class TenVOOLayer(nn.Module):
    """Base of :class:`TenVOOConv3d` and :class:`TenVOOLinear`: a frozen layer plus a tensor-network update.

    Subclasses give the core shapes, their initialisation bounds, the core zeroed by ``last_layer_zero``, the
    contraction into two factors :meth:`_factors` and the layout of their product :meth:`_weight_view`.

    Args:
        base: the layer to adapt (``nn.Conv3d`` or ``nn.Linear``); its weight is frozen and never modified.
        core_shapes: ordered mapping core key -> shape; the key order is the initialisation order.
        core_bounds: core key -> half-width of the uniform initialisation.
        zero_key: the core zeroed by ``init="last_layer_zero"``.
        init: one of :data:`INIT_MODES`.
    """

    def __init__(
        self,
        base: nn.Module,
        core_shapes: Mapping[str, tuple[int, ...]],
        core_bounds: Mapping[str, float],
        zero_key: str,
        init: str,
    ) -> None:
        super().__init__()
        if init not in INIT_MODES:
            raise BadInputError(f"TenVOO init must be one of {list(INIT_MODES)}, got {init!r}.")
        self.base = base
        self.base.weight.requires_grad_(False)
        self.init_mode = init
        device = base.weight.device
        self.cores = nn.ParameterDict(
            {key: nn.Parameter(torch.empty(shape, device=device)) for key, shape in core_shapes.items()}
        )
        with torch.no_grad():
            for key, core in self.cores.items():
                core.uniform_(-core_bounds[key], core_bounds[key])
            if init == "last_layer_zero":
                self.cores[zero_key].zero_()
        self.cores_init = FrozenCores(self.cores)
        # (key, (L0, R0)) of :meth:`_initial_factors` and (key, W, W's version) of :meth:`adapted_weight` without
        # autograd; plain attributes, so never in the state dict
        self._initial_cache: tuple | None = None
        self._weight_cache: tuple | None = None
        # (cores' versions, update operands) left by :func:`prepare_updates` for the next training forward
        self._prepared: tuple | None = None

    #: core key -> (stored labels, operand labels): the axis order in which :meth:`_factors` receives each core
    operand_layouts: Mapping[str, tuple[str, str]] = {}

    def _factors(self, cores: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Contract G stacks of float64 cores, (G, *operand labels of :attr:`operand_layouts`), into (G, A, K) and
        (G, K, B) factors whose products are the G ΔW in matrix form.

        K is a product of bond sizes (r² to r³), so the factors are small; :meth:`_weight_view` maps one (A, B)
        product to ``base.weight``'s shape.
        """
        raise NotImplementedError

    def _weight_view(self, matrix: torch.Tensor) -> torch.Tensor:
        """View an (A, B) product of :meth:`_factors` shaped like ``base.weight`` (possibly non-contiguous)."""
        raise NotImplementedError

    def _factors_fp64(self, cores: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A, K) and (K, B) float64 factors of ``cores`` (stored layout, any float dtype)."""
        left, right = _group_factors([self], [cores])
        return left[0], right[0]

    def _group_key(self) -> tuple:
        """Layers with equal keys are contracted together by :func:`prepare_updates`."""
        cores = tuple((key, core.shape, core.dtype, core.device) for key, core in self.cores.items())
        return type(self), cores, self.base.weight.dtype

    def _update_dtype(self) -> torch.dtype:
        """float32 when float32 matmuls are IEEE on this device and W0 is not float64, otherwise float64."""
        if self.base.weight.dtype != torch.float64 and fp32_matmul_is_ieee(self.base.weight.device):
            return torch.float32
        return torch.float64

    def _version_key(self) -> tuple:
        return _write_marks([*self.cores.values(), *self.cores_init.as_dict().values()])

    def _initial_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors of the frozen θ0, computed once and reused until the buffers change.

        The cache is keyed on the identity, version counter and storage address of every θ0 buffer
        (``load_state_dict`` and ``copy_`` bump the version, ``.to()`` makes new tensors) and on inference mode
        (inference tensors must not enter a training graph). After writing θ0 in place through ``.data``, call
        :meth:`clear_caches`.
        """
        key = (torch.is_inference_mode_enabled(), _write_marks(self.cores_init.as_dict().values()))
        if self._initial_cache is None or not _same_key(self._initial_cache[0], key):
            with torch.no_grad():
                self._initial_cache = (key, self._factors_fp64(self.cores_init.as_dict()))
        return self._initial_cache[1]

    def clear_caches(self) -> None:
        """Forget the cached θ0 factors, inference weight and prepared operands; they are rebuilt when next needed.

        Only needed after a write the caches cannot see: a core, θ0 or W0 written in place through ``.data``
        (``p.data.copy_(...)``), which bumps no version counter. Optimizer steps, ``load_state_dict``, ``copy_``,
        ``.to()``, ``p.data = ...`` and ``vector_to_parameters`` are seen.
        """
        self._initial_cache = None
        self._weight_cache = None
        self._prepared = None

    def _apply(self, fn, recurse=True):
        # moving or casting the module makes new tensors: drop the old caches now rather than at the next forward
        self.clear_caches()
        return super()._apply(fn, recurse)

    def delta_weight(self) -> torch.Tensor:
        """ΔW(θ) of the current cores, float64, shaped like ``base.weight`` (differentiable in the cores)."""
        left, right = self._factors_fp64(dict(self.cores.items()))
        return self._weight_view(left @ right).contiguous()

    def weight_update(self) -> torch.Tensor:
        """ΔW(θ) − ΔW(θ0) shaped like ``base.weight``: what is added to W0; exactly 0 at initialisation.

        In :meth:`_update_dtype`. Uses the operands :func:`prepare_updates` left for this layer when they still
        match the cores (once: a second call in the same forward contracts again), otherwise contracts alone.
        """
        prepared, self._prepared = self._prepared, None
        if prepared is not None and _same_key((None, prepared[0]), (None, self._version_key())):
            stacked_left, stacked_right = prepared[1]
        else:
            left, right = self._factors_fp64(dict(self.cores.items()))
            left0, right0 = self._initial_factors()
            stacked_left, stacked_right = _update_operands(left, right, left0, right0, self._update_dtype())
        with _no_autocast(self.base.weight.device):
            return self._weight_view(stacked_left @ stacked_right)

    def adapted_weight(self) -> torch.Tensor:
        """W0 + ΔW(θ) − ΔW(θ0) in the base weight's dtype.

        Without autograd (``no_grad`` / inference mode) the result is cached until a core, a θ0 buffer or W0 is
        written or replaced (optimizer step, ``load_state_dict``, ``.to()``, ``p.data = ...``,
        ``vector_to_parameters``), so adapted inference costs what merged inference costs; after an in-place write
        through ``.data``, which no version counter records, call :meth:`clear_caches`. The cached tensor never
        reaches a graph: with autograd on it is freed and the weight recomputed.
        """
        if torch.is_grad_enabled():
            self._weight_cache = None  # training (again): release the inference copy of W
            return self._compute_adapted_weight()
        device = self.base.weight.device
        tensors = [*self.cores.values(), *self.cores_init.as_dict().values(), self.base.weight]
        key = ((torch.is_inference_mode_enabled(), fp32_matmul_is_ieee(device)), _write_marks(tensors))
        cache = self._weight_cache
        # the weight's own version too: a caller writing into the returned tensor must not poison later calls
        if cache is None or not _same_key(cache[0], key) or _own_version(cache[1]) != cache[2]:
            weight = self._compute_adapted_weight()
            self._weight_cache = cache = (key, weight, _own_version(weight))
        return cache[1]

    def _compute_adapted_weight(self) -> torch.Tensor:
        return self.base.weight + self.weight_update().to(self.base.weight.dtype)

    def merged(self) -> nn.Module:
        """A plain copy of the base layer carrying the adapted weight (no adapter left, zero overhead)."""
        plain = copy.deepcopy(self.base)
        with torch.no_grad():
            plain.weight.copy_(self.adapted_weight())
        return plain


def _group_factors(
    layers: Sequence[TenVOOLayer], core_sets: Sequence[Mapping[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, A, K) and (G, K, B) float64 factors of G layers with equal :meth:`TenVOOLayer._group_key`.

    The cores are cast already laid out in their operand order (:class:`_StackedOperands`), so the contraction
    needs no separate copy of them. float64 is never TF32 and never touched by autocast, so the factors are exact
    to ~1e-16 (spec Q13).
    """
    first = layers[0]
    keys = list(first.cores)
    orders = tuple(_order(*first.operand_layouts.get(key, ("", ""))) for key in keys)
    stacked = _StackedOperands.apply(orders, len(core_sets), *(cores[key] for key in keys for cores in core_sets))
    with _no_autocast(first.base.weight.device):
        return first._factors(dict(zip(keys, stacked)))


class _StackedOperands(torch.autograd.Function):
    """Stack G layers' cores per key, lay them out in operand order and cast them to float64: one stack and one
    copy per key forward, one copy per key backward.

    Why a Function: autograd would hand each core a permuted (non-contiguous) gradient, which ``AccumulateGrad``
    then copies once per core into the parameter's layout; here the whole stack is laid out in one copy.
    """

    @staticmethod
    def forward(ctx, orders: tuple, group_size: int, *cores: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``cores``: key-major, ``group_size`` cores per key; ``orders``: per key the (G, …) axis permutation."""
        ctx.orders, ctx.group_size = orders, group_size
        ctx.dtypes = [core.dtype for core in cores[::group_size]]
        operands = []
        for index, order in enumerate(orders):
            stacked = _stack(cores[index * group_size : (index + 1) * group_size])
            stacked = stacked if order is None else stacked.permute(order)
            operands.append(stacked.to(torch.float64, memory_format=torch.contiguous_format))
        return tuple(operands)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple:
        core_grads: list[torch.Tensor | None] = []
        for grad, order, dtype in zip(grads, ctx.orders, ctx.dtypes):
            if grad is None:
                core_grads += [None] * ctx.group_size
                continue
            if order is not None:
                grad = grad.permute(tuple(order.index(axis) for axis in range(len(order))))
            core_grads += grad.to(dtype, memory_format=torch.contiguous_format).unbind()
        return (None, None, *core_grads)


def prepare_updates(layers: Iterable[TenVOOLayer]) -> None:
    """Contract the factors of many layers in one batched pass per group of identical core shapes.

    On a GPU the update's cost is the number of dispatched ops, not FLOPs: grouping the 111 layers of the paper
    UNet into 29 shape groups divides the contraction's op count by ~4. Each layer keeps its update operands for
    its next :meth:`TenVOOLayer.weight_update`; :func:`release_updates` drops what a forward did not use.
    """
    groups: dict[tuple, list[TenVOOLayer]] = {}
    for layer in layers:
        groups.setdefault(layer._group_key(), []).append(layer)
    for members in groups.values():
        left, right = _group_factors(members, [dict(member.cores.items()) for member in members])
        initial = [member._initial_factors() for member in members]
        left0, right0 = _stack([factors[0] for factors in initial]), _stack([factors[1] for factors in initial])
        stacked_left, stacked_right = _update_operands(left, right, left0, right0, members[0]._update_dtype())
        # unbind, not indexing: its backward is one stack of the G gradients instead of G zero-filled copies
        for member, operands in zip(members, zip(stacked_left.unbind(), stacked_right.unbind())):
            member._prepared = (member._version_key(), operands)


def release_updates(layers: Iterable[TenVOOLayer]) -> None:
    """Drop the operands :func:`prepare_updates` left (they hold a piece of the autograd graph)."""
    for layer in layers:
        layer._prepared = None
