"""Hugging Face ids as --model / LLM(model), and `cadenza pull`, against a hub cache the tests build (the layout
huggingface_hub writes: models--ORG--NAME/{blobs, refs/main, snapshots/<commit>/<file> -> ../../blobs/<hash>}).
No network: offline runs read that cache for real; the online path runs against a stubbed HfApi."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cadenza import LLM, CadenzaError, SamplingParams
from cadenza.hub import HubId, choose_files, pick_gguf, resolve
from cadenza.loader import open_checkpoint
from tests.cli.test_cli import cli

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def add_snapshot(cache: Path, repo_id: str, src: Path, commit: str = COMMIT, ref: str | None = "main") -> Path:
    """`src`'s files as the snapshot `commit` of `repo_id` in the hub cache `cache` (blobs named by their hash, the
    snapshot's entries relative symlinks to them, refs/<ref> holding the commit); returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory, mixtral_dir):
    """A hub cache holding the tiny Mixtral as org/tiny; (cache folder, snapshot folder, local folder)."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    snap = add_snapshot(cache, "org/tiny", mixtral_dir[0])
    return cache, snap, mixtral_dir[0]


@pytest.fixture
def offline(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub[0]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def hub_env(hub) -> dict:
    return {"HF_HUB_CACHE": str(hub[0]), "HF_HUB_OFFLINE": "1"}


# --- offline, from the cache ----------------------------------------------------------------------------------------


def test_llm_takes_a_hub_id_from_the_cache(offline):
    cache, snap, local = offline
    llm = LLM("org/tiny", device="cpu", dtype="float32")
    assert llm.checkpoint.path == snap and llm.checkpoint.hub_id == HubId("org/tiny")
    want = LLM(str(local), device="cpu", dtype="float32").generate("Hello world", GREEDY)
    assert llm.generate("Hello world", GREEDY).token_ids == want.token_ids
    # a revision by commit and by branch name find the same snapshot
    assert open_checkpoint(f"org/tiny@{COMMIT}").path == snap
    assert open_checkpoint("org/tiny@main").path == snap


def test_gguf_repository_from_the_cache(tmp_path, mixtral_dir, monkeypatch):
    from cadenza.formats.gguf import GgufCheckpoint
    from tests.conftest import prompt_ids
    from tests.formats.gguf_files import write_gguf

    src = tmp_path / "src"
    src.mkdir()
    write_gguf(mixtral_dir[0], src / "tiny-F32.gguf")
    write_gguf(mixtral_dir[0], src / "tiny-Q8_0.gguf", "Q8_0")
    (src / "README.md").write_text("two quantizations")
    snap = add_snapshot(tmp_path / "hub", "org/tiny-GGUF", src)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        CadenzaError, match=r"holds only GGUF files, 2 models: pick one with --model org/tiny-GGUF:FILE"
    ):
        open_checkpoint("org/tiny-GGUF")
    ckpt = open_checkpoint("org/tiny-GGUF:q8_0")
    assert isinstance(ckpt, GgufCheckpoint) and ckpt.path == snap / "tiny-Q8_0.gguf"
    ids = prompt_ids(8)
    got = LLM("org/tiny-GGUF:tiny-F32.gguf", device="cpu", dtype="float32").score(ids)
    assert torch.equal(got, LLM(str(src / "tiny-F32.gguf"), device="cpu", dtype="float32").score(ids))


def test_cli_run_and_pull_offline(hub):
    r = cli("run", "--model", "org/tiny", "--prompt", "Hello world", "--max-tokens", "6", "--temperature", "0",
            "--ignore-eos", "--dtype", "float32", "--json", env=hub_env(hub))  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == str(hub[1]) and len(out["token_ids"]) == 6
    r = cli("pull", "org/tiny", "--revision", "main", env=hub_env(hub))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(hub[1])
    assert "org/tiny@main" in r.stderr


def test_missing_id_offline_says_what_to_run(hub):
    r = cli("run", "--model", "org/absent", "--prompt", "hi", env=hub_env(hub))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "org/absent is not in the Hugging Face cache" in r.stderr
    assert "cadenza pull org/absent" in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    r = cli("pull", "org/absent", env=hub_env(hub))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cadenza pull org/absent" in r.stderr


def test_incomplete_cache_offline(tmp_path, mixtral_dir, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(mixtral_dir[0], src)
    weights = json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    )
    (src / "model.safetensors.index.json").write_text(weights)
    add_snapshot(tmp_path / "hub", "org/partial", src)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        CadenzaError, match=r"incomplete \(2 of its 2 weight shards are missing.*cadenza pull org/partial"
    ):
        open_checkpoint("org/partial")


def test_info_reads_the_cache_and_never_downloads(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub[0]))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", lambda *a, **k: pytest.fail("info asked the hub"))
    from cadenza.cli.info import describe

    assert describe("org/tiny", download=False)["hub_id"] == "org/tiny"
    with pytest.raises(CadenzaError, match="reads a local copy only.*cadenza pull org/other"):
        describe("org/other", download=False)


def test_local_paths_never_ask_the_hub(hub, tmp_path, monkeypatch):
    monkeypatch.setattr("cadenza.hub.snapshot", lambda *a, **k: pytest.fail("a local path went to the hub"))
    # a folder whose relative path looks like a hub id is still the folder
    monkeypatch.chdir(tmp_path)
    shutil.copytree(hub[2], tmp_path / "org" / "tiny")
    ckpt = open_checkpoint("org/tiny")
    assert ckpt.path == Path("org/tiny") and ckpt.hub_id is None
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert resolve(str(gguf)) == (gguf, None)
    # paths that do not exist and are no hub ids get the readers' own message
    assert resolve("missing/model.gguf") == (Path("missing/model.gguf"), None)
    assert resolve("./nowhere") == (Path("nowhere"), None)
    with pytest.raises(CadenzaError, match="does not exist"):
        open_checkpoint(str(tmp_path / "nowhere"))


# --- ids and what is downloaded -------------------------------------------------------------------------------------


def test_parse_ids():
    assert HubId.parse("org/name") == HubId("org/name")
    assert HubId.parse("org/name@v1.0") == HubId("org/name", "v1.0")
    assert HubId.parse("org/name@refs/pr/3:Q4_K_M") == HubId("org/name", "refs/pr/3", "Q4_K_M")
    assert HubId.parse("org/name:sub/x-Q8_0.gguf") == HubId("org/name", None, "sub/x-Q8_0.gguf")
    assert str(HubId("org/name", "dev", "Q4_K_M")) == "org/name@dev:Q4_K_M"
    for path in ("/abs/x", "./x/y", "../x/y", "~/x/y", "a/b/c", "x", "dir/model.gguf", "C:/models/x"):
        assert HubId.parse(path) is None, path


def test_files_chosen_from_a_repository():
    hf = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
          "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
          "consolidated.safetensors", "original/model.safetensors", "pytorch_model.bin"]  # fmt: skip
    wanted, target = choose_files(HubId("o/m"), hf)
    # the shards come from the index once read; never the duplicates
    assert wanted == ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                      "model.safetensors.index.json"] and target is None  # fmt: skip
    single = ["config.json", "model.safetensors", "consolidated.safetensors", "tokenizer.model"]
    assert choose_files(HubId("o/m"), single) == (["config.json", "tokenizer.model", "model.safetensors"], None)
    with pytest.raises(CadenzaError, match="no safetensors weights .*pytorch_model.bin"):
        choose_files(HubId("o/m"), ["config.json", "pytorch_model.bin"])
    with pytest.raises(CadenzaError, match="neither a model folder"):
        choose_files(HubId("o/m"), ["README.md"])


def test_gguf_repositories():
    files = ["README.md", "m-Q8_0.gguf", "mmproj-F16.gguf", "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf",
             "Q4_K_M/m-Q4_K_M-00002-of-00002.gguf"]  # fmt: skip
    ggufs = [f for f in files if f.endswith(".gguf")]
    with pytest.raises(CadenzaError) as e:
        choose_files(HubId("o/m"), files)
    msg = str(e.value)
    assert "holds only GGUF files, 2 models" in msg and "--model o/m:FILE" in msg and "mmproj" not in msg
    assert "o/m:Q4_K_M/m-Q4_K_M-00001-of-00002.gguf  (2 parts)" in msg and "o/m:m-Q8_0.gguf" in msg
    split = ["Q4_K_M/m-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/m-Q4_K_M-00002-of-00002.gguf"]
    assert pick_gguf(HubId("o/m", file="q4_k_m"), ggufs) == split  # a piece of the name, any case
    assert pick_gguf(HubId("o/m", file=split[1]), ggufs) == split  # any part of a split set
    assert choose_files(HubId("o/m", file="Q8_0"), files) == (["m-Q8_0.gguf"], "m-Q8_0.gguf")
    assert choose_files(HubId("o/m"), ["a-Q8_0.gguf", "README.md"]) == (["a-Q8_0.gguf"], "a-Q8_0.gguf")  # the only one
    with pytest.raises(CadenzaError, match="No GGUF file of o/m matches 'Q2_K'"):
        pick_gguf(HubId("o/m", file="Q2_K"), ggufs)
    with pytest.raises(CadenzaError, match="2 GGUF models of o/m match 'm-'"):
        pick_gguf(HubId("o/m", file="m-"), ggufs)


# --- online, against a stubbed hub ----------------------------------------------------------------------------------


def _http_error(cls, status: int):
    response = SimpleNamespace(headers={}, status_code=status, request=None)
    return cls(f"{status} Client Error", response=response)


@pytest.fixture
def online(hub, monkeypatch, tmp_path):
    """A hub whose org/tiny is the cached snapshot plus a duplicate copy of the weights, in a fresh cache; the
    downloads it is asked for are recorded (and served from the tiny checkpoint)."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    local = hub[2]
    files = sorted(p.name for p in local.iterdir()) + ["consolidated.safetensors", "README.md"]
    calls = []

    def model_info(self, repo_id, revision=None, **kw):
        if repo_id != "org/tiny":
            raise _http_error(errors.RepositoryNotFoundError, 404)
        return SimpleNamespace(sha=COMMIT, siblings=[SimpleNamespace(rfilename=f) for f in files])

    def snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, **kw):
        calls.append(sorted(allow_patterns))
        src = tmp_path / "download"
        src.mkdir(exist_ok=True)
        for f in allow_patterns:
            shutil.copyfile(local / f, src / f)
        return str(add_snapshot(Path(cache_dir), repo_id, src, ref=revision or "main"))

    from huggingface_hub import errors

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", model_info)
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    return cache, local, calls


