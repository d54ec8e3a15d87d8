"""Names, digests, manifests and the Modelfile parser: strict, with errors that say what is wrong."""

import json

import pytest

from corral.errors import FormatError
from corral.store import InvalidNameError, check_digest, parse_manifest, parse_modelfile, parse_name, render_modelfile
from corral.store.names import blob_file_name

HEX = "ab" * 32


@pytest.mark.parametrize("text,parts", [
    ("llama3", ("corral.local", "library", "llama3", "latest")),
    ("llama3:8b", ("corral.local", "library", "llama3", "8b")),
    ("me/llama3:8b-q4_0", ("corral.local", "me", "llama3", "8b-q4_0")),
    ("example.com:5000/me/llama3:v1.2", ("example.com:5000", "me", "llama3", "v1.2")),
    ("SmolLM2:135M", ("corral.local", "library", "smollm2", "135m")),
])
def test_parse_name_fills_defaults_and_lowercases(text, parts):
    assert parse_name(text).parts == parts


def test_short_form_round_trips():
    for text in ("llama3:latest", "me/x:1", "h.io/me/x:1"):
        assert str(parse_name(text)) == text


@pytest.mark.parametrize("bad", ["", "..", "../x", "/x", "x/../y", "a/b/c/d", "x:", ":tag", "x:..", ".hidden",
                                 "x\x00y", "x y", "x" * 10_000, "-x", "x:/y", "a//b", "x:a:b:c/", "ns/.."])
def test_bad_names_are_refused(bad):
    with pytest.raises(InvalidNameError):
        parse_name(bad)


@pytest.mark.parametrize("bad", ["sha256:../../x", "sha256:" + "a" * 63, "sha256:" + "a" * 65, "sha256:" + "A" * 64,
                                 "sha512:" + "a" * 64, "md5:" + HEX, HEX, "sha256-" + HEX, None, 7,
                                 "sha256:" + "a" * 63 + "/", "sha256:" + "g" * 64])
def test_bad_digests_are_refused(bad):
    with pytest.raises(InvalidNameError):
        check_digest(bad)


def test_good_digest_maps_to_ollama_blob_name():
    assert blob_file_name("sha256:" + HEX) == "sha256-" + HEX


def _manifest(layers, **over):
    body = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + HEX,
                       "size": 10},
            "layers": layers, **over}
    return json.dumps(body).encode()


MODEL_LAYER = {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + "cd" * 32, "size": 5}


def test_valid_manifest_parses():
    m = parse_manifest(_manifest([MODEL_LAYER]))
    assert m.layers[0].size == 5 and m.config.digest == "sha256:" + HEX


@pytest.mark.parametrize("layers,over,field", [
    ([], {}, "layers"),
    ([{**MODEL_LAYER, "digest": "sha256:../../etc/passwd"}], {}, "layers[0].digest"),
    ([{**MODEL_LAYER, "size": -1}], {}, "layers[0].size"),
    ([{**MODEL_LAYER, "size": "5"}], {}, "layers[0].size"),
    ([MODEL_LAYER, MODEL_LAYER], {}, "layers"),
    ([{**MODEL_LAYER, "mediaType": "application/x-evil"}], {}, "layers"),
    ([MODEL_LAYER], {"schemaVersion": 1}, "schemaVersion"),
    ([{"mediaType": "application/vnd.corral.model.file", "digest": "sha256:" + HEX, "size": 1,
       "annotations": {"org.opencontainers.image.title": "../config.json"}}], {}, "layers[0]"),
])
def test_bad_manifests_are_refused_naming_the_field(layers, over, field):
    with pytest.raises(FormatError) as info:
        parse_manifest(_manifest(layers, **over))
    assert info.value.field == field


def test_manifest_with_a_million_layers_is_refused_by_count():
    with pytest.raises(FormatError, match="layers"):
        parse_manifest(_manifest([MODEL_LAYER] * 5000))
    with pytest.raises(FormatError, match="limit"):
        parse_manifest(b" " * (2 << 20))


MODELFILE = '''# a comment
FROM ./model.gguf
PARAMETER temperature 0.2
parameter stop "<|eot_id|>"
PARAMETER stop """a
b"""
PARAMETER num_predict 64
TEMPLATE """{% for m in messages %}{{ m.content }}{% endfor %}"""
SYSTEM """You are
terse."""
ADAPTER ./lora.safetensors
LICENSE MIT
MESSAGE user Hello there
MESSAGE assistant """Hi."""
'''


def test_modelfile_parses_every_instruction():
    mf = parse_modelfile(MODELFILE)
    assert mf.from_ == "./model.gguf"
    assert mf.parameters == {"temperature": 0.2, "stop": ["<|eot_id|>", "a\nb"], "num_predict": 64}
    assert mf.system == "You are\nterse." and mf.template.startswith("{% for")
    assert mf.adapters == ["./lora.safetensors"] and mf.licenses == ["MIT"]
    assert mf.messages == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi."}]


def test_rendered_modelfile_parses_back_to_the_same():
    mf = parse_modelfile(MODELFILE)
    assert parse_modelfile(render_modelfile(mf)) == mf


@pytest.mark.parametrize("text,match", [
    ("PARAMETER temperature 1", "no FROM"),
    ("FROM x\nFROM y", "more than one FROM"),
    ("FROM x\nPARAMETER tempurature 1", "unknown parameter"),
    ("FROM x\nPARAMETER temperature hot", "number"),
    ("FROM x\nPARAMETER num_predict 1.5", "integer"),
    ("FROM x\nMESSAGE robot hi", "role"),
    ("FROM x\nSYSTEM \"\"\"never closed", "unterminated"),
    ("FROM x\nRUN rm -rf /", "unknown instruction"),
    ("FROM x\nPARAMETER seed", "needs a value"),
])
def test_bad_modelfiles_name_the_problem(text, match):
    with pytest.raises(FormatError, match=match):
        parse_modelfile(text)


def test_modelfile_error_names_the_line():
    with pytest.raises(FormatError) as info:
        parse_modelfile("FROM x\n\nPARAMETER top_k many")
    assert info.value.field == "line 3"
