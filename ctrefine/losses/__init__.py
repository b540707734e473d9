"""Losses: ``reference`` (pure torch, the truth), ``functional`` (kernel dispatch), ``registry`` (the
refiner's loss terms and their default weights), ``loss`` (the loss modules the training stages use)."""
