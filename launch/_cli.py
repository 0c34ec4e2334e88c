"""What every launch script shares: the repository on ``sys.path`` (config files import ``configs.base``),
the ``--config`` flag, and user mistakes reported as one line instead of a traceback."""

from __future__ import annotations

import os
import re
import signal
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


EXIT_NO_SPACE = 74  # the disk (or quota) is full: free space, the same command continues (EX_IOERR)
EXIT_MISTAKE = 2  # a bad flag, config, file or checkpoint: one `error:` line, nothing written over
EXIT_STOPPED = 75  # stopped by SIGTERM or Ctrl-C and saved: the same command continues (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # a second Ctrl-C (or one before training began): stopped at once


HELP = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def usage() -> str:
    """The script's docstring, its flags, and where the config keys are documented."""
    main_module = sys.modules["__main__"]
    script = os.path.basename(getattr(main_module, "__file__", "") or "launch/train.py")
    lines = [(main_module.__doc__ or "").strip(), "", "flags:"]
    lines.append(
        "  --config FILE[:VARIANT]  a config file, e.g. configs/demo.py or configs/gpt2_dolly.py:tiny,gkd"
    )
    lines.append("  --config.KEY=VALUE       any key of the config, e.g. --config.optim.lr=1e-4")
    own = flags.FLAGS.flags_by_module_dict().get(sys.argv[0], []) or flags.FLAGS.flags_by_module_dict().get(
        main_module.__name__, []
    )
    for flag in own:
        lines.append(f"  --{flag.name:<22} {flag.help}")
    lines += [
        "",
        "every config key, its default and meaning: distillm_jax/config/defaults.py (also configs/base.py);",
        "the paper's setups and their variants: configs/README.md; this script: launch/README.md",
    ]
    return f"usage: python launch/{script} --config FILE [flags]\n\n" + "\n".join(lines)


def _hyphenated(argv: list[str]) -> str | None:
    """The first ``--config.a-b`` key: absl reads its value as Python and fails on the key's minus."""
    for arg in argv:
        if arg.startswith("--config."):
            key = arg[len("--config.") :].split("=", 1)[0]
            if "-" in key:
                return key
    return None


def _no_space(e: BaseException) -> str | None:
    """`` writing <file>`` (or "") when ``e`` or what caused it is a full disk or quota, else None: orbax
    reports it from tensorstore as a ValueError naming the OS error, Python as an OSError."""
    import errno

    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f" writing {e.filename}" if e.filename else ""
        text = str(e)
        if "No space left on device" in text or "os_error_code='28'" in text or "Disk quota exceeded" in text:
            found = re.search(r'writing: "([^"]+)"', text)
            return f" writing {found.group(1)}" if found else ""
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _quiet_when_full() -> None:
    """A full disk fails orbax's writer threads first: each prints its traceback and logs an error, then
    the main thread raises the same failure, which ``main`` reports in one line. Those echoes are
    dropped; every other thread error and log line passes."""
    import logging
    import threading

    default = threading.excepthook

    def hook(args) -> None:
        if _no_space(args.exc_value) is None:
            default(args)

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            cause = record.exc_info[1] if record.exc_info else None
            text = record.getMessage()
            return not (
                (cause is not None and _no_space(cause) is not None)
                or "No space left on device" in text
                or (record.levelno >= logging.ERROR and "Failed to run" in text and "background save" in text)
                or "Save Finalize thread" in text
            )

    threading.excepthook = hook
    for name in ("absl", "asyncio"):  # asyncio: "Task exception was never retrieved" at exit
        logging.getLogger(name).addFilter(Drop())
    from distillm_jax.run.checkpoints import hush_abandoned_io

    hush_abandoned_io()


def _stop_at_once(sig: int, frame) -> None:
    """Ctrl-C or SIGTERM while no training step runs (imports, compiles, loading, between stages, the
    test stage): stop now, without unwinding. A KeyboardInterrupt raised into XLA's compile or jax's
    start-up could end in a segmentation fault at exit; nothing in flight needs saving here (checkpoints,
    exports and result files are written to a temporary name and renamed into place)."""
    name = signal.Signals(sig).name
    print(
        f"error: stopped by {name} at once (no training step was running); what was saved is kept; the "
        "same command continues",
        file=sys.stderr,
        flush=True,
    )
    os._exit(EXIT_INTERRUPTED if sig == signal.SIGINT else EXIT_STOPPED)


def main(body) -> None:
    """Run ``body(config)`` (True from it: the run stopped on a signal and saved); a bad flag or config,
    a bad checkpoint, a stopped or interrupted run is one line and an exit code of its own. Outside the
    training loop (which saves first: ``loop.StopRequest``), Ctrl-C and SIGTERM stop at once."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop_at_once)
    if any(arg in HELP for arg in sys.argv[1:]):
        print(usage())
        sys.exit(0)
    key = _hyphenated(sys.argv[1:])
    if key:
        print(
            f"error: config key {key}: keys are spelled with underscores (--config.{key.replace('-', '_')})",
            file=sys.stderr,
        )
        sys.exit(EXIT_MISTAKE)
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
    _quiet_when_full()
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
    except Exception as e:  # a full disk; a collective that failed because another process died or hung
        full = _no_space(e)
        if full is not None:
            print(
                f"error: no space left on the device{full} (run_dir {config.run_dir}); free space or "
                "choose a run_dir elsewhere, then run the same command: it continues from the last complete "
                "checkpoint",
                file=sys.stderr,
            )
            sys.exit(EXIT_NO_SPACE)
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
