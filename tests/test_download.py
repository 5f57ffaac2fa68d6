"""`python -m ovi download` against a loopback stand-in of the hub (tests/hub_server.py); nothing leaves 127.0.0.1."""

from __future__ import annotations

import hashlib
import logging
import random
import subprocess
import sys
from pathlib import Path

import pytest

from ovi.download import (
    DOWNLOAD_CHOICES,
    MMAUDIO_REPO,
    OVI_FP8_REPO,
    OVI_REPO,
    WAN_REPO,
    DownloadError,
    describe_plan,
    download_variant,
    main_download,
    plan_for_variant,
)

from hub_server import FakeHub  # tests/ is on sys.path (pytest rootdir-relative import)

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_loopback_only_test_token"
FUSION = {
    "720x720_5s": (OVI_REPO, "model.safetensors"),
    "720x720_5s_fp8": (OVI_FP8_REPO, "model_fp8_e4m3fn.safetensors"),
    "960x960_5s": (OVI_REPO, "model_960x960.safetensors"),
    "960x960_10s": (OVI_REPO, "model_960x960_10s.safetensors"),
}
TOKENIZER = ("special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json")
SHARED = [
    (WAN_REPO, "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.2-TI2V-5B"),
    (WAN_REPO, "google/umt5-xxl/*", "Wan2.2-TI2V-5B"),
    (WAN_REPO, "Wan2.2_VAE.pth", "Wan2.2-TI2V-5B"),
    (MMAUDIO_REPO, "ext_weights/v1-16.pth", "MMAudio"),
    (MMAUDIO_REPO, "ext_weights/best_netG.pt", "MMAudio"),
]
# Larger than huggingface_hub's 10 MB read chunk, so a cut mid-file leaves whole chunks on disk to resume from.
BIG = (WAN_REPO, "Wan2.2_VAE.pth")
BIG_SIZE = 12_600_000


def _blob(name: str, size: int) -> bytes:
    return random.Random(name).randbytes(size)


def _repos() -> dict[str, dict[str, bytes]]:
    ovi = {name: _blob(name, 3000 + i * 7) for i, (repo, name) in enumerate(FUSION.values()) if repo == OVI_REPO}
    wan = {
        "models_t5_umt5-xxl-enc-bf16.pth": _blob("t5", 5000),
        "Wan2.2_VAE.pth": _blob("vae", BIG_SIZE),
        "google/umt5-xxl/special_tokens_map.json": b'{"eos_token": "</s>"}',  # small: served by the hub itself
        "google/umt5-xxl/spiece.model": _blob("spiece", 2000),
        "google/umt5-xxl/tokenizer.json": b'{"version": "1.0"}',
        "google/umt5-xxl/tokenizer_config.json": b'{"model_max_length": 512}',
        # what the variant does not need
        "diffusion_pytorch_model-00001-of-00003.safetensors": _blob("dit", 900),
        "google/decoy/config.json": b"{}",
        "README.md": b"# Wan\n",
    }
    mm = {
        "ext_weights/v1-16.pth": _blob("v1-16", 1500),
        "ext_weights/best_netG.pt": _blob("netG", 1700),
        "ext_weights/v1-44.pth": _blob("v1-44", 1600),
        "weights/mmaudio_large_44k.pth": _blob("large", 1100),
    }
    return {
        OVI_REPO: {**ovi, "README.md": b"# Ovi\n"},
        OVI_FP8_REPO: {"model_fp8_e4m3fn.safetensors": _blob("fp8", 2500), "README.md": b"fp8\n"},
        WAN_REPO: wan,
        MMAUDIO_REPO: mm,
    }


def _expected_files(variant: str) -> dict[str, tuple[str, str]]:
    """Local path under dest -> (repo, path in repo)."""
    repo, name = FUSION[variant]
    out = {f"Ovi/{name}": (repo, name)}
    for tok in TOKENIZER:
        out[f"Wan2.2-TI2V-5B/google/umt5-xxl/{tok}"] = (WAN_REPO, f"google/umt5-xxl/{tok}")
    for repo, path, sub in SHARED:
        if "*" not in path:
            out[f"{sub}/{path}"] = (repo, path)
    return out


