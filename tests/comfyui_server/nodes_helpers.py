"""Helpers for the Ovi node tests (tests/comfyui_server/test_nodes_*.py): the documented node interface, the shipped
workflows rewritten to the tiny checkpoint, a websocket listener for ComfyUI's progress messages, checks on the
mp4 files, and model files of the kinds the loaders must refuse."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import re
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from .harness import ROOT, STOP_BOUND, WAIT_BOUND, ComfyServer

WORKFLOWS = ROOT / "workflows"
PACK_MODULE_PREFIX = "custom_nodes."

# The node reference (README "ComfyUI nodes"): required and optional inputs in order, and the outputs.
NODES = {
    "OviComponentLoader": (["text_encoder", "video_vae", "audio_vae", "vocoder"], [], ["OVI_COMPONENTS"]),
    "OviEngineLoader": (["model", "components", "variant", "precision", "memory_mode", "block_swap_layers",
                         "attention"], ["compile"], ["OVI_ENGINE"]),
    "OviSampler": (["engine", "prompt", "video_negative_prompt", "audio_negative_prompt", "width", "height", "seed",
                    "steps", "solver", "shift", "video_guidance", "audio_guidance", "slg_layer"],
                   ["image", "cache_threshold", "audio", "video", "video_frames", "video_fps", "overlap"], ["LATENT"]),
    "OviDecode": (["engine", "latent", "tile_size", "tile_overlap", "vae_precision"], [],
                  ["IMAGE", "AUDIO", "FLOAT", "VIDEO"]),
    "OviSaveLatent": (["latent", "filename_prefix"], [], []),
    "OviLoadLatent": (["latent"], [], ["LATENT"]),
    "OviSaveVideo": (["fps", "filename_prefix", "crf"], ["images", "audio", "latent", "engine"], []),
    "OviExtend": (["engine", "latent", "prompt", "seed", "overlap"],
                  ["steps", "solver", "shift", "video_guidance", "audio_guidance", "video_mode", "audio_mode"],
                  ["LATENT"]),
    "OviConvertModel": (["source", "target", "output_name"], [], ["STRING"]),
    "OviLora": (["engine", "lora_name", "strength_video", "strength_audio"], [], ["OVI_ENGINE"]),
}
# (target, source, written file) relative to the make_tiny output: the names the FP8 / GGUF workflows load.
CONVERTED = (
    ("fp8", "Ovi/model_960x960_10s.safetensors", "Ovi/model_960x960_10s_fp8_e4m3fn_scaled.safetensors"),
    ("gguf-q4_k", "Ovi/model_960x960_10s.safetensors", "Ovi/Ovi-960x960-10s-Q4_K.gguf"),
    ("gguf-q8_0", "text_encoders/umt5_xxl_fp16.safetensors", "text_encoders/umt5-xxl-encoder-Q8_0.gguf"),
)
# The FastWan workflow's LoRA, by its real name; the server tests place a tiny Wan-convention LoRA under it.
FASTWAN_LORA = "Wan2_2_5B_FastWanFullAttn_lora_rank_128_bf16.safetensors"
API_WORKFLOWS = sorted(p.name for p in WORKFLOWS.glob("*_api.json"))
UI_WORKFLOWS = sorted(p.name for p in WORKFLOWS.glob("*.json") if not p.name.endswith("_api.json"))
TEST_SIZE = (96, 64)  # width, height: small, both multiples of 32, not square (catches swapped axes)
TEST_STEPS = 2
FOLDERS = {"text_encoder": "text_encoders", "video_vae": "vae", "audio_vae": "mmaudio", "vocoder": "mmaudio"}


COMPONENTS = {"text_encoder": "umt5_xxl_fp16.safetensors", "video_vae": "wan2.2_vae.safetensors",
              "audio_vae": "v1-16.pth", "vocoder": "best_netG.pt"}


def graph(tag: str, *, model="model.safetensors", components=None, engine=None, sampler=None, decode=True) -> dict:
    """Loader -> engine -> sampler (-> decode -> OviSaveVideo), or -> OviSaveLatent with decode=False."""
    api = {
        "1": {"class_type": "OviComponentLoader", "inputs": {**COMPONENTS, **(components or {})}},
        "2": {"class_type": "OviEngineLoader", "inputs": {
            "model": model, "components": ["1", 0], "variant": "auto", "precision": "auto", "memory_mode": "auto",
            "block_swap_layers": 0, "attention": "auto", **(engine or {})}},
        "3": {"class_type": "OviSampler", "inputs": {
            "engine": ["2", 0], "prompt": "A dog barks at a passing bus. Audio: barking, engine noise",
            "video_negative_prompt": "blur", "audio_negative_prompt": "muffled", "width": 96, "height": 64,
            "seed": 5, "steps": 2, "solver": "unipc", "shift": 5.0, "video_guidance": 4.0, "audio_guidance": 3.0,
            "slg_layer": 1, **(sampler or {})}},
    }
    if decode:
        api["4"] = {"class_type": "OviDecode", "inputs": {"engine": ["2", 0], "latent": ["3", 0], "tile_size": 0,
                                                           "tile_overlap": 8, "vae_precision": "auto"}}
        api["5"] = {"class_type": "OviSaveVideo", "inputs": {"images": ["4", 0], "audio": ["4", 1], "fps": ["4", 2],
                                                             "filename_prefix": f"nodes/{tag}", "crf": 18}}
    else:
        api["5"] = {"class_type": "OviSaveLatent", "inputs": {"latent": ["3", 0], "filename_prefix": f"latents/{tag}"}}
    return api


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def tiny_api(api: dict, models: dict[str, list[str]], tag: str, image: str | None = None, audio: str | None = None,
             video: str | None = None) -> dict:
    """A shipped API workflow made cheap: every file it names must be one the tiny set provides (make_tiny writes
    the real file names), 2 steps, 96x64, SLG on the tiny model's layer 1, output prefixes tagged so each run
    writes new files; Load Image / Load Audio / Load Video read the given input files."""
    api = copy.deepcopy(api)
    for node_id, node in api.items():
        ins, kind = node["inputs"], node["class_type"]
        if kind == "OviComponentLoader":
            for key, folder in FOLDERS.items():
                assert ins[key] in models[folder], f"{key} {ins[key]!r} is not a file the tiny set provides"
        elif kind == "OviEngineLoader":
            assert ins["model"] in models["diffusion_models"], ins["model"]
        elif kind == "OviLora":
            assert ins["lora_name"] in models.get("loras", []), f"LoRA {ins['lora_name']!r} is not one the tests place"
        elif kind == "OviSampler":
            ins.update(steps=TEST_STEPS, width=TEST_SIZE[0], height=TEST_SIZE[1], slg_layer=1)
        elif kind == "LoadImage":
            assert image is not None, "this workflow loads an image: pass one"
            ins["image"] = image
        elif kind == "LoadAudio":
            assert audio is not None, "this workflow loads audio: pass a file"
            ins["audio"] = audio
        elif kind == "LoadVideo":
            assert video is not None, "this workflow loads a video: pass a file"
            ins["file"] = video
        if isinstance(ins.get("filename_prefix"), str):
            folder, _, base = ins["filename_prefix"].rpartition("/")
            ins["filename_prefix"] = f"{folder + '/' if folder else ''}{tag}_{base}"
    return api


def variant_of(api: dict) -> str:
    """The variant the workflow's fusion file is (the tiny files carry it in their header, the name says it too)."""
    from ovi.variants import known_file

    (model,) = [n["inputs"]["model"] for n in api.values() if n["class_type"] == "OviEngineLoader"]
    return known_file(model).variant


