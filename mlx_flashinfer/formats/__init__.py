"""What is on disk and how it is read and written: the layout (one format, bundles
per neuron), the converters from Hugging Face, GGUF and MLX checkpoints, the
quantized format, safetensors streaming, tokenizers, atomic writes and the model
cache. Imports nothing of the runtime: the model, the flash path and the
predictors build on it."""
