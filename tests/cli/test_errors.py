"""Every mistake a user can make gets a message naming the problem and the fix: through the API as CadenzaError,
through the CLI as one paragraph on stderr, exit status 2 and no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from cadenza import LLM, CadenzaError, SamplingParams
from tests.conftest import edit_config, make_mixtral


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def broken(tmp_path, mixtral_dir):
    """A fresh copy of the tiny checkpoint to break."""
    return copy_checkpoint(mixtral_dir[0], tmp_path / "ckpt")


def cli(*args, stdin: str | None = None):
    return subprocess.run(
        [sys.executable, "-m", "cadenza", *args], capture_output=True, text=True, input=stdin, timeout=300
    )


def assert_cli_error(args, *words):
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("cadenza: error: ")
    for w in words:
        assert w in r.stderr, r.stderr
    return r.stderr


def test_folder_missing(tmp_path):
    with pytest.raises(CadenzaError, match="does not exist"):
        LLM(tmp_path / "nope", device="cpu")
    assert_cli_error(["run", "--model", str(tmp_path / "nope"), "--prompt", "hi"], "does not exist", "--model")


def test_no_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(CadenzaError, match="No config.json"):
        LLM(broken, device="cpu")
    assert_cli_error(["info", "--model", str(broken)], "No config.json", "download")


def test_bad_json_config(broken):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CadenzaError, match="not valid JSON"):
        LLM(broken, device="cpu")


def test_unsupported_architecture(broken):
    edit_config(broken, architectures=["LlamaForCausalLM"])
    with pytest.raises(CadenzaError, match="LlamaForCausalLM") as e:
        LLM(broken, device="cpu")
    assert "MixtralForCausalLM" in str(e.value)  # the supported list
    assert_cli_error(["run", "--model", str(broken), "--prompt", "hi"], "does not support", "MixtralForCausalLM")


def test_missing_tensor(broken):
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CadenzaError, match="experts.2.w3.weight") as e:
        LLM(broken, device="cpu")
    assert "missing" in str(e.value)


def test_missing_shard(tmp_path):
    path, _ = make_mixtral(tmp_path / "sharded", save_kw={"max_shard_size": "100KB"})
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CadenzaError, match=victim.name) as e:
        LLM(path, device="cpu")
    assert "missing" in str(e.value) and "download" in str(e.value)
    assert_cli_error(["info", "--model", str(path)], victim.name)


def test_shape_disagrees_with_config(broken):
    edit_config(broken, intermediate_size=128)
    with pytest.raises(CadenzaError, match="has shape") as e:
        LLM(broken, device="cpu")
    assert "config.json" in str(e.value)


def test_no_weights(broken):
    (broken / "model.safetensors").unlink()
    torch.save({}, broken / "pytorch_model.bin")
    with pytest.raises(CadenzaError, match="safetensors"):
        LLM(broken, device="cpu")


def test_truncated_weights(broken):
    (broken / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(CadenzaError, match="not a readable safetensors file"):
        LLM(broken, device="cpu")


def test_missing_config_key(broken):
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["num_local_experts"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CadenzaError, match="num_local_experts"):
        LLM(broken, device="cpu")


def test_no_tokenizer_files(broken):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (broken / f).unlink(missing_ok=True)
    with pytest.raises(CadenzaError, match="tokenizer"):
        LLM(broken, device="cpu")
    assert_cli_error(["run", "--model", str(broken), "--prompt", "hi"], "tokenizer.json", "tokenizer.model")


def test_prompt_longer_than_context(mixtral_dir):
    llm = LLM(mixtral_dir[0], device="cpu", dtype="float32", max_context=16)
    with pytest.raises(CadenzaError, match="20 tokens") as e:
        llm.generate(list(range(3, 23)), SamplingParams(max_tokens=4))
    assert "16" in str(e.value) and "Shorten" in str(e.value)
    long_prompt = "word " * 400  # far more than 16 tokens
    assert_cli_error(
        ["run", "--model", str(mixtral_dir[0]), "--device", "cpu", "--max-context", "16", "--prompt", long_prompt],
        "context",
        "Shorten",
    )


def test_generation_stops_at_context(mixtral_dir):
    """max_tokens beyond the context ends with "length" at the context, not with an error."""
    llm = LLM(mixtral_dir[0], device="cpu", dtype="float32", max_context=20)
    out = llm.generate(list(range(3, 13)), SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_bad_sampling_values_cli(mixtral_dir):
    assert_cli_error(["run", "--model", str(mixtral_dir[0]), "--prompt", "hi", "--temperature", "-1"], "temperature")
    assert_cli_error(["run", "--model", str(mixtral_dir[0]), "--prompt", "hi", "--top-p", "1.5"], "top_p")


def test_bad_device_and_dtype(mixtral_dir):
    with pytest.raises(CadenzaError, match="dtype"):
        LLM(mixtral_dir[0], device="cpu", dtype="float8")
    with pytest.raises(CadenzaError, match="device"):
        LLM(mixtral_dir[0], device="tpu")
    if not torch.cuda.is_available():
        assert_cli_error(["run", "--model", str(mixtral_dir[0]), "--prompt", "hi", "--device", "cuda"], "CUDA")


def test_token_ids_outside_vocabulary(mixtral_dir):
    llm = LLM(mixtral_dir[0], device="cpu", dtype="float32")
    with pytest.raises(CadenzaError, match="vocabulary"):
        llm.generate([5, 100000], SamplingParams(max_tokens=2))
