"""Inference engines other than transformers that score the same token ids (llama.cpp through llama-cpp-python)."""
