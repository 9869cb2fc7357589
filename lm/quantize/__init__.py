"""Quantization: weight-only int8/int4 checkpoints for inference (`lm quantize`, weights.py; the
math in numerics.py) and quantized training through qwix rules on module paths (training.py).

This package's `__init__` imports nothing, so the model layers can use `lm.quantize.numerics`
without pulling in the trainer.
"""
