"""The flash path of the FFN: the reader (O_DIRECT / F_NOCACHE, coalesced parallel
reads), the window manager (which neurons stay cached), the neuron cache and the FFN
over it (`ffn.py`), and the memory plan that sizes it all from a budget. Which
neurons a token needs comes from `predictors/`; the transformer that calls this FFN
lives in `model/`."""
