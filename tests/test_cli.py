import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from autobatch.cli import main

import canonical

PREPROCESS = f"{canonical.__file__}:preprocess"
MODEL = f"{canonical.__file__}:build_model"


def run(*args: str) -> tuple[int, str]:
    buffer = io.StringIO()
    code = main(list(args), console=Console(file=buffer, width=160))
    return code, buffer.getvalue()


@pytest.mark.parametrize("which", ["csv", "parquet", "frame.parquet", "csv/3.csv", "parquet/*.parquet"])
def test_probe_prints_tables_for_files_directories_and_globs(shard_dirs, which):
    code, out = run("probe", str(shard_dirs / which), "--target", "label", "--preprocess", PREPROCESS, "--no-cache")
    assert code == 0
    assert "autobatch probe" in out and "autobatch plan" in out and "batch_size" in out
    assert "after preprocess / sample (worst)" in out


def test_json_is_one_parseable_object_with_the_numbers(shard_dirs, frame):
    code, out = run(
        "probe", str(shard_dirs / "csv"), "--target", "label", "--preprocess", PREPROCESS,
        "--ram-limit", "8GiB", "--max-batch-size", "100", "--json", "--no-cache",
    )
    assert code == 0
    data = json.loads(out)
    assert data["batch_size"] == 100 and data["limited_by"] == "max_batch_size"
    assert data["probe"]["n_samples"] == len(frame)
    assert data["budgets"][0]["budget"]["limit_bytes"] == 8 * 1024**3
    assert data["probe"]["worst_preprocessed_bytes_per_sample"] >= data["probe"]["preprocessed_bytes_per_sample"]


def test_data_from_a_module_function(tmp_path, frame, monkeypatch):
    frame.to_parquet(tmp_path / "frame.parquet")
    (tmp_path / "mydata.py").write_text(
        "import pandas as pd\n"
        "def load():\n"
        "    f = pd.read_parquet('frame.parquet')\n"
        "    return f.drop(columns=['label']), f['label']\n"
    )
    monkeypatch.chdir(tmp_path)
    code, out = run("probe", "mydata:load", "--preprocess", PREPROCESS, "--json", "--no-cache")
    assert code == 0 and json.loads(out)["n_samples"] == len(frame)


def test_errors_exit_1_with_the_message_and_no_traceback(tmp_path, capsys):
    code, _ = run("probe", str(tmp_path / "missing"), "--no-cache")
    err = capsys.readouterr().err
    assert code == 1 and "DataError" in err and "does not exist" in err and "Traceback" not in err


def test_budget_too_small_exits_1(shard_dirs, capsys):
    code, _ = run("probe", str(shard_dirs / "csv"), "--target", "label", "--preprocess", PREPROCESS,
                  "--ram-limit", "1KiB", "--no-cache")
    assert code == 1 and "cannot hold even one sample" in capsys.readouterr().err


@pytest.mark.parametrize("args", [[], ["probe"], ["probe", "x", "--safety", "2"], ["probe", "x", "--max-batch-size", "0"]])
def test_usage_errors_exit_2(args):
    with pytest.raises(SystemExit) as excinfo:
        main(args)
    assert excinfo.value.code == 2


TF_START_UP = ("port.cc", "cudart_stub.cc", "cuInit", "absl::InitializeLog")


def probe_with_the_console_script(data: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """The real `autobatch probe` on ``data`` with a real model, as a user's shell starts it: no log level set."""
    exe = Path(sys.executable).with_name("autobatch")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run(
        [str(exe), "probe", str(data), "--target", "label", "--preprocess", PREPROCESS, "--model", MODEL,
         "--ram-limit", "2GiB", "--no-cache", *flags],
        capture_output=True, text=True, timeout=600, env=env,
    )


def test_installed_console_script_with_a_model(shard_dirs):
    """The real `autobatch` executable, a real model probed in a child, JSON out, no TensorFlow start-up lines."""
    out = probe_with_the_console_script(shard_dirs / "parquet", "--trial-batch-sizes", "4,16", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert not [line for line in out.stderr.splitlines() if any(s in line for s in TF_START_UP)], out.stderr
    data = json.loads(out.stdout)
    assert data["confirmed"] and data["probe"]["device"] == "CPU"
    assert [t["batch_size"] for t in data["probe"]["trials"]][:2] == [4, 16]
    assert data["budgets"][0]["predicted_peak_bytes"] <= data["budgets"][0]["usable_bytes"]


def test_debug_shows_tensorflows_start_up_logging_from_the_probe_child(shard_dirs):
    out = probe_with_the_console_script(shard_dirs / "parquet", "--trial-batch-sizes", "4", "--no-confirm", "--debug")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "probe child (pid" in out.stderr and "port.cc" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize(("before", "flags", "after"), [(None, [], "2"), ("1", [], "1"), (None, ["--debug"], "0"), ("3", ["--debug"], "0")])
def test_tensorflow_log_level_is_set_before_tensorflow_loads(shard_dirs, monkeypatch, before, flags, after):
    if before is None:
        monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", before)
    code, _ = run("probe", str(shard_dirs / "csv"), "--target", "label", "--preprocess", PREPROCESS, *flags)
    assert code == 0 and os.environ["TF_CPP_MIN_LOG_LEVEL"] == after


def test_size_aware_options_without_size_aware_are_reported_not_silently_ignored(shard_dirs, capsys):
    code, out = run(
        "probe", str(shard_dirs / "csv"), "--target", "label", "--preprocess", PREPROCESS, "--no-cache",
        "--buckets", "4", "--sequence-columns", "in1",
    )
    err = capsys.readouterr().err
    assert code == 0 and "autobatch plan" in out
    assert "--buckets has no effect without --size-aware" in err
    assert "--sequence-columns has no effect without --size-aware" in err
