"""Training configs: `default.py` and one small delta per paper variant (design.md section 4)."""
