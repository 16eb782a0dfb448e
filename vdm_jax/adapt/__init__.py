"""Partial fine-tuning of trained models: Tune-A-Video's inflation and
one-shot tuning (inflate.py, tuned.py: libraries; tune.py: the program)."""
