"""Every shipped profile is valid and its architecture matches the released checkpoint's size."""

import subprocess
import sys

import pytest

from kiln import profiles
from kiln.errors import KilnError
from kiln.models import base_model_parameters

# Published parameter counts of the released base models (AutoModel, pooler where released).
RELEASED = {
    "bert-tiny": 4_385_920, "bert-mini": 11_170_560, "bert-small": 28_763_648, "bert-medium": 41_373_184,
    "bert-base": 109_482_240, "bert-large": 335_141_888, "distilbert": 66_362_880,
    "distilroberta": 82_118_400, "squeezebert": 51_094_272, "roberta-base": 124_645_632,
    "roberta-large": 355_359_744, "deberta-base": 138_601_728, "deberta-large": 405_163_008,
    "multilingual-bert": 177_853_440, "xlm-roberta-base": 278_043_648, "xlm-roberta-large": 559_890_432,
}


def test_catalogue_is_complete():
    assert set(RELEASED) <= set(profiles.available())


@pytest.mark.parametrize("name", profiles.available())
def test_profile_builds_on_meta_with_released_parameter_count(name):
    config = profiles.load(name)
    assert config.name == name
    assert config.description and config.tasks
    count = base_model_parameters(config.model.type, config.model.config)
    assert count == config.params
    if name in RELEASED:
        assert count == RELEASED[name]


def test_squeezebert_is_really_squeezebert():
    assert profiles.load("squeezebert").model.type == "squeezebert"


def test_unknown_profile_lists_close_matches():
    with pytest.raises(KilnError, match="did you mean bert-mini"):
        profiles.locate("bert-mni")


def test_user_yaml_with_unknown_key_names_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: bert-tiny\ntrain: {epoch: 3}\n")
    with pytest.raises(KilnError) as err:
        profiles.load(str(path))
    assert str(path) in str(err.value) and "train.epochs" in str(err.value)


def test_invalid_yaml_reports_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ntrain: {epochs: [1\n")
    with pytest.raises(KilnError) as err:
        profiles.load(str(path))
    assert f"{path}:" in str(err.value)


def test_profiles_command_lists_parameter_counts():
    out = subprocess.run([sys.executable, "-m", "kiln", "profiles"], capture_output=True, text=True, check=True)
    assert "bert-base" in out.stdout and "109.48M" in out.stdout
    shown = subprocess.run([sys.executable, "-m", "kiln", "profiles", "show", "bert-mini"],
                           capture_output=True, text=True, check=True)
    assert "num_hidden_layers: 4" in shown.stdout
