"""Where the probe's trials run: a child process it starts and watches, or (``probe="in_process"``) this one.

:class:`Child` starts ``python -m autobatch._child_main`` through :func:`spawn`, as autobatch starts every
process of its own: with ``TF_CPP_MIN_LOG_LEVEL=2`` (TensorFlow's C++ INFO and WARNING lines hidden) unless
the caller set that variable (a ``--debug`` run that sets 0 sees them again). What the child still prints
(TensorFlow logs its first lines before it reads the level) goes to a log file, never to the console; the
errors quote its end. It sends one command at a time and waits for its answer, killing the child past a
memory limit or a timeout. :class:`InProcess` answers the same commands on the caller's own model.
:func:`request_trial` asks either for a trial on a batch, :func:`trial_outcome` reads the answer.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from autobatch._memory import child_rss_limit_bytes, rss_bytes
from autobatch._shipping import WAYS_OUT, caller_path
from autobatch._trial import error_reply, session, trial
from autobatch._units import format_bytes
from autobatch._wire import pack_batch, parse_reply
from autobatch.errors import ModelError, ProbeError

logger = logging.getLogger(__name__)

CHILD_MODULE = "autobatch._child_main"
"""The module the probe's child process runs (``python -m``)."""
QUIET_TF_LOG_LEVEL = "2"
"""``TF_CPP_MIN_LOG_LEVEL`` of a child whose parent did not set it: TensorFlow's C++ INFO and WARNING lines hidden."""
_TF_START_UP_LINE = re.compile(
    r"^(?:WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|I\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] .*|To enable the following instructions: .* compiler flags\.)\n?",
    re.MULTILINE,
)
"""TensorFlow's INFO lines logged before it reads its level (oneDNN, no CUDA driver): not what went wrong."""


