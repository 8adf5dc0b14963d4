"""The on-disk layout of a moe-hub checkpoint, shared by convert, finetune, info and push.

    config.json                      MoELoraConfig with auto_map -> the shipped code
    model*.safetensors               the dense base under MoE-LoRA names (absent: adapter-only)
    moe_adapters.safetensors         experts and routers
    model.safetensors.index.json     weight map over all of the above
    *.py                             configuration, modeling, layer, routers, Triton kernel
    tokenizer files, generation_config.json, README.md (model card)
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .errors import MoEHubError

# Re-exported: the name is the shipped loader's (adapter-only checkpoints), defined there once.
from .modeling.modeling_moe_lora import ADAPTER_WEIGHTS as ADAPTER_WEIGHTS
from .outputs import record_publish, sync_dir, sync_tree

INDEX_FILE = "model.safetensors.index.json"
_MODELING_DIR = Path(__file__).resolve().parent / "modeling"
_KERNEL_FILE = Path(__file__).resolve().parent / "kernels" / "moe_lora_triton.py"


def code_files() -> list[Path]:
    """The source files a checkpoint carries: the flat modeling package and the Triton kernel."""
    files = sorted(p for p in _MODELING_DIR.glob("*.py") if p.name != "__init__.py")
    return [*files, _KERNEL_FILE]


def copy_code(target: Path) -> None:
    """Copy the model code verbatim (one source: what the library runs is what checkpoints run)."""
    for path in code_files():
        shutil.copyfile(path, target / path.name)


CONFIG_FILE = "config.json"
MODEL_TYPE = "moe_lora"
#: A base's or checkpoint's tokenizer files (what convert downloads and a checkpoint carries).
TOKENIZER_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "*.model", "vocab*", "merges.txt", "chat_template*",
    "added_tokens.json",
)
# Files moe-hub itself writes next to the weights: generation defaults, the model card, and the
# training record with its routing statistics (names as in model_card.py and routing_stats.py).
_RECORD_FILES = ("generation_config.json", "README.md", "moe_hub_training.json",
                 "routing_stats.json", "routing_heatmap.png")


def read_weight_map(index: Path, owner: str, fix: str) -> dict[str, str]:
    """The ``weight_map`` of the index file ``index``, every entry a file name inside the index's
    own folder. ``owner`` names the folder in messages (BASE, the checkpoint); ``fix`` says what
    to do about a corrupt index."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MoEHubError(f"{owner} index {index} is not valid JSON ({err.__class__.__name__}): "
                          f"{fix}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        kind = "missing" if weight_map is None else f"a {type(weight_map).__name__}"
        raise MoEHubError(f"{owner} index {index}: field weight_map is {kind}, not an object "
                          f"mapping tensor names to files: {fix}")
    folder = index.parent.resolve()
    for tensor, name in weight_map.items():
        inside = isinstance(name, str) and name and not os.path.isabs(name) and ".." not in \
            Path(name).parts and (folder / name).resolve().parent == folder
        if not inside:
            raise MoEHubError(f"{owner} index {index} maps {tensor} to {name!r}, which is not a "
                              f"file inside {owner} {index.parent}: {fix}")
    return weight_map


