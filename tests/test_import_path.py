import pytest
import torch.nn.functional as F

from fedmeta.import_path import (
    call_with_named, import_path_of, is_import_path, is_passed_from_python, load, passed_from_python,
)


def test_an_import_path_names_a_module_and_an_attribute_in_it():
    assert load("torch.nn.functional:l1_loss", "task.loss") is F.l1_loss
    assert [is_import_path(t) for t in ("mypkg.models:resnet18", "mlp", "a:b:c", "a.:b", "pkg:Outer.make")] == [
        True, False, False, False, True]


def test_a_module_that_does_not_import_is_one_line_naming_the_key():
    with pytest.raises(ValueError, match=r"^model\.name = 'no_such_pkg\.models:net': cannot import "
                                         r"'no_such_pkg\.models' \(ModuleNotFoundError: No module named "
                                         r"'no_such_pkg'\)$"):
        load("no_such_pkg.models:net", "model.name")


def test_a_missing_attribute_is_one_line_naming_the_key():
    with pytest.raises(ValueError, match=r"^data\.kind = 'torch\.nn\.functional:no_such': module "
                                         r"'torch\.nn\.functional' has no 'no_such'$"):
        load("torch.nn.functional:no_such", "data.kind")


def module_level(num_classes, scale=2):
    return num_classes * scale


def test_only_what_imports_the_object_itself_is_its_path():
    assert import_path_of(F.mse_loss) == "torch.nn.functional:mse_loss"
    assert import_path_of(lambda x: x) is None
    assert import_path_of(3) is None


def test_an_object_without_a_path_is_recorded_as_passed_from_python():
    value = passed_from_python("Net <2 layers>")

    assert value == "<passed from Python: Net 2 layers>"
    assert is_passed_from_python(value) and not is_import_path(value)


def test_a_factory_gets_only_the_arguments_it_names():
    assert call_with_named(module_level, num_classes=5, input_dim=60) == 10
    assert call_with_named(lambda: "built", num_classes=5) == "built"
