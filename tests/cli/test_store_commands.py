"""The store commands end to end through `corral.cli.main`: round trips, --json, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from corral.cli import main
from corral.llm import default_model_path
from corral.store import Store

ROOT = Path(__file__).parents[2]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def names(capsys):
    code, out, _ = run(capsys, "list", "--json")
    assert code == 0
    return sorted(m["name"] for m in json.loads(out))


@pytest.mark.parametrize("fmt", ["gguf", "hf", "meta", "smollm2"])
def test_create_list_show_cp_rm_round_trip(tmp_path, home, models, capsys, fmt):
    source = default_model_path() if fmt == "smollm2" else models[fmt]
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f'FROM {source}\nPARAMETER temperature 0.1\nPARAMETER stop "END"\nSYSTEM """Be brief."""\n'
                         "LICENSE Apache-2.0\nMESSAGE user hi\n")
    assert run(capsys, "create", "mine:v1", "-f", str(modelfile))[0] == 0
    code, out, _ = run(capsys, "list")
    assert code == 0 and out.splitlines()[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert out.splitlines()[1].startswith("mine:v1 ")
    code, out, _ = run(capsys, "show", "mine:v1", "--json")
    shown = json.loads(out)
    assert shown["details"]["model_format"] == ("gguf" if fmt == "smollm2" else fmt)
    assert shown["parameters"] == {"temperature": 0.1, "stop": ["END"]} and shown["system"] == "Be brief."
    assert shown["license"] == ["Apache-2.0"] and shown["messages"] == [{"role": "user", "content": "hi"}]
    assert run(capsys, "show", "mine:v1", "--parameters")[1].split() == ["stop", '"END"', "temperature", "0.1"]
    assert run(capsys, "show", "mine:v1", "--license")[1].strip() == "Apache-2.0"
    assert "PARAMETER temperature 0.1" in run(capsys, "show", "mine:v1", "--modelfile")[1]
    assert run(capsys, "cp", "mine:v1", "team/yours")[0] == 0
    assert names(capsys) == ["mine:v1", "team/yours:latest"]
    assert run(capsys, "rm", "mine:v1")[0] == 0
    assert names(capsys) == ["team/yours:latest"]
    assert run(capsys, "verify")[0] == 0
    assert run(capsys, "rm", "team/yours")[0] == 0
    assert names(capsys) == [] and Store(home).blobs.digests() == []


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_stored_directory_model_loads_the_same_weights(home, models, capsys, fmt):
    import torch

    from corral.checkpoint.load import load_checkpoint

    assert run(capsys, "import", str(models[fmt]), "dir-model")[0] == 0
    stored = load_checkpoint(Store(home).model_path("dir-model"))
    original = load_checkpoint(models[fmt])
    assert stored.format == fmt and stored.state_dict.keys() == original.state_dict.keys()
    assert all(torch.equal(stored.state_dict[k], original.state_dict[k]) for k in original.state_dict)


def test_push_and_pull_through_a_directory_and_a_tar(tmp_path, home, models, capsys):
    assert run(capsys, "import", str(models["gguf"]), "m")[0] == 0
    assert run(capsys, "push", "m", "--to", str(tmp_path / "remote"))[0] == 0
    assert run(capsys, "push", "m", "--to", str(tmp_path / "m.tar"))[0] == 0
    assert run(capsys, "rm", "m")[0] == 0
    assert run(capsys, "pull", "m", "--from", str(tmp_path / "remote"), "--as", "back")[0] == 0
    assert run(capsys, "pull", "ignored", "--from", str(tmp_path / "m.tar"))[0] == 0
    assert run(capsys, "import", str(tmp_path / "m.tar"), "again")[0] == 0
    assert names(capsys) == ["again:latest", "back:latest", "m:latest"]
    assert Store(home).verify() == []


def test_quantize_writes_q8_0_and_q4_0_and_records_runtime_int8(tmp_path, home, models, capsys):
    from corral.checkpoint.gguf_reader import read_gguf

    assert run(capsys, "import", str(models["gguf"]), "tiny")[0] == 0
    for qtype in ("Q8_0", "Q4_0"):
        assert run(capsys, "quantize", "tiny", "--type", qtype)[0] == 0
        with read_gguf(Store(home).model_path(f"tiny:{qtype.lower()}")) as g:
            assert g.tensors["blk.0.attn_q.weight"].type_name == qtype
            assert g.tensors["blk.0.attn_norm.weight"].type_name == "F32"
    assert run(capsys, "quantize", "tiny", "--type", "int8")[0] == 0
    store = Store(home)
    assert store.info("tiny:int8").config["quant"] == "int8"
    assert store.model_path("tiny:int8") == store.model_path("tiny")  # no new weights, only a load-time flag


def test_convert_meta_to_hf_and_gguf(tmp_path, home, models, capsys):
    from corral.checkpoint.load import detect_format

    code, _, err = run(capsys, "convert", str(models["meta"]), str(tmp_path / "out-hf"), "--format", "hf")
    assert code == 0 and "tokenizer is not carried" in err
    assert detect_format(tmp_path / "out-hf") == "hf"
    assert run(capsys, "convert", str(models["meta"]), str(tmp_path / "out-meta"), "--format", "meta")[0] == 0
    assert (tmp_path / "out-meta" / "tokenizer.model").is_file()


@pytest.mark.parametrize("argv,match", [
    (["show", "nope"], "not found"),
    (["show", "../../etc"], "invalid model name"),
    (["rm", "nope"], "not found"),
    (["create", "x", "-f", "/nonexistent/Modelfile"], "no Modelfile"),
    (["pull", "x", "--from", "http://127.0.0.1:9/"], "no Corral server answers"),
    (["pull", "x", "--from", "ftp://127.0.0.1:9/"], "only http:// and https://"),
    (["ps"], "no Corral server answers"),
])
def test_errors_are_one_line_with_exit_code_1(home, capsys, monkeypatch, argv, match):
    monkeypatch.setenv("CORRAL_HOST", "127.0.0.1:9")  # discard port: nothing listens
    code, out, err = run(capsys, *argv)
    assert code == 1 and err.startswith("corral: error:") and match in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_debug_flag_shows_the_traceback(home):
    env = {"CORRAL_HOME": str(home), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "corral.cli", "show", "nope", "--debug"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ModelNotFoundError" in proc.stderr


def test_bad_modelfile_is_refused_before_anything_is_stored(tmp_path, home, capsys):
    (tmp_path / "Modelfile").write_text("FROM ./missing.gguf\n")
    code, _, err = run(capsys, "create", "x", "-f", str(tmp_path / "Modelfile"))
    assert code == 1 and "no such file" in err
    (tmp_path / "Modelfile").write_text("FROM x\nTEMPLATE {% if %}\n")
    assert run(capsys, "create", "x", "-f", str(tmp_path / "Modelfile"))[0] == 1
    assert not (home / "models" / "manifests").exists() or names(capsys) == []