def child_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment autobatch starts a process of its own with: ``environ`` (default this process's).

    ``TF_CPP_MIN_LOG_LEVEL`` is :data:`QUIET_TF_LOG_LEVEL` unless ``environ`` sets it, and output is unbuffered
    (a child killed mid-trial has written all it printed).
    """
    env = dict(os.environ if environ is None else environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_TF_LOG_LEVEL)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(module: str, *, stderr: IO[Any] | int) -> subprocess.Popen[str]:
    """Start ``python -m module`` in the working directory, with :func:`child_environment`.

    Args:
        module: the module the child runs.
        stderr: where its stderr goes (a file, or ``subprocess.PIPE``).

    Returns:
        The process, its stdin and stdout text pipes.
    """
    return subprocess.Popen(
        [sys.executable, "-m", module],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=child_environment(),
        cwd=os.getcwd(),
    )


def _parquet_reader() -> None:
    import pyarrow.parquet  # noqa: F401


class Child:
    """A running trial process (``python -m autobatch._child_main``) and the lines it answers with.

    It starts loading TensorFlow and the model at once; :attr:`info` waits for that, so the caller can sample
    and preprocess the data meanwhile.
    """

    def __init__(
        self, model_ref: dict[str, Any], *, timeout_s: float, workdir: Path, shard: Path | None = None
    ) -> None:
        self._timeout_s = timeout_s
        self._model_kind = model_ref["kind"]
        self._expected_params: int | None = model_ref.get("params")
        self._stderr_path = workdir / "child-stderr.log"
        self._stderr = open(self._stderr_path, "w+b")
        self.proc = spawn(CHILD_MODULE, stderr=self._stderr)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._info: dict[str, Any] | None = None
        self._loading = self._send(
            {"cmd": "load", "model": model_ref, "shard": str(shard) if shard else None, "sys_path": caller_path()}
        )

    @property
    def info(self) -> dict[str, Any]:
        """The child's answer to loading the model (waits for it).

        Raises:
            ProbeError: the child exited or hung while loading.
            ModelError: the model could not be loaded there.
        """
        if self._info is not None:
            return self._info
        info = self._loading or self._wait(rss_limit_bytes=None)
        if info.get("timeout"):
            self.close()
            raise ProbeError(
                f"loading the model in the probe's child process took longer than {self._timeout_s:.0f} s and was "
                "killed. Check that the model function returns promptly, or raise `timeout_s`."
            )
        if info.get("died"):
            tail = self.stderr_tail()
            self.close()
            raise ProbeError(f"the probe's child process exited while loading the model. Its last output:\n{tail}")
        if not info.get("ok"):
            self.close()
            hint = f" {WAYS_OUT}" if self._model_kind == "file" else ""
            raise ModelError(f"cannot load the model in the probe's child process: {info.get('error')}.{hint}")
        if self._expected_params is not None and info.get("param_count") != self._expected_params:
            self.close()
            raise ModelError(
                f"the model the probe's child loaded has {info.get('param_count'):,} parameters, the caller's "
                f"{self._expected_params:,}: it did not arrive intact. {WAYS_OUT}"
            )
        self._info = info
        return info

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            reply = parse_reply(line)
            if reply is not None:
                self._lines.put(reply)
        self._lines.put(None)

    def stderr(self) -> str:
        """All the child wrote on stderr (and on stdout besides its replies) so far."""
        if not self._stderr.closed:
            self._stderr.flush()
        return self._stderr_path.read_bytes().decode(errors="replace")

    def stderr_tail(self, chars: int = 1500) -> str:
        """The end of the child's stderr as an error quotes it: without TensorFlow's start-up INFO lines."""
        return _TF_START_UP_LINE.sub("", self.stderr())[-chars:].strip()

    def _send(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """Write one command; the answer that stands for it when the child is gone, else ``None``."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return {"ok": False, "died": True, "error": "the child process is gone"}
        return None

    def request(self, message: dict[str, Any], *, rss_limit_bytes: int | None) -> dict[str, Any]:
        """Send one command and wait for its answer, killing the child past the RSS limit or timeout.

        Whatever ``rss_limit_bytes`` says, the child is also stopped before it and this process together would
        pass what the machine or the cgroup they share can give (:func:`autobatch._memory.child_rss_limit_bytes`).
        """
        self.info  # noqa: B018 (the model is loaded before any other command)
        return self._send(message) or self._wait(rss_limit_bytes=rss_limit_bytes, guard=True)

    def _wait(self, *, rss_limit_bytes: int | None, guard: bool = False) -> dict[str, Any]:
        deadline = time.monotonic() + self._timeout_s
        peak_seen = 0
        while True:
            try:
                line = self._lines.get(timeout=0.05)
            except queue.Empty:
                line = ""
            if line is None:
                code = self.proc.wait()
                return {"ok": False, "died": True, "returncode": code, "peak_seen": peak_seen}
            if line:
                return json.loads(line)
            if guard and self.proc.poll() is None:
                current = rss_bytes(self.proc.pid)
                peak_seen = max(peak_seen, current)
                ceiling = child_rss_limit_bytes(current)
                limit = ceiling if rss_limit_bytes is None else min(rss_limit_bytes, ceiling)
                if current > limit:
                    self.kill()
                    return {"ok": False, "over_limit": True, "peak_seen": peak_seen, "limit": limit,
                            "ceiling": limit == ceiling}
            if time.monotonic() > deadline:
                self.kill()
                return {"ok": False, "timeout": True}

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        if logger.isEnabledFor(logging.DEBUG):  # `autobatch probe --debug`: all the child printed, start-up included
            logger.debug("probe child (pid %d) stderr:\n%s", self.proc.pid, self.stderr().strip() or "(nothing)")
        self._stderr.close()


class InProcess:
    """Trials on the caller's own model in the caller's process (``probe="in_process"``): no child, no guard.

    An out-of-memory trial here kills the caller; it is the explicit choice for a model that cannot travel
    to a child. The model's weights and optimizer state are put back after every trial, so probing does not
    train it.
    """

    def __init__(self, model: Any, *, shard: Path | None = None) -> None:
        import tensorflow as tf

        if not getattr(model, "compiled", False) or model.optimizer is None:
            raise ModelError(f"model {model.name!r} is not compiled: call model.compile(optimizer=..., loss=...).")
        gpu = bool(tf.config.list_physical_devices("GPU"))
        # What else the training process feeds the model with is in this process already (autobatch.fit imports
        # the feeds before it probes); Arrow's Parquet reader may be read in only by the first shard.
        (self._model, self._held), self._info = session(
            model, str(shard) if shard else None, gpu=gpu, preload=_parquet_reader
        )
        self._gpu, self._shard = gpu, str(shard) if shard else None
        self.alive = True

    @property
    def info(self) -> dict[str, Any]:
        return self._info

    def request(self, message: dict[str, Any], *, rss_limit_bytes: int | None) -> dict[str, Any]:
        model = self._model
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)  # so its state before the trial can be put back
        weights = [v.numpy() for v in model.variables]
        state = [v.numpy() for v in model.optimizer.variables]
        try:
            return trial(model, message, self._gpu, self._shard)
        except Exception as exc:  # noqa: BLE001 (answered as the child answers a failed command)
            return error_reply(exc)
        finally:
            for variable, value in zip(model.variables, weights):
                variable.assign(value)
            for variable, value in zip(model.optimizer.variables, state):
                variable.assign(value)

    def stderr_tail(self, chars: int = 1500) -> str:
        return ""

    def kill(self) -> None:
        self.close()

    def close(self) -> None:
        self._held, self.alive = None, False


