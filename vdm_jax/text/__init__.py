"""Frozen text encoders behind one interface (encoders.py).

texts -> `TextEmbeddings` (token embeddings [B, L, D] + mask, and a pooled
vector), computed on the host, outside the jitted step: the offline
default (`wordllama`'s pretrained static token embeddings), Hugging Face
encoders run once by `prepare` (hf.py), and precomputed embeddings read
from a file, whatever made them.
"""
