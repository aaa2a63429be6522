"""Who is described how: a story's named characters and the descriptions given to each, across sentences.

A visual story that calls Remy "the green square" in one sentence and "the red circle" in the next
reads fluently, sentence by sentence, and contradicts itself: the character has two looks. A text
encoder that pools its tokens into one vector, as the reward model's does, does not compare the two
mentions, and on storyworld it learned that binding from none of the data sizes tried. These
features do the comparison explicitly, and the reward model learns from the labels how much each
one matters (`rlhf.train_rm --entity_features`).

The reading is a small English heuristic, not a parser: a name is a capitalized word followed by
an appositive, "Remy the green square" or "Remy, a tall knight"; its description is the first
`DESCRIPTION_WORDS` words of the appositive, which ends at a comma, a sentence's end or a
capitalized word. Two descriptions differ if their words do: "Mo, a knight" and "Mo, a tall knight"
count as two looks. It reads stories written the way storyworld's are; it misses descriptions given
any other way ("the green square called Remy", pronouns), and then its features are zeros, which
cost the reward model nothing (a constant cancels in a comparison). Check on your own data whether it pays:
train with and without `--entity_features` and compare `eval_accuracy` (and the policy's pairs, with
`python -m rlhf.rewards`).
"""

from __future__ import annotations

import re

from annotate.formats import plain_text

DESCRIPTION_WORDS = 2
# Name, optional comma, an article, then the description's lower-case words (letters, hyphens): a comma, a sentence end or a capital ends it.
APPOSITIVE = re.compile(r"\b([A-Z][a-z]+),? (?:the|a|an) ([a-z][a-z-]*(?: [a-z][a-z-]*)*)")
# Capitalized words that open a sentence and are no one's name ("In the eerie hush", "Then the lights ...").
NOT_NAMES = frozenset(
    """a about across after along among an and around as at before behind beside beyond but by down during
finally for from here in inside into it later meanwhile near next now of on once outside over since so soon suddenly
that then there these this those through to under until up upon when while with within without yet""".split()
)
# The features, in order: characters given more than one description; the extra descriptions beyond
# each character's first (two looks count 1, three count 2); characters described at all.
ENTITY_FEATURES = 3
FEATURE_NAMES = ("characters_with_two_looks", "extra_looks", "characters_described")


def descriptions(story: str) -> dict[str, list[tuple[str, ...]]]:
    """Each described name → its descriptions in the order they appear (repeats kept).

    >>> descriptions("Remy the green square waved. Later, Remy the red circle slept.")
    {'Remy': [('green', 'square'), ('red', 'circle')]}
    """
    found: dict[str, list[tuple[str, ...]]] = {}
    for sentence in re.split(r"(?<=[.!?;:])\s+", plain_text(story)):
        for name, rest in APPOSITIVE.findall(sentence):
            if name.lower() in NOT_NAMES:
                continue
            words = tuple(rest.split()[:DESCRIPTION_WORDS])
            found.setdefault(name, []).append(words)
    return found


def entity_features(story: str) -> list[float]:
    """`ENTITY_FEATURES` numbers for one story (see `FEATURE_NAMES`); all 0 for a story with no described name."""
    looks = [set(d) for d in descriptions(story).values()]
    return [float(sum(len(v) > 1 for v in looks)), float(sum(len(v) - 1 for v in looks)), float(len(looks))]
