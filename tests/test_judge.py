"""The judge reads back every scene the dataset renderer draws."""

from __future__ import annotations

import random

from tests.judge import judge
from training.shapes import HELD_OUT, all_scenes, caption, render, vocabulary


def test_the_judge_reads_every_rendered_scene_correctly():
    rng = random.Random(0)
    wrong = []
    for scene in all_scenes():
        for jitter in (None, rng):
            seen = judge(render(scene, 64, jitter))
            expected = scene.__class__(scene.colour, scene.shape, scene.background,
                                       scene.position or "center", scene.size)
            if seen != expected:
                wrong.append((scene, seen))
    assert not wrong, f"{len(wrong)} misread, e.g. {wrong[:3]}"


def test_captions_use_several_phrasings_and_a_closed_vocabulary():
    scene = all_scenes()[0]
    phrasings = {caption(scene, i) for i in range(4)}
    assert len(phrasings) == 4
    words = set(vocabulary())
    assert {"red", "circle", "blue", "background", "left", "small"} <= words and len(words) < 60
    assert HELD_OUT and all(len(combo) == 3 for combo in HELD_OUT)
