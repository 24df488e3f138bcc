"""The container engine for `make test-container`, and the base image the Dockerfile's FROM names.

Engine: Docker where a daemon answers; otherwise Debian's podman with runc (crun refused this machine's hybrid
cgroups), installed with apt-get when missing. podman keeps all its state (storage, run root, tmp, locks, events,
network configuration) in one folder of the run's own, deleted at the end with every container and image in it.
Containers use the host's network, so no network or firewall rule is ever made.

Base image: the FROM image is pulled when a registry answers. Where none does, a STAND-IN is made from Debian
packages and imported under the FROM tag: `debootstrap --variant=minbase bookworm` with python3, python3-venv and
ca-certificates, from the mirror the machine's apt already uses, plus a virtual environment at /usr/local so that
`python` and `pip` resolve from /usr/local/bin as in the real image. The stand-in's tarball is cached in
/var/cache/todo-api-container (CONTAINER_TEST_CACHE); delete it to make a fresh one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("CONTAINER_TEST_CACHE", "/var/cache/todo-api-container"))
STAND_IN_SUITE = "bookworm"  # python:3.11-slim is Debian bookworm, whose python3 is 3.11
STAND_IN_PACKAGES = ("python3", "python3-venv", "ca-certificates")
STAND_IN_RECIPE = "2"  # part of the cache key: bump it when the recipe below changes
STAND_IN_LABEL = ("STAND-IN for {image}, not the real image: debootstrap --variant=minbase bookworm with "
                  + " ".join(STAND_IN_PACKAGES) + ", a venv at /usr/local; made by tests/container/engine.py")
# What python:3.11-slim sets, and the stand-in copies.
BASE_CHANGES = ("ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8",
                'CMD ["python3"]')
# Left out of the stand-in as debian:bookworm-slim (under python:3.11-slim) leaves them out.
SLIM_EXCLUDES = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info", "usr/share/groff",
                 "usr/share/lintian", "var/lib/apt/lists", "var/cache/apt", "var/log")
PACKAGES = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap"}

Say = Callable[[str], None]


class EngineUnavailable(Exception):
    """Neither Docker nor podman can run here: the reason is printed and the checks are skipped."""


@dataclass
class Engine:
    """The engine's command line, with the environment and the options it needs here."""

    name: str
    argv: list[str]
    env: dict[str, str]
    version: str = ""
    run_options: list[str] = field(default_factory=list)  # for every `run`
    read_only_options: list[str] = field(default_factory=list)  # for `run --read-only`, as Docker has it
    build_options: list[str] = field(default_factory=list)
    state: Path | None = None  # podman: the folder that holds all its state
    made_images: list[str] = field(default_factory=list)  # removed at the end (Docker; podman drops its state)
    made_folders: list[Path] = field(default_factory=list)  # outside `state`, made by podman on this run
    firewall: list[str] | None = None  # the host's iptables rules when the run began

    def __call__(self, *args: object, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [*self.argv, *map(str, args)]
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"`{' '.join(command)}` exited {result.returncode}:\n"
                                 f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def inspect(self, kind: str, name: str) -> dict:
        return json.loads(self(kind, "inspect", name).stdout)[0]

    def healthcheck(self, image: str) -> list[str]:
        """The image's HEALTHCHECK test (podman shows it at the top of `image inspect`, Docker in its Config)."""
        found = self.inspect("image", image)
        return (found.get("Healthcheck") or found["Config"].get("Healthcheck") or {}).get("Test") or []


def open_engine(say: Say) -> Engine:
    """Docker if its daemon answers, else podman with runc (installed if missing); raises EngineUnavailable."""
    if shutil.which("docker"):
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=30)
        if info.returncode == 0:
            say(f"engine: Docker {info.stdout.strip()} (its daemon answered)")
            return Engine("docker", ["docker"], dict(os.environ), info.stdout.strip())
        say("engine: no Docker daemon answers here; using podman with runc")
    if os.geteuid() != 0:
        raise EngineUnavailable("no Docker daemon, and podman is only set up here as root (this is not root)")
    ensure_packages(("podman", "runc"), say)
    engine = _podman(Path(tempfile.mkdtemp(prefix="todo-api-podman-")))
    say(f"engine: podman {engine.version} with runc, all its state in {engine.state}")
    return engine


def ensure_packages(binaries: Sequence[str], say: Say) -> None:
    """Install the Debian packages of missing binaries with apt-get; raises EngineUnavailable if that fails."""
    missing = sorted({PACKAGES[binary] for binary in binaries if not shutil.which(binary)})
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise EngineUnavailable(f"{', '.join(missing)} missing, and only root with apt-get installs them here")
    say(f"installing {', '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-qq", *missing]  # as tried here
    for attempt in ([install], [["apt-get", "-o", "DPkg::Lock::Timeout=600", "update", "-qq"], install]):
        results = [subprocess.run(step, env=env, capture_output=True, text=True, timeout=900) for step in attempt]
        if all(result.returncode == 0 for result in results):
            return
    raise EngineUnavailable(f"apt-get could not install {', '.join(missing)}: {results[-1].stderr.strip()[-500:]}")


