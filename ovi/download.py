"""`python -m ovi download`: fetch exactly the checkpoint files one Ovi variant needs, resumable and size-checked.

The layout is the official downloader's (`<dest>/Ovi/`, `<dest>/Wan2.2-TI2V-5B/`, `<dest>/MMAudio/`), so a folder
filled by either tool works with the other. huggingface_hub is imported inside the functions: the node pack must
import without it.

Why not `hf_hub_download`: in huggingface_hub 2.4 it downloads into a per-process temporary file and deletes it when
the transfer fails, so an interrupted 23 GB fusion checkpoint would start again from zero. Here each file streams
into `<file>.<etag>.incomplete` beside its target through the hub's own `http_get` (Range requests, retries,
progress bars); a rerun continues from the bytes already on disk, and the etag in the name keeps a partial file
of an older upload from being extended with bytes of a newer one.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import inspect
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

from .log import log
from .variants import FP8_ONLY_MESSAGE, VARIANTS, VariantSpec, variant_spec

OVI_REPO = "chetwinlow1/Ovi"
OVI_FP8_REPO = "rkfg/Ovi-fp8_quantized"
WAN_REPO = "Wan-AI/Wan2.2-TI2V-5B"
MMAUDIO_REPO = "hkchengrex/MMAudio"
REVISION = "main"
DEFAULT_DEST = "./ckpts"
FP8_SUFFIX = "_fp8"
PARTIAL_SUFFIX = ".incomplete"

# Every choice `--variant` accepts: the plain variants plus "<name>_fp8" where an fp8 file exists.
DOWNLOAD_CHOICES: tuple[str, ...] = tuple(VARIANTS) + tuple(
    f"{v.name}{FP8_SUFFIX}" for v in VARIANTS.values() if v.fp8_checkpoint
)


class DownloadError(RuntimeError):
    """A download that cannot finish as asked; the message names the file and what to do."""


@dataclass(frozen=True)
class DownloadItem:
    repo_id: str
    pattern: str  # a path in the repo, or an fnmatch pattern for a folder's files
    subfolder: str  # folder under the destination; the repo path is kept below it
    role: str

    @property
    def is_pattern(self) -> bool:
        return any(c in self.pattern for c in "*?[")


@dataclass(frozen=True)
class RemoteFile:
    """One file of the plan, resolved against the hub listing."""

    item: DownloadItem
    path: str
    size: int | None  # what the hub lists; None only when it lists no size

    @property
    def repo_id(self) -> str:
        return self.item.repo_id

    @property
    def relpath(self) -> str:
        return f"{self.item.subfolder}/{self.path}"

    def local_path(self, dest: str | os.PathLike) -> Path:
        return Path(dest).joinpath(self.item.subfolder, *self.path.split("/"))


SHARED_ITEMS: tuple[DownloadItem, ...] = (
    DownloadItem(WAN_REPO, "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.2-TI2V-5B", "umT5-XXL text encoder"),
    DownloadItem(WAN_REPO, "google/umt5-xxl/*", "Wan2.2-TI2V-5B", "umT5 tokenizer"),
    DownloadItem(WAN_REPO, "Wan2.2_VAE.pth", "Wan2.2-TI2V-5B", "Wan2.2 video VAE"),
    DownloadItem(MMAUDIO_REPO, "ext_weights/v1-16.pth", "MMAudio", "MMAudio audio VAE"),
    DownloadItem(MMAUDIO_REPO, "ext_weights/best_netG.pt", "MMAudio", "BigVGAN vocoder"),
)


def resolve_variant(variant: str | None, fp8: bool = False) -> VariantSpec:
    """`variant` as `--variant` takes it ("720x720_5s_fp8" is "720x720_5s" with fp8); unknown names list the choices."""
    name = "" if variant is None else str(variant).strip()
    if name.endswith(FP8_SUFFIX) and name[: -len(FP8_SUFFIX)] in VARIANTS:
        name, fp8 = name[: -len(FP8_SUFFIX)], True
    if name not in VARIANTS:
        shown = repr(variant) if variant else "none given"
        raise ValueError(f"unknown Ovi variant ({shown}); valid choices: {', '.join(DOWNLOAD_CHOICES)}")
    if fp8 and not VARIANTS[name].fp8_checkpoint:
        raise ValueError(f"{FP8_ONLY_MESSAGE} Valid choices: {', '.join(DOWNLOAD_CHOICES)}")
    return variant_spec(name, fp8)


def plan_for_variant(variant: str | None, fp8: bool = False) -> list[DownloadItem]:
    """The files one variant needs: its fusion checkpoint, then the shared text encoder, tokenizer, VAEs, vocoder."""
    spec = resolve_variant(variant, fp8)
    repo = OVI_FP8_REPO if spec.fp8 else OVI_REPO
    kind = "fp8 fusion" if spec.fp8 else "fusion"
    fusion = DownloadItem(repo, spec.checkpoint_basename, "Ovi", f"Ovi {spec.variant.name} {kind} model")
    return [fusion, *SHARED_ITEMS]


def _hub_endpoint(endpoint: str | None) -> str | None:
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    return endpoint.rstrip("/") if endpoint else None


def _listed_size(sibling) -> int | None:
    lfs = getattr(sibling, "lfs", None)
    if lfs:
        size = getattr(lfs, "size", None)
        if size is None and isinstance(lfs, dict):
            size = lfs.get("size")
        if size is not None:
            return int(size)
    size = getattr(sibling, "size", None)
    return None if size is None else int(size)


def _require_online() -> None:
    try:
        from huggingface_hub import constants
    except ImportError as e:
        raise DownloadError("downloading needs huggingface_hub: pip install 'huggingface_hub>=0.20'") from e

    if constants.HF_HUB_OFFLINE:
        raise DownloadError("HF_HUB_OFFLINE is set, so the hub cannot be reached: unset it (or set it to 0)")


def resolve_plan(
    items: Sequence[DownloadItem], *, endpoint: str | None = None, token: str | bool | None = None
) -> tuple[list[RemoteFile], dict[str, str]]:
    """The plan's files with the sizes the hub lists, and each repo's commit (downloads are pinned to it)."""
    from huggingface_hub import HfApi

    endpoint = _hub_endpoint(endpoint)
    api = HfApi(endpoint=endpoint, token=token)
    listings: dict[str, dict] = {}
    commits: dict[str, str] = {}
    files: list[RemoteFile] = []
    for item in items:
        if item.repo_id not in listings:
            try:
                info = api.model_info(item.repo_id, revision=REVISION, files_metadata=True)
            except Exception as e:
                raise DownloadError(
                    f"cannot list {item.repo_id} on {endpoint or 'the Hugging Face Hub'}: {_first_line(e)}. Check the "
                    "connection; for a mirror pass --endpoint or set HF_ENDPOINT; for a private copy set HF_TOKEN"
                ) from e
            listings[item.repo_id] = {s.rfilename: s for s in (info.siblings or [])}
            commits[item.repo_id] = info.sha or REVISION
        listing = listings[item.repo_id]
        if item.is_pattern:
            names = sorted(n for n in listing if fnmatch.fnmatchcase(n, item.pattern))
        else:
            names = [item.pattern] if item.pattern in listing else []
        if not names:
            raise DownloadError(
                f"{item.repo_id} (commit {commits[item.repo_id][:12]}) has no file matching {item.pattern!r} "
                f"({item.role}); the repository layout has changed, please report it"
            )
        files.extend(RemoteFile(item, n, _listed_size(listing[n])) for n in names)
    return files, commits


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def human_size(n: int | None) -> str:
    if n is None:
        return "size?"
    if n < 1000:
        return f"{n} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


def _wrong_size_message(rf: RemoteFile, path: Path, have: int) -> str:
    return (
        f"{path} is {have} bytes but the hub lists {rf.size} bytes for {rf.repo_id}/{rf.path}: "
        f"delete {path} and re-run the download"
    )


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


def _http_get_kwargs(http_get, progress: bool) -> dict:
    if progress:
        return {}
    if "tqdm_class" not in inspect.signature(http_get).parameters:
        return {}  # older huggingface_hub: its bars follow HF_HUB_DISABLE_PROGRESS_BARS only
    from huggingface_hub.utils import silent_tqdm

    return {"tqdm_class": silent_tqdm}


def _fetch(
    rf: RemoteFile, target: Path, commit: str, *, endpoint: str | None, token: str | bool | None, progress: bool
) -> None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(rf.repo_id, rf.path, revision=commit, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, token=token)
    except Exception as e:
        raise DownloadError(f"cannot reach {url} for {rf.relpath}: {_first_line(e)}") from e
    size = rf.size if rf.size is not None else meta.size
    if rf.size is not None and meta.size is not None and meta.size != rf.size:
        raise DownloadError(
            f"the hub lists {rf.size} bytes for {rf.repo_id}/{rf.path} but serves {meta.size}: "
            f"the repository is changing under us, re-run the download in a moment"
        )

    tag = re.sub(r"[^0-9A-Za-z]", "", meta.etag or "")[:16] or "unknown"
    part = target.with_name(f"{target.name}.{tag}{PARTIAL_SUFFIX}")
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{glob.escape(target.name)}.*{PARTIAL_SUFFIX}"):
        if stale != part:  # a partial of an older upload: its bytes cannot be continued
            stale.unlink()
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if have:
        log.info(f"{rf.relpath}: resuming at {human_size(have)} of {human_size(size)}")

    headers = build_hf_headers(token=token)
    headers["Accept-Encoding"] = "identity"  # byte offsets of a compressed stream would not match the file
    location = meta.location or url
    if _origin(location) != _origin(url):
        headers.pop("authorization", None)  # signed CDN url: the hub token stays with the hub
    if size is None or have < size:
        try:
            with open(part, "ab") as f:
                http_get(location, f, resume_size=have, headers=headers, displayed_filename=rf.relpath,
                         **_http_get_kwargs(http_get, progress))
        except KeyboardInterrupt:
            log.warning(f"{rf.relpath}: interrupted; run the same command again to resume")
            raise
        except Exception as e:
            got = part.stat().st_size if part.exists() else 0
            raise DownloadError(
                f"download of {rf.relpath} stopped at {human_size(got)} of {human_size(size)} ({_first_line(e)}); "
                "run the same command again to resume from there"
            ) from e
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise DownloadError(
            f"{rf.relpath}: the hub lists {size} bytes for {rf.repo_id}/{rf.path} but {got} bytes arrived; "
            f"the partial file was deleted, re-run the download (if it happens again the hub copy is inconsistent)"
        )
    os.replace(part, target)


def _check_local(files: Sequence[RemoteFile], dest: Path) -> dict[RemoteFile, bool]:
    """Which files are already present; a present file of the wrong size stops the run before any download."""
    present, wrong = {}, []
    for rf in files:
        path = rf.local_path(dest)
        present[rf] = path.is_file()
        if present[rf] and rf.size is not None and path.stat().st_size != rf.size:
            wrong.append(_wrong_size_message(rf, path, path.stat().st_size))
    if wrong:
        raise DownloadError("size mismatch:\n  " + "\n  ".join(wrong))
    return present


def download_variant(
    variant: str | None,
    dest: str | os.PathLike = DEFAULT_DEST,
    *,
    fp8: bool = False,
    endpoint: str | None = None,
    token: str | bool | None = None,
    progress: bool = True,
) -> list[Path]:
    """Fetch what `variant` needs into `dest`; files already there with the hub's size are kept. Returns every path."""
    items = plan_for_variant(variant, fp8)
    dest = Path(dest).expanduser().absolute()
    endpoint = _hub_endpoint(endpoint)
    _require_online()
    files, commits = resolve_plan(items, endpoint=endpoint, token=token)
    present = _check_local(files, dest)

    missing = sum(rf.size or 0 for rf in files if not present[rf])
    if missing:
        dest.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dest).free
        if free < missing:
            log.warning(f"{dest} has {human_size(free)} free but up to {human_size(missing)} remain to download")

    paths, fetched = [], 0
    for rf in files:
        target = rf.local_path(dest)
        if present[rf]:
            log.info(f"{rf.relpath} {human_size(rf.size)} skipped")
        else:
            _fetch(rf, target, commits[rf.repo_id], endpoint=endpoint, token=token, progress=progress)
            got = target.stat().st_size
            if rf.size is not None and got != rf.size:
                raise DownloadError(_wrong_size_message(rf, target, got))
            fetched += 1
            log.info(f"{rf.relpath} {human_size(got)} downloaded")
        paths.append(target)
    total = sum(p.stat().st_size for p in paths)
    log.info(f"{len(paths)} files, {human_size(total)} in {dest} ({fetched} downloaded, {len(paths) - fetched} "
             "already present)")
    return paths


