"""labels.json: the formats users write by hand are read, and a wrong one says what to write."""

from __future__ import annotations

import json

import pytest

from medgen.errors import BadInputError
from medgen.labels import LabelInfo, default_color, load_labels, save_labels


def test_round_trip_of_saved_labels(tmp_path):
    labels = [LabelInfo("liver", 1, (1.0, 0.0, 0.0)), LabelInfo("kidney", 3, (0.0, 1.0, 0.0))]
    assert load_labels(save_labels(labels, tmp_path / "labels.json")) == labels


def test_colour_is_optional_and_nnunet_style_objects_are_read(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([{"name": "liver", "value": 2}]))
    assert load_labels(tmp_path / "list.json") == [LabelInfo("liver", 2, default_color(2))]
    (tmp_path / "object.json").write_text(json.dumps({"background": 0, "kidney": 2, "liver": 1}))
    assert [(label.name, label.value) for label in load_labels(tmp_path / "object.json")] == [("liver", 1), ("kidney", 2)]


@pytest.mark.parametrize("content, detail", [
    ('[{"value": 1}]', "missing 'name'"),
    ('{"liver": "one"}', "the value of 'liver' must be a whole number, got 'one'"),
    ('{"liver": 1.7}', "must be a whole number, got 1.7"),
    ('[{"name": "liver", "value": true}]', "must be a whole number, got True"),
    ('{"liver": 1, "liver": 2}', r"names \['liver'\] appear twice"),
    ('[1, 2]', "expected a list of objects"),
    ('[{"name": "a", "value": 1}, {"name": "a", "value": 2}]', r"must be unique; repeated names \['a'\]"),
    ('[{"name": "a", "value": 1, "color": [255, 0, 0]}]', "RGB triples in \\[0, 1\\]"),
    ('{"liver": Infinity}', "the value of 'liver' must be a whole number, got inf"),
    ('{"Background ": 1, "liver": 2}', "'background' is value 0, never a structure"),
    ('[{"name": null, "value": 1}]', "the name of the label of value 1 must be a string, got None"),
    ('[{"name": "Liver", "value": 1}, {"name": "liver ", "value": 2}]', r"differ by more than case.*\['liver'\]"),
])
def test_a_wrong_format_says_what_to_write(tmp_path, content, detail):
    (tmp_path / "labels.json").write_text(content)
    with pytest.raises(BadInputError, match=detail) as caught:
        load_labels(tmp_path / "labels.json")
    if not any(word in detail for word in ("unique", "RGB", "differ", "background")):
        assert 'Write a list [{"name": "liver", "value": 1' in str(caught.value)


def test_a_background_entry_is_left_out_of_the_list_form_as_of_the_object_form(tmp_path):
    (tmp_path / "labels.json").write_text('[{"name": "background", "value": 0}, {"name": "liver", "value": 1}]')
    assert [(label.name, label.value) for label in load_labels(tmp_path / "labels.json")] == [("liver", 1)]


def test_a_structure_given_value_0_is_refused_not_taken_for_background(tmp_path):
    """Only an entry named background may hold 0: a 'tumour' at 0 would vanish into the background (its voxels
    unlabelled, the model never told), so reading, saving and checking such labels all refuse it by name."""
    (tmp_path / "labels.json").write_text('[{"name": "tumour", "value": 0}, {"name": "liver", "value": 1}]')
    with pytest.raises(BadInputError, match=r"Label values must be positive \(0 is background\); got \[0, 1\]"):
        load_labels(tmp_path / "labels.json")
    with pytest.raises(BadInputError, match=r"must be positive \(0 is background\); got \[0\]"):
        save_labels([LabelInfo("tumour", 0, (1.0, 0.0, 0.0))], tmp_path / "saved.json")
    assert not (tmp_path / "saved.json").exists()
    (tmp_path / "dataset_labels.json").write_text('{"background": 0, "tumour": 0, "liver": 1}')  # the object form too
    with pytest.raises(BadInputError, match=r"must be positive \(0 is background\); got \[0, 1\]"):
        load_labels(tmp_path / "dataset_labels.json")


def test_labels_medgen_wrote_before_the_stricter_file_rules_still_read_back(tmp_path):
    """Model folders keep their labels through save_labels/check_labels: a 'Background' segment or 'Liver' next to
    'liver' trained on earlier must not stop them from generating (only hand-written labels.json files are refused)."""
    from medgen.labels import check_labels

    check_labels([LabelInfo("Background", 1, (0.0, 0.0, 0.0)), LabelInfo("Liver", 2, (1.0, 0.0, 0.0)),
                  LabelInfo("liver", 3, (0.0, 1.0, 0.0))])
