"""The dense building blocks the models share: MLP, cross network, interactions, attention."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Sequential):
    """Linear -> ReLU (-> Dropout) per layer; `out_features` adds a final plain linear layer."""

    def __init__(
        self,
        in_features: int,
        layers: tuple[int, ...],
        dropout: float = 0.0,
        out_features: int | None = None,
    ) -> None:
        modules: list[nn.Module] = []
        width = in_features
        for hidden in layers:
            modules += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout:
                modules.append(nn.Dropout(dropout))
            width = hidden
        if out_features is not None:
            modules.append(nn.Linear(width, out_features))
            width = out_features
        super().__init__(*modules)
        self.out_features = width


class CrossNetwork(nn.Module):
    """DCN-v2 cross layers: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l (Wang et al., WWW 2021).

    With `low_rank` r, W_l = U_l V_l^T (the paper's low-rank mixture with one expert).
    """

    def __init__(self, in_features: int, layers: int, low_rank: int | None = None) -> None:
        super().__init__()
        if low_rank is None:
            self.weights = nn.ModuleList(nn.Linear(in_features, in_features) for _ in range(layers))
        else:
            self.weights = nn.ModuleList(
                nn.Sequential(
                    nn.Linear(in_features, low_rank, bias=False), nn.Linear(low_rank, in_features)
                )
                for _ in range(layers)
            )

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for weight in self.weights:
            x = x0 * weight(x) + x
        return x


def dot_interaction(vectors: torch.Tensor) -> torch.Tensor:
    """[B, F, d] -> [B, F(F-1)/2]: the dot product of every pair of distinct vectors."""
    fields = vectors.shape[1]
    gram = torch.bmm(vectors, vectors.transpose(1, 2))
    rows, cols = torch.triu_indices(fields, fields, offset=1, device=vectors.device)
    return gram[:, rows, cols]


def fm_interaction(vectors: torch.Tensor) -> torch.Tensor:
    """[B, F, d] -> [B]: sum over pairs of <v_i, v_j>, as 0.5 * ((sum v)^2 - sum v^2)."""
    summed = vectors.sum(dim=1)
    return 0.5 * (summed * summed - (vectors * vectors).sum(dim=1)).sum(dim=1)


class TargetAttention(nn.Module):
    """DIN's activation unit: weight each behaviour by an MLP of (query, key, q - k, q * k).

    Weights are not softmax-normalised (Zhou et al., KDD 2018), so the pooled interest keeps the
    strength of the match; padded positions get weight 0.
    """

    def __init__(self, dim: int, layers: tuple[int, ...]) -> None:
        super().__init__()
        self.score = MLP(4 * dim, layers, out_features=1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query [B, d], keys [B, L, d], mask [B, L] -> the keys pooled by their weights [B, d]."""
        weights = self.weights(query, keys, mask)
        return torch.bmm(weights.unsqueeze(1), keys).squeeze(1)

    def weights(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query [B, d], keys [B, L, d], mask [B, L] -> each behaviour's weight [B, L]."""
        expanded = query.unsqueeze(1).expand_as(keys)
        features = torch.cat([expanded, keys, expanded - keys, expanded * keys], dim=-1)
        return self.score(features).squeeze(-1) * mask
