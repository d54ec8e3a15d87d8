"""`corral.store.load`: the one way `corral run`, `corral chat` and the server open a stored model."""


from corral.model.quant import Int8Linear
from corral.store import Modelfile, create_model
from corral.store.load import DEFAULT_NAME, ensure_default, is_default, load_stored
from corral.tokenizer.template import JinjaChatFormat

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"


def test_load_stored_applies_the_stored_template_name_and_returns_the_info(store, models):
    mf = Modelfile(from_=str(models["meta"]), parameters={"num_predict": 8}, template=TEMPLATE, system="Be brief.")
    create_model(store, "tiny", mf)
    llm, info = load_stored(store, "tiny")
    assert llm.name == str(info.name) == "tiny:latest"
    assert isinstance(llm.chat_format, JinjaChatFormat) and llm.chat_format.stop_ids == llm.stop_ids
    assert llm.chat_format.render([{"role": "user", "content": "hi"}], add_generation_prompt=False) == "<user>hi"
    assert (info.parameters, info.system) == ({"num_predict": 8}, "Be brief.")


def test_a_stored_quant_wins_over_the_callers_and_the_callers_applies_otherwise(store, models):
    create_model(store, "plain", Modelfile(from_=str(models["meta"])))
    create_model(store, "q8", Modelfile(from_=str(models["meta"])), quant="int8")
    plain, _ = load_stored(store, "plain")
    asked, _ = load_stored(store, "plain", quant="int8")
    stored, _ = load_stored(store, "q8", quant="int4")
    assert not isinstance(plain.model.layers[0].attention.wq, Int8Linear)
    assert isinstance(asked.model.layers[0].attention.wq, Int8Linear)
    assert isinstance(stored.model.layers[0].attention.wq, Int8Linear)


def test_ensure_default_registers_the_embedded_model_once(store, capsys):
    assert is_default("smollm2:135m") and is_default("library/smollm2:135m") and not is_default("smollm2")
    ensure_default(store)
    ensure_default(store)
    assert capsys.readouterr().err.count("registering the embedded model") == 1
    assert store.info(DEFAULT_NAME).config["model_format"] == "gguf"
