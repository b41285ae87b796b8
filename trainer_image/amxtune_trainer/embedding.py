"""The learned token: only its vectors are a trainable parameter.

The text encoder's input embedding (49,408 x 768 for SD-1.5) stays frozen and untouched;
`SplicedEmbedding` wraps it and substitutes the new vectors wherever a placeholder id appears.
Nothing is copied or restored per step, frozen rows stay bit-identical, and the only gradient
is the [num_vectors, hidden] tensor of the new vectors (what the ranks all-reduce).
"""

from __future__ import annotations

from pathlib import Path

from amxtune_trainer.errors import UserError


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """'<tok>', '<tok>_1', ... — the names diffusers' load_textual_inversion also uses."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def add_placeholder_tokens(tokenizer, placeholder: str, num_vectors: int) -> list[int]:
    """Add the placeholder tokens; UserError when one already exists. Returns their ids."""
    tokens = placeholder_tokens(placeholder, num_vectors)
    vocab = tokenizer.get_vocab()
    # A key of the vocabulary, or a word the tokenizer already reads as one token ('toy').
    taken = [
        t for t in tokens
        if t in vocab or len(tokenizer.encode(t, add_special_tokens=False)) == 1
    ]
    if taken:
        raise UserError(
            f"placeholder token {taken[0]!r} is already in the tokenizer's vocabulary; "
            "choose another, e.g. '<my-concept>'"
        )
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise UserError(f"placeholder token {placeholder!r} could not be added to the tokenizer")
    ids = tokenizer.convert_tokens_to_ids(tokens)
    # Each must tokenize to exactly itself, or prompts would not reach the new vectors.
    for token, token_id in zip(tokens, ids, strict=True):
        if tokenizer.encode(token, add_special_tokens=False) != [token_id]:
            raise UserError(f"placeholder token {token!r} does not tokenize to a single token")
    return ids


def token_text(placeholder: str, num_vectors: int) -> str:
    """What a prompt contains for the concept: all its tokens in order."""
    return " ".join(placeholder_tokens(placeholder, num_vectors))


def initializer_ids(tokenizer, initializer: str) -> list[int]:
    ids = tokenizer.encode(initializer, add_special_tokens=False)
    if not ids:
        raise UserError(f"initializer token {initializer!r} tokenizes to nothing")
    return ids


def initial_vectors(embedding_weight, init_ids: list[int], num_vectors: int):
    """Spread the initializer's token embeddings over the vectors, in order.

    With as many tokens as vectors each vector takes one; with fewer tokens, vector i takes
    token floor(i * k / n); with more, vector i is the mean of its contiguous share.
    """
    import torch

    k, n = len(init_ids), num_vectors
    rows = embedding_weight.detach()[torch.tensor(init_ids)].float()
    if k <= n:
        return torch.stack([rows[i * k // n] for i in range(n)]).clone()
    bounds = [round(i * k / n) for i in range(n + 1)]
    return torch.stack([rows[bounds[i]:bounds[i + 1]].mean(0) for i in range(n)])


def read_embedding_file(path: str | Path, num_vectors: int, hidden: int):
    """Vectors [num_vectors, hidden] from a diffusers, A1111 or plain tensor file."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"initial embedding file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(f"cannot read initial embedding {path}: {first}") from None
    tensor = data
    if isinstance(data, dict):
        if "string_to_param" in data:  # Automatic1111
            tensor = next(iter(data["string_to_param"].values()), None)
        elif "emb_params" in data:
            tensor = data["emb_params"]
        else:
            tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
            tensor = tensors[0] if len(tensors) == 1 else None
    if not isinstance(tensor, torch.Tensor):
        raise UserError(f"initial embedding {path} must hold exactly one embedding tensor")
    tensor = tensor.detach().float()
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tuple(tensor.shape) != (num_vectors, hidden):
        raise UserError(
            f"initial embedding {path} has shape {list(tensor.shape)}, expected "
            f"[{num_vectors}, {hidden}] (num_vectors x text encoder hidden size)"
        )
    return tensor.clone()


def _make_module_class():
    import torch
    from torch import nn

    class SplicedEmbedding(nn.Module):
        """Frozen nn.Embedding plus trainable rows for the placeholder ids."""

        def __init__(self, base: nn.Embedding, new_ids: list[int], vectors: torch.Tensor):
            super().__init__()
            self.base = base
            self.vectors = nn.Parameter(vectors.detach().float().clone())
            size = max(max(new_ids) + 1, base.num_embeddings)
            slot = torch.full((size,), -1, dtype=torch.long)
            slot[torch.tensor(new_ids)] = torch.arange(len(new_ids))
            self.register_buffer("slot", slot, persistent=False)
            self.first_new_id = min(new_ids)

        @property
        def weight(self):  # what code that inspects the embedding expects (dtype, shape)
            return self.base.weight

        @property
        def num_embeddings(self) -> int:
            return int(self.slot.numel())

        @property
        def embedding_dim(self) -> int:
            return self.base.embedding_dim

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            slots = self.slot[ids]
            is_new = slots >= 0
            if not bool(is_new.any()):
                return self.base(ids)
            out = self.base(ids.masked_fill(is_new, 0))
            new = self.vectors.to(out.dtype)[slots.clamp(min=0)]
            return torch.where(is_new.unsqueeze(-1), new, out)

    return SplicedEmbedding


_CLASS = None


def splice(text_encoder, new_ids: list[int], vectors):
    """Install the trainable vectors into `text_encoder`; returns the SplicedEmbedding."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_module_class()
    embeddings = text_encoder.text_model.embeddings
    base = embeddings.token_embedding
    if isinstance(base, _CLASS):
        base = base.base
    module = _CLASS(base, new_ids, vectors)
    embeddings.token_embedding = module
    return module


def unsplice(text_encoder) -> None:
    """Put the plain frozen embedding back (e.g. before saving the text encoder)."""
    embeddings = text_encoder.text_model.embeddings
    if _CLASS is not None and isinstance(embeddings.token_embedding, _CLASS):
        embeddings.token_embedding = embeddings.token_embedding.base