def _podman(state: Path) -> Engine:
    """podman as root with every file of its own under `state`."""
    for folder in ("storage", "run", "tmp", "networks", "volumes"):
        (state / folder).mkdir()
    (state / "containers.conf").write_text(f"""\
[containers]
# As root without CAP_SYS_RESOURCE podman cannot raise a limit above the machine's hard one, and it lowers its
# own nproc to kernel.pid_max at start: its defaults (1048576) make runc fail with EPERM.
default_ulimits = ["nofile={_hard_limit(resource.RLIMIT_NOFILE)}", "nproc={_nproc_limit()}"]
log_driver = "k8s-file"
netns = "host"

[network]
network_config_dir = "{state}/networks"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{state}/events.log"
tmp_dir = "{state}/tmp"
lock_type = "file"
volume_path = "{state}/volumes"
""")
    (state / "storage.conf").write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{state}/storage"\n'
                                        f'runroot = "{state}/run"\n')
    # FROM python:3.11-slim means docker.io/library/python:3.11-slim, pulled or imported under that name.
    (state / "registries.conf").write_text('unqualified-search-registries = ["docker.io"]\n'
                                           'short-name-mode = "permissive"\n')
    env = {**os.environ, "CONTAINERS_CONF": str(state / "containers.conf"),
           "CONTAINERS_STORAGE_CONF": str(state / "storage.conf"),
           "CONTAINERS_REGISTRIES_CONF": str(state / "registries.conf"), "TMPDIR": str(state / "tmp")}
    # netavark makes its run folder even when every container is on the host's network; it goes at the end.
    made_folders = [path for path in (Path("/run/containers"), Path("/run/containers/networks")) if not path.exists()]
    version = subprocess.run(["podman", "--version"], capture_output=True, text=True, env=env).stdout.split()[-1]
    return Engine(
        "podman", ["podman"], env, version, state=state, made_folders=made_folders, firewall=firewall_rules(),
        # No systemd here to run the HEALTHCHECK on a timer (podman logs errors trying): the checks run its command.
        run_options=["--no-healthcheck"],
        read_only_options=["--read-only-tmpfs=false"],  # podman adds tmpfs on /run, /var/tmp...; Docker does not
        build_options=["--format", "docker", "--pull=never"],  # the docker format keeps the HEALTHCHECK
    )


def _hard_limit(kind: int) -> str:
    hard = resource.getrlimit(kind)[1]
    value = 1048576 if hard == resource.RLIM_INFINITY else hard
    return f"{value}:{value}"


def _nproc_limit() -> str:
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    value = pid_max if hard == resource.RLIM_INFINITY else min(hard, pid_max)
    return f"{value}:{value}"


def close_engine(engine: Engine, containers: Sequence[str], say: Say) -> None:
    """Remove the containers and images this run made; for podman, its whole state folder too."""
    for name in containers:
        engine("rm", "--force", name, check=False)
    for image in reversed(engine.made_images):
        engine("rmi", "--force", image, check=False)
    if engine.state is None:
        return
    left = engine("ps", "--all", "--quiet", check=False).stdout.split()
    engine("rm", "--all", "--force", check=False)
    engine("rmi", "--all", "--force", check=False)
    remove_tree(engine.state)
    for folder in reversed(engine.made_folders):
        try:
            folder.rmdir()  # only if empty: another podman may use it by now
        except OSError:
            pass
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(engine.state) in line]
    firewall = "unchanged" if firewall_rules() == engine.firewall else "CHANGED during the run (not by podman here?)"
    say(f"cleaned up: {len(containers)} containers (+{len(left)} strays), the images and the podman state in "
        f"{engine.state}; mounts left: {len(mounts)}; iptables rules: {firewall}")


def firewall_rules() -> list[str] | None:
    """The host's iptables and ip6tables rules and chains, without counters; None where they cannot be read."""
    rules = []
    for program in ("iptables-save", "ip6tables-save"):
        if not shutil.which(program):
            return None
        result = subprocess.run([program], capture_output=True, text=True)
        if result.returncode != 0:
            return None
        rules += [re.sub(r" \[\d+:\d+\]$", "", line) for line in result.stdout.splitlines()
                  if line.startswith(("*", ":", "-A"))]
    return rules


def remove_tree(path: Path) -> None:
    """Unmount whatever is mounted under path (deepest first), then delete it without crossing into a mount."""
    prefix = str(path.resolve()) + "/"
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", mount], capture_output=True)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], capture_output=True)


# The base image --------------------------------------------------------------------------------------------------


def dockerfile_base() -> str:
    """The image the Dockerfile's (single) FROM names."""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.upper().startswith("FROM "):
            return line.split()[1]
    raise AssertionError("the Dockerfile has no FROM")


