"""The ``featlab`` console script as a process of its own (what shells and pipes see)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FEATLAB = str(Path(sys.executable).with_name("featlab"))


def test_a_reader_that_stops_early_is_no_error():
    # `featlab points resnet50 | head -1`: the pipe closes while featlab still prints
    done = subprocess.Popen([FEATLAB, "points", "resnet50", "--input-size", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done.stdout.close()  # the reader is gone before the first line
    err = done.stderr.read().decode()
    assert done.wait(timeout=120) == 141  # as a shell reports a process ended by SIGPIPE
    assert err == ""  # no BrokenPipeError traceback


def test_errors_and_warnings_are_one_line_each(tmp_path):
    done = subprocess.run([FEATLAB, "inspect", str(tmp_path / "missing.h5")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("featlab inspect: error:")


def test_progress_bars_write_a_log_file_seldom(tmp_path):
    # stderr into a file, as in a batch job: the bar shows at start and end, not 10 times a second
    cmd = [FEATLAB, "extract", "--model", "resnet18", "--weights", "none", "--data", "shapes",
           "--input-size", "64", "--limit", "160", "--batch-size", "2", "--workers", "0",
           "--out", str(tmp_path / "c.h5")]
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_MININTERVAL", "FEATLAB_PROGRESS")}
    with open(tmp_path / "log", "w") as log:
        done = subprocess.run(cmd, stderr=log, stdout=subprocess.DEVNULL, env=env, timeout=300)
    text = (tmp_path / "log").read_text()
    assert done.returncode == 0, text
    renders = text.count("extract c.h5:")
    assert 1 <= renders <= 3, text
    assert "160/160" in text  # the last state is there


def test_ctrl_c_while_torch_loads_waits_for_it_then_stops_cleanly(tmp_path):
    # interrupted midway, `import torch` left half-registered operators: a segfault or a
    # RuntimeError. A Ctrl-C that arrives while it loads (here: sent by the import of
    # torchvision itself) is acted on once both are loaded.
    script = tmp_path / "run.py"
    script.write_text(
        "import builtins, os, signal, sys\n"
        "real = builtins.__import__\n"
        "def hooked(name, *args, **kwargs):\n"
        "    if name == 'torchvision' and not hooked.sent:\n"
        "        hooked.sent = True\n"
        "        os.kill(os.getpid(), signal.SIGINT)  # pending: handled after this import\n"
        "        module = real(name, *args, **kwargs)\n"
        "        print('torchvision loaded', flush=True)\n"
        "        return module\n"
        "    return real(name, *args, **kwargs)\n"
        "hooked.sent = False\n"
        "builtins.__import__ = hooked\n"
        "from featlab.cli import main\n"
        "code = main(['models'])\n"
        "print('exit', code, 'handler restored', signal.getsignal(signal.SIGINT) is "
        "signal.default_int_handler)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.splitlines() == ["torchvision loaded", "exit 130 handler restored True"]
    assert done.stderr == "featlab models: interrupted\n"


def test_every_option_says_what_it_does_and_its_default():
    import argparse

    from featlab.cli import build_parser

    def options(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, command in action.choices.items():
                    yield from options(command, f"{name} {sub}")
            elif action.option_strings and action.dest not in ("help", "version"):
                yield name, action

    seen = 0
    for name, action in options(build_parser(), "featlab"):
        seen += 1
        flag = f"{name} {action.option_strings[-1]}"
        assert action.help, f"{flag} has no help"
        if action.default is not None and action.default is not False:  # 0 counts
            assert "default" in action.help, f"{flag} hides its default {action.default!r}"
    assert seen > 100


def test_the_readme_shows_every_option():
    import argparse

    from featlab.cli import build_parser

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme[readme.index("## Command line"):readme.index("## Python")]
    missing = []

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, command in action.choices.items():
                    walk(command, f"{name} {sub}")
            for flag in action.option_strings:
                if flag.startswith("--") and flag not in ("--help", "--version", "--quiet",
                                                          "--verbose") and flag not in block:
                    missing.append(f"{name} {flag}")

    walk(build_parser(), "featlab")
    assert not missing, missing


def test_commands_that_only_read_caches_start_without_torch(tmp_path):
    # importing torch and torchvision took 3.7 s of the 3.9 s `featlab inspect` took here
    import featlab.testing as ft
    from featlab.cache.writer import extract
    from featlab.data import load_dataset
    from featlab.models import BackboneSpec

    cache = tmp_path / "c.h5"
    spec = BackboneSpec("tiny", "none", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32, 10)
    extract(ft.TinyResNet(), load_dataset("shapes", "val", size=32, length=4), "stages", cache,
            spec=spec, batch_size=2, num_workers=0, progress=False)
    script = (
        "import sys\n"
        "from featlab.cli import main\n"
        f"codes = [main(['inspect', {str(cache)!r}]), main(['verify', {str(cache)!r}]),\n"
        f"         main(['merge', {str(cache)!r}, '--out', {str(tmp_path / 'm.h5')!r}])]\n"
        "print(codes, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.splitlines()[-1] == "[0, 0, 2] False", done.stdout + done.stderr
    assert "is a whole cache" in done.stderr  # merge read it before refusing it
