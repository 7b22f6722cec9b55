"""The one registry idiom: scorers, data readers and prompt readers look names up alike."""

from __future__ import annotations

import pytest

from lobass.data import CONVERTERS, DataError, read_examples
from lobass.evaluation.prompts import PROMPT_READERS, read_prompts
from lobass.registry import Registry
from lobass.schema import registries
from lobass.scoring import SCORERS, get_scorer


def test_a_name_registered_twice_is_refused_and_a_miss_names_the_choices() -> None:
    colours: Registry[int] = Registry("colour", KeyError)
    colours.add("red", 1)
    with pytest.raises(ValueError, match="colour 'red' is registered twice"):
        colours.add("red", 2)
    assert colours["red"] == 1 and list(colours) == ["red"] and len(colours) == 1
    with pytest.raises(KeyError, match=r"unknown colour 'blue'; choose one of \['red'\]"):
        colours.lookup("blue")


def test_each_registry_misses_with_its_own_error_and_the_config_checks_read_the_same_names(
        tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown scorer 'alpagasus'; choose one of \['ifd'"):
        get_scorer("alpagasus")
    with pytest.raises(DataError, match=r"unknown data reader 'csv'; choose one of \['alpaca'"):
        read_examples(tmp_path / "absent.json", "csv")
    with pytest.raises(DataError, match=r"unknown prompt reader 'csv'; choose one of \['alpaca'"):
        read_prompts(tmp_path / "absent.json", "csv")
    assert registries.scorers() == sorted(SCORERS)
    assert registries.readers() == sorted(CONVERTERS)
    assert registries.prompt_readers() == sorted({"fastchat", *CONVERTERS})
    assert set(PROMPT_READERS) == {"fastchat", *CONVERTERS}
