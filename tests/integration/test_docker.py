"""docker/ without a Docker daemon: the base image, the megatron-core pin against setup.py and the tested
environment, what the image pip-installs (and never), its build-time scripts, the build context, and the
commands of docker/README.md against the Dockerfile and examples/slurm/pretrain_llama2.sbatch."""

import ast
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE_REPO = "/workspace/megatron-harpe"
# NGC PyTorch images moved to Ubuntu 24.04 and Python 3.12 with 25.01 (24.12 and earlier: Python 3.10).
FIRST_PY312_NGC = (25, 1)
# What NVIDIA's container builds together; pip must never install or replace any of it.
CONTAINER_STACK = re.compile(
    r"(torch|torchvision|torchaudio|triton|pytorch-triton.*|transformer-engine.*|apex|nvidia-.*|flash-attn.*)")
CONTAINER_SUPPLIED = {"torch"}  # runtime requirements the container provides instead of pip
EXTRAS = ("test", "hf", "plots")
PIP_VALUE_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "-e", "--editable", "-i", "--index-url",
                     "--extra-index-url", "-f", "--find-links", "-t", "--target", "--prefix", "--root"}
PINS_FILE = "/etc/pip/megatron-harpe-pins.txt"


def read(*parts):
    with open(os.path.join(REPO, *parts)) as f:
        return f.read()


def setup_args():
    call = next(node for node in ast.walk(ast.parse(read("setup.py")))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords
            if kw.arg in ("install_requires", "extras_require", "python_requires")}


def setup_requirement(name):
    return next(r for r in map(Requirement, setup_args()["install_requires"]) if canonicalize_name(r.name) == name)


def dockerfile_lines():
    """docker/Dockerfile without comment lines, backslash continuations joined."""
    lines = [line for line in read("docker", "Dockerfile").splitlines() if not line.lstrip().startswith("#")]
    return "\n".join(lines).replace("\\\n", " ").splitlines()


def dockerfile_args():
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", "\n".join(dockerfile_lines()), re.M))


def expand(text, variables):
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


def pip_installs():
    """Every `pip install` of the Dockerfile as (flags, option values, install targets), ARGs expanded."""
    variables = dockerfile_args()
    installs = []
    for line in dockerfile_lines():
        for m in re.finditer(r"\bpip3?\s+install\s+([^;&|\n]*)", line):
            flags, values, targets = set(), {}, []
            tokens = iter(shlex.split(expand(m[1], variables)))
            for token in tokens:
                if token in PIP_VALUE_OPTIONS:
                    values.setdefault(token, []).append(next(tokens))
                elif token.startswith("-"):
                    flags.add(token.split("=")[0])
                else:
                    targets.append(token)
            installs.append((flags, values, targets))
    return installs


def requirement_names(targets):
    names = set()
    for target in targets:
        try:
            names.add(canonicalize_name(Requirement(target).name))
        except InvalidRequirement:
            pass
    return names


def heredocs(tag):
    """Bodies of the Dockerfile's `<<'TAG'` heredocs."""
    return re.findall(rf"<<'{tag}'\n(.*?)\n{tag}\n", read("docker", "Dockerfile"), re.S)


def python_snippet(marker):
    return next(body for body in heredocs("PY") if marker in body)


def dockerignore_excludes(path):
    """Docker's .dockerignore rule: the last matching pattern wins, `!` re-includes, a match on a directory
    excludes what is under it; `*` and `?` stay within one path element, `**` spans any number."""
    excluded = False
    for pattern in read(".dockerignore").splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = ""
        for piece in re.split(r"(\*\*/?|\*|\?|\[[^\]]*\])", pattern):
            if piece.startswith("**"):
                regex += "(.*/)?" if piece.endswith("/") else ".*"
            elif piece == "*":
                regex += "[^/]*"
            elif piece == "?":
                regex += "[^/]"
            elif piece.startswith("["):
                regex += piece
            else:
                regex += re.escape(piece)
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def readme_shell():
    """The shell code blocks of docker/README.md, backslash continuations joined."""
    blocks = re.findall(r"```bash\n(.*?)```", read("docker", "README.md"), re.S)
    return "\n".join(blocks).replace("\\\n", " ").splitlines()


# --- the base image and megatron-core -------------------------------------------------------------------------

def test_base_image_is_ngc_pytorch_with_python_312():
    froms = [expand(line.split()[1], dockerfile_args()) for line in dockerfile_lines() if line.startswith("FROM ")]
    assert len(froms) == 1, froms
    m = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d\d)\.(\d\d)-py3", froms[0])
    assert m, f"base image {froms[0]} is not an NGC PyTorch YY.MM-py3 tag"
    assert (int(m[1]), int(m[2])) >= FIRST_PY312_NGC, f"{froms[0]} ships Python 3.10"
    # The premise: the container's Python 3.12 satisfies setup.py.
    assert "3.12.3" in SpecifierSet(setup_args()["python_requires"])