def request_trial(
    child: Child | InProcess,
    inputs: Any,
    targets: Any,
    message: Mapping[str, Any],
    *,
    workdir: Path,
    name: str,
    rss_limit_bytes: int | None,
) -> dict[str, Any]:
    """Ask ``child`` for one trial on this batch: its arrays in an ``.npz`` file (removed after), the rest in ``message``.

    Args:
        child: the handle to ask.
        inputs, targets: the preprocessed batch.
        message: the trial's other fields (``steps``, ``prefetch``, ``sweep``, ``rows``, ``batch_size``).
        workdir: where the batch file is written.
        name: the start of its name.
        rss_limit_bytes: as for :meth:`Child.request`.

    Returns:
        The answer (see :func:`trial_outcome`).
    """
    import numpy as np

    arrays, structure = pack_batch(inputs, targets)
    path = workdir / f"{name}-{os.getpid()}-{time.monotonic_ns()}.npz"
    np.savez(path, **arrays)
    del arrays
    try:
        command = {"cmd": "trial", "arrays": str(path), "structure": structure, **message}
        return child.request(command, rss_limit_bytes=rss_limit_bytes)
    finally:
        path.unlink(missing_ok=True)


def _oom_summary(error: str) -> str:
    """The line of an out-of-memory error that says what failed (TensorFlow's carry a long graph traceback)."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    line = next((line for line in lines if line.startswith("OOM when allocating")), lines[0] if lines else error)
    return line if len(line) <= 200 else line[:197] + "..."


def trial_outcome(
    reply: Mapping[str, Any], child: Child | InProcess, *, what: str, shrink: str, timeout_s: float
) -> dict[str, Any]:
    """The :class:`~autobatch.probe.StepTrial` fields a trial's answer gives.

    Args:
        reply: the child's answer to a ``trial`` command (or what :class:`Child` stands in for it with).
        child: the handle that answered.
        what: the trial, as errors name it (``"batch 32"``).
        shrink: the option a trial that timed out asks to lower.
        timeout_s: the time a trial may take.

    Returns:
        ``peak_rss_bytes``, ``gpu_peak_bytes``, ``seconds_per_step``; or ``fits``/``note`` for a trial
        that did not fit.

    Raises:
        ProbeError: the child exited or timed out.
        ModelError: the training step itself failed.
    """
    if reply.get("ok"):
        return {
            "peak_rss_bytes": reply["peak_rss_bytes"],
            "gpu_peak_bytes": reply.get("gpu_peak_bytes"),
            "seconds_per_step": reply.get("seconds_per_step"),
        }
    if reply.get("over_limit"):
        # What it reached before being stopped is a lower bound on its peak: keep it for the fit.
        note = f"stopped: child RSS passed the limit of {format_bytes(reply.get('limit'))}" + (
            " (what the machine or cgroup can give this process and the child together)" if reply.get("ceiling") else ""
        )
        return {"peak_rss_bytes": reply.get("peak_seen") or None, "fits": False, "note": note}
    if reply.get("oom"):
        return {"peak_rss_bytes": None, "fits": False, "note": f"out of memory: {_oom_summary(str(reply.get('error')))}"}
    if reply.get("died"):
        code = reply.get("returncode")
        if code is not None and code < 0:
            note = f"child killed by signal {-code} (likely out of memory)"
            return {"peak_rss_bytes": None, "fits": False, "note": note}
        raise ProbeError(
            f"the probe's child process exited (code {code}) during a trial at {what}.\n"
            f"Its last output:\n{child.stderr_tail()}"
        )
    if reply.get("timeout"):
        raise ProbeError(
            f"a training trial at {what} took longer than {timeout_s:.0f} s and was killed. "
            f"Raise `timeout_s` or probe with smaller `{shrink}`."
        )
    raise ModelError(f"training step failed at {what}: {reply.get('error')}\n{reply.get('traceback', '')}".rstrip())
