"""Model zoo for onexone: reference PyTorch CNNs, their ONNX exports and a trained digits CNN.

The zoo gives the rewriter realistic, reproducible graphs to transform; ``models.digits`` adds
a small trained model so accuracy-affecting passes can be measured, not just shape-checked.
"""
