"""T2Q: the text-to-quality predictor of QLIP (paper Table S5): three linear layers
``C→C`` (the text encoder's frozen projection), ``C→512``, ``512→1``, ReLU after the first two,
a sigmoid at the end; trained with MSE on [0, 1] quality labels of FP generations.

The input is ``PromptBatch.pooled``: the end-of-text state, already through the encoder's text
projection where the encoder has one. The first layer is therefore a frozen ``C→C`` map applied
to that state: identity by default (the projection was applied by the encoder; for an encoder
without one, e.g. SD 1.x's ``CLIPTextModel``, the final-layer-norm end-of-text state stands in
for the projected one), or a projection matrix the caller supplies (``T2Q(C, first=W)``, e.g.
CLIP ViT-L/14's ``text_projection`` for SD 1.x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class T2QConfig:
    hidden: int = 512  # the paper's C→512 layer
    iters: int = 2000  # minibatch Adam steps (10k labels: ~25 epochs at 128)
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("hidden", "iters", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"T2QConfig.{name} must be >= 1; got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"T2QConfig.lr must be > 0; got {self.lr}")


class T2Q(nn.Module):
    """q = σ(W3 · relu(W2 · relu(P · z))) with P frozen.

    >>> t2q = T2Q(768)
    >>> q = t2q(batch.pooled)  # [B] in (0, 1]  # doctest: +SKIP
    """

    def __init__(self, dim: int, hidden: int = 512, first: torch.Tensor | None = None):
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"T2Q needs dim >= 1 and hidden >= 1; got {dim}, {hidden}")
        first = torch.eye(dim) if first is None else first.detach().float()
        if first.shape != (dim, dim):
            raise ValueError(f"the frozen first layer must be [{dim}, {dim}]; got {tuple(first.shape)}")
        self.register_buffer("first", first.clone())  # frozen: a buffer, never a parameter
        self.hidden = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, 1)

    @property
    def dim(self) -> int:
        return self.first.shape[0]

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if pooled.ndim != 2 or pooled.shape[1] != self.dim:
            raise ValueError(f"T2Q takes pooled text embeddings [B, {self.dim}]; "
                             f"got {tuple(pooled.shape)}")
        z = torch.relu(pooled.float() @ self.first.T)
        return torch.sigmoid(self.out(torch.relu(self.hidden(z)))).squeeze(-1)


def train_t2q(embeddings: torch.Tensor, labels: torch.Tensor, config: T2QConfig | None = None,
              first: torch.Tensor | None = None) -> T2Q:
    """Fit a T2Q on ``embeddings [N, C]`` and labels ``[N]`` in [0, 1] with MSE (Adam).

    >>> t2q = train_t2q(pooled, labels, T2QConfig(iters=500))  # doctest: +SKIP
    """
    config = config or T2QConfig()
    labels = torch.as_tensor(labels, dtype=torch.float32).flatten()
    if embeddings.ndim != 2 or embeddings.shape[0] != labels.shape[0]:
        raise ValueError(f"need embeddings [N, C] and labels [N]; got {tuple(embeddings.shape)} "
                         f"and {tuple(labels.shape)}")
    if labels.numel() < 2 or labels.min() < 0 or labels.max() > 1:
        raise ValueError("T2Q labels must be at least 2 values in [0, 1] (rank-normalised scores)")
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model = T2Q(embeddings.shape[1], config.hidden, first)
    x, y = embeddings.detach().float().cpu(), labels.cpu()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for _ in tqdm(range(config.iters), desc="T2Q", disable=not config.progress):
        rows = torch.randint(0, len(y), (min(config.batch_size, len(y)),), generator=gen)
        loss = torch.mean((model(x[rows]) - y[rows]) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)
