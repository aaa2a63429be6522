"""storyworld: a synthetic world of visual stories with a known human preference.

Scenes of 1-4 rendered frames (`scene`), a story grammar with flaw knobs (`grammar`), a hidden
utility (`utility`), simulated annotators (`annotators`), and the files that tie them together
(`world`). It is the demo content of the labeling app, the fixture data of the tests, and the way
the learning benchmarks prove that the reward model and PPO learn. It imports nothing else of
storypref, and only its tiny models (`storyworld.clip`, `storyworld.vision`) need torch.
"""

from storyworld.annotators import SimAnnotator, default_pool, pairwise_agreement
from storyworld.grammar import STYLES, Knobs, write_story
from storyworld.scene import Scene, make_scene, render_frame
from storyworld.utility import components, utility
from storyworld.world import annotate_world, make_demo, make_world, read_world, score_stories

__all__ = [
    "STYLES",
    "Knobs",
    "Scene",
    "SimAnnotator",
    "annotate_world",
    "components",
    "default_pool",
    "make_demo",
    "make_scene",
    "make_world",
    "pairwise_agreement",
    "read_world",
    "render_frame",
    "score_stories",
    "utility",
    "write_story",
]
