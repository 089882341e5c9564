from pathlib import Path

import pytest
import torch

from bem.core.attach import Attachment
from bem.core.models import build_tiny_llama, byte_tokenizer, save_model, tiny_gpt2, tiny_llama_config


@pytest.fixture
def llama() -> torch.nn.Module:
    return build_tiny_llama(tiny_llama_config(), seed=0)


@pytest.fixture
def gpt2() -> torch.nn.Module:
    return tiny_gpt2(seed=0)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 259, (3, 20), generator=torch.Generator().manual_seed(1))


def randomize(attachment: Attachment, scale: float = 0.3) -> None:
    """U starts at zero, which would hide every code effect: give the bases real values."""
    with torch.no_grad():
        for site in attachment.sites.values():
            site.U.normal_(0, scale)
            site.V.normal_(0, scale)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ~90k-parameter test base saved to disk, so experiments load it through the real loading code."""
    path = tmp_path_factory.mktemp("base")
    save_model(build_tiny_llama(tiny_llama_config(), seed=0), byte_tokenizer(), path)
    return path
