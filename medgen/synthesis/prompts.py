"""MRGen prompts (spec B.3/B.4): the text fields, prompt dropout, prompt encoders and the mixed
source/target training set of the mask ControlNet.

A prompt has MRGen's four fields ``[modality, attributes, region, organs]``. Two encoders turn
prompts into the cross-attention context ``(B, L, E)`` of the latent UNet and ControlNet; both
satisfy :class:`PromptEncoder`:

- :class:`LearnedPromptEncoder` (default, offline): embedding tables over a :class:`PromptVocabulary`
  built from the training prompts (the lighter alternative of spec B.9), trained with the UNet.
- :class:`FrozenTextEncoder`: any local text model, e.g. MRGen's frozen BiomedCLIP text tower,
  called on ``prompt.text()``; pass it to ``train_maskgen(..., prompt_encoder=)`` and again to
  ``MaskGenModel.load(..., prompt_encoder=)`` (Python API: the jobs and the panel use the learned table).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from medgen.errors import BadInputError, GeometryMismatchError
from medgen.synthesis.masks import control_tensor, empty_control, foreground_fraction


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One MRGen prompt.

    Args:
        modality: modality key, e.g. ``"T2 SPIR Abdomen MRI"``.
        attributes: the fixed attribute phrase of the modality, e.g. ``"fat low signal, water high signal"``.
        region: body region, e.g. ``"abdomen"``.
        organs: organ names; in label-map order (value ``j`` = ``organs[j-1]``) where a label map goes with it.
    """

    modality: str
    attributes: str = ""
    region: str = ""
    organs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "organs", tuple(self.organs))

    @classmethod
    def empty(cls) -> "Prompt":
        """The empty prompt ``""``: the unconditional branch of classifier-free guidance."""
        return cls(modality="")

    @property
    def is_empty(self) -> bool:
        return not (self.modality or self.attributes or self.region or self.organs)

    def text(self) -> str:
        """Fields joined by ``", "`` with empty fields (and empty organ names) dropped."""
        parts = [self.modality, self.attributes, self.region, *self.organs]
        return ", ".join(part.strip() for part in parts if part.strip())


def drop_prompt(prompt: Prompt, p_drop: float, generator: torch.Generator) -> Prompt:
    """``Prompt.empty()`` with probability ``p_drop`` (MRGen: 0.1, enabling CFG), else ``prompt``."""
    if not 0.0 <= p_drop <= 1.0:
        raise BadInputError(f"The prompt dropout probability must lie in [0, 1]; got {p_drop}.")
    return Prompt.empty() if torch.rand((), generator=generator).item() < p_drop else prompt


@runtime_checkable
class PromptEncoder(Protocol):
    """Turns prompts into a cross-attention context; what the generator needs from any text encoder.

    ``context_length`` (L) and ``embedding_dim`` (E, the UNet's ``cross_attention_dim``) are fixed per
    encoder; ``encode_prompts`` returns float ``(B, L, E)``. The empty prompt must map to the context
    used as the unconditional branch of classifier-free guidance.

    To plug a local text model, wrap a function ``texts -> (B, L, E)`` in :class:`FrozenTextEncoder`,
    for example a Hugging Face text tower loaded from a local folder::

        tokenizer = AutoTokenizer.from_pretrained(folder)
        tower = AutoModel.from_pretrained(folder).eval()

        def embed(texts):
            tokens = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            return tower(**tokens).last_hidden_state

        encoder = FrozenTextEncoder(embed, context_length=77, embedding_dim=768)
    """

    context_length: int
    embedding_dim: int

    def encode_prompts(self, prompts: Sequence[Prompt]) -> torch.Tensor: ...


