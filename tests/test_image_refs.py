"""The one rule that finds image files: as written under the root, then by shorter tails."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsvl_cli.data.image_refs import ImageRefError, candidate_paths, locate_image

ORIGINAL = "./eval/eval_data/images/cats/1.jpg"  # how the original's eval sets write paths


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_candidates_are_the_path_then_its_shorter_tails(tmp_path: Path) -> None:
    assert candidate_paths(ORIGINAL, tmp_path) == [
        tmp_path / "eval/eval_data/images/cats/1.jpg",
        tmp_path / "eval_data/images/cats/1.jpg",
        tmp_path / "images/cats/1.jpg",
        tmp_path / "cats/1.jpg",
        tmp_path / "1.jpg",
    ]
    # A tail never starts with "..": those name places outside the root's tree.
    assert candidate_paths("../shared/a.png", tmp_path) == [
        tmp_path / "../shared/a.png",
        tmp_path / "shared/a.png",
        tmp_path / "a.png",
    ]


def test_absolute_paths_and_file_uris_name_one_place(tmp_path: Path) -> None:
    picture = tmp_path / "my images" / "a b.png"
    assert candidate_paths(str(picture), "/elsewhere") == [picture]
    assert candidate_paths(picture.as_uri(), "/elsewhere") == [picture]
    with pytest.raises(ImageRefError, match="never downloads") as err:
        candidate_paths("https://example.com/a.png", tmp_path)
    assert err.value.reason == "remote_image"


@pytest.mark.parametrize(
    "root",
    ["", "eval", "eval/eval_data", "eval/eval_data/images", "eval/eval_data/images/cats"],
)
def test_any_folder_on_the_way_to_the_image_finds_it(tmp_path: Path, root: str) -> None:
    image = touch(tmp_path / "eval/eval_data/images/cats/1.jpg")
    assert locate_image(ORIGINAL, tmp_path / root) == image


def test_the_longest_existing_tail_wins(tmp_path: Path) -> None:
    nested = touch(tmp_path / "images/cats/1.jpg")
    touch(tmp_path / "1.jpg")  # another picture with the same name, higher up
    assert locate_image(ORIGINAL, tmp_path) == nested


def test_not_found_names_every_place_tried(tmp_path: Path) -> None:
    with pytest.raises(ImageRefError) as err:
        locate_image(ORIGINAL, tmp_path / "images")
    places = ", ".join(str(p) for p in candidate_paths(ORIGINAL, tmp_path / "images"))
    assert str(err.value) == f"image {ORIGINAL!r}: no such file; tried {places}"
    assert err.value.reason == "missing"
    with pytest.raises(ImageRefError, match=r"no such file; tried /nowhere/a\.png$"):
        locate_image("/nowhere/a.png", tmp_path)
