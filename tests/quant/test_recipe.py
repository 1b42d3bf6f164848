"""The quantization pipeline is a recipe object plus run(); the CLI only parses into it."""

from __future__ import annotations

import pytest

from llmopt.quant.recipe import QuantRecipe, run


@pytest.mark.parametrize("kw,msg", [
    ({"method": "bogus"}, "unknown method"),
    ({"fmt": "int5"}, "unknown format"),
    ({"method": "gptq", "fmt": "fp8"}, "supports"),
    ({"group_size": 12}, "multiple of 8"),
    ({"lm_head": "int5"}, "--lm-head"),
    ({"embedding": "sometimes"}, "--embedding"),
    ({"bits": "many"}, "--bits"),
])
def test_a_bad_recipe_fails_before_loading_anything(tmp_path, kw, msg):
    # the model does not exist: a recipe error must be reported first, without touching it
    recipe = QuantRecipe(model=str(tmp_path / "no-such-model"), output=tmp_path / "out", **kw)
    with pytest.raises(ValueError, match=msg):
        run(recipe)
    assert not (tmp_path / "out").exists()


def test_run_quantizes_writes_and_reloads_a_tiny_model(tmp_path, tiny_models):
    src = tiny_models["llama"][1]
    r = run(QuantRecipe(model=str(src), output=tmp_path / "q", fmt="int8", group_size=32, ppl_texts=1,
                        ppl_tokens=32, threads=1))
    assert r["format"] == "int8" and r["method"] == "rtn"
    assert (tmp_path / "q" / "quant_config.json").exists() and r["size_bytes"] > 0
    assert r["ppl_before"] is not None and r["ppl_after"] is not None
