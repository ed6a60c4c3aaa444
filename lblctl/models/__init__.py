"""Backbones (registry), losses and margin heads, checkpoints, ONNX in and out, embedding."""
