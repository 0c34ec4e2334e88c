"""What every launch script shares: the repository on ``sys.path`` (config files import ``configs.base``),
the ``--config`` flag, and user mistakes reported as one line instead of a traceback."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

CONFIG = config_flags.DEFINE_config_file("config", None, "a config file, e.g. configs/demo.py[:tiny]")
flags.mark_flags_as_required(["config"])


def _one_line(e: BaseException) -> str:
    """The useful line of a flag error (config_flags wraps a config file's own error in a traceback)."""
    lines = [x.strip() for x in str(e).replace("\\n", "\n").splitlines() if x.strip()]
    text = lines[-1] if lines else type(e).__name__
    if isinstance(e, AttributeError | KeyError):
        text = "unknown config key " + re.sub(r"[\\'\"]+", "", " ".join(lines)).replace("? ", "?")
    return text


def _config_file(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


EXIT_MISTAKE = 2  # a bad flag, config, file or checkpoint: one `error:` line, nothing written over
EXIT_STOPPED = 75  # stopped by SIGTERM or Ctrl-C and saved: the same command continues (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # a second Ctrl-C (or one before training began): stopped at once


def main(body) -> None:
    """Run ``body(config)`` (True from it: the run stopped on a signal and saved); a bad flag or config,
    a bad checkpoint, a stopped or interrupted run is one line and an exit code of its own."""
    from absl import logging

    from distillm_jax.config import ConfigError
    from distillm_jax.models import CheckpointError
    from distillm_jax.trainer import TrainingError

    path = (_config_file(sys.argv) or "").split(":")[0]
    if path and not os.path.isfile(path):
        print(f"error: config file {path} does not exist", file=sys.stderr)
        sys.exit(EXIT_MISTAKE)
    try:  # an unknown --config.key, a value of the wrong type, a config file that fails
        argv = flags.FLAGS(sys.argv)
        config = CONFIG.value
    except Exception as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_MISTAKE)
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        sys.exit(EXIT_MISTAKE)
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    try:
        from distillm_jax import config as cfglib
        from distillm_jax import distributed

        cfglib.check(config)
        distributed.initialize(config)  # before any device is touched
        stopped = body(config)
    except (ConfigError, CheckpointError, TrainingError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_MISTAKE)
    except KeyboardInterrupt:
        print(
            "error: interrupted at once; what was saved is kept (the same command continues from the last "
            "checkpoint)",
            file=sys.stderr,
        )
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # a collective that failed because another process died or hung
        import jax

        if jax.process_count() == 1 or not isinstance(e, jax.errors.JaxRuntimeError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(
            f"error: process {jax.process_index()}: another process stopped or lost contact ({first}); "
            "fix what stopped it (its log), then run again with --config.resume=True",
            file=sys.stderr,
        )
        sys.exit(1)
    if stopped:
        sys.exit(EXIT_STOPPED)
