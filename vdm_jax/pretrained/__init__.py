"""Pretrained models from local diffusers / transformers folders.

formats.py reads folders and safetensors; convert.py maps torch state dicts
onto Flax trees by one rule table per family; one file per family (its
class names, config.json -> module fields, rule table, loader).
"""
