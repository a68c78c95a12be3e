"""Local training for the demo: plain SGD, or DP-SGD with Opacus's PrivacyEngine.

Without DP, deterministic given the seed: the secure run and the plaintext baseline train the
same way from the same global models (their global models differ only by the protocol's
error). With DP, the noise, Opacus's Poisson sampling and dropout draw from generators seeded
from the OS's CSPRNG each round: noise drawn from ``seed`` (a public constant of the demo)
could be replayed by anyone (an outside auditor trained the demo's public config on dummy
data, and the two updates had a cosine similarity of 0.92), and subtracted from the update it
was to hide. (Opacus's ``secure_mode`` needs torchcsprng, which is not installable beside
torch 2.13: so the noise comes from torch's Mersenne Twister, seeded with 63 secret bits, and
is not hardened against floating-point attacks on the Gaussian sampler.)
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    lr: float = 0.05
    batch_size: int = 32
    momentum: float = 0.0
    dp: bool = False
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5


class LocalTrainer:
    """One site's trainer. With DP, the PrivacyEngine (and its accountant) lives as long as the
    site, so epsilon accumulates over rounds."""

    def __init__(self, model: Any, x: np.ndarray, y: np.ndarray, config: TrainConfig,
                 seed: int) -> None:
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        self.config = config
        self.seed = seed
        self.samples = len(y)
        data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
        self._generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(data, batch_size=config.batch_size, shuffle=True,
                            generator=self._generator)
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=config.lr,
                                         momentum=config.momentum)
        self.loader = loader
        self.engine = None
        # defence: demo.trainer-makes-dp-private
        if config.dp:
            from opacus import PrivacyEngine

            self.engine = PrivacyEngine(accountant="rdp", secure_mode=False)
            self._noise = torch.Generator()
            self.model, self.optimizer, self.loader = self.engine.make_private(
                module=model, optimizer=self.optimizer, data_loader=loader,
                noise_multiplier=config.noise_multiplier, max_grad_norm=config.max_grad_norm,
                noise_generator=self._noise)

    @property
    def module(self) -> Any:
        """The plain module (Opacus wraps it); its state_dict has the original names."""
        return getattr(self.model, "_module", self.model)

    def train_round(self, state: dict[str, Any], round_number: int) -> dict[str, Any]:
        import torch
        from torch import nn

        self.module.load_state_dict(state)
        # each round starts fresh from the global model: no optimizer state carries over
        getattr(self.optimizer, "original_optimizer", self.optimizer).state.clear()
        if self.engine is None:
            self._generator.manual_seed(self.seed * 1000 + round_number)
            torch.manual_seed(self.seed * 1000 + round_number)
        else:
            # the noise (its own generator), the Poisson sampling (Opacus's DPDataLoader
            # takes the loader's generator) and dropout (torch's global one): secret, fresh
            # each round (see the module's docstring)
            # defence: demo.dp-randomness-secret
            self._noise.manual_seed(secrets.randbits(63))
            torch.manual_seed(secrets.randbits(63))
            # defence: demo.dp-sampling-secret
            self._generator.manual_seed(secrets.randbits(63))
        self.model.train()
        loss_fn = nn.CrossEntropyLoss()
        for _ in range(self.config.epochs):
            for xb, yb in self.loader:
                if len(yb) == 0:
                    continue
                self.optimizer.zero_grad()
                loss_fn(self.model(xb), yb).backward()
                self.optimizer.step()
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def epsilon(self) -> float | None:
        if self.engine is None:
            return None
        return float(self.engine.get_epsilon(self.config.delta))


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    module = getattr(model, "_module", model)
    module.eval()
    with torch.no_grad():
        pred = module(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float(np.mean(pred == y))
