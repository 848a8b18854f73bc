"""Pretrained encoder weights on the runtime side: `store` (where they live, sidecars,
verification) and `checkpoints` (the loaders the encoders call). Fetching and importing are
training-side tools (`train/weights.py`)."""
