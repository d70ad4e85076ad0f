"""The NumPy backend of mlx-flashinfer: the reference implementation, on any
platform."""