def png(width: int, height: int) -> bytes:
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * y) % 256], -1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def check_clip(path: Path, variant: str, size: tuple[int, int] = TEST_SIZE, frames: int | None = None,
               samples: int | None = None) -> dict:
    """The mp4 has one H.264 video and one AAC audio stream with the variant's frame count (or ``frames``), frame
    size and durations (video T/fps, audio N/16000 (or ``samples``) within one AAC frame). Returns the probe."""
    from ovi.variants import VARIANTS
    from ovi.video_io import probe_mp4

    v = VARIANTS[variant]
    frames = v.video_frames if frames is None else frames
    samples = v.audio_samples if samples is None else samples
    info = probe_mp4(path)
    kinds = sorted(s["type"] for s in info["streams"])
    assert kinds == ["audio", "video"], (path, info["streams"])
    video, audio = info["video"], info["audio"]
    assert video["codec"] == "h264" and (video["width"], video["height"]) == size, video
    assert video["frames"] == frames, (video, frames)
    assert abs(video["duration"] - frames / v.fps) < 1.5 / v.fps, video
    assert audio["codec"] == "aac" and audio["sample_rate"] == v.sample_rate, audio
    assert abs(audio["duration"] - samples / v.sample_rate) <= 1024 / v.sample_rate, (audio, samples)
    return info


