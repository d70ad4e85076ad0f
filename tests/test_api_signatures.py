"""The public API takes its options by keyword, as mlx-lm's does: a value given in
the wrong place is refused, never read as another option."""

import inspect

import pytest
from tiny_models import random_weights, tiny_config, write_hf_checkpoint

import mlx_flashinfer
from mlx_flashinfer import convert, load
from mlx_flashinfer.chat import Chat
from mlx_flashinfer.generate import generate_step
from mlx_flashinfer.loader import resolve_model
from mlx_flashinfer.perplexity import perplexity
from mlx_flashinfer.predictors.train import train_predictor

# the arguments every call needs, positional; everything after them keyword-only
ESSENTIAL = {
    mlx_flashinfer.load: ["path"],
    mlx_flashinfer.convert: ["src", "dst"],
    mlx_flashinfer.generate: ["model", "tokenizer", "prompt"],
    mlx_flashinfer.make_prompt_cache: ["model"],
    mlx_flashinfer.save_prompt_cache: ["file", "cache", "model"],
    mlx_flashinfer.load_prompt_cache: ["file", "model"],
    mlx_flashinfer.stream_generate: ["model", "tokenizer", "prompt"],
    # keyword-only: its options' order is not mlx-lm's, so a call by position
    # would pass them wrong
    mlx_flashinfer.make_sampler: [],
    generate_step: ["model", "prompt_ids"],
    resolve_model: ["spec"],
    train_predictor: ["path"],
    perplexity: ["model", "token_ids", "context"],
    Chat.__init__: ["self", "model", "tokenizer"],
}


@pytest.mark.parametrize("function", ESSENTIAL, ids=lambda f: f.__qualname__)
def test_options_after_the_essential_arguments_are_keyword_only(function):
    params = inspect.signature(function).parameters.values()
    positional = [
        p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    assert positional == ESSENTIAL[function]


def test_every_public_function_is_covered():
    public = [getattr(mlx_flashinfer, n) for n in mlx_flashinfer.__all__]
    functions = [f for f in public if inspect.isfunction(f)]
    assert set(functions) <= set(ESSENTIAL)


def test_a_value_in_the_wrong_place_is_refused(tmp_path):
    config = tiny_config("llama", "relu")
    src = write_hf_checkpoint(tmp_path / "src", config, random_weights(config))
    with pytest.raises(TypeError, match="positional argument"):
        convert(src, tmp_path / "out", "float32")
    layout = convert(src, tmp_path / "out", dtype="float32", progress=False)
    # once the third positional was `dense`: a "budget" gave a dense model quietly
    with pytest.raises(TypeError, match="positional argument"):
        load(layout, None, "100%")
    model, _ = load(layout, memory_budget="10MB", predictor="gate")
    assert model.plan is not None
