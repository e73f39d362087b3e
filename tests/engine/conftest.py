"""Session fixtures: one saved tiny model (with tokenizer) per architecture."""
import pytest

from engine_testing import ARCHS, make_hf_model, make_tokenizer


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """arch -> (directory, transformers model) for every architecture in ARCHS."""
    dirs = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp(arch)
        model = make_hf_model(arch)
        model.save_pretrained(path)
        make_tokenizer().save_pretrained(path)
        dirs[arch] = (path, model)
    return dirs


@pytest.fixture(scope="session")
def qwen2_dir(model_dirs):
    return model_dirs["qwen2"][0]

