"""Training presets and the DeepSpeed config, installed as package data (``ctrefine.presets``).

In a source checkout this is the ``configs/`` folder; ``ds_config.json`` here is a link to the
repository's top-level ``ds_config.json`` (one file, two ways to reach it). Load a preset with
``ctrefine.config.load_config("cpu-small")``.
"""