def test_megatron_core_pin_is_setup_py_range_and_the_tested_version():
    pin = dockerfile_args()["MEGATRON_CORE_VERSION"]
    spec = setup_requirement("megatron-core").specifier
    assert pin in spec, f"Dockerfile pins megatron-core {pin}, setup.py asks for {spec}"
    # The release CI installs may move within setup.py's range (0.19.x); the image must stay on the same minor.
    tested = importlib.metadata.version("megatron-core")
    assert pin.split(".")[:2] == tested.split(".")[:2], f"the image pins {pin}, CI tests {tested}"
    pinned = [t for _, _, targets in pip_installs() for t in targets
              if requirement_names([t]) == {"megatron-core"}]
    assert [str(Requirement(t).specifier) for t in pinned] == [f"=={pin}"], pinned


def test_build_refuses_a_megatron_core_outside_setup_py(tmp_path):
    check = python_snippet("MEGATRON_CORE_VERSION")
    env = dict(os.environ, MEGATRON_CORE_VERSION=dockerfile_args()["MEGATRON_CORE_VERSION"])
    ok = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    env["MEGATRON_CORE_VERSION"] = "0.20.0"
    bad = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "outside setup.py" in bad.stderr, bad.stderr


# --- what pip installs ----------------------------------------------------------------------------------------

def test_image_installs_every_runtime_dependency():
    args = setup_args()
    needed = {canonicalize_name(Requirement(r).name) for r in args["install_requires"]}
    for extra in EXTRAS:
        needed |= {canonicalize_name(Requirement(r).name) for r in args["extras_require"][extra]}
    # megatron-core goes in with --no-deps, so its own requirements must be listed too.
    for r in map(Requirement, importlib.metadata.requires("megatron-core") or []):
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            needed.add(canonicalize_name(r.name))
    installs = pip_installs()
    installed = set().union(*(requirement_names(targets) for _, _, targets in installs))
    assert needed - CONTAINER_SUPPLIED - installed == set()
    # ... and the repository itself, editable.
    assert any(values.get("-e") == ["."] or values.get("--editable") == ["."] for _, values, _ in installs)


def test_image_never_pip_installs_the_container_stack():
    installs = pip_installs()
    assert installs
    for flags, values, targets in installs:
        for target in targets:
            name = requirement_names([target])
            assert name, f"pip installs {target!r}: only named packages (and the repository with -e .)"
            assert not CONTAINER_STACK.fullmatch(name.pop()), f"pip installs {target} over the container's"
        assert not flags & {"-U", "--upgrade", "--force-reinstall", "-I", "--ignore-installed"}, flags
        # megatron-core and the package require torch: resolving that could reach for PyPI's torch.
        if "megatron-core" in requirement_names(targets) or values.get("-e") == ["."]:
            assert "--no-deps" in flags, (flags, targets)
    assert not re.search(r"\buv\s+(pip|sync|add)\b", "\n".join(dockerfile_lines())), "uv ignores PIP_CONSTRAINT"


def test_pip_constraints_are_kept_and_the_stack_pinned():
    lines = dockerfile_lines()
    assignments = [line for line in lines if re.search(r"\bPIP_CONSTRAINT=", line)]
    assert assignments
    for line in assignments:  # NGC's /etc/pip/constraint.txt is extended, never cleared or replaced
        assert re.search(r"PIP_CONSTRAINT=\"?\$\{?PIP_CONSTRAINT\b", line), line
    env = [line for line in lines if line.startswith("ENV ") and "PIP_CONSTRAINT=" in line]
    assert len(env) == 1 and PINS_FILE in env[0], env
    first_pip = next(i for i, line in enumerate(lines) if re.search(r"\bpip3?\s+install\b", line))
    assert any(f"> {PINS_FILE}" in line for line in lines[:first_pip]), "pins written after the first pip install"
    # The Dockerfile's pattern covers what it must pin.
    pattern = re.compile(re.search(r're\.compile\(r"(.*?)"\)', python_snippet("pins = {}"))[1])
    for name in ("torch", "triton", "pytorch-triton", "transformer-engine", "transformer-engine-torch", "apex",
                 "nvidia-nccl-cu13", "nvidia-cudnn-cu12"):
        assert pattern.fullmatch(name), name
    for name in ("megatron-core", "transformers", "numpy", "safetensors"):
        assert not pattern.fullmatch(name), name


