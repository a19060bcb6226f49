"""PyTorch references for the training step: built from a fastvae model, so they start from the
same weights and can be checked against it. Only imported where torch is (never a dependency).

- `AutogradStep`: the step as a PyTorch user writes it: `nn.Linear` layers, autograd, one
  `torch.optim.Adam(fused=True)` per network; with `autocast=True` the networks run under
  `torch.autocast("cpu", dtype=torch.bfloat16)` (oneDNN's bf16 products, on AMX where it is),
  losses in fp32 as autocast leaves them.
- `HandWrittenStep` (in bench_step.py, `TorchStep`): the same passes as fastvae's hand-written
  backward, in torch ops.
"""
import contextlib

import numpy as np


class AutogradStep:
    """Compute the VAE-GAN losses with autograd and step three fused Adams (mode vaegan, pixel
    reconstruction, as `VAEGAN.compute_gradients` defines them)."""

    def __init__(self, model, autocast=False, device="cpu"):
        import torch
        from torch import nn

        config = model.config
        if config.mode != "vaegan" or config.reconstruction != "pixel":
            raise ValueError("the PyTorch reference covers mode vaegan, pixel reconstruction")
        self.torch, self.config, self.device = torch, config, device
        self.autocast = autocast
        activations = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2),
                       "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}

        def sequential(linears):
            layers = []
            for layer in linears:
                linear = nn.Linear(layer.in_features, layer.out_features)
                with torch.no_grad():
                    linear.weight.copy_(torch.tensor(model.backend.to_numpy(layer.weight).T))
                    linear.bias.copy_(torch.tensor(model.backend.to_numpy(layer.bias)))
                layers.append(linear)
                if layer.activation != "identity":
                    layers.append(activations[layer.activation]())
            return nn.Sequential(*layers).to(device)

        encoder = model.encoder
        self.encoder_body = sequential(encoder.body.linears())
        self.mu_head = sequential([encoder.mu_head])
        self.log_var_head = sequential([encoder.log_var_head])
        self.decoder = sequential(model.decoder.linears())
        self.discriminator = sequential(model.discriminator.linears())
        self.params = {
            "encoder": [*self.encoder_body.parameters(), *self.mu_head.parameters(),
                        *self.log_var_head.parameters()],
            "decoder": list(self.decoder.parameters()),
            "discriminator": list(self.discriminator.parameters()),
        }
        self.optimizers = {
            name: torch.optim.Adam(params, lr=getattr(config, "lr_" + name),
                                   betas=getattr(config, "betas_" + name), eps=1e-8,
                                   fused=True)
            for name, params in self.params.items()}
        self.noise = {}

    def _mixed(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return self.torch.autocast(self.device, dtype=self.torch.bfloat16)

    def losses(self, x, eps, prior_z):
        """The losses of `VAEGAN.compute_gradients` (0-d fp32 tensors, graphs attached)."""
        torch = self.torch
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        batch, gamma = x.shape[0], self.config.gamma
        with self._mixed():
            hidden = self.encoder_body(x)
            mu, log_var = self.mu_head(hidden).float(), self.log_var_head(hidden).float()
        std = torch.exp(0.5 * log_var)
        z = mu + std * eps
        kl = -0.5 * torch.sum(1 + log_var - mu * mu - std * std) / batch
        with self._mixed():
            logits = self.decoder(torch.cat([z, prior_z])).float()
        fake = torch.sigmoid(logits)
        reconstruction = bce(logits[:batch], x, reduction="sum") / batch
        with self._mixed():
            d_out = self.discriminator(torch.cat([x, fake.detach()])).float()
            g_out = self.discriminator(fake).float()

        def labelled(out, real, weight):
            target = torch.ones_like(out) if real else torch.zeros_like(out)
            return weight * bce(out, target, reduction="sum") / batch

        d_real = labelled(d_out[:batch], True, 1.0)
        d_fake = (labelled(d_out[batch:2 * batch], False, 0.5)
                  + labelled(d_out[2 * batch:], False, 0.5))
        adversarial = labelled(g_out[:batch], True, 0.5) + labelled(g_out[batch:], True, 0.5)
        return {"reconstruction": reconstruction, "kl": kl, "adversarial": adversarial,
                "encoder": self.config.kl_weight * kl + reconstruction,
                "decoder": gamma * reconstruction + adversarial,
                "discriminator": d_real + d_fake}

    def backward(self, losses):
        """Each network's gradient of its own loss only (the adversarial loss never reaches the
        encoder's or the discriminator's parameters)."""
        torch = self.torch
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=False)
        torch.autograd.backward(losses["discriminator"], inputs=self.params["discriminator"])
        torch.autograd.backward(losses["encoder"], inputs=self.params["encoder"],
                                retain_graph=True)
        torch.autograd.backward(losses["decoder"], inputs=self.params["decoder"])

    def train_step(self, x):
        torch = self.torch
        batch, latent = x.shape[0], self.config.latent_dim
        if batch not in self.noise:
            self.noise[batch] = (torch.empty(batch, latent, device=self.device),
                                 torch.empty(batch, latent, device=self.device))
        eps, prior_z = self.noise[batch]
        eps.normal_()
        prior_z.normal_()
        losses = self.losses(x, eps, prior_z)
        self.backward(losses)
        for optimizer in self.optimizers.values():
            optimizer.step()
        return {name: value.detach() for name, value in losses.items()}


def check_autograd_step(model, step, batch, seed=0, tolerance=1e-3):
    """The autograd reference's losses and gradients equal the model's for the same batch and
    noise (fp32: products in a different order, so 1e-3 relative to the largest gradient)."""
    torch = step.torch
    rng = np.random.default_rng(seed)
    images = rng.random((batch, model.config.image_size))
    eps = rng.standard_normal((batch, model.config.latent_dim))
    prior_z = rng.standard_normal((batch, model.config.latent_dim))
    ours = model.compute_gradients(model.backend.asarray(images), eps, prior_z)

    def tensor(a):
        return torch.tensor(a, dtype=torch.float32, device=step.device)

    theirs = step.losses(tensor(images), tensor(eps), tensor(prior_z))
    step.backward(theirs)
    for name in ("encoder", "decoder", "discriminator", "kl", "reconstruction"):
        np.testing.assert_allclose(float(theirs[name].detach()), float(ours[name]), rtol=tolerance,
                                   err_msg=f"loss {name} differs from the model's")
    for name, params in step.params.items():
        flat = []
        for param in params:  # nn.Linear weights are (out, in): fastvae's transposed
            grad = param.grad.detach().cpu().numpy()
            flat.append((grad.T if grad.ndim == 2 else grad).reshape(-1))
        mine = model.backend.to_numpy(model.grads[name])
        scale = max(1.0, float(np.abs(mine).max()))
        # nn.Module order (body, mu head, log-variance head) is fastvae's packing order
        np.testing.assert_allclose(np.concatenate(flat), mine, rtol=tolerance,
                                   atol=tolerance * scale,
                                   err_msg=f"{name} gradients differ from the model's")
