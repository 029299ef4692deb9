"""Post-training recipes over the public tinker client, like a cookbook.

A recipe is one module here (`s1.py`, `rl.py`) whose settings model declares every setting once; `cli.py`
turns each model into the `nightlab recipe NAME` command. What the recipes share lives in `common/`.
"""