def test_pins_script_pins_this_environments_torch():
    """The build-time script that writes the pins file, run in this environment."""
    run = subprocess.run([sys.executable, "-c", python_snippet("pins = {}")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    pins = dict(line.split("==") for line in run.stdout.split())
    assert pins["torch"] == importlib.metadata.version("torch")
    assert "megatron-core" not in pins and all(CONTAINER_STACK.fullmatch(name) for name in pins)


def test_build_scripts_parse():
    for body in heredocs("PY"):
        compile(body, "<Dockerfile heredoc>", "exec")
    scripts = heredocs("EOF")
    assert len(scripts) == 2
    for body in scripts:
        run = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_hadolint():
    run = subprocess.run(["hadolint", "--failure-threshold", "error", os.path.join(REPO, "docker", "Dockerfile")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


# --- build context --------------------------------------------------------------------------------------------

def test_dockerignore_keeps_the_context_to_the_source():
    for path in (".venv/bin/python", ".git/HEAD", ".pytest_cache/v/cache/nodeids", "megatron_harpe.egg-info/PKG-INFO",
                 "megatron_harpe/__pycache__/model.cpython-312.pyc", "tests/data/__pycache__/x.pyc",
                 "outputs/quickstart/run/metrics.jsonl", "checkpoints/llama2-7b/latest_checkpointed_iteration.txt",
                 "data/mixture.bin", "logs/harpe-1.out", "build/lib/x.py", "dist/x.whl"):
        assert dockerignore_excludes(path), path
    for path in ("setup.py", "README.md", "pretrain_harpe.py", "megatron_harpe/data/__init__.py", "tests/data/conftest.py",
                 "examples/slurm/pretrain_llama2.sbatch", "tools/select_bases.py", "benchmarks/rope.py",
                 "docker/Dockerfile"):
        assert not dockerignore_excludes(path), path


def test_dockerignore_keeps_every_tracked_file():
    if shutil.which("git") is None or not os.path.exists(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert files
    assert [f for f in files if dockerignore_excludes(f)] == []


# --- docker/README.md -----------------------------------------------------------------------------------------

def test_readme_build_and_run_match_the_dockerfile():
    lines = readme_shell()
    builds = [shlex.split(line) for line in lines if line.startswith("docker build")]
    assert builds
    for build in builds:
        assert build[build.index("-f") + 1] == "docker/Dockerfile" and build[-1] == ".", build
        for i, token in enumerate(build):
            if token == "--build-arg":
                assert build[i + 1].split("=")[0] in dockerfile_args(), build[i + 1]
    assert any(build[build.index("-t") + 1] == "megatron-harpe:latest" for build in builds)
    workdirs = [line.split()[1] for line in dockerfile_lines() if line.startswith("WORKDIR ")]
    assert workdirs == [IMAGE_REPO]
    assert re.search(r"^COPY \. \.$", "\n".join(dockerfile_lines()), re.M), "the repository is not copied there"
    runs = [shlex.split(line.split("#")[0]) for line in lines if line.startswith("docker run")]
    assert len(runs) == 1
    run = runs[0]
    assert {"--gpus", "--ipc=host"} <= set(run) and run[-1] == "megatron-harpe:latest", run
    mounts = [run[i + 1] for i, token in enumerate(run) if token == "-v"]
    assert mounts and all(m.split(":")[1].startswith(IMAGE_REPO + "/") for m in mounts), mounts


def test_readme_slurm_uses_what_the_sbatch_reads():
    sbatch = read("examples", "slurm", "pretrain_llama2.sbatch")
    readme = read("docker", "README.md")
    read_by_sbatch = set(re.findall(r"\$\{?(\w+)", sbatch))
    container_vars = set(re.findall(r"\bCONTAINER_[A-Z_]+", readme))
    assert {"CONTAINER_IMAGE", "CONTAINER_MOUNTS"} <= container_vars <= read_by_sbatch
    assert re.search(r"^REPO=\$\{REPO:-", sbatch, re.M), "the sbatch no longer takes REPO from the environment"
    assert '--container-workdir "$REPO"' in sbatch and "$REPO/examples/$SCRIPT" in sbatch
    from megatron_harpe.recipes import ENV_NAMES  # the launch settings (recipes.py reads them, not the shell)

    settings = set(re.findall(r"\$\{(\w+)", read("examples", "llama2_common.sh"))) | set(ENV_NAMES)
    submits = [line for line in readme_shell() if re.search(r"\bsbatch\b", line) and "=" in line]
    assert submits
    for line in submits:
        tokens = shlex.split(line)
        at = tokens.index("sbatch")
        env = dict(token.split("=", 1) for token in tokens[:at])
        assert set(env) <= read_by_sbatch | settings, set(env) - read_by_sbatch - settings
        assert env["REPO"] == IMAGE_REPO and os.path.isfile(os.path.join(REPO, "examples", env["SCRIPT"]))
        assert os.path.isfile(os.path.join(REPO, tokens[-1])), tokens[-1]
        for mount in env["CONTAINER_MOUNTS"].split(","):
            source, target = mount.split(":")
            assert source.startswith("/") and target.startswith(IMAGE_REPO + "/"), mount
    interactive = [shlex.split(line) for line in readme_shell() if line.startswith("srun")]
    assert interactive and all(s[s.index("--container-workdir") + 1] == IMAGE_REPO and s[-2:] == ["--pty", "bash"]
                               for s in interactive)


def test_readme_names_existing_launch_scripts():
    named = set(re.findall(r"\bexamples/[\w/.-]+\.(?:sh|sbatch)\b", read("docker", "README.md")))
    assert named
    for path in named:
        assert os.path.isfile(os.path.join(REPO, path)), path
