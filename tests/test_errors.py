"""One error family: every exception class rge defines is an ``RGEError``, keeps its built-in base, and real
failures raise one that ``except RGEError`` catches."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys

import pytest

import rge
import rge.errors
from rge import RGEEncoder, RGEError
from rge.errors import (
    RGECheckpointError,
    RGEDataError,
    RGEInputError,
    RGEJobError,
    RGEMissingExtraError,
    RGEModelNotFoundError,
    RGESettingsError,
    TrainingDataError,
    TrainingSetupError,
    require_extra,
)


def exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of rge (warnings aside: they are issued, not raised)."""
    found = {}
    for module in pkgutil.walk_packages(rge.__path__, "rge."):
        if module.name.endswith(".__main__"):  # runs the command when imported
            continue
        for name, value in vars(importlib.import_module(module.name)).items():
            if (
                inspect.isclass(value) and issubclass(value, BaseException) and not issubclass(value, Warning)
                and value.__module__ == module.name
            ):  # fmt: skip
                found[f"{module.name}.{name}"] = value
    return found


def test_every_exception_class_of_rge_is_an_rge_error():
    classes = exception_classes()
    expected = {"rge.serving.protocol.APIError", "rge.serving.request_images.ImageRejected",
                "rge.serving.bodies.BodyTooLarge", "rge.cli.errors.CLIError", "rge.errors.RGEInputError"}  # fmt: skip
    assert expected <= set(classes)
    assert not sorted(name for name, cls in classes.items() if not issubclass(cls, RGEError))


@pytest.mark.parametrize(
    "error, base",
    [(RGEInputError, ValueError), (RGECheckpointError, ValueError), (RGEModelNotFoundError, FileNotFoundError),
     (RGEModelNotFoundError, RGECheckpointError), (RGEMissingExtraError, ImportError), (RGEDataError, ValueError),
     (TrainingDataError, ValueError), (TrainingSetupError, ValueError), (RGEJobError, ValueError),
     (RGESettingsError, ValueError)],
)  # fmt: skip
def test_each_keeps_the_built_in_base_callers_caught_before(error, base):
    assert issubclass(error, base) and issubclass(error, RGEError)


def test_the_classes_defined_elsewhere_are_the_ones_in_rge_errors():
    from rge.corpus import RGEJobError as job
    from rge.eval.mmeb import RGESettingsError as settings
    from rge.training import TrainingDataError as data
    from rge.training import TrainingSetupError as setup

    assert (job, settings, data, setup) == (RGEJobError, RGESettingsError, TrainingDataError, TrainingSetupError)
    assert {"RGEError", "RGEInputError", "RGECheckpointError", "RGEModelNotFoundError", "RGEMissingExtraError"} <= set(
        rge.__all__
    )


def _no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(
    "options, expected, said",
    [
        ({"device": "cuda"}, RGEInputError, "CUDA is not available"),
        ({"device": "tpu"}, RGEInputError, "is not a device"),
        ({"min_pixels": 0}, RGEInputError, "min_pixels must be a positive int, got 0"),
        ({"max_pixels": 28 * 28}, RGEInputError, "min_pixels 200704 (the default) is above max_pixels 784"),
        ({"dtype": "int8"}, RGEInputError, "not a floating-point type"),
        ({"dtype": "float33"}, RGEInputError, "not a torch dtype"),
    ],
)
def test_bad_loading_options_are_input_errors_before_anything_is_read(monkeypatch, options, expected, said):
    _no_cuda(monkeypatch)
    monkeypatch.setattr("rge.encoder.resolve_checkpoint", _never_resolved)
    with pytest.raises(RGEError) as raised:
        RGEEncoder.from_pretrained("MCG-NJU/RGE", **options)
    assert type(raised.value) is expected and said in str(raised.value)


def _never_resolved(*args, **kwargs):
    raise AssertionError("the checkpoint was looked for before the options were checked")


def test_a_missing_extra_is_one_line_with_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.serve", None)  # makes "import ray.serve" fail
    with pytest.raises(RGEError) as raised:
        require_extra("ray.serve", extra="ray", needed_by="serving with Ray Serve")
    assert str(raised.value) == 'serving with Ray Serve needs ray: pip install "rge-embeddings[ray]"'
    assert isinstance(raised.value, ImportError) and isinstance(raised.value.__cause__, ModuleNotFoundError)


def test_an_extra_that_is_installed_but_broken_says_so(monkeypatch, tmp_path):
    (tmp_path / "broken_extra.py").write_text("import no_such_dependency_of_it\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RGEMissingExtraError, match=r"needs broken_extra: .* installed but does not import: .*no_such"):
        require_extra("broken_extra", extra="x", needed_by="this")


@pytest.mark.parametrize(
    "module, package",
    [("rge.serving.ray_serve", "ray.serve"), ("rge.integrations.ray", "ray.data"), ("rge.integrations.mteb", "mteb")],
)
def test_importing_an_adapter_without_its_extra_is_a_missing_extra_error(monkeypatch, module, package):
    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(RGEError, match=r'pip install "rge-embeddings\[\w+\]"'):
        importlib.import_module(module)


def test_create_app_without_the_serve_extra(monkeypatch):
    import rge.serving

    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(RGEMissingExtraError, match=r'rge.serving.create_app needs fastapi: .*\[serve\]"'):
        rge.serving.create_app  # noqa: B018 (the attribute is what imports the app)


def test_an_input_error_carries_the_item_and_the_bare_reason(encoder, tmp_path):
    """Callers that report the item their own way read ``index``, ``part`` and ``reason``; ``str()`` is the
    one line users see, the item first."""
    missing = tmp_path / "missing.png"
    with pytest.raises(RGEInputError) as raised:
        encoder.prepare(["fine", {"text": "a photo", "image": missing}], reason=False)
    error = raised.value
    assert (error.index, error.part) == (1, "image")
    assert error.reason == f"image file not found: {str(missing)!r}"
    assert str(error) == f"item 1: image file not found: {str(missing)!r}"
    whole = RGEInputError("give texts, images or both")
    assert (whole.index, whole.part, whole.reason, str(whole)) == (None, None, "give texts, images or both",
                                                                    "give texts, images or both")  # fmt: skip
