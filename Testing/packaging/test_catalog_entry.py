"""MedGen.json is a valid ExtensionsIndex entry that agrees with the top-level CMakeLists.txt."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema

from slicer_stubs import REPOSITORY

SCHEMA_FILE = Path(__file__).resolve().parent / "slicer-extension-catalog-entry-schema-v1.0.2.json"
ENTRY_FILE = REPOSITORY / "MedGen.json"
# A subset of the Index CI's accepted categories, enough to catch a typo in ours.
ACCEPTED_CATEGORIES = {"Image Synthesis", "Segmentation", "Filtering", "Registration", "Utilities", "Examples"}


def cmake_value(name: str) -> str:
    text = (REPOSITORY / "CMakeLists.txt").read_text(encoding="utf-8")
    return re.search(rf'set\s*\({name}\s*"([^"]+)"\)', text).group(1)


def test_entry_validates_against_the_v1_0_2_schema():
    entry = json.loads(ENTRY_FILE.read_text(encoding="utf-8"))
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(entry, schema)
    assert entry["$schema"].split("/")[-1].rstrip("#") == SCHEMA_FILE.name


def test_schema_copy_rejects_unknown_fields_and_bad_tiers():
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    base = {"$schema": "x", "category": "Examples", "scm_url": "https://example.org/SlicerX"}
    assert validator.is_valid(base)
    assert not validator.is_valid({**base, "homepage": "https://example.org"})
    assert not validator.is_valid({**base, "tier": 6})
    assert not validator.is_valid({"$schema": "x", "category": "Examples"})


def test_entry_name_and_fields_agree_with_cmakelists():
    entry = json.loads(ENTRY_FILE.read_text(encoding="utf-8"))
    project = re.search(r"project\s*\(\s*([^\s\)\n\r]+)", (REPOSITORY / "CMakeLists.txt").read_text()).group(1)
    assert ENTRY_FILE.stem == project
    assert not project.startswith("Slicer")
    assert entry["category"] == cmake_value("EXTENSION_CATEGORY") and entry["category"] in ACCEPTED_CATEGORIES
    assert entry["build_dependencies"] == cmake_value("EXTENSION_DEPENDS").split()
    assert entry["scm_url"] == cmake_value("EXTENSION_HOMEPAGE")
    assert entry["scm_url"].rsplit("/", 1)[-1].startswith("Slicer")
    assert entry["scm_revision"] == "main" and entry["tier"] == 1


def test_entry_uses_lf_and_two_space_formatting():
    raw = ENTRY_FILE.read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n")
    assert all(line.startswith(b"  ") or line in (b"{", b"}") for line in raw.splitlines())


def test_license_is_apache_2_in_the_root():
    text = (REPOSITORY / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_screenshot_and_icon_urls_point_at_files_in_the_repository():
    """The Extensions Index fetches these raw URLs from main: every file they name must be committed."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cmake = (root / "CMakeLists.txt").read_text()
    urls = re.findall(r'set\(EXTENSION_(?:ICONURL|SCREENSHOTURLS)\s*"([^"]+)"\)', cmake)
    paths = [url.split("/main/", 1)[1] for value in urls for url in value.split()]
    assert paths and all((root / path).is_file() and path.endswith(".png") for path in paths), paths
