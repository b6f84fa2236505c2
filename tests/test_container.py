"""The Docker image, built and run for real (marker `container`; not part of `pytest -q`: .ci/run runs it after the
main suite as `pytest -q -m container`).

A private dockerd (its socket, data root, exec root and pid file in a temp dir; no iptables, no default bridge, the
host's ip_forward untouched, ports published on 127.0.0.1 only; overlay2 where the disk takes an overlay mount, else
vfs, or MG_TEST_STORAGE_DRIVER), a Debian base made here (scripts/container-base.sh: debootstrap from the machine's
own apt mirror, cached in /var/cache/manifold-guard; no registry needed) unless MG_TEST_BASE_IMAGE names one, then the
CPU image built as a user builds it (`docker build -t manifold-guard .`, BuildKit) with this host's pip sources and CA
bundle passed through (local ones served on loopback; the CA as a secret), torch from MG_TEST_TORCH_INDEX_URL as in
tests/test_docker.py. The container runs as non-root, turns healthy, verified the models' sha256 at start (and
refuses a tampered file), labels docs/examples/digit.png 7 over /v1/classify and /v2 infer, holds no CUDA package;
then `docker-compose up` on the repo's compose file (its host port rebound to a free loopback one) answers both the
same way under the public profile the file sets, which refuses a seed. At the end nothing is left: no daemon process,
mount, network interface, data root or engine state file. It skips, with the reason, where no engine can start (not
root, docker.io missing, dockerd does not come up). Prints the image size, build time and start-up times as it goes.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import functools
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parent.parent
DIGIT = ROOT / "docs" / "examples" / "digit.png"  # a 7 from the MNIST test set
MANIFEST = json.loads((ROOT / "models" / "manifest.json").read_text())
MEASURED = json.loads((ROOT / "models" / "measured.json").read_text())
SERVED = MEASURED["defaults"]["mnist"]["classifier"]  # the default /v1/classify model: mnist/classifier_S_...
# what reaches this machine in place of PyTorch's CPU index, as in tests/test_docker.py: PyPI, with pip's find-links
# (passed through below) holding the CPU wheel
TEST_TORCH_INDEX = os.environ.get("MG_TEST_TORCH_INDEX_URL", "https://pypi.org/simple")
TEST_BASE_IMAGE = os.environ.get("MG_TEST_BASE_IMAGE")  # e.g. python:3.11-slim where a registry is reachable
BASE_NAME = "mg-base:bookworm"  # what scripts/container-base.sh imports
IMAGE = "manifold-guard"  # the README's `docker build -t manifold-guard .`
COMPOSE_IMAGE = "manifold-guard:cpu"  # docker-compose.yml's image name for the CPU service
# engine state dockerd/containerd/runc write outside the data and exec roots (removed again if this test made them)
HOST_STATE = (Path("/etc/docker/key.json"), Path("/run/docker"), Path("/run/containerd"), Path("/run/runc"))
RESULTS: dict[str, str] = {}  # what the run measured, printed as it goes and summed up at the end
OURS = re.compile(r"docker|containerd|buildkit|runc")  # mounts an engine makes outside its root (netns, build mounts)


def say(config: pytest.Config, line: str) -> None:
    """A line on the terminal as it happens, with or without -s."""
    capman = config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print(f"\n[container] {line}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mounts() -> set[str]:
    return {line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()}


def interfaces() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line holds `text` (the engine's temp dir: dockerd, containerd, its shims)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def overlay_works(where: Path) -> bool:
    """An overlay mount succeeds in `where` (not on an overlay root, for one): overlay2 then, vfs otherwise."""
    d = where / "overlay-probe"
    for sub in ("l", "u", "w", "m"):
        (d / sub).mkdir(parents=True)
    opts = f"lowerdir={d / 'l'},upperdir={d / 'u'},workdir={d / 'w'}"
    ok = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(d / "m")], capture_output=True).returncode
    if ok == 0:
        subprocess.run(["umount", str(d / "m")], check=True)
    shutil.rmtree(d)
    return ok == 0


class Engine:
    """A private dockerd. `docker(...)` runs the CLI against it; `stop()` removes every container and network, stops
    the daemon by its PID, kills what it left running, unmounts what it mounted, removes its root and the engine
    state it wrote outside (if absent before), and returns what it could not clean (empty: nothing left)."""

    def __init__(self, dockerd: str, cli: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mg-dockerd-"))  # short: unix socket paths stay under 108 bytes
        self.cli = cli
        self.sock = self.root / "docker.sock"
        self.log = self.root / "dockerd.log"
        self.before = {"mounts": mounts(), "interfaces": interfaces(), "state": {p for p in HOST_STATE if p.exists()}}
        self.driver = os.environ.get("MG_TEST_STORAGE_DRIVER") or ("overlay2" if overlay_works(self.root) else "vfs")
        (self.root / "daemon.json").write_text("{}")  # not the host's /etc/docker/daemon.json
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_CONFIG": str(self.root / "cli"),
                    "DOCKER_BUILDKIT": "1"}  # fmt: skip
        self.args = [dockerd, "--storage-driver", self.driver, "--iptables=false", "--ip-forward=false",
                     "--ip-masq=false", "--bridge=none", "--ip", "127.0.0.1", "-H", f"unix://{self.sock}",
                     "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
                     "--pidfile", str(self.root / "docker.pid"),
                     "--config-file", str(self.root / "daemon.json")]  # fmt: skip
        self.proc: subprocess.Popen | None = None
        self.stopped = False
        self.t0 = time.monotonic()

    def start(self, timeout: float = 90.0) -> str | None:
        """Start dockerd and wait for it to answer; None, or why it did not come up (with its log's tail)."""
        with self.log.open("wb") as f:
            self.proc = subprocess.Popen(self.args, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"dockerd exited with status {self.proc.returncode}: {self.log.read_text()[-1500:]}"
            if self.docker("version", check=False, timeout=10).returncode == 0:
                return None
            time.sleep(0.5)
        return f"dockerd did not answer in {timeout:g} s: {self.log.read_text()[-1500:]}"

    def docker(self, *args: str, check: bool = True, timeout: float = 300,
               stdin: bytes | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        p = subprocess.run([self.cli, *args], env=self.env, input=stdin, capture_output=True, timeout=timeout)
        if check:
            assert p.returncode == 0, f"docker {' '.join(args)}: {p.stderr.decode(errors='replace')[-3000:]}"
        return p

    def out(self, *args: str, timeout: float = 300) -> str:
        return self.docker(*args, timeout=timeout).stdout.decode().strip()

    def new_mounts(self) -> set[str]:
        """Mounts made since the engine started that an engine makes (others' mounts are none of its business)."""
        return {m for m in mounts() - self.before["mounts"] if m.startswith(str(self.root)) or OURS.search(m)}

    def new_interfaces(self) -> set[str]:
        """Interfaces made since the engine started that an engine makes: bridges and veth pairs."""
        return {n for n in interfaces() - self.before["interfaces"] if n.startswith(("br-", "veth", "docker"))}

    def stop(self) -> list[str]:
        if self.stopped:
            return []
        self.stopped = True
        problems: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            ids = self.docker("ps", "-aq", check=False).stdout.decode().split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=120)
            ids = self.docker("network", "ls", "-q", "--filter", "type=custom", check=False).stdout.decode().split()
            if ids:
                self.docker("network", "rm", *ids, check=False, timeout=120)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                problems.append("dockerd ignored SIGTERM for 60 s: killed")
                self.proc.kill()
                self.proc.wait()
        for pid in pids_mentioning(str(self.root)):  # containerd and shims it started, if any outlived it
            problems.append(f"process {pid} outlived dockerd: killed")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for m in sorted(self.new_mounts(), key=len, reverse=True):
            problems.append(f"mount {m} left: unmounted")
            subprocess.run(["umount", "-l", m], capture_output=True)
        for name in self.new_interfaces():
            problems.append(f"interface {name} left: deleted")
            subprocess.run(["ip", "link", "delete", name], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        if self.root.exists():
            problems.append(f"{self.root} could not be removed")
        for path in set(HOST_STATE) - self.before["state"]:
            if path.is_file():
                path.unlink()
            elif path.is_dir():  # only if empty of files: a socket or file in it belongs to something running
                for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                    if not any(d.iterdir()):
                        d.rmdir()
                if any(path.iterdir()):
                    problems.append(f"{path} holds {sorted(map(str, path.rglob('*')))[:5]}")
                else:
                    path.rmdir()
        return problems


@pytest.fixture(scope="module", autouse=True)
def selected(request: pytest.FixtureRequest) -> None:
    """Runs only when asked for by its marker: it builds an image (minutes), after the main suite."""
    if "container" not in (request.config.option.markexpr or ""):
        pytest.skip("the container test runs on its own: pytest -m container (.ci/run's second command)")


@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    if os.geteuid() != 0:
        pytest.skip("no engine can start: dockerd and debootstrap need root")
    dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd" if Path("/usr/sbin/dockerd").exists() else None)
    if dockerd is None:
        pytest.skip("no engine can start: dockerd is not installed (scripts/setup.sh --dev installs docker.io)")
    # the CLI that ships with this dockerd (docker.io: /usr/bin/docker): its BuildKit client needs no buildx plugin,
    # which a newer CLI elsewhere on PATH may require
    beside = Path(dockerd).resolve().parent.parent / "bin" / "docker"
    cli = os.environ.get("MG_TEST_DOCKER") or (str(beside) if beside.exists() else shutil.which("docker"))
    if cli is None:
        pytest.skip("no docker CLI (docker.io installs /usr/bin/docker)")
    e = Engine(dockerd, cli)
    t = time.monotonic()
    why = e.start()
    if why is not None:
        problems = e.stop()
        pytest.skip(f"no engine can start here: {why}" + (f" (cleanup: {problems})" if problems else ""))
    RESULTS["engine"] = f"{e.driver}, up in {time.monotonic() - t:.1f} s"
    e.t0 = t
    say(request.config, f"dockerd {e.out('version', '-f', '{{.Server.Version}}')} ({e.driver}) on {e.sock}")
    yield e
    e.stop()


class LoopbackFiles:
    """Local pip sources (find-links directories, file:// indexes) served over HTTP on 127.0.0.1 for the build, whose
    RUN steps share the host's network (--network host)."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    def __init__(self) -> None:
        self.servers: list[ThreadingHTTPServer] = []

    def serve(self, directory: Path) -> str:
        srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(self.Quiet, directory=str(directory)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        self.servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    def url(self, item: str, index: bool) -> str:
        if re.match(r"https?://", item):
            return item
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(item).path) if item.startswith("file:") else item)
        if path.is_file() or index:  # an index's pages link to ../../files: serve its parent
            return f"{self.serve(path.parent)}/{urllib.parse.quote(path.name)}" + ("/" if index else "")
        return self.serve(path) + "/"

    def close(self) -> None:
        for srv in self.servers:
            srv.shutdown()
            srv.server_close()


def pip_config() -> dict[str, str]:
    """pip's settings on this host as `pip config list` shows them: its files, then PIP_* variables (the last
    wins, as in pip)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    conf: dict[str, str] = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if section in ("global", "install", ":env:") and value:
            conf[name] = ast.literal_eval(value)
    return conf


def build_settings(files: LoopbackFiles) -> tuple[list[str], dict[str, str]]:
    """This host's pip sources and CA as the Dockerfile's build arguments and pip_cert secret: what the host's pip
    would use, reachable from a build step (the CA bundle of an intercepting proxy included)."""
    conf = pip_config()
    args: dict[str, str] = {}
    for name, var, index in (("index-url", "PIP_INDEX_URL", True), ("extra-index-url", "PIP_EXTRA_INDEX_URL", True),
                             ("find-links", "PIP_FIND_LINKS", False)):  # fmt: skip
        if conf.get(name):
            args[var] = " ".join(files.url(item, index) for item in conf[name].split())
    if conf.get("trusted-host"):
        args["PIP_TRUSTED_HOST"] = conf["trusted-host"]
    paths = ssl.get_default_verify_paths()
    candidates = [conf.get("cert"), os.environ.get("SSL_CERT_FILE"), os.environ.get("REQUESTS_CA_BUNDLE"),
                  paths.cafile, paths.openssl_cafile]  # fmt: skip
    cert = next((c for c in candidates if c and Path(c).is_file()), None)
    flags = [f"--secret=id=pip_cert,src={cert}"] if cert else []
    for k, v in args.items():
        flags += ["--build-arg", f"{k}={v}"]
    return flags, args


@pytest.fixture(scope="module")
def image(engine: Engine, request: pytest.FixtureRequest) -> str:
    """The CPU image, built as `docker build -t manifold-guard .` on a base that needs no registry."""
    t = time.monotonic()
    if TEST_BASE_IMAGE:
        base, how = TEST_BASE_IMAGE, "from MG_TEST_BASE_IMAGE"
    else:
        p = subprocess.run([str(ROOT / "scripts" / "container-base.sh"), BASE_NAME], capture_output=True, text=True,
                           env={**engine.env, "DOCKER": engine.cli}, timeout=900)  # fmt: skip
        assert p.returncode == 0, p.stdout + p.stderr
        base, how = BASE_NAME, "cached" if "cached" in p.stdout else "made by debootstrap"
    RESULTS["base"] = f"{base} ({how}) in {time.monotonic() - t:.1f} s"
    say(request.config, f"base {RESULTS['base']}")
    files = LoopbackFiles()
    try:
        flags, args = build_settings(files)
        say(request.config, f"building; pip settings passed through: {args or 'none'}; CA secret: {bool(flags)}")
        log = engine.root / "build.log"
        t = time.monotonic()
        cmd = [engine.cli, "build", "--progress", "plain", "--network", "host", "-t", IMAGE,
               "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"TORCH_INDEX_URL={TEST_TORCH_INDEX}",
               *flags, str(ROOT)]  # fmt: skip
        with log.open("wb") as f:
            p = subprocess.run(cmd, env=engine.env, stdout=f, stderr=subprocess.STDOUT, timeout=2400)
        assert p.returncode == 0, log.read_text()[-4000:]
    finally:
        files.close()
    size = int(engine.out("image", "inspect", "-f", "{{.Size}}", IMAGE))
    RESULTS["build"] = f"{time.monotonic() - t:.0f} s"
    RESULTS["size"] = f"{size / 1e9:.2f} GB ({size / 2**20:.0f} MiB)"
    say(request.config, f"image {IMAGE}: {RESULTS['size']}, built in {RESULTS['build']}")
    return IMAGE


def wait_until(what: str, ok: Callable[[], bool], timeout: float, logs: Callable[[], str]) -> float:
    """Poll `ok()` until true; the seconds it took. On timeout: fail with `logs()`."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if ok():
            return time.monotonic() - t
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached in {timeout:g} s\n{logs()[-3000:]}")


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def health(engine: Engine, container: str) -> str:
    return engine.out("inspect", "-f", "{{if .State.Health}}{{.State.Health.Status}}{{end}}", container)


@pytest.fixture(scope="module")
def served(engine: Engine, image: str, request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """The image run as `docker run -p 127.0.0.1:PORT:8000 manifold-guard` (on a network of its own); (name, URL)."""
    name, net, port = "mg-run", "mg-run-net", free_port()
    engine.docker("network", "create", net)
    t = time.monotonic()
    engine.docker("run", "-d", "--name", name, "--network", net, "-p", f"127.0.0.1:{port}:8000", image)
    created = time.monotonic() - t
    url = f"http://127.0.0.1:{port}"
    logs = lambda: engine.docker("logs", name, check=False).stderr.decode(errors="replace")  # noqa: E731
    wait_until("/readyz 200", lambda: http_ok(f"{url}/readyz"), 300, logs)
    ready = time.monotonic() - t
    wait_until("HEALTHCHECK healthy", lambda: health(engine, name) == "healthy", 180, logs)
    healthy = time.monotonic() - t  # the HEALTHCHECK runs every 10 s: up to 10 s after /readyz
    RESULTS["start"] = f"docker run {created:.1f} s, /readyz 200 after {ready:.1f} s, healthy after {healthy:.1f} s"
    say(request.config, f"start-up: {RESULTS['start']}")
    yield name, url
    engine.docker("rm", "-f", name, check=False)
    engine.docker("network", "rm", net, check=False)


def digit_png() -> bytes:
    return DIGIT.read_bytes()


def classify_digit(url: str) -> dict:
    r = httpx.post(f"{url}/v1/classify", files={"file": ("digit.png", digit_png(), "image/png")}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def infer_digit(url: str) -> dict[str, dict]:
    """/v2 metadata and infer of the served default (mnist-classifier_S_...): its outputs by name."""
    name = SERVED.replace("/", "-")
    meta = httpx.get(f"{url}/v2/models/{name}", timeout=30)
    assert meta.status_code == 200 and meta.json()["name"] == name, meta.text
    x = np.asarray(Image.open(io.BytesIO(digit_png())).convert("L"), dtype=np.float32) / 255.0
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": x.ravel().tolist()}]}
    r = httpx.post(f"{url}/v2/models/{name}/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return {o["name"]: o for o in r.json()["outputs"]}


def test_the_container_runs_as_non_root_and_holds_no_cuda(engine: Engine, served: tuple[str, str]) -> None:
    name, _ = served
    assert engine.out("exec", name, "id", "-u") != "0"
    assert health(engine, name) == "healthy"
    pkgs = {p["name"].lower(): p["version"] for p in json.loads(engine.out("exec", name, "pip", "list",
                                                                           "--format", "json"))}  # fmt: skip
    assert pkgs["torch"].endswith("+cpu"), pkgs["torch"]
    assert not [n for n in pkgs if n.startswith(("nvidia", "triton")) or "cuda" in n], sorted(pkgs)
    # pip's CA reached the build as a secret only: not in the image's history or environment
    history = engine.out("history", "--no-trunc", "--format", "{{.CreatedBy}}", IMAGE)
    env = engine.out("image", "inspect", "-f", "{{json .Config.Env}}", IMAGE)
    assert "BEGIN CERTIFICATE" not in history and "PIP_CERT" not in env


def test_start_up_verified_the_models_and_refuses_a_tampered_one(engine: Engine, served: tuple[str, str]) -> None:
    name, _ = served
    log = engine.docker("logs", name).stderr.decode(errors="replace")
    assert re.search(r"models from /app/models verified", log), log[-2000:]
    onnx = MANIFEST["artifacts"][SERVED]["files"]["onnx"]["path"]
    # the same image on a copy of its models with one byte appended to the served classifier: start-up refuses it
    script = (f"cp -r /app/models /tmp/m && printf x >> /tmp/m/{onnx} && MG_MODELS_DIR=/tmp/m python -m service "
              "--port 8009; status=$?; rm -rf /tmp/m; exit $status")  # fmt: skip
    p = engine.docker("exec", name, "sh", "-c", script, check=False, timeout=300)
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 2 and "refusing to start" in err and onnx in err, (p.returncode, err[-2000:])


def test_v1_classify_labels_the_digit_7(served: tuple[str, str]) -> None:
    body = classify_digit(served[1])
    assert body["model"] == SERVED and body["predictions"][0]["label"] == 7, body


def test_v2_infer_labels_the_digit_7(served: tuple[str, str]) -> None:
    assert infer_digit(served[1])["labels"]["data"] == [7]


def test_compose_serves_the_public_profile(engine: Engine, image: str, request: pytest.FixtureRequest) -> None:
    """`docker-compose up` on the repo's compose file (the image built above, under the name the file gives it; its
    published port rebound to a free loopback one, the file's only change) answers /v1/classify and /v2 as on the
    host, under the public profile the file sets, which refuses a seed."""
    compose = shutil.which("docker-compose")
    assert compose is not None, "docker-compose is not installed (scripts/setup.sh --dev installs it)"
    engine.docker("tag", image, COMPOSE_IMAGE)
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = spec["services"]["manifold-guard"]
    assert svc["image"] == COMPOSE_IMAGE and svc["environment"]["MG_PUBLIC"] == "true"
    port = free_port()
    svc["ports"] = [f"127.0.0.1:{port}:8000"]
    file = engine.root / "docker-compose.yml"
    file.write_text(yaml.safe_dump(spec, sort_keys=False))
    project = f"mgtest{os.getpid()}"

    def run(*args: str, timeout: float = 300) -> str:
        p = subprocess.run([compose, "-p", project, "-f", str(file), "--project-directory", str(ROOT), *args],
                           env=engine.env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
        assert p.returncode == 0, f"docker-compose {' '.join(args)}: {p.stderr[-3000:]}"
        return p.stdout.strip()

    url = f"http://127.0.0.1:{port}"
    try:
        t = time.monotonic()
        run("up", "-d", "--no-build", "manifold-guard")
        cid = run("ps", "-q", "manifold-guard")
        logs = lambda: engine.docker("logs", cid, check=False).stderr.decode(errors="replace")  # noqa: E731
        wait_until("compose service healthy", lambda: health(engine, cid) == "healthy", 300, logs)
        RESULTS["compose"] = f"up -d to healthy {time.monotonic() - t:.1f} s"
        say(request.config, f"docker-compose up: {RESULTS['compose']}")
        assert classify_digit(url)["predictions"][0]["label"] == 7  # as on the host
        assert infer_digit(url)["labels"]["data"] == [7]
        seeded = {"image": base64.b64encode(digit_png()).decode(), "seed": 0}
        r = httpx.post(f"{url}/v1/classify", json=seeded, timeout=60)
        assert r.status_code == 422 and "public profile" in r.json()["error"], (r.status_code, r.text)
    finally:
        run("down", "--remove-orphans", "--timeout", "10")
    left = engine.out("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}")
    nets = engine.out("network", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}")
    assert not left and not nets, (left, nets)


def test_nothing_is_left_behind(engine: Engine, request: pytest.FixtureRequest) -> None:
    """Last: the engine stopped and cleaned: no daemon, mount, interface, data root or engine state file remains."""
    pid, root = engine.proc.pid, engine.root
    problems = engine.stop()
    RESULTS["total"] = f"{time.monotonic() - engine.t0:.0f} s from dockerd's start to its clean stop"
    say(request.config, "; ".join(f"{k}: {v}" for k, v in RESULTS.items()))
    assert not problems, problems
    assert not Path(f"/proc/{pid}").exists() and not pids_mentioning(str(root)), "a daemon process is left"
    assert not engine.new_mounts() and not engine.new_interfaces(), (engine.new_mounts(), engine.new_interfaces())
    assert not root.exists()
    assert {p for p in HOST_STATE if p.exists()} <= engine.before["state"]
