"""Everything of storypref that needs torch: reward model, policies, SFT, PPO, rewards, generation.

Submodules are imported on use; importing `rlhf` itself loads nothing heavy.
"""
