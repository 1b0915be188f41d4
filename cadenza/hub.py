"""Hugging Face Hub ids as model sources, resolved to a folder or file in the hub cache.

What `--model` and `LLM(model)` accept, besides a local folder or .gguf file (an existing path is always taken as
it is, and the hub is never asked):

- `ORG/NAME`: a repository on the hub, its main branch;
- `ORG/NAME@REVISION`: a branch, tag or commit of it;
- `ORG/NAME:FILE` (also after `@REVISION`): one GGUF model of a repository that holds several: FILE is the .gguf
  file's path in the repository (any part of a split set), or a piece of its name such as a quantization (`Q4_K_M`).

Only the files cadenza reads are downloaded: config.json, generation_config.json, the tokenizer files and the
safetensors weights the index lists (not a repository's duplicate `consolidated.safetensors` or `original/`
folder), or the chosen GGUF's parts. They go to huggingface_hub's cache (HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub), shared with transformers and `hf download`; HF_TOKEN (or a saved `hf auth login`) opens
gated and private repositories; HF_HUB_OFFLINE=1 reads the cache only. Environment variables are read at each
call, as cadenza.paths reads CADENZA_CACHE.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cadenza.errors import CadenzaError

log = logging.getLogger(__name__)

# what cadenza reads from an HF checkpoint folder, besides the weights
SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^:\s]+))?(?::(?P<file>\S+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SPLIT = re.compile(r"(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")


@dataclass(frozen=True)
class HubId:
    """`ORG/NAME[@REVISION][:FILE]`, parsed."""

    repo_id: str
    revision: str | None = None  # None: the main branch
    file: str | None = None  # a GGUF file's path in the repository, or a piece of its name

    @classmethod
    def parse(cls, text: str) -> HubId | None:
        """The hub id `text` spells, or None when it does not look like one (then it is a local path)."""
        m = _ID.fullmatch(text.strip())
        if m is None or (m["file"] is None and m["revision"] is None and text.endswith(".gguf")):
            return None  # `dir/model.gguf` that does not exist is a mistyped path, not a repository
        return cls(m["repo"], m["revision"], m["file"])

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + (f":{self.file}" if self.file else "")

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"


def resolve(source: str | Path, download: bool = True) -> tuple[Path, HubId | None]:
    """The local path for a model source, and the hub id it came from (None for a local path). A path that exists
    is returned as it is; a hub id resolves to its snapshot in the hub cache, downloaded when missing (download
    False: the cache only). Anything else comes back as a path, for the checkpoint readers' own "does not exist"."""
    path = Path(source).expanduser()
    if path.exists() or not isinstance(source, str):
        return path, None
    hub_id = HubId.parse(source)
    if hub_id is None:
        return path, None
    return snapshot(hub_id, download=download), hub_id


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, from the environment at this call (as huggingface_hub reads it at import)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(os.path.expandvars(env)).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set: the cache only, no network."""
    from huggingface_hub import constants

    def true(v: str | None) -> bool:
        return (v or "").strip().upper() in ("1", "ON", "YES", "TRUE")

    set_now = os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE"))
    return true(set_now) if set_now is not None else bool(constants.HF_HUB_OFFLINE)


def _repo_folder(hub_id: HubId) -> Path:
    return hub_cache_dir() / ("models--" + hub_id.repo_id.replace("/", "--"))


def snapshot(hub_id: HubId, download: bool = True) -> Path:
    """The local folder (or .gguf file) of `hub_id`: its cached snapshot, completed from the hub first when online
    and `download` (only what is missing is fetched, with huggingface_hub's progress bars)."""
    _check_installed()
    if offline():
        return _from_cache(hub_id, "offline")
    if not download:
        return _from_cache(hub_id, "no-download")
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(hub_id.repo_id, revision=hub_id.revision)
    except Exception as e:
        _raise_hub_error(e, hub_id)
        cached = _from_cache(hub_id, "unreachable", e)
        log.info("cannot reach the Hugging Face Hub (%s): using the cached copy of %s", _short(e), hub_id.repo_id)
        return cached
    files = [s.rfilename for s in info.siblings or ()]
    folder = _repo_folder(hub_id) / "snapshots" / str(info.sha)
    wanted, target = choose_files(hub_id, files)
    if INDEX in wanted:  # the shards the index lists: not a repository's other copies of the weights
        wanted += _index_shards(hub_id, folder)
    if all((folder / f).is_file() for f in wanted):
        _write_ref(hub_id, str(info.sha))
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(
                snapshot_download(
                    hub_id.repo_id, revision=hub_id.revision, cache_dir=hub_cache_dir(), allow_patterns=wanted
                )
            )
        except Exception as e:
            _raise_hub_error(e, hub_id)
            raise CadenzaError(
                f"Downloading {hub_id} from the Hugging Face Hub failed ({_short(e)}). Run the same command again "
                "to resume the download."
            ) from e
    return folder / target if target else folder


def choose_files(hub_id: HubId, files: list[str]) -> tuple[list[str], str | None]:
    """Of a repository's files, those cadenza reads (the safetensors shards an index lists are added once the
    index is read), and the GGUF file to open in the snapshot (None: the snapshot folder itself)."""
    root = [f for f in files if "/" not in f]
    ggufs = [f for f in files if f.endswith(".gguf")]
    if hub_id.file is not None:
        parts = pick_gguf(hub_id, ggufs)
        return parts, parts[0]
    safetensors = [f for f in root if f.endswith(".safetensors")]
    if "config.json" in root and safetensors:
        small = [f for f in SMALL_FILES if f in root]
        if INDEX in root:
            return small + [INDEX], None
        return small + ([SINGLE] if SINGLE in root else safetensors), None
    if ggufs:
        parts = pick_gguf(hub_id, ggufs)
        return parts, parts[0]
    if "config.json" in root:
        bins = [f for f in root if f.endswith((".bin", ".pt", ".pth"))]
        hint = f" (it has PyTorch pickle weights: {bins[0]})" if bins else ""
        raise CadenzaError(
            f"{hub_id.repo_id} has no safetensors weights{hint}; cadenza reads safetensors and GGUF files. Look for "
            "a release of the model in safetensors (most repositories have one) or a GGUF conversion of it."
        )
    raise CadenzaError(
        f"{hub_id.repo_id} on the Hugging Face Hub holds neither a model folder (config.json and *.safetensors) nor "
        f"GGUF files, so cadenza cannot run it. Check the id at {hub_id.url}."
    )


def gguf_models(ggufs: list[str]) -> dict[str, list[str]]:
    """GGUF files grouped into models: first file (part 1 of a split set) -> its parts. Vision projectors
    (mmproj*) are not models of their own."""
    models: dict[str, list[str]] = {}
    for f in sorted(ggufs):
        if Path(f).name.lower().startswith("mmproj"):
            continue
        m = _SPLIT.fullmatch(f)
        if m is None:
            models[f] = [f]
            continue
        count = int(m["count"])
        first = f"{m['stem']}-00001-of-{count:05d}.gguf"
        models.setdefault(first, [f"{m['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)])
    return models


def pick_gguf(hub_id: HubId, ggufs: list[str]) -> list[str]:
    """The parts of the GGUF model `hub_id.file` names (a file of it, or a piece of its name); with no file
    named, the repository's only GGUF model. A clear error lists the models when the choice is not one."""
    models = gguf_models(ggufs)
    if hub_id.file is None:
        if len(models) == 1:
            return next(iter(models.values()))
        return _choose_one(hub_id, models, f"{hub_id.repo_id} holds only GGUF files, {len(models)} models")
    want = hub_id.file
    for parts in models.values():
        if want in parts:
            return parts
    if want.endswith(".gguf"):
        missing = f"{hub_id.repo_id} has no file {want}"
        return _choose_one(hub_id, models, missing, none_left=not models)
    found = {k: v for k, v in models.items() if want.lower() in k.lower()}
    if len(found) == 1:
        return next(iter(found.values()))
    if found:
        return _choose_one(hub_id, found, f"{len(found)} GGUF models of {hub_id.repo_id} match '{want}'")
    return _choose_one(hub_id, models, f"No GGUF file of {hub_id.repo_id} matches '{want}'", none_left=not models)


def _choose_one(hub_id: HubId, models: dict[str, list[str]], problem: str, none_left: bool = False) -> list[str]:
    base = HubId(hub_id.repo_id, hub_id.revision)
    if none_left or not models:
        raise CadenzaError(f"{problem}, and it holds no GGUF models. Check the name at {hub_id.url}.")
    listed = "\n".join(
        f"  {base}:{first}" + (f"  ({len(parts)} parts)" if len(parts) > 1 else "")
        for first, parts in list(models.items())[:20]
    )
    more = f"\n  ... and {len(models) - 20} more" if len(models) > 20 else ""
    example = next(iter(models))
    quant = re.search(r"(?i)(?:IQ|Q|BF|F)\d[\w]*?(?=(-\d{5}-of-\d{5})?\.gguf$)", Path(example).name)
    tag = f" (or a piece of its name, e.g. {base}:{quant.group(0)})" if quant else ""
    raise CadenzaError(f"{problem}: pick one with --model {base}:FILE{tag}:\n{listed}{more}")


def _index_shards(hub_id: HubId, folder: Path) -> list[str]:
    """The shards model.safetensors.index.json lists (the index is downloaded first when not cached)."""
    index = folder / INDEX
    if not index.is_file():
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(hub_id.repo_id, INDEX, revision=hub_id.revision, cache_dir=hub_cache_dir()))
        except Exception as e:
            _raise_hub_error(e, hub_id)
            raise CadenzaError(f"Downloading {INDEX} of {hub_id} failed ({_short(e)}). Run the command again.") from e
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError) as e:
        raise CadenzaError(
            f"{index} ({hub_id}'s shard index) is unreadable ({e}). Download it again: cadenza pull {hub_id}"
        ) from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CadenzaError(f"{hub_id}'s {INDEX} has no weight_map. The repository is broken: tell its authors.")
    return sorted(set(weight_map.values()))


def _write_ref(hub_id: HubId, sha: str) -> None:
    """refs/<revision> -> sha, as snapshot_download writes it, so that offline use finds this snapshot by name."""
    revision = hub_id.revision or "main"
    if _COMMIT.fullmatch(revision):
        return
    ref = _repo_folder(hub_id) / "refs" / revision
    try:
        if not ref.is_file() or ref.read_text().strip() != sha:
            ref.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
            tmp.write_text(sha)
            os.replace(tmp, ref)
    except OSError as e:
        log.warning("cannot record %s's revision in %s (%s)", hub_id.repo_id, ref, e)


# --- the cache only --------------------------------------------------------------------------------------------------


def _from_cache(hub_id: HubId, why: str, error: Exception | None = None) -> Path:
    """The cached snapshot of `hub_id`, checked to hold what cadenza reads; `why` the hub is not asked: "offline"
    (HF_HUB_OFFLINE), "unreachable" (`error`), "no-download" (a command that reads a local copy only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        folder = Path(
            snapshot_download(
                hub_id.repo_id,
                revision=hub_id.revision,
                cache_dir=hub_cache_dir(),
                local_files_only=True,
                allow_patterns=["config.json"],
            )
        )
    except LocalEntryNotFoundError as e:
        if type(e).__name__ == "IncompleteSnapshotError":
            raise CadenzaError(_incomplete(hub_id, why, error, "config.json is missing")) from None
        raise CadenzaError(_not_cached(hub_id, why, error)) from None
    except Exception as e:
        _raise_hub_error(e, hub_id)
        raise CadenzaError(_not_cached(hub_id, why, error or e)) from None
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    if hub_id.file is not None or not (folder / "config.json").is_file():
        ggufs = [f for f in files if f.endswith(".gguf")]
        if not ggufs and hub_id.file is None:
            raise CadenzaError(_incomplete(hub_id, why, error, "it holds neither config.json nor a GGUF file"))
        try:
            parts = pick_gguf(hub_id, ggufs)
        except CadenzaError as e:
            raise CadenzaError(f"In the cached copy of {hub_id.repo_id} ({folder}): {e}") from None
        missing = [p for p in parts if p not in files]
        if missing:
            raise CadenzaError(
                _incomplete(hub_id, why, error, f"{len(missing)} of {len(parts)} GGUF parts are missing")
            )
        return folder / parts[0]
    if (folder / INDEX).is_file():
        shards = _index_shards(hub_id, folder)
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CadenzaError(
                _incomplete(hub_id, why, error, f"{len(missing)} of its {len(shards)} weight shards are missing")
            )
    return folder


def _how_to_get(hub_id: HubId, why: str) -> str:
    base = HubId(hub_id.repo_id, hub_id.revision, hub_id.file)
    if why == "offline":
        return (
            f"Run `cadenza pull {base}` on a machine with internet access (then copy its Hugging Face cache here, or "
            f"point HF_HUB_CACHE at it), or unset HF_HUB_OFFLINE to download it now."
        )
    if why == "no-download":
        return f"Download it first: cadenza pull {base}"
    return (
        "Check the connection (behind a proxy: HTTPS_PROXY; a hub mirror: HF_ENDPOINT), or run "
        f"`cadenza pull {base}` on a connected machine and use its Hugging Face cache here with HF_HUB_OFFLINE=1."
    )


def _state(why: str, error: Exception | None) -> str:
    if why == "offline":
        return "HF_HUB_OFFLINE is set, so cadenza reads only the Hugging Face cache"
    if why == "no-download":
        return "this command reads a local copy only"
    return f"the Hugging Face Hub cannot be reached ({_short(error)})"


def _not_cached(hub_id: HubId, why: str, error: Exception | None) -> str:
    return (
        f"{hub_id.repo_id}{'@' + hub_id.revision if hub_id.revision else ''} is not in the Hugging Face cache "
        f"({hub_id_cache(hub_id)}), and {_state(why, error)}. (There is no local folder or file of that name "
        f"either.) {_how_to_get(hub_id, why)}"
    )


def _incomplete(hub_id: HubId, why: str, error: Exception | None, what: str) -> str:
    return (
        f"The cached copy of {hub_id.repo_id} in {hub_id_cache(hub_id)} is incomplete ({what}; an interrupted "
        f"download?), and {_state(why, error)}. {_how_to_get(hub_id, why)}"
    )


def hub_id_cache(hub_id: HubId) -> Path:
    return _repo_folder(hub_id) if _repo_folder(hub_id).exists() else hub_cache_dir()


# --- errors ----------------------------------------------------------------------------------------------------------


def _short(e: BaseException | None) -> str:
    text = str(e).strip().splitlines()[0] if e is not None and str(e).strip() else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:
        return None


def _raise_hub_error(e: Exception, hub_id: HubId) -> None:
    """A CadenzaError for a hub answer a user can act on (no such repository or revision, gated, bad token); other
    errors (the hub unreachable) return, for the caller to handle."""
    from huggingface_hub import utils as errors  # exports the hub's errors in old and new releases alike

    if isinstance(e, CadenzaError):
        raise e
    if isinstance(e, errors.HFValidationError):
        raise CadenzaError(
            f"'{hub_id.repo_id}' is neither a local folder or file nor a valid Hugging Face model id ({e}). Pass "
            "--model a folder, a .gguf file, or an id ORG/NAME as in the model page's URL."
        ) from None
    if isinstance(e, errors.GatedRepoError):
        if _token():
            raise CadenzaError(
                f"{hub_id.repo_id} is a gated model, and the account of your Hugging Face token has no access to it "
                f"yet. Accept its conditions at {hub_id.url} while logged in (some need the authors' approval), "
                "then run the command again."
            ) from None
        raise CadenzaError(
            f"{hub_id.repo_id} is a gated model: its authors ask you to accept their conditions first. Accept them "
            f"at {hub_id.url} while logged in, then give cadenza a token of that account: export HF_TOKEN=hf_... "
            "(tokens: https://huggingface.co/settings/tokens), or run `hf auth login` once."
        ) from None
    if isinstance(e, errors.RevisionNotFoundError):
        raise CadenzaError(
            f"{hub_id.repo_id} has no revision '{hub_id.revision}' (a branch, tag or commit). Pick one that exists "
            f"(see {hub_id.url}/tree/main), or drop @{hub_id.revision} for the main branch."
        ) from None
    if isinstance(e, errors.RepositoryNotFoundError):
        private = (
            "If it is private, the account of your token has no access to it."
            if _token()
            else "A private repository needs a token: export HF_TOKEN=hf_... (or run `hf auth login`)."
        )
        raise CadenzaError(
            f"No model '{hub_id.repo_id}' on the Hugging Face Hub, and no local folder or file of that name. Check "
            f"the spelling (ORG/NAME, as in https://huggingface.co/ORG/NAME). {private}"
        ) from None
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(e, errors.HfHubHTTPError) and status == 401:
        raise CadenzaError(
            "The Hugging Face Hub refused your token (401 Unauthorized): it is invalid or expired. Set a valid one "
            "in HF_TOKEN (https://huggingface.co/settings/tokens), or unset it for public models."
        ) from None


def _check_installed() -> None:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError as e:
        raise CadenzaError(
            f"Hugging Face ids need the huggingface_hub package ({e}): pip install huggingface_hub. Or pass --model "
            "a local folder or .gguf file."
        ) from None
