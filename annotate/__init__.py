"""The labeling side of storypref: the Gradio app, scheduling, accounts, ingest, export, statistics.

`ui` builds the app (`build_app`), `scheduler` picks the next comparison, `auth` and `users` own the
accounts, `throttle` pauses a name or an address after failed logins, `ingest` and `export` move
data in and out all-or-nothing, `stats` computes agreement and the Bradley–Terry leaderboard,
`render` draws a comparison as escaped HTML, `formats` holds the text conventions `rlhf` shares
(the prompt, plain text, frame alignment), and `demo` seeds a new database.

Nothing here imports torch: `annotate` must run on a labeling server without the training stack
(tests/test_structure.py checks it). Submodules are imported on use (`python -m annotate.ingest`,
`from annotate.export import export`). docs/app.md and docs/data.md are the user's guides.
"""
