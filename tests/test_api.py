"""The package's public names resolve (lazy ones included), so a notebook user's imports work."""

import draftguide


def test_every_public_name_resolves():
    for name in draftguide.__all__:
        assert callable(getattr(draftguide, name)), name


def test_unknown_name_raises_attribute_error():
    import pytest

    with pytest.raises(AttributeError):
        draftguide.no_such_thing  # noqa: B018