def qualified(image: str) -> str:
    """docker.io/library/python:3.11-slim for python:3.11-slim, as both engines store it."""
    first = image.split("/")[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return image
    return f"docker.io/{image}" if "/" in image else f"docker.io/library/{image}"


def provide_base(engine: Engine, say: Say) -> str:
    """Make the FROM image available: the real one if a registry answers, else the stand-in. Returns which."""
    image = qualified(dockerfile_base())
    if engine.name == "docker" and engine("image", "inspect", image, check=False).returncode == 0:
        say(f"base: {image}, already in Docker (the real image)")
        return "real"
    started = time.monotonic()
    try:
        pulled = engine("pull", image, timeout=300, check=False)
        reason = (pulled.stderr.strip().splitlines() or [""])[-1].removeprefix("Error: ")[:400]
    except subprocess.TimeoutExpired:
        pulled, reason = None, "no answer within 300 s"
    if pulled is not None and pulled.returncode == 0:
        say(f"base: {image} pulled in {time.monotonic() - started:.0f} s (the real image)")
        if engine.name == "docker":
            engine.made_images.append(image)
        return "real"
    say(f"base: no registry answered ({reason})")
    say(f"base: using a STAND-IN for {image}, made from Debian packages; it is NOT the real image")
    tarball = stand_in_tarball(engine, say)
    started = time.monotonic()
    changes = [*BASE_CHANGES, f"LABEL todo-api.stand-in={json.dumps(STAND_IN_LABEL.format(image=image))}"]
    engine("import", *(arg for change in changes for arg in ("--change", change)), tarball, image, timeout=300)
    engine.made_images.append(image)
    say(f"base: stand-in imported as {image} in {time.monotonic() - started:.0f} s")
    return "stand-in"


def stand_in_tarball(engine: Engine, say: Say) -> Path:
    """The stand-in's root file system as a tarball: from the cache, else made with debootstrap (about 90 s)."""
    mirror = apt_mirror()
    key = hashlib.sha256(f"{STAND_IN_RECIPE} {mirror} {STAND_IN_SUITE} {STAND_IN_PACKAGES}".encode()).hexdigest()
    name = f"python-3.11-slim-stand-in-{key[:16]}.tar"
    if (CACHE / name).is_file():
        say(f"base: stand-in root file system from the cache, {CACHE / name}")
        return CACHE / name
    ensure_packages(("debootstrap",), say)
    work = Path(tempfile.mkdtemp(prefix="todo-api-stand-in-", dir=engine.state))
    rootfs = work / "rootfs"
    started = time.monotonic()
    try:
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(STAND_IN_PACKAGES)}", STAND_IN_SUITE,
              str(rootfs), mirror], timeout=1200)
        # `python` and `pip` in /usr/local/bin, packages in /usr/local/lib/python3.11/site-packages, as upstream.
        _run(["chroot", str(rootfs), "/usr/bin/python3", "-m", "venv", "/usr/local"], timeout=300)
        for script in (rootfs / "usr/local/bin").glob("[Aa]ctivate*"):
            script.unlink()
        for folder in SLIM_EXCLUDES:
            for entry in (rootfs / folder).glob("*"):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        tarball = work / name
        _run(["tar", "--numeric-owner", "--exclude=./dev/*", "--exclude=./proc/*", "--exclude=./sys/*",
              "-C", str(rootfs), "-cf", str(tarball), "."], timeout=300)
        say(f"base: stand-in made with debootstrap from {mirror} in {time.monotonic() - started:.0f} s")
        try:
            CACHE.mkdir(parents=True, exist_ok=True)
            partial = CACHE / f".{name}.{os.getpid()}"
            shutil.copyfile(tarball, partial)
            partial.rename(CACHE / name)
            return CACHE / name
        except OSError as error:
            say(f"base: not cached ({error}); the next run makes it again")
            return tarball  # inside the engine's state folder, deleted with it
    finally:
        remove_tree(rootfs)


def _run(command: list[str], timeout: float) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"`{' '.join(command)}` exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses for bookworm (else for any main suite), or deb.debian.org."""
    entries: list[tuple[str, list[str]]] = []  # (URI, suites)
    sources = Path("/etc/apt/sources.list.d")
    for path in [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list")), *sorted(sources.glob("*.sources"))]:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":  # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.MULTILINE))
                if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                    entries += [(uri, fields.get("Suites", "").split()) for uri in fields.get("URIs", "").split()]
        else:  # one-line entries
            for match in re.finditer(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.MULTILINE):
                entries.append((match.group(1), [match.group(2)]))
    for uri, suites in entries:
        if STAND_IN_SUITE in suites:
            return uri
    for uri, suites in entries:
        if uri.rstrip("/").endswith("/debian") and not any("security" in suite for suite in suites):
            return uri
    return "http://deb.debian.org/debian"