class PromptVocabulary:
    """Indexes of the prompt fields seen in training; index 0 of every field means "absent/empty".

    Token layout of :meth:`encode` (fixed, ``L = 3 + len(organs)``): ``[modality, attributes, region,
    organ slot 1, ..., organ slot N]``. The organs are a set encoded multi-hot: slot ``i`` holds organ
    id ``i`` when the prompt names organ ``i`` and 0 otherwise, so the order in which a prompt lists
    its organs does not change the tokens.

    Args:
        modalities, attributes, regions, organs: the known non-empty values of each field.
    """

    FIELDS = ("modalities", "attributes", "regions", "organs")

    def __init__(self, modalities: Sequence[str], attributes: Sequence[str], regions: Sequence[str], organs: Sequence[str]):
        self.modalities = _unique(modalities)
        self.attributes = _unique(attributes)
        self.regions = _unique(regions)
        self.organs = _unique(organs)

    @classmethod
    def from_prompts(cls, prompts: Sequence[Prompt]) -> "PromptVocabulary":
        """The vocabulary of every field value in ``prompts``, in order of first appearance."""
        return cls(
            [p.modality for p in prompts], [p.attributes for p in prompts],
            [p.region for p in prompts], [organ for p in prompts for organ in p.organs],
        )

    @property
    def context_length(self) -> int:
        return 3 + len(self.organs)

    def field_sizes(self) -> tuple[int, int, int, int]:
        """Table sizes (known values + the empty index 0) of modality, attributes, region, organ."""
        return tuple(len(getattr(self, field)) + 1 for field in self.FIELDS)

    def to_dict(self) -> dict[str, list[str]]:
        return {field: list(getattr(self, field)) for field in self.FIELDS}

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> "PromptVocabulary":
        try:
            return cls(*(document[field] for field in cls.FIELDS))
        except (KeyError, TypeError) as error:
            raise BadInputError(f"A prompt vocabulary needs the lists {cls.FIELDS}; got {document!r} ({error}).") from None

    def encode(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """Token ids of ``prompts``: int64 ``(B, L)`` in the layout above.

        Raises:
            BadInputError: a prompt names a modality, attribute phrase, region or organ not in the vocabulary.
        """
        tokens = torch.zeros((len(prompts), self.context_length), dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            tokens[row, 0] = _index(self.modalities, prompt.modality, "modality")
            tokens[row, 1] = _index(self.attributes, prompt.attributes, "attribute phrase")
            tokens[row, 2] = _index(self.regions, prompt.region, "region")
            for organ in prompt.organs:
                organ_id = _index(self.organs, organ, "organ")
                if organ_id:
                    tokens[row, 2 + organ_id] = organ_id
        return tokens


def _unique(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(value for value in values if value))


def _index(known: tuple[str, ...], value: str, what: str) -> int:
    if not value:
        return 0
    if value not in known:
        raise BadInputError(
            f"The prompt names the {what} {value!r}, which the model was not trained with. Known: {list(known)}."
        )
    return known.index(value) + 1


class LearnedPromptEncoder(nn.Module):
    """Learned context from prompt tokens: one embedding table per field plus a learned slot embedding.

    The empty prompt (all tokens 0) maps to a learned, well-defined context: the true unconditional
    branch of classifier-free guidance (spec B.9 caveat: MONAI's built-in CFG would use a constant
    fill instead).

    Args:
        vocabulary: the known field values (saved with the model, see :meth:`to_config`).
        embedding_dim: ``E``, the UNet's ``cross_attention_dim``.
    """

    def __init__(self, vocabulary: PromptVocabulary, embedding_dim: int):
        super().__init__()
        self.vocabulary = vocabulary
        self.embedding_dim = int(embedding_dim)
        self.context_length = vocabulary.context_length
        modality_size, attribute_size, region_size, organ_size = vocabulary.field_sizes()
        self.modality = nn.Embedding(modality_size, embedding_dim)
        self.attributes = nn.Embedding(attribute_size, embedding_dim)
        self.region = nn.Embedding(region_size, embedding_dim)
        self.organ = nn.Embedding(organ_size, embedding_dim)
        self.slot = nn.Parameter(torch.randn(self.context_length, embedding_dim) * 0.02)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` token ids from :meth:`PromptVocabulary.encode` -> context ``(B, L, E)``."""
        if token_ids.ndim != 2 or token_ids.shape[1] != self.context_length:
            raise BadInputError(f"Expected token ids (B, {self.context_length}); got {tuple(token_ids.shape)}.")
        fields = torch.cat(
            [
                self.modality(token_ids[:, 0:1]),
                self.attributes(token_ids[:, 1:2]),
                self.region(token_ids[:, 2:3]),
                self.organ(token_ids[:, 3:]),
            ],
            dim=1,
        )
        return fields + self.slot

    def encode_prompts(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """Context ``(B, L, E)`` of ``prompts`` on the encoder's device."""
        return self(self.vocabulary.encode(prompts).to(self.slot.device))

    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable settings to rebuild the encoder with :meth:`from_config` (weights saved apart)."""
        return {"kind": "learned", "vocabulary": self.vocabulary.to_dict(), "embedding_dim": self.embedding_dim}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LearnedPromptEncoder":
        return cls(PromptVocabulary.from_dict(config["vocabulary"]), int(config["embedding_dim"]))


class FrozenTextEncoder(nn.Module):
    """Adapter from a text model ``texts -> (B, L, E)`` to :class:`PromptEncoder`, run without gradients.

    The model is frozen, so each distinct text is encoded once and its context cached (training draws
    the same few prompts every step), and copies of the adapter (the EMA of the training loop) share
    it instead of duplicating the text model.

    Args:
        text_fn: called with ``[prompt.text() for prompt in prompts]``; an ``nn.Module`` is frozen
            (``requires_grad_(False)``, eval mode) and moves with this adapter.
        context_length, embedding_dim: the ``(L, E)`` it returns; checked on every call.
    """

    def __init__(self, text_fn: Callable[[list[str]], torch.Tensor], context_length: int, embedding_dim: int):
        super().__init__()
        if isinstance(text_fn, nn.Module):
            text_fn.requires_grad_(False).eval()
        self.text_fn = text_fn
        self.context_length = int(context_length)
        self.embedding_dim = int(embedding_dim)
        self._contexts: dict[str, torch.Tensor] = {}

    def __deepcopy__(self, memo: dict) -> "FrozenTextEncoder":
        return self  # frozen: a copy would only duplicate the text model

    def encode_prompts(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        texts = [prompt.text() for prompt in prompts]
        missing = sorted(set(texts) - set(self._contexts))
        if missing:
            with torch.no_grad():
                context = self.text_fn(missing)
            expected = (len(missing), self.context_length, self.embedding_dim)
            if tuple(context.shape) != expected:
                raise BadInputError(f"The text model returned a context of shape {tuple(context.shape)}; expected {expected}.")
            self._contexts.update(zip(missing, context.float()))
        return torch.stack([self._contexts[text] for text in texts])


@dataclasses.dataclass
class TrainingSample:
    """One ControlNet training sample (spec B.4 adapted to 3D volumes).

    Args:
        image: float ``(1, I, J, K)``.
        label: int64 ``(1, I, J, K)`` organ label map for a source-modality sample; None for a
            target-modality sample (its control is :func:`medgen.synthesis.masks.empty_control`).
        prompt: the sample's prompt (before dropout).
        is_source: True for a source-modality sample.
    """

    image: torch.Tensor
    label: torch.Tensor | None
    prompt: Prompt
    is_source: bool

    def control(self, encoding: str = "one-hot", weights: Sequence[float] | None = None) -> torch.Tensor:
        """The ControlNet condition ``(C, I, J, K)``: the encoded label map, or the empty control."""
        num_organs = len(self.prompt.organs)
        if self.label is None:
            return empty_control(self.image.shape[1:], num_organs, encoding)
        return control_tensor(self.label, num_organs, encoding, weights)


def compose_training_set(
    source_cases: Sequence[tuple[torch.Tensor, torch.Tensor]],
    target_cases: Sequence[torch.Tensor | tuple[torch.Tensor, Any]],
    source_prompt: Prompt,
    target_prompt: Prompt,
) -> list[TrainingSample]:
    """MRGen's mixed training set: source volumes with their masks, target volumes with no mask.

    Source cases without any organ voxel are dropped (MRGen keeps only slices with ``len(organs) > 0``).
    Every sample's prompt names the dataset's organ list ``source_prompt.organs``: MRGen takes the
    organs field from the dataset's label list, which it does not blank for target-modality samples,
    so target samples name the organs although their control is empty.

    Args:
        source_cases: ``(image (1, I, J, K), label (1, I, J, K))`` pairs of the source modality, label
            values in ``0..len(source_prompt.organs)``.
        target_cases: target-modality images ``(1, I, J, K)`` (or ``(image, anything)`` pairs; target
            labels are never used).
        source_prompt: prompt of the source modality; ``organs`` = the dataset's organ names in label order.
        target_prompt: prompt of the target modality; its ``organs`` must be empty or equal the source's.

    Returns:
        the source samples (in input order) followed by the target samples.
    """
    organs = source_prompt.organs
    if not organs:
        raise BadInputError("The source prompt must name the dataset's organs (label value j = organs[j-1]).")
    if target_prompt.organs and target_prompt.organs != organs:
        raise BadInputError(
            f"The target prompt names organs {list(target_prompt.organs)} but the dataset's are {list(organs)}; "
            "MRGen gives both modalities the dataset's organ list. Leave the target organs empty or make them equal."
        )
    target_prompt = dataclasses.replace(target_prompt, organs=organs)
    samples = []
    for index, (image, label) in enumerate(source_cases):
        if tuple(image.shape) != tuple(label.shape) or image.ndim != 4 or image.shape[0] != 1:
            raise GeometryMismatchError(
                f"Source case {index}: image {tuple(image.shape)} and label {tuple(label.shape)} must both be (1, I, J, K)."
            )
        label = torch.as_tensor(label).long()
        if label.min() < 0 or label.max() > len(organs):
            raise BadInputError(
                f"Source case {index} has label values {label.min().item()}..{label.max().item()}, but the prompt names "
                f"{len(organs)} organs {list(organs)}."
            )
        if foreground_fraction(label) > 0:
            samples.append(TrainingSample(image.float(), label, source_prompt, True))
    if not samples:
        raise BadInputError("No source case contains an organ: the ControlNet needs source volumes with labels.")
    for index, case in enumerate(target_cases):
        image = case[0] if isinstance(case, (tuple, list)) else case
        if image.ndim != 4 or image.shape[0] != 1:
            raise BadInputError(f"Target case {index}: expected an image (1, I, J, K); got {tuple(image.shape)}.")
        samples.append(TrainingSample(image.float(), None, target_prompt, False))
    return samples
