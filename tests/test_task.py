"""The DashAI task contract on real PIL images and real files."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from PIL import Image

from t2i_task.storage.tables import ProcessData
from t2i_task.task import BaseGenerativeTask, TextToImageGenerationTask

UUID_PNG = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\.png$")


@pytest.fixture
def task():
    return TextToImageGenerationTask(max_prompt_length=50)


def gradient(width: int, height: int, shift: int = 0) -> Image.Image:
    x = np.arange(width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.arange(height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x + shift, y, (x ^ y)], axis=-1), "RGB")


def test_metadata_names_types_and_cardinality():
    assert TextToImageGenerationTask.get_metadata() == {
        "inputs_types": ["str"],
        "outputs_types": ["Image"],
        "inputs_cardinality": 1,
        "outputs_cardinality": "n",
    }


def test_the_base_task_is_abstract():
    with pytest.raises(TypeError):
        BaseGenerativeTask()


def test_prompt_is_stored_as_one_str_row(task):
    assert task.prepare_input_for_database(["a red circle"]) == [("a red circle", "str")]


@pytest.mark.parametrize(
    ("bad_input", "message"),
    [
        ([], "exactly one prompt, got 0"),
        (["a", "b"], "exactly one prompt, got 2"),
        ([""], "prompt is empty"),
        (["   \n"], "prompt is empty"),
        ([42], "prompt must be a string, got int"),
        ([None], "prompt must be a string, got NoneType"),
        (["x" * 51], "longer than 50 characters"),
        (["a\x00b"], "NUL"),
        ("a cat", "must be a list"),
    ],
)
def test_bad_input_is_refused_with_a_reason(task, bad_input, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        task.prepare_input_for_database(bad_input)


def test_prompt_for_the_model_is_the_first_input_row(task):
    rows = [ProcessData(data="a cat", data_type="str"), ProcessData(data="ignored", data_type="str")]
    assert task.prepare_for_task(rows) == "a cat"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "no input rows"),
        ([ProcessData(data="x.png", data_type="Image")], "data_type 'Image', expected 'str'"),
        ([ProcessData(data=" ", data_type="str")], "prompt is empty"),
    ],
)
def test_unusable_input_rows_are_refused(task, rows, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        task.prepare_for_task(rows)


def test_text_input_is_shown_as_stored(task):
    rows = [ProcessData(id=1, data="a cat", data_type="str", is_input=True)]
    assert task.process_input_from_database(rows) == rows


def test_images_are_saved_as_uuid_named_pngs_in_a_new_folder(task, tmp_path):
    folder = tmp_path / "not" / "yet" / "there"
    images = [gradient(64, 48), gradient(32, 32, shift=7)]

    rows = task.process_output(images, images_path=folder)

    assert [data_type for _, data_type in rows] == ["Image", "Image"]
    names = [name for name, _ in rows]
    assert all(UUID_PNG.match(name) for name in names) and len(set(names)) == 2
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)
    for (name, _), original in zip(rows, images):
        with Image.open(folder / name) as saved:
            assert saved.format == "PNG"
            assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(original))


def test_each_png_carries_its_generation_parameters(task, tmp_path):
    parameters = [
        {"prompt": "un cercle rouge ✓", "negative_prompt": "blur", "seed": 7, "num_inference_steps": 4,
         "guidance_scale": 7.5, "size": "64x48", "model": "tiny-sd"},
        {"prompt": "un cercle rouge ✓", "negative_prompt": None, "seed": 8, "num_inference_steps": 4,
         "guidance_scale": 7.5, "size": "64x48", "model": "tiny-sd"},
    ]
    rows = task.process_output([gradient(64, 48), gradient(64, 48, 1)], images_path=tmp_path, parameters=parameters)

    with Image.open(tmp_path / rows[0][0]) as first, Image.open(tmp_path / rows[1][0]) as second:
        assert first.text == {k: str(v) for k, v in parameters[0].items()}
        assert second.text["seed"] == "8"
        assert "negative_prompt" not in second.text


def test_parameters_must_match_the_images_one_to_one(task, tmp_path):
    with pytest.raises(ValueError, match="parameters for 1 images but 2 images"):
        task.process_output([gradient(8, 8), gradient(8, 8)], images_path=tmp_path, parameters=[{"seed": 1}])
    assert list(tmp_path.iterdir()) == []


def test_non_images_are_refused_before_anything_is_written(task, tmp_path):
    with pytest.raises(ValueError, match=r"output\[1\] is a str"):
        task.process_output([gradient(8, 8), "not an image"], images_path=tmp_path)
    with pytest.raises(ValueError, match="non-empty list"):
        task.process_output([], images_path=tmp_path)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_a_failed_save_leaves_no_file_behind(task, tmp_path):
    unsavable = Image.new("CMYK", (8, 8))  # PNG has no CMYK mode
    with pytest.raises(OSError):
        task.process_output([gradient(8, 8), unsavable], images_path=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_output_rows_show_the_bare_file_name(task, tmp_path):
    stored = [
        ProcessData(id=3, data="/somewhere/else/abc.png", data_type="Image", process_id=1, is_input=False),
        ProcessData(id=4, data="Error details: boom", data_type="str", process_id=1, is_input=False),
    ]
    shown = task.process_output_from_database(stored, images_path=tmp_path)

    assert [(row.id, row.data, row.data_type, row.is_input) for row in shown] == [
        (3, "abc.png", "Image", False),
        (4, "Error details: boom", "str", False),
    ]
    assert stored[0].data == "/somewhere/else/abc.png", "the stored row must not change"


def test_output_rows_as_base64_hold_the_png_file_bytes(task, tmp_path):
    (name, data_type), = task.process_output([gradient(16, 16)], images_path=tmp_path)
    stored = [ProcessData(id=1, data=name, data_type=data_type, is_input=False)]

    shown = task.process_output_from_database(stored, images_path=tmp_path, as_base64=True)

    assert base64.b64decode(shown[0].data) == (tmp_path / name).read_bytes()
    assert stored[0].data == name
