"""The public API's shape: annotated, typed, one signature convention for the estimators.

* every public function and method of every public module (the names in its ``__all__``) has a
  return annotation, and the package ships ``py.typed``, so type checkers read them;
* string options are ``Literal`` types whose values are the ones the checks accept;
* every estimator constructor takes the model as its only positional argument
  (``tests/test_validation.py`` checks the call side).
"""

import importlib
import inspect
import pkgutil
import typing
from pathlib import Path

import vaeml_jax as vj
from vaeml_jax.estimators import _common, sumo


def _public_modules():
    for info in pkgutil.walk_packages(vj.__path__, "vaeml_jax."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        yield importlib.import_module(info.name)


def _public_functions():
    for mod in _public_modules():
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name, None)
            if inspect.isfunction(obj) and obj.__module__ == mod.__name__:
                yield f"{mod.__name__}.{name}", obj
            elif inspect.isclass(obj) and obj.__module__ == mod.__name__:
                for attr, value in vars(obj).items():
                    if not attr.startswith("_") and inspect.isfunction(value):
                        yield f"{mod.__name__}.{name}.{attr}", value


def test_every_public_function_has_a_return_annotation():
    found = dict(_public_functions())
    assert len(found) > 150  # the walk saw the package
    missing = sorted(name for name, fn in found.items() if "return" not in fn.__annotations__)
    assert not missing, f"public functions without a return annotation: {missing}"


def test_the_package_ships_py_typed():
    assert (Path(vj.__file__).parent / "py.typed").is_file()


def test_string_options_are_literals_of_the_accepted_values():
    assert typing.get_args(_common.EncoderObjective) == _common.ENCODER_OBJECTIVES
    assert set(_common.REPARAM_OBJECTIVES) <= set(_common.ENCODER_OBJECTIVES)
    assert typing.get_args(sumo.SumoEncoderObjective) == sumo.ENCODER_OBJECTIVES
    hints = typing.get_type_hints(vj.make_unbiased_grad)
    assert _common.EncoderObjective in typing.get_args(hints["encoder_objective"])
    slots = typing.get_type_hints(vj.LoopOptions)["num_slots"]
    assert typing.Literal["auto"] in typing.get_args(slots)


def test_gradient_info_documents_every_field():
    doc = inspect.getdoc(vj.GradientInfo)
    for field in vj.GradientInfo.__annotations__:
        assert f"{field}:" in doc, field