def clip_length(api: dict, variant: str, audio_seconds: float, video_frames_24fps: int) -> tuple[int, int]:
    """(frames, samples) the workflow's clip lasts: one window per sampler and Ovi Extend on the way to the
    output, or as long as the audio / video it loads (windows of the variant, ``ovi.long_clip.plan``)."""
    from ovi.long_clip.plan import plan_clip

    kinds = [n["class_type"] for n in api.values()]
    (sampler,) = [n["inputs"] for n in api.values() if n["class_type"] == "OviSampler"]
    overlap = float(sampler.get("overlap", 1.0))
    extends = [n["inputs"] for n in api.values() if n["class_type"] == "OviExtend"]
    if "LoadAudio" in kinds:
        plan = plan_clip(variant, duration=audio_seconds, overlap=overlap)
    elif "LoadVideo" in kinds:
        plan = plan_clip(variant, duration=video_frames_24fps / 24, overlap=overlap)
    else:
        assert {float(e["overlap"]) for e in extends} <= {overlap}, extends
        plan = plan_clip(variant, windows=1 + len(extends), overlap=overlap)
    return plan.frames, plan.samples


def decoding_node(api: dict) -> str:
    """The id of the node that decodes the latent: Ovi Decode, or Ovi Save Video given the latent."""
    (node_id,) = [k for k, n in api.items() if n["class_type"] == "OviDecode"
                  or (n["class_type"] == "OviSaveVideo" and "latent" in n["inputs"])]
    return node_id