def test_download_fetches_what_cadenza_reads_once(online):
    cache, local, calls = online
    ckpt = open_checkpoint("org/tiny")
    assert ckpt.hub_id == HubId("org/tiny") and ckpt.path == cache / "models--org--tiny" / "snapshots" / COMMIT
    wanted = sorted(f for f in os.listdir(local) if f != "README.md")
    assert calls == [wanted] and "consolidated.safetensors" not in wanted
    (cache / "models--org--tiny" / "refs" / "main").unlink()
    open_checkpoint("org/tiny")  # complete in the cache: no second download, and the ref is written back
    assert len(calls) == 1 and (cache / "models--org--tiny" / "refs" / "main").read_text() == COMMIT
    # the packed-expert cache names its entries of a hub snapshot after the repository, not the commit
    from cadenza.moe.packed_store import _display_name

    assert _display_name(ckpt.path) == "org--tiny"


def test_hub_errors_are_clear(online, monkeypatch):
    from huggingface_hub import errors
    from huggingface_hub._snapshot_download import snapshot_download as real_snapshot_download

    with pytest.raises(CadenzaError, match="No model 'org/nope' on the Hugging Face Hub.*HF_TOKEN"):
        open_checkpoint("org/nope")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("cadenza.hub._token", lambda: None)

    def gated(*a, **k):
        raise _http_error(errors.GatedRepoError, 403)

    monkeypatch.setattr("huggingface_hub.snapshot_download", gated)
    with pytest.raises(CadenzaError, match="org/tiny is a gated model.*export HF_TOKEN="):
        open_checkpoint("org/tiny")

    def unreachable(*a, **k):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", unreachable)
    monkeypatch.setattr("huggingface_hub.snapshot_download", real_snapshot_download)  # the cache, for real
    with pytest.raises(CadenzaError, match="cannot be reached .*Network is unreachable.*cadenza pull org/tiny"):
        open_checkpoint("org/tiny")
    add_snapshot(online[0], "org/tiny", online[1])  # once it is cached, an unreachable hub is no problem
    assert open_checkpoint("org/tiny").path == online[0] / "models--org--tiny" / "snapshots" / COMMIT


# --- progress on a terminal -----------------------------------------------------------------------------------------


def _run_with_stderr_on_a_pty(args: list[str], env: dict) -> str:
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "cadenza", *args], stdout=subprocess.PIPE, stderr=slave,
                         stdin=subprocess.DEVNULL, env={**os.environ, **env})  # fmt: skip
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed its side
                break
            if not chunk:
                break
            out += chunk
        elif p.poll() is not None:
            break
    p.communicate(timeout=300)
    os.close(master)
    assert p.returncode == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def test_weight_reading_progress_on_a_terminal_only(mixtral_dir):
    args = ["run", "--model", str(mixtral_dir[0]), "--prompt", "Hi", "--max-tokens", "2"]
    env = {"CADENZA_PROGRESS_AFTER": "0"}  # the tiny model reads in milliseconds
    shown = _run_with_stderr_on_a_pty(args, env)
    assert "\rcadenza: reading weights: " in shown and "B/s" in shown
    piped = cli(*args, env=env)
    assert piped.returncode == 0, piped.stderr
    assert "reading weights" not in piped.stderr
