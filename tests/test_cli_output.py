"""What the `bin/` commands print: TensorFlow's start-up noise is left out, nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from ish_tf.cli import tensorflow_start_lines

# As TensorFlow 2.21 prints them on a CPU-only Linux machine.
NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1795266594.563292   23719 port.cc:153] oneDNN custom operations are on. You "
    "may see slightly different numerical results due to floating-point round-off errors.",
    "I0000 00:00:1795266594.691023   23719 cpu_feature_guard.cc:227] This TensorFlow binary is "
    "optimized to use available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow "
    "with the appropriate compiler flags.",
]
NO_DRIVER = ("I0000 00:00:1795266594.563695   23719 cudart_stub.cc:31] Could not find cuda "
             "drivers on your machine, GPU will not be used.")
CUINIT = ("E0000 00:00:1795266598.035168   23719 cuda_platform.cc:52] failed call to cuInit: "
          "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)")


def test_start_lines_drop_the_noise_and_keep_the_rest():
    other = ["W0000 00:00:1.0 1 some_op.cc:1] a real warning", "Traceback (most recent call last):"]
    assert tensorflow_start_lines(NOISE + [NO_DRIVER, other[0], CUINIT, other[1]]) == other
    # With a driver installed, a failed cuInit is a real problem: it stays.
    assert tensorflow_start_lines(NOISE + [CUINIT]) == [CUINIT]
    assert tensorflow_start_lines([]) == []


def _fake_tensorflow(root, body: str):
    """A directory whose `tensorflow` package runs `body` on import."""
    (root / "tensorflow").mkdir(parents=True)
    (root / "tensorflow" / "__init__.py").write_text(textwrap.dedent(body))
    return root


def _run(cwd, level: str) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom ish_tf.cli import import_tensorflow_quietly\n"
            "import_tensorflow_quietly()\nprint('imported', file=sys.stderr)")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": level}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_import_filters_the_file_descriptor_and_replays_on_failure(tmp_path):
    lines = "\\n".join(NOISE + [NO_DRIVER, "W0000 a real warning", CUINIT])
    ok = _fake_tensorflow(tmp_path / "ok", f"""
        import os, sys
        os.write(2, b"{lines}\\n")  # as the C++ libraries do, below Python's sys.stderr
        print("a Python warning", file=sys.stderr)
        class config:
            @staticmethod
            def list_physical_devices():
                os.write(2, b"device search\\n")
        """)
    quiet = _run(ok, "2")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.splitlines() == ["W0000 a real warning", "a Python warning",
                                         "device search", "imported"]
    verbose = _run(ok, "0")  # TF_CPP_MIN_LOG_LEVEL below 2: nothing filtered
    assert all(line in verbose.stderr for line in NOISE)

    broken = _fake_tensorflow(tmp_path / "broken", f"""
        import os
        os.write(2, b"{NOISE[0]}\\nwhy it broke\\n")
        raise ImportError("libcudnn.so.9: cannot open shared object file")
        """)
    failed = _run(broken, "2")
    assert failed.returncode != 0
    assert NOISE[0] in failed.stderr and "why it broke" in failed.stderr  # all of it, replayed
    assert "libcudnn.so.9" in failed.stderr


def test_real_tensorflow_starts_quietly(tmp_path):
    """Against the installed TensorFlow: the quiet import shows exactly what the filter keeps of
    a plain import's output (here: nothing, of 6-7 lines), and no start-up line survives."""
    quiet = _run(tmp_path, "2")
    assert quiet.returncode == 0, quiet.stderr
    shown = quiet.stderr.splitlines()
    assert shown[-1] == "imported"
    assert not [line for line in shown[:-1] if not tensorflow_start_lines([line])], shown
    plain = subprocess.run(
        [sys.executable, "-c", "import tensorflow as tf; tf.config.list_physical_devices()"],
        cwd=tmp_path, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True,
        text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    assert len(tensorflow_start_lines(plain.stderr.splitlines())) == len(shown) - 1
