import types

import autobatch


def test_all_is_sorted_and_names_every_public_object():
    assert autobatch.__all__ == sorted(autobatch.__all__)
    public = {
        name
        for name, value in vars(autobatch).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(autobatch.__all__) == public


def test_probe_and_plan_are_the_functions_not_the_modules():
    assert callable(autobatch.probe) and callable(autobatch.plan)


def test_every_error_derives_from_autobatch_error():
    errors = [getattr(autobatch, n) for n in autobatch.__all__ if n.endswith("Error")]
    assert len(errors) == 7
    assert all(issubclass(e, autobatch.AutobatchError) for e in errors)


def test_planning_layer_does_not_import_tensorflow():
    import subprocess
    import sys

    code = "import sys, autobatch.plan; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
