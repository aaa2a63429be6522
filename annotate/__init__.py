"""The labeling side of storypref: ingest, export, accounts (and, later, the Gradio app).

Nothing here imports torch: `annotate` must run on a labeling server without the training stack.
Submodules are imported on use (`python -m annotate.ingest`, `from annotate.export import export`).
"""
