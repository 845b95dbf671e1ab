"""The pure-PyTorch core: teacher summaries, distillation losses and evaluation metrics (no Ray import)."""
