"""A random-weight Llama 3 model in each checkpoint format, loaded through the public API."""

import pytest
import torch

import corral
from corral.checkpoint.export import export_checkpoint
from corral.model.config import ModelConfig
from corral.model.llama import Transformer, init_weights_
from corral.tokenizer import load_llama3_tokenizer


def llama3_dir(tmp_path, scaled: bool):
    from corral.checkpoint.meta import export_meta
    from corral.tokenizer.llama3 import default_tokenizer_model_path

    extra = dict(use_scaled_rope=True, max_seq_len=131072) if scaled else {}
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, **extra)
    torch.manual_seed(0)
    model = init_weights_(Transformer(config))
    export_meta(config, model.state_dict(), tmp_path / "meta", tokenizer_model=default_tokenizer_model_path())
    return config, model


@pytest.mark.parametrize("scaled,stops", [(False, {128001, 128009}), (True, {128001, 128008, 128009})])
def test_meta_directory_loads_with_llama3_tokenizer_and_stop_set(tmp_path, scaled, stops):
    llama3_dir(tmp_path, scaled)
    llm = corral.load(tmp_path / "meta")
    assert llm.tokenizer.vocab_size == 128256
    assert set(llm.stop_ids) == stops
    ids = llm.chat_format.encode_dialog([{"role": "user", "content": "hi"}])
    tail = [128006, *llm.tokenizer.encode("assistant"), 128007, *llm.tokenizer.encode("\n\n")]
    assert ids[0] == 128000 and ids[-len(tail):] == tail
    out = llm.chat([{"role": "user", "content": "hi"}], temperature=0, max_new_tokens=5)
    assert len(out.token_ids) <= 5 and out.finish_reason in ("stop", "length")


def test_generate_accepts_token_ids_and_respects_max_new_tokens(tmp_path):
    llama3_dir(tmp_path, scaled=True)
    llm = corral.load(tmp_path / "meta")
    prompt = load_llama3_tokenizer().encode("Hello", bos=True)
    a = llm.generate(prompt, temperature=0, max_new_tokens=7)
    b = llm.generate("Hello", temperature=0, max_new_tokens=7)
    assert a.token_ids == b.token_ids and a.prompt_tokens == len(prompt) == 2
    assert len(a.token_ids) == 7 and a.finish_reason == "length"


def test_prompt_over_context_is_a_clean_error(tmp_path):
    config, model = llama3_dir(tmp_path, scaled=False)
    llm = corral.load(tmp_path / "meta")
    with pytest.raises(corral.CorralError, match="context"):
        llm.generate([1] * config.max_seq_len, max_new_tokens=1)


def test_bad_sampling_parameters_are_named(tmp_path):
    llama3_dir(tmp_path, scaled=False)
    llm = corral.load(tmp_path / "meta")
    for kwargs, name in [({"temperature": float("nan")}, "temperature"), ({"top_p": 2.0}, "top_p"),
                         ({"max_new_tokens": 0}, "max_new_tokens")]:
        with pytest.raises(corral.CorralError, match=name):
            llm.generate("hi", **kwargs)


def test_hf_and_gguf_exports_of_one_model_generate_the_same_tokens(tmp_path):
    config, model = llama3_dir(tmp_path, scaled=True)
    export_checkpoint(config, model.state_dict(), tmp_path / "m.gguf", "gguf")
    meta = corral.load(tmp_path / "meta")
    gguf_ckpt = corral.llm.load_checkpoint(tmp_path / "m.gguf")
    from_gguf = corral.llm.build_model(gguf_ckpt.config, gguf_ckpt.state_dict)
    ids = meta.tokenizer.encode("The quick brown fox", bos=True)
    with torch.no_grad():
        assert torch.equal(meta.model(torch.tensor([ids])), from_gguf(torch.tensor([ids])))


def test_bad_prompt_token_ids_are_refused(tmp_path):
    llama3_dir(tmp_path, scaled=False)
    llm = corral.load(tmp_path / "meta")
    for ids in ([128256], [-1], [1.5], [True]):
        with pytest.raises(corral.CorralError, match="token ids"):
            llm.generate(ids, max_new_tokens=1)