@pytest.fixture(scope="module")
def server():
    with FakeHub(_repos(), lifetime_s=120) as hub:
        yield hub


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    """The loopback hub, with huggingface_hub confined to it: own HF_HOME, online, no proxies, loopback-only client."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "HF_TOKEN",
                "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    import huggingface_hub.utils._detect_agent as detect_agent
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    for name, value in (("HF_HOME", str(tmp_path / "hf_home")), ("HF_HUB_CACHE", str(tmp_path / "hf_home/hub")),
                        ("HF_HUB_OFFLINE", False), ("HF_HUB_DISABLE_TELEMETRY", True),
                        ("AGENT_HARNESSES_PATH", str(tmp_path / "hf_home/agents.json"))):
        monkeypatch.setattr(constants, name, value)
    # build_hf_headers would otherwise fetch an agent registry from the default endpoint
    monkeypatch.setattr(detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})

    def loopback_only(request) -> None:
        if request.url.host not in ("127.0.0.1", "localhost"):
            raise RuntimeError(f"test tried to reach {request.url}")

    def client_factory():
        client = _http.default_client_factory()
        client.event_hooks = {**client.event_hooks, "request": [*client.event_hooks["request"], loopback_only]}
        return client

    _http.set_client_factory(client_factory)
    server.reset()
    yield server
    _http.set_client_factory(_http.default_client_factory)
    server.reset()


def _download(hub: FakeHub, variant: str, dest: Path, progress: bool = False, **kw) -> list[Path]:
    return download_variant(variant, dest, endpoint=hub.url, token=TOKEN, progress=progress, **kw)


def _check_tree(hub: FakeHub, variant: str, dest: Path, paths: list[Path]) -> None:
    expected = _expected_files(variant)
    assert sorted(p.relative_to(dest).as_posix() for p in paths) == sorted(expected)
    on_disk = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert on_disk == sorted(expected)  # no decoys, no partial files, no hub metadata folders
    for rel, (repo, path) in expected.items():
        assert (dest / rel).read_bytes() == hub.repos[repo][path].data, rel


# the plan


@pytest.mark.parametrize("variant", list(FUSION))
def test_plan_is_exactly_what_the_variant_needs(variant):
    plan = plan_for_variant(variant)
    repo, name = FUSION[variant]
    assert [(i.repo_id, i.pattern, i.subfolder) for i in plan] == [(repo, name, "Ovi"), *SHARED]
    assert len({i.role for i in plan}) == len(plan)


def test_plan_fp8_flag_and_the_fusion_files_of_other_variants():
    assert plan_for_variant("720x720_5s", fp8=True) == plan_for_variant("720x720_5s_fp8")
    names = {v: {i.pattern for i in plan_for_variant(v)} for v in FUSION}
    assert "model.safetensors" not in names["960x960_10s"] and "model_960x960.safetensors" not in names["960x960_10s"]
    assert "model.safetensors" not in names["720x720_5s_fp8"]
    assert "model_960x960_10s.safetensors" not in names["720x720_5s"]
    with pytest.raises(ValueError, match="only supported for 720x720_5s"):
        plan_for_variant("960x960_10s", fp8=True)


def test_unknown_variant_lists_the_choices(caplog, tmp_path):
    with pytest.raises(ValueError) as err:
        plan_for_variant("1080x1080_5s")
    assert "1080x1080_5s" in str(err.value)
    for choice in ("720x720_5s", "720x720_5s_fp8", "960x960_5s", "960x960_10s"):
        assert choice in str(err.value) and choice in DOWNLOAD_CHOICES
    caplog.set_level(logging.INFO, logger="ovi")
    assert main_download(["--variant", "1080x1080_5s", "--dest", str(tmp_path)]) == 2
    assert "valid choices: 720x720_5s, 960x960_5s, 960x960_10s, 720x720_5s_fp8" in caplog.text
    assert main_download(["--variant", "960x960_5s", "--fp8", "--dest", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())


def test_import_does_not_need_huggingface_hub():
    code = "import sys, ovi.download; assert 'huggingface_hub' not in sys.modules, 'imported eagerly'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=600)


# downloads


@pytest.mark.parametrize("variant", list(FUSION))
def test_download_variant_lands_the_right_bytes(hub, tmp_path, variant, caplog):
    caplog.set_level(logging.INFO, logger="ovi")
    dest = tmp_path / "ckpts"
    _check_tree(hub, variant, dest, _download(hub, variant, dest))
    # one GET per file, none for what the variant does not need
    got = sorted(h.key for h in hub.gets() if h.server == "cdn" or h.status == 200)
    assert got == sorted(f"{r}/{p}" for r, p in _expected_files(variant).values())
    for rel in _expected_files(variant):
        assert f"[Ovi] {rel} " in caplog.text
    assert caplog.text.count(" downloaded\n") == len(_expected_files(variant))
    # the token goes to the hub, never to the CDN the hub redirects to
    assert all(h.auth for h in hub.hits if h.server == "hub")
    cdn = [h for h in hub.hits if h.server == "cdn"]
    assert cdn and not any(h.auth for h in cdn)


def test_rerun_skips_present_files(hub, tmp_path, caplog):
    dest = tmp_path / "ckpts"
    first = _download(hub, "960x960_10s", dest)
    mtimes = {p: p.stat().st_mtime_ns for p in first}
    hub.reset()
    caplog.set_level(logging.INFO, logger="ovi")
    second = _download(hub, "960x960_10s", dest)
    assert second == first
    assert hub.gets() == []  # nothing fetched again, not even a redirect
    assert {p: p.stat().st_mtime_ns for p in second} == mtimes
    assert caplog.text.count(" skipped\n") == len(first) and " downloaded\n" not in caplog.text
    assert "[Ovi] Ovi/model_960x960_10s.safetensors 3.02 kB skipped" in caplog.text


def test_connection_dropped_once_resumes_with_range(hub, tmp_path):
    key = "/".join(BIG)
    hub.drop_after[key] = 11_000_000
    dest = tmp_path / "ckpts"
    _check_tree(hub, "720x720_5s", dest, _download(hub, "720x720_5s", dest, progress=True))  # bars survive the retry
    gets = hub.gets(key)
    cdn = [h for h in gets if h.server == "cdn"]
    assert [h.range for h in cdn] == [None, "bytes=10485760-"]
    assert cdn[1].status == 206


def test_interrupted_run_resumes_on_rerun(hub, tmp_path):
    key = "/".join(BIG)
    hub.drop_after[key] = 11_000_000
    hub.fail_next[key] = 1  # the in-run retry fails too: the run stops
    dest = tmp_path / "ckpts"
    stale = dest / "Wan2.2-TI2V-5B" / "Wan2.2_VAE.pth.0123456789abcdef.incomplete"  # from an older upload
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old bytes")
    with pytest.raises(DownloadError, match=r"Wan2.2-TI2V-5B/Wan2.2_VAE.pth.*run the same command again to resume"):
        _download(hub, "960x960_5s", dest)
    partial = list(stale.parent.glob("Wan2.2_VAE.pth.*.incomplete"))
    assert not stale.exists() and len(partial) == 1 and partial[0].stat().st_size == 10485760
    assert not (dest / "Wan2.2-TI2V-5B" / "Wan2.2_VAE.pth").exists()
    done_before = {h.key for h in hub.gets() if h.key != key}
    assert f"{OVI_REPO}/model_960x960.safetensors" in done_before

    hub.reset()
    paths = _download(hub, "960x960_5s", dest)
    _check_tree(hub, "960x960_5s", dest, paths)
    assert [h.range for h in hub.gets(key) if h.server == "cdn"] == ["bytes=10485760-"]
    assert not done_before & {h.key for h in hub.gets()}  # finished files are not fetched again
    vae = (dest / "Wan2.2-TI2V-5B" / "Wan2.2_VAE.pth").read_bytes()
    assert hashlib.sha256(vae).hexdigest() == hub.repos[WAN_REPO]["Wan2.2_VAE.pth"].sha256


def test_hub_size_that_does_not_match_the_bytes_is_an_error(hub, tmp_path):
    hub.size_offset[f"{WAN_REPO}/models_t5_umt5-xxl-enc-bf16.pth"] = 5
    dest = tmp_path / "ckpts"
    with pytest.raises(DownloadError) as err:
        _download(hub, "720x720_5s", dest)
    msg = str(err.value)
    assert "Wan2.2-TI2V-5B/models_t5_umt5-xxl-enc-bf16.pth" in msg and "5005 bytes" in msg and "5000 bytes" in msg
    assert "re-run" in msg
    t5 = dest / "Wan2.2-TI2V-5B" / "models_t5_umt5-xxl-enc-bf16.pth"
    assert not t5.exists() and not list(t5.parent.glob("*.incomplete"))


def test_small_file_size_mismatch_is_an_error(hub, tmp_path):
    hub.size_offset[f"{WAN_REPO}/google/umt5-xxl/tokenizer.json"] = -3  # a file the hub serves itself
    with pytest.raises(DownloadError, match=r"google/umt5-xxl/tokenizer.json.*15 bytes.*18 bytes arrived"):
        _download(hub, "960x960_5s", tmp_path / "ckpts")


def test_local_file_of_wrong_size_stops_before_downloading(hub, tmp_path, caplog):
    dest = tmp_path / "ckpts"
    bad = dest / "MMAudio" / "ext_weights" / "best_netG.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"truncated")
    with pytest.raises(DownloadError) as err:
        _download(hub, "960x960_10s", dest)
    assert str(bad) in str(err.value) and "9 bytes" in str(err.value) and "1700 bytes" in str(err.value)
    assert f"delete {bad} and re-run" in str(err.value)
    assert hub.gets() == []
    caplog.set_level(logging.INFO, logger="ovi")
    assert main_download(["--variant", "960x960_10s", "--dest", str(dest), "--endpoint", hub.url, "--no-progress"]) == 1
    assert f"delete {bad} and re-run" in caplog.text


def test_dry_run_lists_sizes_and_downloads_nothing(hub, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ovi")
    dest = tmp_path / "ckpts"
    assert main_download(["--variant", "720x720_5s_fp8", "--dest", str(dest), "--endpoint", hub.url, "--dry-run"]) == 0
    assert hub.gets() == [] and not dest.exists()
    assert "[Ovi] Ovi/model_fp8_e4m3fn.safetensors 2.50 kB missing" in caplog.text
    assert "[Ovi] Wan2.2-TI2V-5B/Wan2.2_VAE.pth 12.60 MB missing" in caplog.text
    assert "Wan2.2-TI2V-5B/google/umt5-xxl/spiece.model 2.00 kB missing" in caplog.text
    assert "plan: 9 files, 12.61 MB" in caplog.text

    _download(hub, "720x720_5s", dest, fp8=True)
    rows = describe_plan("720x720_5s_fp8", dest, endpoint=hub.url, token=TOKEN)
    assert [state for _, _, state in rows] == ["ok"] * 9
    assert {rel for rel, _, _ in rows} == set(_expected_files("720x720_5s_fp8"))


@pytest.mark.parametrize("case", ["range", "range ignored", "complete"])
def test_partial_file_from_an_earlier_run_is_continued(hub, tmp_path, case):
    key = f"{WAN_REPO}/models_t5_umt5-xxl-enc-bf16.pth"
    f = hub.repos[WAN_REPO]["models_t5_umt5-xxl-enc-bf16.pth"]
    have = len(f.data) if case == "complete" else 1000
    dest = tmp_path / "ckpts"
    part = dest / "Wan2.2-TI2V-5B" / f"models_t5_umt5-xxl-enc-bf16.pth.{f.sha256[:16]}.incomplete"
    part.parent.mkdir(parents=True)
    part.write_bytes(f.data[:have])
    if case == "range ignored":
        hub.no_range.add(key)
    _check_tree(hub, "960x960_10s", dest, _download(hub, "960x960_10s", dest))
    gets = [(h.range, h.status) for h in hub.gets(key)]
    assert gets == {"range": [("bytes=1000-", 206)], "range ignored": [("bytes=1000-", 200)], "complete": []}[case]
