import subprocess
import sys
import types

import autobatch


PUBLIC = [
    # the one-call path and its two steps
    "fit", "plan", "plan_size_aware", "probe", "Plan", "ProbeResult",
    # feeding model.fit yourself, and watching it
    "make_feed", "InMemoryFeed", "ShardFeed", "SizeAwareFeed", "SizeAwareShardFeed", "distribute_feed", "MemoryMonitor",
    # padding in preprocess, sizes in bytes
    "PadColumns", "pad_columns", "parse_bytes", "format_bytes",
    # what autobatch raises
    "AutobatchError", "BudgetError", "ConfigError", "DataError", "ModelError", "PreprocessError", "ProbeError",
]


def test_the_public_names_are_the_ones_a_training_script_needs():
    assert autobatch.__all__ == sorted(PUBLIC)


def test_everything_else_stays_in_its_submodule():
    from autobatch.bucket_plan import BucketPlan
    from autobatch.padding import count_truncations
    from autobatch.plan import make_plan

    for name, value in [("BucketPlan", BucketPlan), ("make_plan", make_plan), ("count_truncations", count_truncations)]:
        assert name not in autobatch.__all__ and not hasattr(autobatch, name), name
        assert callable(value)


def test_all_is_sorted_and_names_every_public_object():
    assert autobatch.__all__ == sorted(autobatch.__all__)
    eager = {
        name
        for name, value in vars(autobatch).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType) and name not in {"annotations", "importlib", "Any"}
    }
    assert eager <= set(autobatch.__all__)
    for name in autobatch.__all__:
        assert getattr(autobatch, name) is not None


def test_unknown_attribute_is_an_attribute_error():
    try:
        autobatch.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_probe_and_plan_are_the_functions_not_the_modules():
    assert callable(autobatch.probe) and callable(autobatch.plan) and callable(autobatch.fit)


def test_every_error_derives_from_autobatch_error():
    errors = [getattr(autobatch, n) for n in autobatch.__all__ if n.endswith("Error")]
    assert len(errors) == 7
    assert all(issubclass(e, autobatch.AutobatchError) for e in errors)


def test_import_and_planning_do_not_load_tensorflow():
    code = "import sys, autobatch, autobatch.plan; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
