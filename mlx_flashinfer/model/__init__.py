"""The transformer, written once over a small backend API (`transformer.py`), and
the backends it runs on: MLX (`mlx_backend.py`) and NumPy (`fallback_numpy`), chosen
by `backends.py`. The FFN is passed in: dense here, from flash in `flash/`."""
