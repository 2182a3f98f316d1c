"""The public surface of dcy is exactly what ``dcy.__all__`` lists."""

from __future__ import annotations

import inspect

import dcy


def test_every_name_in_all_exists() -> None:
    """Every name in __all__ is an attribute of the package."""
    missing = [name for name in dcy.__all__ if not hasattr(dcy, name)]
    assert missing == []


def test_all_has_no_duplicates_and_is_sorted() -> None:
    """__all__ is a sorted list without repeats, so additions are easy to review."""
    assert len(set(dcy.__all__)) == len(dcy.__all__)
    assert list(dcy.__all__) == sorted(dcy.__all__)


def test_every_public_class_and_function_is_exported() -> None:
    """Each public class or function of dcy, defined in dcy, is listed in __all__."""
    public = {
        name
        for name, member in vars(dcy).items()
        if not name.startswith("_")
        and (inspect.isclass(member) or inspect.isfunction(member))
        and member.__module__.split(".")[0] == "dcy"
    }
    assert public - set(dcy.__all__) == set()


def test_exported_members_come_from_private_modules() -> None:
    """Public names are re-exported from dcy's private modules, which users never import."""
    for name in dcy.__all__:
        member = getattr(dcy, name)
        if inspect.isclass(member) or inspect.isfunction(member):
            module = member.__module__
            assert module.startswith("dcy._"), f"{name} is defined in {module}"
