"""kvserve models: one file per family, HF attribute names, weight loading."""
