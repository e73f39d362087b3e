"""Session fixtures: one saved tiny model (with tokenizer) per architecture."""
import pytest

from engine_testing import ARCHS, make_hf_model, saved_models


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """arch -> (directory, transformers model) for every architecture in ARCHS."""
    return saved_models(tmp_path_factory, ARCHS, make_hf_model)


@pytest.fixture(scope="session")
def qwen2_dir(model_dirs):
    return model_dirs["qwen2"][0]