def describe_plan(
    variant: str | None,
    dest: str | os.PathLike = DEFAULT_DEST,
    *,
    fp8: bool = False,
    endpoint: str | None = None,
    token: str | bool | None = None,
) -> list[tuple[str, int | None, str]]:
    """(local path under dest, size, state) per file, logged; sizes come from the hub when it can be reached."""
    items = plan_for_variant(variant, fp8)
    dest = Path(dest).expanduser().absolute()
    endpoint = _hub_endpoint(endpoint)
    try:
        _require_online()
        files, _ = resolve_plan(items, endpoint=endpoint, token=token)
    except DownloadError as e:
        log.warning(f"sizes unavailable: {e}")
        files = [RemoteFile(i, i.pattern, None) for i in items]
    rows = []
    for rf in files:
        path = rf.local_path(dest)
        if rf.item.is_pattern and rf.path == rf.item.pattern:
            state = "folder, files unknown"
        elif not path.is_file():
            state = "missing"
        elif rf.size is None or path.stat().st_size == rf.size:
            state = "ok"
        else:
            state = f"wrong size ({path.stat().st_size} bytes here): delete it and re-run"
        rows.append((rf.relpath, rf.size, state))
        log.info(f"{rf.relpath} {human_size(rf.size)} {state}  [{rf.repo_id}: {rf.item.role}]")
    known = [s for _, s, _ in rows if s is not None]
    log.info(f"plan: {len(rows)} files, {human_size(sum(known)) if known else 'size unknown'} into {dest}")
    return rows


