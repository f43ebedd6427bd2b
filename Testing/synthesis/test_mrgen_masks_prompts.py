"""MRGen mask encodings, prompts and the mixed training set (spec B.10 oracles 1-3)."""

from __future__ import annotations

import json

import pytest
import torch

from medgen.errors import BadInputError
from medgen.synthesis.masks import (
    CHAOS_WEIGHTS,
    MASK_THRESHOLD,
    control_channels,
    control_tensor,
    decode_merged_mask,
    default_weights,
    empty_control,
    foreground_fraction,
    label_from_organ_masks,
    merged_mask,
    organ_masks,
)
from medgen.synthesis.prompts import (
    FrozenTextEncoder,
    LearnedPromptEncoder,
    Prompt,
    PromptEncoder,
    PromptVocabulary,
    compose_training_set,
    drop_prompt,
)

CHAOS_ORGANS = ("liver", "right kidney", "left kidney", "spleen")


def chaos_label(seed: int = 0, shape=(12, 14, 16)) -> torch.Tensor:
    """A random label map (1, I, J, K) holding all four CHAOS organs and background."""
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 5, (1, *shape), generator=generator)
    label[0, 0, 0, :5] = torch.arange(5)
    return label


def test_oracle1_merged_mask_encoding():
    label = chaos_label()
    masks = organ_masks(label, 4)
    merged = merged_mask(masks, CHAOS_WEIGHTS)
    assert merged.shape == (1, *label.shape[1:])
    assert torch.all(merged[label == 0] == -1.0)
    for organ, expected in zip(range(1, 5), (-0.4, 0.0, -0.2, 0.2)):
        assert torch.allclose(merged[label == organ], torch.tensor(expected), atol=1e-6)
    # the value -> organ map is injective for non-overlapping organs
    values = {round(float(merged[label == organ][0]), 6) for organ in range(5)}
    assert len(values) == 5
    # nearest-weight decoding recovers the one-hot masks exactly, also after nearest-neighbour resampling
    assert torch.equal(decode_merged_mask(merged, CHAOS_WEIGHTS), masks)
    resampled = torch.nn.functional.interpolate(merged[None], scale_factor=2, mode="nearest")[0]
    expected = torch.nn.functional.interpolate(masks[None], scale_factor=2, mode="nearest")[0]
    assert torch.equal(decode_merged_mask(resampled, CHAOS_WEIGHTS), expected)
    # overlaps add up; the label map of overlapping masks takes the larger id (spec B.6)
    overlap = torch.zeros(4, 1, 1, 2)
    overlap[0, ..., 0] = overlap[3, ..., 0] = 1
    assert torch.allclose(merged_mask(overlap, CHAOS_WEIGHTS)[0, 0, 0], torch.tensor([2 * (0.3 + 0.6) - 1, -1.0]))
    assert label_from_organ_masks(overlap).tolist() == [[[[4, 0]]]]
    assert torch.equal(label_from_organ_masks(masks), label)
    # a single-organ dataset uses w = 1: organ voxels +1
    single = merged_mask(organ_masks((label > 0).long(), 1), (1.0,))
    assert set(single.unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(BadInputError, match="repeated"):
        decode_merged_mask(merged, (0.3, 0.3, 0.4, 0.6))


def test_control_encodings_and_empty_control():
    label = chaos_label()
    one_hot = control_tensor(label, 4)
    assert one_hot.shape == (control_channels(4), *label.shape[1:]) == (4, *label.shape[1:])
    assert set(one_hot.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal((one_hot > 0).float(), organ_masks(label, 4))
    merged = control_tensor(label, 4, "merged", CHAOS_WEIGHTS)
    assert merged.shape[0] == control_channels(4, "merged") == 1
    assert torch.equal(merged, merged_mask(organ_masks(label, 4), CHAOS_WEIGHTS))
    # "no mask" equals the control of an all-background label map in both encodings
    background = torch.zeros_like(label)
    for encoding in ("one-hot", "merged"):
        empty = empty_control(label.shape[1:], 4, encoding)
        assert torch.equal(empty, control_tensor(background, 4, encoding))
        assert torch.all(empty == -1.0)
    assert foreground_fraction(background) == 0.0
    assert foreground_fraction(label) == pytest.approx(float((label > 0).float().mean()))
    assert MASK_THRESHOLD == 0.005
    with pytest.raises(BadInputError, match=r"0\.\.3"):
        control_tensor(label, 3)
    with pytest.raises(BadInputError, match="encoding"):
        control_tensor(label, 4, "rgb")


def test_default_merged_weights_are_j_over_n():
    """Without given weights the merged control uses w_j = j / N: w = 1 for one organ (organ voxels +1, as in
    MRGen's single-organ datasets) and organ j of four at 2 j / 4 - 1, so the last organ reaches +1."""
    assert default_weights(1) == (1.0,)
    assert default_weights(4) == (0.25, 0.5, 0.75, 1.0)
    label = chaos_label()
    merged = control_tensor(label, 4, "merged")
    for organ, expected in zip(range(5), (-1.0, -0.5, 0.0, 0.5, 1.0)):
        assert torch.allclose(merged[label == organ], torch.tensor(expected), atol=1e-6), organ
    assert set(control_tensor((label > 0).long(), 1, "merged").unique().tolist()) == {-1.0, 1.0}


def test_oracle2_prompt_composer():
    full = Prompt("T2 SPIR Abdomen MRI", "fat low signal, water high signal", "abdomen", CHAOS_ORGANS)
    assert full.text() == "T2 SPIR Abdomen MRI, fat low signal, water high signal, abdomen, liver, right kidney, left kidney, spleen"
    sparse = Prompt("T1 Abdomen MRI", "", " ", ("", "liver"))
    assert sparse.text() == "T1 Abdomen MRI, liver"
    for prompt in (full, sparse, Prompt("", region="pelvis"), Prompt.empty()):
        text = prompt.text()
        assert ", ," not in text and not text.startswith(",") and not text.endswith(",") and ",," not in text
    assert Prompt.empty().text() == "" and Prompt.empty().is_empty and not full.is_empty

    generator = torch.Generator().manual_seed(0)
    drops = sum(drop_prompt(full, 0.1, generator).is_empty for _ in range(10_000))
    assert abs(drops / 10_000 - 0.1) <= 0.01
    assert drop_prompt(full, 0.0, generator) == full and drop_prompt(full, 1.0, generator).is_empty


def test_prompt_vocabulary_and_learned_encoder():
    source = Prompt("T1 Abdomen MRI", "fat high signal", "abdomen", CHAOS_ORGANS)
    target = Prompt("T2 SPIR Abdomen MRI", "fat low signal", "abdomen", CHAOS_ORGANS)
    vocabulary = PromptVocabulary.from_prompts([source, target])
    restored = PromptVocabulary.from_dict(json.loads(json.dumps(vocabulary.to_dict())))
    assert restored.to_dict() == vocabulary.to_dict()

    tokens = vocabulary.encode([source, target, Prompt.empty(), Prompt("T1 Abdomen MRI", organs=("spleen", "liver"))])
    assert tokens.shape == (4, 3 + 4) and tokens.dtype == torch.int64
    assert tokens[0].tolist() == [1, 1, 1, 1, 2, 3, 4] and tokens[1].tolist() == [2, 2, 1, 1, 2, 3, 4]
    assert tokens[2].tolist() == [0] * 7
    assert tokens[3].tolist() == [1, 0, 0, 1, 0, 0, 4]  # organ slots are a set: order does not matter
    with pytest.raises(BadInputError, match="T1 Abdomen MRI"):
        vocabulary.encode([Prompt("CT")])
    with pytest.raises(BadInputError, match="pancreas"):
        vocabulary.encode([Prompt("T1 Abdomen MRI", organs=("pancreas",))])

    torch.manual_seed(0)
    encoder = LearnedPromptEncoder(vocabulary, embedding_dim=8)
    assert isinstance(encoder, PromptEncoder)
    context = encoder.encode_prompts([source, target, Prompt.empty(), Prompt.empty()])
    assert context.shape == (4, encoder.context_length, encoder.embedding_dim) == (4, 7, 8)
    assert torch.equal(context[2], context[3]) and not torch.equal(context[0], context[2])
    assert not torch.equal(context[0], context[1])
    # each of the L positions adds its own learned slot vector to its field's embedding (the empty prompt: token 0)
    fields = torch.cat([encoder.modality.weight[:1], encoder.attributes.weight[:1], encoder.region.weight[:1],
                        encoder.organ.weight[[0, 0, 0, 0]]])
    assert torch.allclose(context[2], fields + encoder.slot)
    assert not torch.allclose(context[2, 3], context[2, 4])  # same organ token, different slot
    rebuilt = LearnedPromptEncoder.from_config(json.loads(json.dumps(encoder.to_config())))
    rebuilt.load_state_dict(encoder.state_dict())
    assert torch.equal(rebuilt.encode_prompts([source]), context[:1])
    context[0].sum().backward()
    assert encoder.modality.weight.grad is not None


def test_frozen_text_encoder_adapter():
    def tiny_text_model(texts):
        # deterministic stand-in for a text tower: per text, its character codes tiled into (L, E)
        rows = [torch.tensor([float(ord(c)) for c in (text or " ")][:12]) for text in texts]
        return torch.stack([torch.nn.functional.pad(row, (0, 12 - len(row))).view(3, 4) for row in rows])

    encoder = FrozenTextEncoder(tiny_text_model, context_length=3, embedding_dim=4)
    assert isinstance(encoder, PromptEncoder)
    context = encoder.encode_prompts([Prompt("T1"), Prompt.empty()])
    assert context.shape == (2, 3, 4)
    assert context[0, 0, :2].tolist() == [ord("T"), ord("1")] and context[1, 0, 0] == ord(" ")
    with pytest.raises(BadInputError, match=r"\(1, 5, 4\)"):
        FrozenTextEncoder(tiny_text_model, context_length=5, embedding_dim=4).encode_prompts([Prompt("T1")])


def test_oracle3_training_set_composer():
    source_prompt = Prompt("T1 Abdomen MRI", "fat high signal", "abdomen", CHAOS_ORGANS)
    target_prompt = Prompt("T2 SPIR Abdomen MRI", "fat low signal", "abdomen")
    with_organs = chaos_label(1)
    without_organs = torch.zeros_like(with_organs)
    source_cases = [(torch.rand(with_organs.shape), with_organs), (torch.rand(with_organs.shape), without_organs)]
    target_cases = [torch.rand(with_organs.shape), (torch.rand(with_organs.shape), None)]
    samples = compose_training_set(source_cases, target_cases, source_prompt, target_prompt)

    assert [sample.is_source for sample in samples] == [True, False, False]  # the organ-less case is dropped
    for sample in samples:
        control = sample.control()
        if sample.is_source:
            assert sample.label is not None and foreground_fraction(sample.label) > 0
            assert sample.prompt.organs and sample.prompt == source_prompt
            assert torch.equal(control, control_tensor(sample.label, 4))
        else:
            assert sample.label is None
            assert torch.all(control == -1.0) and torch.all(sample.control("merged") == -1.0)
            # MRGen quirk: target samples still name the dataset's organs
            assert sample.prompt.modality == "T2 SPIR Abdomen MRI" and sample.prompt.organs == CHAOS_ORGANS
    assert not any(sample.label is not None and not sample.prompt.organs for sample in samples)

    with pytest.raises(BadInputError, match="organs"):
        compose_training_set(source_cases, target_cases, Prompt("T1 Abdomen MRI"), target_prompt)
    with pytest.raises(BadInputError, match="No source case"):
        compose_training_set(source_cases[1:], target_cases, source_prompt, target_prompt)
    with pytest.raises(BadInputError, match="dataset's are"):
        compose_training_set(source_cases, target_cases, source_prompt, Prompt("T2", organs=("liver",)))
    beyond = with_organs.clone()
    beyond[0, 0, 0, 0] = 5  # one value past the four named organs
    with pytest.raises(BadInputError, match=r"label values 0..5, but the prompt names 4 organs"):
        compose_training_set([(torch.rand(beyond.shape), beyond)], target_cases, source_prompt, target_prompt)
