"""The judge reads back every scene the dataset renderer draws."""

from __future__ import annotations

import random

import pytest
from PIL import ImageFilter

from training.judge import judge, score
from training.shapes import HELD_OUT, Scene, all_scenes, caption, render, vocabulary


@pytest.mark.parametrize("resolution", [32, 64])
def test_the_judge_reads_every_rendered_scene_correctly(resolution):
    rng = random.Random(0)
    wrong = []
    for scene in all_scenes():
        for jitter in (None, rng):
            seen = judge(render(scene, resolution, jitter))
            expected = scene.__class__(scene.colour, scene.shape, scene.background,
                                       scene.position or "center", scene.size)
            if seen != expected:
                wrong.append((scene, seen))
    assert not wrong, f"{len(wrong)} misread, e.g. {wrong[:3]}"


@pytest.mark.parametrize("resolution", [32, 64])
def test_the_judge_reads_softened_pictures_as_a_person_would(resolution):
    """Generated pictures have soft edges: a slight blur must not change what is read."""
    rng = random.Random(1)
    scenes = rng.sample(all_scenes(), 600)
    wrong = [(scene, seen) for scene in scenes
             if (seen := judge(render(scene, resolution, rng).filter(ImageFilter.GaussianBlur(0.6))))
             != Scene(scene.colour, scene.shape, scene.background, scene.position or "center", scene.size)]
    assert not wrong, f"{len(wrong)} misread, e.g. {wrong[:3]}"


def test_captions_use_several_phrasings_and_a_closed_vocabulary():
    scene = all_scenes()[0]
    phrasings = {caption(scene, i) for i in range(4)}
    assert len(phrasings) == 4
    words = set(vocabulary())
    assert {"red", "circle", "blue", "background", "left", "small"} <= words and len(words) < 60
    assert HELD_OUT and all(len(combo) == 3 for combo in HELD_OUT)


def test_scores_count_position_and_size_only_where_asked():
    asked = Scene("red", "circle", "blue", "left", None)
    unasked = Scene("red", "circle", "blue")
    seen = Scene("red", "square", "blue", "right", "small")
    scores = score([(asked, seen), (unasked, seen)])
    assert scores["colour"] == {"accuracy": 100.0, "images": 2} and scores["shape"] == {"accuracy": 0.0, "images": 2}
    assert scores["position"] == {"accuracy": 0.0, "images": 1} and scores["size"] == {"accuracy": None, "images": 0}
