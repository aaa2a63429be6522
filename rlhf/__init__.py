"""Everything of storypref that needs torch: the reward model, policies, SFT, PPO, rewards, generation.

One module per concept: `losses` (the pure math), `loading` (models by id or path), `clip` (frozen
CLIP features and CLIPScore), `data` (preference pairs from any export), `stories` (story examples),
`runlog` (checkpoints and metrics), `reward_model` and `train_rm`, `policy` and `sft`, `generate`,
`evaluate`, `rewards` (the reward signals), `ppo`, and `verdicts` (the signals' picks beside the
annotators', for the Admin tab). docs/DESIGN.md draws how they depend on each
other; tests/test_structure.py keeps the graph free of circles.

Submodules are imported on use; importing `rlhf` itself loads nothing heavy.
"""
