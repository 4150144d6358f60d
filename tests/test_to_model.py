"""`fxzip.to_model`: a merge that kept the architecture (one shared output, width 1) given back as
the input's own class — a timm ResNet that `load_state_dict` takes, a transformers decoder that
`save_pretrained` writes and `from_pretrained` reloads and that generates — and `fxzip merge`
recipes of transformers folders, which write that folder."""
import json
import warnings

import pytest
import timm
import torch

import fxzip
from fxzip.cli import main
from fxzip.testing import permuted_copy
from merge_files import write_recipe

transformers = pytest.importorskip("transformers")


def quiet_merge(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxzip.CalibrationWarning)
        return fxzip.merge(*args, progress=False, **kwargs)


def tiny_llama(seed: int, tied: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


def token_batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (4, 16), generator=generator)}
            for _ in range(count)]


def test_timm_resnet_round_trips_into_its_own_class():
    """A permuted copy (every hidden space permuted) merged with shared_output: the timm model
    given back computes the merged model's outputs, and those are the model's own."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=5).eval()
    x = torch.randn(8, 3, 32, 32)
    copy, permuted = permuted_copy(model, x, seed=1)
    assert permuted > 0
    merged = quiet_merge(model, copy, [x], shared_output=True, reset_bn=False)
    back = fxzip.to_model(merged, like=model, example=x)
    assert type(back) is type(model) and back is not model
    fresh = timm.create_model("resnet18", num_classes=5).eval()
    fresh.load_state_dict(back.state_dict())
    with torch.no_grad():
        want, got, own = merged(x), fresh(x), model(x)
    assert (got - want).abs().max() < 1e-5
    assert (got - own).abs().max() / own.abs().max() < 1e-5


def test_different_resnets_round_trip_and_the_input_is_untouched():
    torch.manual_seed(0)
    a = timm.create_model("resnet18", num_classes=5).eval()
    b = timm.create_model("resnet18", num_classes=5).eval()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    x = torch.randn(16, 3, 32, 32)
    merged = quiet_merge(a, b, [x[:8], x[8:]], shared_output=True)
    back = fxzip.to_model(merged, like=a, example=x)
    with torch.no_grad():
        assert (back(x) - merged(x)).abs().max() < 1e-5
        assert (back(x) - a(x)).abs().max() > 1e-2  # really the merged weights
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())


def test_a_merged_language_model_is_written_reloaded_and_generates(tmp_path):
    """Two decoders of different inits with a tied output embedding: the merge unties it (the
    embedding and the output layer get different merged values); the written model reloads with
    the merged model's logits and generates the same tokens."""
    a, b = tiny_llama(0), tiny_llama(1)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    batches = token_batches(4)
    merged = quiet_merge(a, b, batches, shared_output=True)
    back = fxzip.to_model(merged, like=a, example=batches[0])
    assert type(back) is transformers.LlamaForCausalLM
    assert back.config.tie_word_embeddings is False and a.config.tie_word_embeddings is True
    assert not torch.equal(back.lm_head.weight, back.model.embed_tokens.weight)
    back.save_pretrained(tmp_path / "lm")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    test = token_batches(1, seed=5)[0]
    with torch.no_grad():
        want = merged(**test).logits
        assert (loaded(**test).logits - want).abs().max() < 1e-5
        assert (back(**test).logits - want).abs().max() < 1e-5
        prompt = test["input_ids"][:1, :6]
        tokens = loaded.generate(prompt, max_new_tokens=8, do_sample=False)
        assert torch.equal(tokens, back.generate(prompt, max_new_tokens=8, do_sample=False))
        # greedy generation is the merged model's own argmax, step by step (the merged graph
        # takes sequences of any length)
        seq = prompt
        for _ in range(8):
            seq = torch.cat([seq, merged(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    assert tokens.shape == (1, 14) and torch.equal(tokens, seq)


def test_merges_that_changed_the_architecture_are_refused():
    a, b = tiny_llama(0, tied=False), tiny_llama(1, tied=False)
    batches = token_batches(4)
    heads = quiet_merge(a, b, batches)
    with pytest.raises(fxzip.InputError, match="shared_output=True"):
        fxzip.to_model(heads, like=a)
    wide = quiet_merge(a, b, batches, shared_output=True, width=1.5)
    with pytest.raises(fxzip.InputError, match="width=1"):
        fxzip.to_model(wide, like=a)
    with pytest.raises(fxzip.InputError, match="fxzip.merge"):
        fxzip.to_model(a, like=a)
    with pytest.raises(fxzip.InputError, match="like="):
        fxzip.to_model(heads, like="a")


def test_recipes_of_transformers_folders_write_a_transformers_model(tmp_path):
    """`transformers:AutoModelForCausalLM:DIR` models, token ids as calibration data: with a
    shared output the command writes `model/` (save_pretrained), the merged model's own logits;
    without, the .pt2 with one head per model."""
    for name, seed in (("lm_a", 0), ("lm_b", 1)):
        tiny_llama(seed).save_pretrained(tmp_path / name)
    (tmp_path / "lm_a" / "tokenizer_config.json").write_text("{}")  # copied next to the model
    ids = torch.cat([b["input_ids"] for b in token_batches(4)])
    torch.save({"input_ids": ids}, tmp_path / "tokens.pt")
    models = [{"model": f"transformers:AutoModelForCausalLM:{n}"} for n in ("lm_a", "lm_b")]
    write_recipe(tmp_path / "shared.yaml", {"models": models, "calibration": {
        "data": "tokens.pt", "batch_size": 4}, "merge": {"shared_output": True}})
    write_recipe(tmp_path / "heads.yaml", {"models": models, "calibration": {
        "data": "tokens.pt", "batch_size": 4}})
    assert main(["merge", str(tmp_path / "shared.yaml"), "-o", str(tmp_path / "out"),
                 "--quiet"]) == 0
    out = tmp_path / "out"
    assert not (out / "merged.pt2").exists() and (out / "model" / "config.json").is_file()
    assert (out / "model" / "tokenizer_config.json").is_file()
    assert json.loads((out / "report.json").read_text())["transformers"]["folder"] == "model"
    assert "from_pretrained('model')" in (out / "README.md").read_text()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lm_a").eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lm_b").eval()
    merged = quiet_merge(a, b, [{"input_ids": t} for t in ids.split(4)], shared_output=True)
    test = token_batches(1, seed=5)[0]
    with torch.no_grad():
        assert (loaded(**test).logits - merged(**test).logits).abs().max() < 1e-5
    with pytest.raises(fxzip.ExportError, match="from_pretrained"):
        fxzip.load(out)
    assert main(["merge", str(tmp_path / "heads.yaml"), "-o", str(tmp_path / "out2"),
                 "--quiet"]) == 0
    program = fxzip.load(tmp_path / "out2")
    with torch.no_grad():
        outputs = program(**test)
    assert len(outputs) == 2 and outputs[0].logits.shape == (4, 16, 64)


def test_bad_transformers_model_names_say_what_to_write(tmp_path, capsys):
    tiny_llama(0).save_pretrained(tmp_path / "lm_a")
    torch.save(torch.randint(0, 64, (8, 16)), tmp_path / "tokens.pt")
    cases = {"transformers:AutoModelForCausalLM": "transformers:AUTO_CLASS:DIR",
             "transformers:AutoModelForCasualLM:lm_a": "did you mean AutoModelForCausalLM",
             "transformers:AutoModelForCausalLM:nowhere": "no config.json"}
    for k, (name, needle) in enumerate(cases.items()):
        write_recipe(tmp_path / f"r{k}.yaml", {"models": [{"model": name}, {"model": name}],
                                               "calibration": {"data": "tokens.pt"}})
        assert main(["merge", str(tmp_path / f"r{k}.yaml"), "-o", str(tmp_path / f"o{k}"),
                     "--quiet"]) != 0
        assert needle in capsys.readouterr().err
        assert not (tmp_path / f"o{k}").exists()


def test_token_id_files_stay_integer():
    from fxzip.io.calibration_data import load_calibration
    import tempfile, pathlib

    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "ids.pt"
        torch.save(torch.arange(20).view(5, 4), path)
        batches = load_calibration(path, batch_size=2)
        assert [b.dtype for b in batches] == [torch.int64] * 3
        torch.save({"input_ids": torch.zeros(5, 4, dtype=torch.long),
                    "attention_mask": torch.ones(4, 4)}, path)
        with pytest.raises(fxzip.InputError, match="same number"):
            load_calibration(path)


def test_constants_the_capture_lifted_are_left_to_the_class():
    """DeBERTa-v2 (relative positions: torch.export lifts constants of its code into the graph)
    merged from two inits with a shared output: the class makes those constants itself, and the
    model given back computes the merged model's logits."""
    from benchmarks.common import hf_families

    a, b = hf_families.build("deberta_v2"), hf_families.build("deberta_v2", seed=1)
    batches = [hf_families.batch("deberta_v2", seed=s) for s in range(2)]
    merged = quiet_merge(a, b, batches, shared_output=True)
    assert any("lifted_tensor" in name for name, _ in merged.named_buffers())
    back = fxzip.to_model(merged, like=a, example=batches[0])
    with torch.no_grad():
        assert (back(**batches[1]).logits - merged(**batches[1]).logits).abs().max() < 1e-5
