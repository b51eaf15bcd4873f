"""Inference: the model on its device, batch pre- and post-processing, and the worker threads."""