def _auto_map_modules(config: dict[str, Any]) -> set[str]:
    """``<module>.py`` of every class config.json's ``auto_map`` names (``module.Class`` or
    ``repo--module.Class``; a tokenizer entry may be a [slow, fast] pair)."""
    modules = set()
    auto_map = config.get("auto_map")
    for value in (auto_map.values() if isinstance(auto_map, dict) else ()):
        for ref in (value if isinstance(value, list) else [value]):
            if isinstance(ref, str) and "." in ref:
                modules.add(ref.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return modules


def checkpoint_files(checkpoint: Path, include: list[str] | None = None) -> list[str]:
    """Relative paths of the files a moe-hub checkpoint consists of, derived from its own
    config and index (never from whatever else lies in the folder): config.json, the weights the
    index names (or the single files the layout defines), the code config.json's ``auto_map`` and
    the layout name, tokenizer files, generation config, model card and training record. Files
    matching an ``include`` pattern (fnmatch on the relative path, or a folder name) are added.

    Publishing (push) and fine-tuning (its output starts from these) both use it, so a stray
    ``credentials.json`` or ``wandb/`` in the folder never travels with the model."""
    config = read_checkpoint_config(checkpoint)
    names = {CONFIG_FILE, ADAPTER_WEIGHTS, "model.safetensors", *_RECORD_FILES,
             *_auto_map_modules(config), *(path.name for path in code_files())}
    index = checkpoint / INDEX_FILE
    if index.is_file():
        names.add(INDEX_FILE)
        names.update(read_weight_map(index, "the checkpoint", "re-create it with "
                                     "`moe-hub convert`").values())
    files = {name for name in names if (checkpoint / name).is_file()}
    for entry in checkpoint.iterdir():
        if entry.is_file() and any(fnmatch.fnmatchcase(entry.name, pattern)
                                   for pattern in TOKENIZER_PATTERNS):
            files.add(entry.name)
    files.update(included_files(checkpoint, include))
    return sorted(files)


def included_files(folder: Path, include: list[str] | None) -> set[str]:
    """The files below ``folder`` (relative paths) that match an ``include`` pattern: fnmatch
    on the relative path, or a folder name (``notes`` or ``notes/`` takes all of it)."""
    if not include:
        return set()
    return {rel for rel in _all_files(folder) if any(_matches(rel, p) for p in include)}


def _all_files(root: Path) -> list[str]:
    """Every file below ``root`` (relative), without descending into symlinked folders."""
    found = []
    for folder, dirs, names in os.walk(root):
        base = Path(folder).relative_to(root)
        found.extend((base / name).as_posix() for name in names
                     if (Path(folder) / name).is_file())
        dirs.sort()
    return sorted(found)


def _matches(rel: str, pattern: str) -> bool:
    pattern = pattern.strip().rstrip("/")
    return fnmatch.fnmatchcase(rel, pattern) or rel.startswith(pattern + "/")


def left_out(checkpoint: Path, files: list[str]) -> list[str]:
    """What lies in ``checkpoint`` besides ``files``: top-level names, folders with a '/'."""
    taken = {rel.split("/", 1)[0] for rel in files}
    return sorted(entry.name + ("/" if entry.is_dir() else "")
                  for entry in checkpoint.iterdir() if entry.name not in taken)


class NotACheckpointError(MoEHubError, ValueError):
    """The directory is not a moe-hub checkpoint."""


def read_checkpoint_config(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's config.json as a dict; raises NotACheckpointError naming the fix."""
    path = Path(checkpoint_dir)
    config_path = path / CONFIG_FILE
    if not path.is_dir():
        raise NotACheckpointError(f"{path} is not a directory; pass a moe-hub checkpoint folder")
    if not config_path.is_file():
        raise NotACheckpointError(
            f"{path} has no config.json, so it is not a moe-hub checkpoint; "
            f"create one with `moe-hub convert BASE {path}`"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise NotACheckpointError(
            f"{config_path} is not valid JSON ({err}); re-run convert"
        ) from err
    if config.get("model_type") != MODEL_TYPE:
        raise NotACheckpointError(
            f"{path} is not a moe-hub checkpoint (config.json model_type is "
            f"{config.get('model_type')!r}, expected {MODEL_TYPE!r}); convert it first with "
            f"`moe-hub convert {path} OUT`"
        )
    return config


def require_checkpoint(path: str | Path) -> Path:
    """``path`` as a Path, or NotACheckpointError when it is not a moe-hub checkpoint."""
    read_checkpoint_config(path)
    return Path(path)


def is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` holds a moe-hub checkpoint (its config.json names ``MODEL_TYPE``)."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == MODEL_TYPE


def refuse_overlap(out: Path, inputs: list[tuple[str, str | os.PathLike]],
                   out_label: str) -> None:
    """Raise when ``out`` is, contains or lies inside one of ``inputs`` (see ``check_output``);
    an input that does not exist locally (a Hub id) cannot overlap."""
    target = out.resolve()
    for label, given in inputs:
        path = Path(given).expanduser()
        if not path.exists():
            continue
        source = path.resolve()
        if target == source:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents:
            relation = "lies inside"
        else:
            continue
        raise MoEHubError(f"{out_label} {out} {relation} {label} {given}: pass another "
                          f"{out_label}, outside every input")


def check_output(out: Path, overwrite: bool, inputs: list[tuple[str, str | os.PathLike]],
                 out_label: str = "OUT") -> None:
    """Refuse an OUT that writing would destroy data through, before any work is done.

    ``inputs`` are (how the user named it, path) of everything the run reads; entries that are
    not local paths (Hub ids) are skipped. Paths are compared resolved, so a symlink or ``..``
    cannot hide that OUT is, holds or lies inside an input; inside one is refused even when OUT
    is new, as the input folder would change under the user. An existing OUT is replaced only with
    ``overwrite`` and only when it is a moe-hub checkpoint or an empty folder: publishing removes
    the old OUT whole, so anything else in it would be lost."""
    refuse_overlap(out, inputs, out_label)
    _refuse_current_directory(out, out_label)
    removed = remove_stale_temporaries(out)
    if removed:
        from rich.console import Console

        Console(stderr=True).print(
            f"removed {len(removed)} temporary folder(s) of interrupted runs that no longer run: "
            f"{', '.join(p.name for p in removed)} (in {out.parent})", highlight=False,
            soft_wrap=True)
    target = out.resolve()
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise MoEHubError(f"{out} already exists: pass --overwrite to replace it")
    if out.is_symlink():
        # Publishing would replace the link, not the folder it names, and leave the old link
        # behind under a hidden name.
        raise MoEHubError(f"{out_label} {out} is a symbolic link: pass the folder it points to "
                          f"({target}) or another {out_label}")
    if target.is_dir() and (not any(target.iterdir()) or is_checkpoint_dir(target)):
        return
    kind = "a folder that is not a moe-hub checkpoint" if target.is_dir() else "not a folder"
    raise MoEHubError(f"{out_label} {out} is {kind}: --overwrite only replaces a moe-hub "
                      f"checkpoint or an empty folder, so pass another {out_label} or move "
                      f"{out} away yourself")


def dense_weight_files(dense_dir: Path, allow_pickle: bool, scratch: Path) -> list[Path]:
    """The base's safetensors shards in index order. Pickle-only bases are refused unless
    ``allow_pickle``; then each ``.bin`` is loaded with ``weights_only=True`` and re-saved as
    safetensors in ``scratch``."""
    index = dense_dir / INDEX_FILE
    if index.is_file():
        weight_map = read_weight_map(index, "BASE", "re-download the base model")
        files = [dense_dir / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MoEHubError(f"{dense_dir} lacks shard(s) {missing} named in its index: "
                              f"re-download the base model")
        return files
    single = dense_dir / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(dense_dir.glob("pytorch_model*.bin"))
    if pickles and not allow_pickle:
        raise MoEHubError(
            f"{dense_dir} has only pickle (.bin) weights, which can run code when loaded: pass "
            f"--allow-pickle if you trust their source"
        )
    if not pickles:
        raise MoEHubError(f"{dense_dir} has no weights (*.safetensors or pytorch_model*.bin)")
    scratch.mkdir(parents=True, exist_ok=True)
    converted = []
    for path in pickles:
        state = torch.load(path, map_location="cpu", weights_only=True)
        target = scratch / (path.stem + ".safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, target)
        converted.append(target)
        del state
    return converted


def write_index(directory: Path, weight_map: dict[str, str]) -> None:
    """Write the shard index. ``total_size`` counts each distinct file once."""
    total = sum((directory / name).stat().st_size for name in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _refuse_current_directory(out: Path, out_label: str) -> None:
    """OUT is replaced whole by a rename: the current directory (or one holding it) would vanish
    from under the shell that runs the command."""
    try:
        here = Path.cwd().resolve()
    except OSError:
        return
    target = out.resolve()
    if target == here or target in here.parents:
        where = "the current directory" if target == here else "a folder holding the current one"
        raise MoEHubError(f"{out_label} {out} is {where}: {out_label} must be a new folder "
                          f"(or a moe-hub checkpoint to replace with --overwrite) outside it")


#: Temporary siblings of OUT: ``.<OUT name>.<pid>-<8 hex>.partial`` / ``.scratch``.
_TEMPORARY = re.compile(r"^(\d+)-[0-9a-f]{8}\.(partial|scratch)$")


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` whose process no longer runs (a SIGKILL or a
    power cut skips their cleanup); return them. Live runs' and other users' folders stay."""
    from .run_checkpoints import pid_alive

    prefix = f".{out.name}."
    removed = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        match = _TEMPORARY.match(path.name[len(prefix):]) if path.name.startswith(prefix) \
            else None
        if match and path.is_dir() and not path.is_symlink() \
                and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _make_sibling_dir(out: Path, suffix: str) -> Path:
    """A new empty directory next to ``out``, with the mode the user's umask gives new folders
    (``tempfile.mkdtemp`` would make it 0700, and that mode would survive the rename into OUT).
    Its name holds this process's id, so a later run can tell a dead run's leftover."""
    for _ in range(100):
        candidate = out.parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise MoEHubError(f"cannot create a temporary folder next to {out}: clean up {out.parent}")


@contextmanager
def staging_dir(out: Path, suffix: str = ".partial") -> Iterator[Path]:
    """A temporary sibling of ``out`` (same filesystem, so the final rename is atomic), removed
    on any error, interrupt included."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _make_sibling_dir(out, suffix)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _give_files_the_umask_mode(staging: Path) -> None:
    """safetensors writes its files 0600; a checkpoint's files get the mode the user's umask
    gives new files, as its folder does (made by ``mkdir``, so 0777 minus the umask)."""
    file_mode = staging.stat().st_mode & 0o666
    for path in staging.iterdir():
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o666 != file_mode:
            path.chmod(file_mode)


def publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Move a finished ``staging`` directory to ``out``, replacing an old ``out`` only when
    ``overwrite`` (the old one is renamed aside first, so ``out`` is never half-written)."""
    _give_files_the_umask_mode(staging)
    sync_tree(staging)
    record_publish(staging, out)
    if out.exists():
        if not overwrite:
            raise MoEHubError(f"{out} appeared while writing it: pass --overwrite to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        try:
            os.replace(staging, out)
        except BaseException:
            # The new checkpoint could not move in: the old one goes back where it was, never
            # left behind under a hidden name.
            os.replace(old, out)
            raise
        sync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
        sync_dir(out.parent)
