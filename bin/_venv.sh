# Sourced by bin/* scripts: create or reuse .venv at the project root and install ish_tf into it.
# A stamp file records the hash of setup.py so an unchanged checkout skips pip entirely.
ISH_TF_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ISH_TF_VENV="${ISH_TF_VENV:-$ISH_TF_ROOT/.venv}"
_ish_tf_python="${PYTHON:-python3}"
if [ ! -x "$ISH_TF_VENV/bin/python" ]; then
  echo "ish_tf: creating virtual environment in $ISH_TF_VENV" >&2
  "$_ish_tf_python" -m venv "$ISH_TF_VENV" || { echo "ish_tf: could not create $ISH_TF_VENV (is python3-venv installed?)" >&2; exit 1; }
fi
_ish_tf_stamp="$ISH_TF_VENV/.ish_tf-installed"
_ish_tf_want="$(cat "$ISH_TF_ROOT/setup.py" "$ISH_TF_ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$_ish_tf_stamp" ] || [ "$(cat "$_ish_tf_stamp")" != "$_ish_tf_want" ]; then
  echo "ish_tf: installing the package and its dependencies into $ISH_TF_VENV (first run takes a few minutes)" >&2
  "$ISH_TF_VENV/bin/python" -m pip install -q --upgrade pip >&2 || exit 1
  "$ISH_TF_VENV/bin/python" -m pip install -q -e "$ISH_TF_ROOT[test]" >&2 || { echo "ish_tf: pip install failed" >&2; exit 1; }
  echo "$_ish_tf_want" > "$_ish_tf_stamp"
fi
export PATH="$ISH_TF_VENV/bin:$PATH"
# Quiet TensorFlow's C++ start-up chatter; failures still surface through Python exceptions.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
