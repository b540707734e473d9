"""Training: ``stages`` (what differs between the base and the refine stage), ``driver`` (the
DeepSpeed loop both share), ``checkpointing`` (save, resume, rotate, best-model export), ``logs``.

Entry point: ``python -m ctrefine.train`` / ``deepspeed --module ctrefine.train`` (see
:mod:`ctrefine.training.driver`). A new stage is one class in :mod:`ctrefine.training.stages`.
"""