def add_download_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--variant", help=f"which model to fetch: {', '.join(DOWNLOAD_CHOICES)}")
    parser.add_argument("--fp8", action="store_true", help="the fp8 fusion checkpoint (720x720_5s only)")
    parser.add_argument("--dest", default=DEFAULT_DEST, help=f"checkpoint folder (default {DEFAULT_DEST})")
    parser.add_argument("--endpoint", default=None, help="hub endpoint or mirror (default: $HF_ENDPOINT, else the Hub)")
    parser.add_argument("--token", default=None, help="hub token (default: $HF_TOKEN or the saved login)")
    parser.add_argument("--dry-run", action="store_true", help="list the files and their sizes, download nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ovi download", description="Fetch one Ovi variant's checkpoints.")
    return add_download_arguments(parser)


def _ensure_console_logging() -> None:
    # Run as a command with nobody configuring logging, INFO lines would vanish; a host's own setup is left alone.
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)


def main_download(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    """CLI entry: 0 on success, 1 when a download fails, 2 for a bad variant choice, 130 when interrupted."""
    args = argv if isinstance(argv, argparse.Namespace) else build_parser().parse_args(argv)
    _ensure_console_logging()
    variant, fp8 = getattr(args, "variant", None), bool(getattr(args, "fp8", False))
    dest = getattr(args, "dest", None) or DEFAULT_DEST
    endpoint, token = getattr(args, "endpoint", None), getattr(args, "token", None)
    try:
        resolve_variant(variant, fp8)
    except ValueError as e:
        log.error(str(e))
        return 2
    try:
        if getattr(args, "dry_run", False):
            describe_plan(variant, dest, fp8=fp8, endpoint=endpoint, token=token)
        else:
            download_variant(variant, dest, fp8=fp8, endpoint=endpoint, token=token,
                             progress=not getattr(args, "no_progress", False))
    except DownloadError as e:
        log.error(str(e))
        return 1
    except KeyboardInterrupt:
        return 130  # the partial file stays; the interrupted download already said how to resume
    return 0