def wav(seconds: float, rate: int = 44100, channels: int = 2) -> bytes:
    """A 16-bit PCM wav: a 220 Hz tone with a slow 3 Hz swell (a voice-like envelope) and a little noise."""
    import wave

    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    rng = np.random.default_rng(7)
    mono = 0.4 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(n)
    pcm = (np.clip(np.stack([mono] * channels, -1), -1, 1) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def silent_mp4(path: Path, seconds: float, fps: float = 30, size: tuple[int, int] = (160, 120)) -> Path:
    """A silent H.264 mp4 of a moving gradient (written by the engine's mp4 writer, no audio stream)."""
    import torch

    from ovi.video_io import write_mp4

    n = int(round(seconds * fps))
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    frames = np.stack([np.stack([(x * 255 // w + 4 * i) % 256, np.full_like(x, 40 + i % 160), y * 255 // h], -1)
                       for i in range(n)]).astype(np.uint8)
    write_mp4(path, torch.from_numpy(frames), None, fps=fps)
    return path


def output_videos(server: ComfyServer, result) -> dict[str, Path]:
    """{node id: mp4 path} for every video output of a finished prompt."""
    found = {}
    for node_id, out in result.outputs.items():
        for entry in out.get("images", []):
            if entry["filename"].endswith(".mp4"):
                found[node_id] = server.file_path(entry)
    return found


def error_text(result) -> str:
    """The error of a failed prompt as one string (runtime exception message, or the 400 body)."""
    if isinstance(result.error, dict) and "exception_message" in result.error:
        return f"{result.error.get('node_type')}: {result.error['exception_message']}"
    return json.dumps(result.error)


def log_match(server: ComfyServer, pattern: str, start: int = 0) -> re.Match:
    """The first match of ``pattern`` in the server log after character ``start``. No waiting: call it once the
    server has provably done what logs the line (a finished prompt, a settled /free); ComfyUI's log handler
    flushes every record, so the line is in the file by then."""
    m = re.compile(pattern).search(server.log_text(), start)
    if m is None:
        raise AssertionError(f"no log line matching {pattern!r} after character {start}\n{server.log_tail(40)}")
    return m


class Progress:
    """Listens on ComfyUI's websocket (/ws?clientId=...) in a thread and keeps the JSON messages; queue prompts
    with ``client_id`` to receive their progress."""

    def __init__(self, server: ComfyServer):
        self.url = f"ws://127.0.0.1:{server.port}/ws?clientId="
        self.client_id = uuid.uuid4().hex
        self.messages: list[dict] = []
        self.previews = 0  # binary frames: ComfyUI sends latent previews this way
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self):
        import aiohttp

        try:
            async with aiohttp.ClientSession() as session:  # trust_env=False: never through a proxy
                async with session.ws_connect(self.url + self.client_id, heartbeat=20) as ws:
                    self._ready.set()
                    while not self._stop.is_set():
                        try:
                            msg = await ws.receive(timeout=0.2)
                        except asyncio.TimeoutError:
                            continue
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            self.messages.append(json.loads(msg.data))
                        elif msg.type == aiohttp.WSMsgType.BINARY:
                            self.previews += 1
                        elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            break
        except BaseException as e:  # reported by __enter__/wait_for
            self._error = e
            self._ready.set()

    def __enter__(self) -> "Progress":
        self._thread.start()
        if not self._ready.wait(WAIT_BOUND) or self._error is not None:
            raise AssertionError(f"could not open ComfyUI's websocket: {self._error!r}")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(STOP_BOUND)

    def steps(self, node: str, prompt_id: str | None = None) -> list[tuple[int, int]]:
        """(value, max) of every progress message for ``node``."""
        return [(m["data"]["value"], m["data"]["max"]) for m in list(self.messages)
                if m.get("type") == "progress" and str(m["data"].get("node")) == node
                and (prompt_id is None or m["data"].get("prompt_id") == prompt_id)]

    def wait_for(self, predicate, timeout: float = WAIT_BOUND) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self._error is not None:
                raise AssertionError(f"websocket failed: {self._error!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"progress did not arrive within {timeout:.0f} s: {self.messages[-10:]}")
            time.sleep(0.05)

    def done(self, prompt_id: str) -> bool:
        """Whether the prompt's closing message ("executing" with node None) has arrived. ComfyUI sends it after
        the prompt's history entry is written, through the same ordered queue as the progress messages and
        previews, so from then on every message of the prompt is in ``messages``."""
        return any(m.get("type") == "executing" and m["data"].get("node") is None
                   and m["data"].get("prompt_id") == prompt_id for m in list(self.messages))

    def wait_done(self, prompt_id: str) -> None:
        """Wait for ``done(prompt_id)``: a finished prompt's history entry can be read before the websocket has
        delivered its last progress messages, and on a busy machine often is."""
        self.wait_for(lambda: self.done(prompt_id))


def write_fp8_fusion(src: Path, dst: Path) -> Path:
    """The tiny fusion model with its matrices cast to float8_e4m3fn, as an FP8 checkpoint holds them."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: t.to(torch.float8_e4m3fn) if t.dim() == 2 and t.is_floating_point() else t
               for k, t in tensors.items()}
    save_file(tensors, str(dst), metadata=meta)
    return dst


def write_kj_split(src: Path, folder: Path) -> tuple[Path, Path]:
    """The tiny fusion model as Kijai's Ovi 1.0 FP8 pack: a video file (keys without ``video_model.``) and an
    audio file (``audio_model.`` keys), matrices float8_e4m3fn with a float32 ``scale_weight`` each, no header
    metadata (the variant comes from the known names)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    halves: dict[str, dict] = {"video": {}, "audio": {}}
    for k, t in tensors.items():
        branch = "video" if k.startswith("video_model.") else "audio"
        name = k.removeprefix("video_model.")
        if t.dim() == 2 and t.is_floating_point() and k.endswith(".weight"):
            scale = (t.float().abs().amax() / 448).clamp(min=1e-12)
            halves[branch][name] = (t.float() / scale).to(torch.float8_e4m3fn)
            halves[branch][name[:-len(".weight")] + ".scale_weight"] = scale.reshape(1)
        else:
            halves[branch][name] = t
    paths = (folder / "Wan2_2_Ovi_Video_fp8_e4m3fn_scaled_KJ.safetensors",
             folder / "Wan2_2_Ovi_Audio_fp8_e4m3fn_scaled_KJ.safetensors")
    for path, half in zip(paths, halves.values()):
        save_file({k: v.contiguous() for k, v in half.items()}, str(path))
    return paths


def write_gguf(dst: Path, names: tuple[str, ...]) -> Path:
    """A small valid GGUF file holding tensors with the given names (only the container matters here)."""
    import gguf

    writer = gguf.GGUFWriter(str(dst), "ovi")
    for i, name in enumerate(names):
        writer.add_tensor(name, np.full((4, 8), i, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def run_ui_jobs(url: str, jobs: list[dict], timeout: float = WAIT_BOUND) -> list[dict]:
    """Run tests/comfyui_server/ui_workflows.js (one headless Chromium for all jobs); its per-job results."""
    import os
    import subprocess
    import tempfile

    from .harness import CHROMIUM, NODE_MODULES, ComfyError

    script = Path(__file__).with_name("ui_workflows.js")
    with tempfile.TemporaryDirectory(prefix="ovi-ui-") as tmp:
        jobs_file = Path(tmp) / "jobs.json"
        jobs_file.write_text(json.dumps(jobs))
        cmd = ["node", str(script), "--url", url, "--jobs", str(jobs_file), "--chromium", CHROMIUM,
               "--timeout-ms", str(int(timeout * 1000)), "--profile-dir", tmp]
        env = dict(os.environ, NODE_PATH=str(NODE_MODULES), NO_PROXY="*", no_proxy="*")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=timeout + STOP_BOUND,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise ComfyError(f"ui_workflows.js overran {timeout + STOP_BOUND:.0f} s: {e.stdout!r} {e.stderr!r}") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    summary = json.loads(lines[-1]) if lines else {}
    if proc.returncode or not summary.get("ok"):
        raise ComfyError(f"ui_workflows.js exit {proc.returncode}: {summary.get('error')}\n{proc.stderr[-3000:]}")
    return summary["results"]
