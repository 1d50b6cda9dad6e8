"""DashAI's generative task contract and its text-to-image task.

The task sits between the database and the model: it turns stored input rows
into a prompt, and generated images into files and stored output rows. It knows
PIL and the ProcessData rows, not torch, HTTP or SQL sessions.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, List, Tuple

from PIL import Image, PngImagePlugin

from t2i_task.storage.tables import ProcessData

DEFAULT_IMAGES_PATH = Path("data/images")
DEFAULT_MAX_PROMPT_LENGTH = 1000

TEXT_TYPE = "str"
IMAGE_TYPE = "Image"


class BaseGenerativeTask(ABC):
    """A generative task: adapters between ProcessData rows and a model."""

    metadata: ClassVar[dict[str, Any]]

    @classmethod
    def get_metadata(cls) -> dict[str, Any]:
        """Return serialisable metadata for the current generative task.

        Types are reported by class name, as DashAI's front end expects.
        """
        return {
            "inputs_types": [t.__name__ for t in cls.metadata["inputs_types"]],
            "outputs_types": [t.__name__ for t in cls.metadata["outputs_types"]],
            "inputs_cardinality": cls.metadata["inputs_cardinality"],
            "outputs_cardinality": cls.metadata["outputs_cardinality"],
        }

    @abstractmethod
    def prepare_for_task(self, input: List[ProcessData], **kwargs: Any) -> Any:
        """Turn stored input rows into the model's input."""

    @abstractmethod
    def prepare_input_for_database(self, input: List[Any], **kwargs: Any) -> List[Tuple[str, str]]:
        """Turn a request's inputs into (data, data_type) pairs to store."""

    @abstractmethod
    def process_input_from_database(self, input: List[ProcessData], **kwargs: Any) -> List[ProcessData]:
        """Stored input rows as the front end shows them."""

    @abstractmethod
    def process_output(self, output: List[Any], **kwargs: Any) -> List[Tuple[str, str]]:
        """Turn the model's output into (data, data_type) pairs to store."""

    @abstractmethod
    def process_output_from_database(self, output: List[ProcessData], **kwargs: Any) -> List[ProcessData]:
        """Stored output rows as the front end shows them."""


class TextToImageGenerationTask(BaseGenerativeTask):
    """Task for generating images from natural-language text prompts.

    Input: exactly one prompt (a "str" row). Output: any number of images, saved
    as `<uuid4>.png` files in `images_path` and stored by bare file name.
    """

    metadata: ClassVar[dict[str, Any]] = {
        "inputs_types": [str],
        "outputs_types": [Image.Image],
        "inputs_cardinality": 1,
        "outputs_cardinality": "n",
    }

    def __init__(self, max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH) -> None:
        self.max_prompt_length = max_prompt_length

    def validate_prompt(self, prompt: Any) -> str:
        """Return the prompt, or raise ValueError saying what is wrong with it."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("prompt is empty")
        if len(prompt) > self.max_prompt_length:
            raise ValueError(f"prompt is longer than {self.max_prompt_length} characters ({len(prompt)})")
        if "\x00" in prompt:
            # PostgreSQL cannot store NUL in text, and no tokenizer wants it.
            raise ValueError("prompt contains a NUL character")
        return prompt

    def prepare_for_task(self, input: List[ProcessData], **kwargs: Any) -> str:
        """The prompt: the data of the first input row, which must be a "str" row."""
        if not input:
            raise ValueError("no input rows: a text-to-image process needs one prompt")
        first = input[0]
        if first.data_type != TEXT_TYPE:
            raise ValueError(f"input row has data_type {first.data_type!r}, expected {TEXT_TYPE!r}")
        return self.validate_prompt(first.data)

    def prepare_input_for_database(self, input: List[str], **kwargs: Any) -> List[Tuple[str, str]]:
        """`["a cat"]` becomes `[("a cat", "str")]`."""
        if not isinstance(input, (list, tuple)):
            raise ValueError(f"input must be a list with one prompt, got {type(input).__name__}")
        if len(input) != 1:
            raise ValueError(f"input must hold exactly one prompt, got {len(input)}")
        return [(self.validate_prompt(input[0]), TEXT_TYPE)]

    def process_input_from_database(self, input: List[ProcessData], **kwargs: Any) -> List[ProcessData]:
        """Text input is shown as stored."""
        return list(input)

    def process_output(
        self,
        output: List[Image.Image],
        images_path: str | os.PathLike = DEFAULT_IMAGES_PATH,
        parameters: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> List[Tuple[str, str]]:
        """Save each image as `<uuid4>.png` in `images_path`; return `(file name, "Image")` pairs.

        `parameters`, when given, holds one mapping per image (prompt, seed, ...);
        each entry is written into that PNG as a text chunk, so a file alone
        says how it was made. Files appear whole or not at all: each is written
        to a temporary name and renamed, and if any image fails the ones already
        saved are removed.
        """
        if not isinstance(output, (list, tuple)) or not output:
            raise ValueError("output must be a non-empty list of images")
        for position, image in enumerate(output):
            if not isinstance(image, Image.Image):
                raise ValueError(f"output[{position}] is a {type(image).__name__}, not a PIL image")
        if parameters is not None and len(parameters) != len(output):
            raise ValueError(f"got parameters for {len(parameters)} images but {len(output)} images")

        folder = Path(images_path)
        folder.mkdir(parents=True, exist_ok=True)
        saved: list[Path] = []
        try:
            for position, image in enumerate(output):
                target = folder / f"{uuid.uuid4()}.png"
                _write_png_atomically(image, target, parameters[position] if parameters else {})
                saved.append(target)
        except BaseException:
            for path in saved:
                path.unlink(missing_ok=True)
            raise
        return [(path.name, IMAGE_TYPE) for path in saved]

    def process_output_from_database(
        self,
        output: List[ProcessData],
        images_path: str | os.PathLike = DEFAULT_IMAGES_PATH,
        as_base64: bool = False,
        **kwargs: Any,
    ) -> List[ProcessData]:
        """Image rows reduced to the file's base name, or with `as_base64` to the
        base64 of the PNG file's bytes (no `data:` prefix). Other rows, such as
        an error message, are returned as stored.

        The rows returned are new, detached objects: the stored rows are never changed.
        """
        shown = []
        for row in output:
            data = row.data
            if row.data_type == IMAGE_TYPE:
                data = os.path.basename(data)
                if as_base64:
                    data = base64.b64encode((Path(images_path) / data).read_bytes()).decode("ascii")
            shown.append(
                ProcessData(id=row.id, data=data, data_type=row.data_type, process_id=row.process_id, is_input=row.is_input)
            )
        return shown


# The formats an answer may carry images in (OpenAI's `output_format`), as PIL names them.
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(png: bytes, output_format: str = "png", compression: int | None = None) -> str:
    """Base64 of a stored PNG in `output_format` (the PNG itself, with its text chunks, as it is);
    `compression` is the JPEG/WebP quality (100, OpenAI's default, compresses least)."""
    if output_format == "png":
        return base64.b64encode(png).decode("ascii")
    with Image.open(io.BytesIO(png)) as image:
        return encode_picture(image, output_format, compression)


def encode_picture(image: Image.Image, output_format: str, compression: int | None = None) -> str:
    """Base64 of an image in `output_format` (see encode_image)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, IMAGE_FORMATS[output_format], quality=100 if compression is None else compression)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _write_png_atomically(image: Image.Image, target: Path, text: Mapping[str, Any]) -> None:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        if value is not None:
            # iTXt keeps non-Latin-1 prompts intact.
            info.add_itxt(str(key), str(value))
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".png.part")
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
