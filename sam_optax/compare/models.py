"""The models of ``sam-optax compare``: a 1-D CNN for MNIST-1D and an MLP for digits."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from sam_optax.compare.data import NUM_CLASSES, check_dataset


def make_model(dataset: str) -> Any:
    """The Flax Linen model of a dataset: a 1-D CNN (MNIST-1D) or an MLP (digits).

    The CNN has three convolutions (32 channels, kernels 5, 3, 3, stride 2, ReLU)
    and a dense classifier, as MNIST-1D's reference CNN. Its convolutions are
    written as patch extraction and one contraction (same maths as
    ``nn.Conv``), which XLA runs about ten times faster on a CPU for channels
    this narrow. No BatchNorm, so averaged weights need no statistics.

    Args:
      dataset: one of :data:`DATASETS`.

    Returns:
      A ``flax.linen.Module`` mapping ``[B, features]`` to ``[B, 10]`` logits.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from sam_optax.compare import make_model
      >>> model = make_model("mnist1d")
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 40)))["params"]
      >>> model.apply({"params": params}, jnp.zeros((2, 40))).shape
      (2, 10)
    """
    import flax.linen as nn

    class Conv1D(nn.Module):
        features: int
        kernel_size: int
        stride: int = 2
        padding: int = 1

        @nn.compact
        def __call__(self, x):
            k, s = self.kernel_size, self.stride
            x = jnp.pad(x, ((0, 0), (self.padding, self.padding), (0, 0)))
            length = (x.shape[1] - k) // s + 1
            patches = jnp.stack([x[:, j : j + s * (length - 1) + 1 : s] for j in range(k)], 2)
            kernel = self.param(
                "kernel", nn.initializers.lecun_normal(), (k, x.shape[-1], self.features)
            )
            bias = self.param("bias", nn.initializers.zeros, (self.features,))
            return jnp.einsum("blkc,kcf->blf", patches, kernel) + bias

    class CNN1D(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x[..., None]
            for k in (5, 3, 3):
                x = nn.relu(Conv1D(32, k)(x))
            return nn.Dense(NUM_CLASSES)(x.reshape(x.shape[0], -1))

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(2):
                x = nn.relu(nn.Dense(128)(x))
            return nn.Dense(NUM_CLASSES)(x)

    check_dataset(dataset)
    return CNN1D() if dataset == "mnist1d" else MLP()
