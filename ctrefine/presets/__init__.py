"""Training presets and the DeepSpeed config, installed as package data (``ctrefine.presets``).

Load a preset by name with ``ctrefine.config.load_config("cpu-small")``; the DeepSpeed config every
launch defaults to is :func:`ctrefine.config.ds_config_path`.
"""
