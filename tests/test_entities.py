"""rlhf.entities: who is described how, by hand; and the reward model's learned term on it."""

from __future__ import annotations

import pytest

from rlhf.entities import ENTITY_FEATURES, FEATURE_NAMES, descriptions, entity_features

TWO_LOOKS = ("In the eerie hush, at dusk in the forest, Remy the green square crept forward slowly. "
             "Remy met Ava the red circle and they whispered. Then Remy the red circle slunk home.")  # fmt: skip


def test_descriptions_bind_names_across_sentences():
    assert descriptions(TWO_LOOKS) == {"Remy": [("green", "square"), ("red", "circle")], "Ava": [("red", "circle")]}
    # "In the eerie hush" and "Then the ..." open sentences: no one is called In or Then
    assert descriptions("In the dark forest it rained. Then the lights went out.") == {}
    # a comma before the appositive, "a"/"an", and grounding tags are read as the story's plain text
    assert descriptions("<gdi image1>Suddenly <gdo char1>Mo</gdo>, a tall knight, waved.</gdi>") == {"Mo": [("tall", "knight")]}
    assert descriptions("Nobody is named here.") == {}


@pytest.mark.parametrize(("story", "expected"), [
    (TWO_LOOKS, [1.0, 1.0, 2.0]),  # Remy has two looks (one extra), two characters are described
    ("Remy the green square waved. Remy the green square slept.", [0.0, 0.0, 1.0]),  # the same look twice is consistent
    ("Remy the green square waved. Remy the red circle sat. Remy the blue star slept. Ava the red circle ran. Ava the blue star hid.",
     [2.0, 3.0, 2.0]),  # Remy: three looks (two extra); Ava: two (one extra)
    ("It rained all day.", [0.0, 0.0, 0.0]),
])  # fmt: skip
def test_entity_features_by_hand(story, expected):
    assert entity_features(story) == expected and len(expected) == ENTITY_FEATURES == len(FEATURE_NAMES)
