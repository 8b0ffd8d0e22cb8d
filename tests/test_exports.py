import subprocess
import sys
import types

import autobatch


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
