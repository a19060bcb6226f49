"""The three networks and the VAE-GAN of Larsen et al. 2015 built from them.

The model knows nothing of data files or training: `compute_gradients(x)` takes one batch
(a backend array of shape (batch, image_size) with values in [0, 1]), returns the losses and
leaves every network's gradient in `grads`; `fastvae.state.TrainState` applies them.
"""
import numpy as np

from fastvae import losses
from fastvae.backend import resolve
from fastvae.config import Config
from fastvae.layers import Buffers, Linear, NeuralNetwork, Sigmoid, pack_bf16_weights, pack_parameters
from fastvae.prior import StandardNormal

NETWORKS = ("encoder", "decoder", "discriminator")


def mlp(sizes, activation, init, rng, backend, hidden_after_last=False, final_sigmoid=False):
    """Linear layers through `sizes` with `activation` fused into each hidden one (into the
    last too if asked). Hidden layers are the taps "hidden0", "hidden1", ...; the last
    Linear is "output" (unless it is hidden)."""
    network = NeuralNetwork(backend=backend)
    steps = list(zip(sizes[:-1], sizes[1:]))
    for index, (n_in, n_out) in enumerate(steps):
        hidden = hidden_after_last or index < len(steps) - 1
        network.add(Linear(n_in, n_out, activation=activation if hidden else "identity",
                           init=init, rng=rng, backend=backend),
                    f"hidden{index}" if hidden else "output")
    if final_sigmoid:
        network.add(Sigmoid(backend))
    return network


class Encoder:
    """x -> (mu, log_var): a hidden MLP, then two linear heads."""

    def __init__(self, config, rng, backend):
        sizes = (config.image_size,) + config.encoder_widths
        self.body = mlp(sizes, config.activation, config.init, rng, backend, hidden_after_last=True)
        width, latent = sizes[-1], config.latent_dim
        self.mu_head = Linear(width, latent, init="glorot", rng=rng, backend=backend)
        self.log_var_head = Linear(width, latent, init="glorot", rng=rng, backend=backend)

    def linears(self):
        return self.body.linears() + [self.mu_head, self.log_var_head]

    def forward(self, x):
        hidden = self.body.forward(x)
        hidden16 = self.body.output16
        return self.mu_head.forward(hidden, hidden16), self.log_var_head.forward(hidden, hidden16)

    def backward(self, grad_mu, grad_log_var, *, input_grad=False):
        grad_hidden = self.mu_head.backward(grad_mu)
        grad_hidden += self.log_var_head.backward(grad_log_var)
        return self.body.backward(grad_hidden, input_grad=input_grad)


def Decoder(config, rng, backend):
    """z -> image probabilities: hidden MLP and a sigmoid output (run as logits in training)."""
    sizes = (config.latent_dim,) + config.decoder_widths + (config.image_size,)
    return mlp(sizes, config.activation, config.init, rng, backend, final_sigmoid=True)


def Discriminator(config, rng, backend):
    """image -> probability that it is real (one logit in training)."""
    sizes = (config.image_size,) + config.discriminator_widths + (1,)
    return mlp(sizes, config.discriminator_activation, config.init, rng, backend,
               final_sigmoid=True)


class VAEGAN:
    """Encoder, decoder (generator) and discriminator, trained as in Larsen et al. 2015.

    Encoder loss: kl_weight x KL + reconstruction. Decoder loss: gamma x reconstruction +
    adversarial (non-saturating, on reconstructions and on decoded prior samples).
    Discriminator loss: BCE of real vs (0.5 reconstructions + 0.5 prior samples). The
    adversarial loss never reaches the encoder, the reconstruction never updates the
    discriminator, and all three gradients are computed before any network is updated.
    """

    def __init__(self, config=None, backend=None, **overrides):
        config = config if config is not None else Config()
        self.config = config.replace(**overrides) if overrides else config
        init_seed, noise_seed = np.random.SeedSequence(self.config.seed).spawn(2)
        self.backend = resolve(backend or self.config.backend, dtype=self.config.dtype,
                               seed=noise_seed, device_noise=self.config.device_noise,
                               precision=self.config.precision)
        self.config = self.config.replace(backend=self.backend.name,
                                          dtype=self.backend.dtype.name,
                                          precision=self.backend.precision)
        rng = np.random.default_rng(init_seed)
        self.encoder = Encoder(self.config, rng, self.backend)
        self.decoder = Decoder(self.config, rng, self.backend)
        self.discriminator = (Discriminator(self.config, rng, self.backend)
                              if self.config.mode == "vaegan" else None)
        self.prior = StandardNormal(self.config.latent_dim)  # what `sample` draws z from
        linears = {"encoder": self.encoder.linears(), "decoder": self.decoder.linears()}
        if self.discriminator is not None:
            linears["discriminator"] = self.discriminator.linears()
        self.params, self.grads = {}, {}   # per network: one flat buffer each
        self.params16 = {}  # bf16 weight copies (bf16 backends), refreshed by each update
        for name, layers in linears.items():
            self.params[name], self.grads[name] = pack_parameters(layers, self.backend)
            self.params16[name] = pack_bf16_weights(layers, self.params[name], self.backend)
        self._buffers = Buffers(self.backend)

    def _buffer(self, name, shape):
        return self._buffers.get(name, shape)

    def refresh_bf16_weights(self):
        """Round the weights into their bf16 copies again, after they were written directly
        (a checkpoint restored); the optimisers do it themselves on every update."""
        for name, params16 in self.params16.items():
            if params16 is not None:
                self.backend.ops.to_bf16(self.params[name], params16)

    def _feature_tap(self):
        """The discriminator layer of the learned-similarity loss (config.feature_layer)."""
        return f"hidden{self.config.feature_layer % len(self.config.discriminator_widths)}"

    def _noise(self, out, given):
        if given is None:
            return self.backend.standard_normal(out)
        out[...] = self.backend.asarray(given)
        return out

    # ----- gradients -----

    def compute_gradients(self, x, eps=None, prior_z=None):
        """Losses of batch `x` and every network's gradient; `eps`, `prior_z` fix the noise."""
        if x.ndim != 2 or x.shape[1] != self.config.image_size:
            raise ValueError(f"expected a batch (n, {self.config.image_size}), got {x.shape}")
        batch, latent = x.shape[0], self.config.latent_dim
        vaegan = self.discriminator is not None
        mu, log_var = self.encoder.forward(x)
        eps = self._noise(self._buffer("eps", (batch, latent)), eps)
        z = self._buffer("z", ((2 if vaegan else 1) * batch, latent))
        kl_weight = self.config.kl_weight
        _, weighted_kl = losses.reparameterize(mu, log_var, eps, weight=kl_weight,
                                               z_out=z[:batch], backend=self.backend)
        if vaegan:
            self._noise(z[batch:], prior_z)
        logits = self.decoder.forward(z, logits=True)
        if vaegan:
            grad_z, step_losses = self._adversarial_gradients(x, logits)
        else:
            grad_z, step_losses = self._vae_gradients(x, logits)
        grad_mu, grad_log_var = losses.reparameterize_backward(
            grad_z, mu, log_var, eps, weight=kl_weight, backend=self.backend,
            grad_mu=self._buffer("grad_mu", mu.shape),
            grad_log_var=self._buffer("grad_log_var", log_var.shape),
        )
        self.encoder.backward(grad_mu, grad_log_var)
        step_losses["kl"] = weighted_kl if kl_weight == 1 else weighted_kl * (1.0 / kl_weight)
        step_losses["encoder"] = weighted_kl + step_losses["reconstruction"]
        return step_losses

    def _vae_gradients(self, x, logits):
        """Plain VAE: decoder and encoder share the reconstruction loss, one backward pass."""
        reconstruction, grad_logits = losses.bce(
            logits, x, grad_out=self._buffer("grad_rec", x.shape), backend=self.backend
        )
        grad_z = self.decoder.backward(grad_logits, logits=True)
        return grad_z, {"reconstruction": reconstruction, "decoder": reconstruction}

    def _adversarial_gradients(self, x, logits):
        """Discriminator on [real; reconstructed; prior samples] at once, then the gradients."""
        batch, ops, backend = x.shape[0], self.backend.ops, self.backend
        real, recon, prior, fake = (slice(0, batch), slice(batch, 2 * batch),
                                    slice(2 * batch, 3 * batch), slice(batch, 3 * batch))
        images = self._buffer("d_in", (3 * batch, x.shape[1]))
        images[real] = x
        ops.activation_forward("sigmoid", logits, images[fake])
        d_logits, taps = self.discriminator.forward(images, logits=True,
                                                    keep=(self._feature_tap(),))

        grad_d = self._buffer("grad_d", d_logits.shape)
        d_real, _ = losses.adversarial(d_logits[real], True, label=self.config.real_label,
                                       grad_out=grad_d[real], backend=backend)
        d_recon, _ = losses.adversarial(d_logits[recon], False, weight=0.5,
                                        grad_out=grad_d[recon], backend=backend)
        d_prior, _ = losses.adversarial(d_logits[prior], False, weight=0.5,
                                        grad_out=grad_d[prior], backend=backend)
        self.discriminator.backward(grad_d, logits=True, input_grad=False)

        grad_g = self._buffer("grad_g", (2 * batch, 1))
        g_recon, _ = losses.adversarial(d_logits[recon], True, weight=0.5,
                                        grad_out=grad_g[:batch], backend=backend)
        g_prior, _ = losses.adversarial(d_logits[prior], True, weight=0.5,
                                        grad_out=grad_g[batch:], backend=backend)

        if self.config.reconstruction == "pixel":
            reconstruction, grad_rec = losses.bce(
                logits[:batch], x, grad_out=self._buffer("grad_rec", x.shape), backend=backend
            )
            grad_images = self.discriminator.backward(grad_g, logits=True, rows=fake,
                                                      param_grads=False)
        else:
            reconstruction, grad_rec, grad_images = self._feature_gradients(
                grad_g, batch, taps[self._feature_tap()])

        grad_dec = self._buffer("grad_dec", logits.shape)
        ops.activation_backward("sigmoid", images[fake], grad_images, grad_dec)
        if self.config.reconstruction == "pixel" and self.config.gamma == 1:
            grad_dec[:batch] += grad_rec  # the default: one pass, no scaled copy
        elif self.config.reconstruction == "pixel":
            scaled = self._buffer("scaled_rec", grad_rec.shape)
            backend.xp.multiply(grad_rec, self.config.gamma, out=scaled)
            grad_dec[:batch] += scaled
        self.decoder.backward(grad_dec, logits=True, input_grad=False)
        grad_z = self.decoder.backward(grad_rec, logits=True, rows=real, param_grads=False)

        adversarial = g_recon + g_prior
        return grad_z, {
            "reconstruction": reconstruction,
            "adversarial": adversarial,
            "decoder": self.config.gamma * reconstruction + adversarial,
            "discriminator": d_real + d_recon + d_prior,
            "disc_real": d_real,
            "disc_fake": d_recon + d_prior,
        }

    def _feature_gradients(self, grad_g, batch, features):
        """Larsen's learned similarity: 0.5 x squared error of a discriminator hidden layer.

        Returns the loss, its gradient at the reconstruction logits (for the encoder) and the
        gradient at the fake images of gamma x reconstruction + adversarial (for the decoder).
        """
        backend, disc, layer = self.backend, self.discriminator, self._feature_tap()
        reconstruction, grad_features = losses.squared_error(
            features[batch:2 * batch], features[:batch], backend=backend,
            grad_out=self._buffer("grad_features", (batch, features.shape[1])),
        )
        injected = self._buffer("inject", (2 * batch, features.shape[1]))
        backend.xp.multiply(grad_features, self.config.gamma, out=injected[:batch])
        injected[batch:] = 0
        grad_images = disc.backward(grad_g, logits=True, rows=slice(batch, 3 * batch),
                                    param_grads=False, inject={layer: injected})
        grad_recon_images = disc.backward(grad_features, logits=True, rows=slice(batch, 2 * batch),
                                          param_grads=False, start=layer)
        grad_rec = self._buffer("grad_rec", grad_recon_images.shape)
        recon_images = self._buffer("d_in", (3 * batch, grad_rec.shape[1]))[batch:2 * batch]
        backend.ops.activation_backward("sigmoid", recon_images, grad_recon_images, grad_rec)
        return reconstruction, grad_rec, grad_images

    # ----- inference (NumPy in, NumPy out) -----

    def _batches(self, images, batch_size=1000):
        images = np.asarray(images).reshape(len(images), -1)
        if images.shape[1] != self.config.image_size:
            raise ValueError(f"images have {images.shape[1]} pixels, the model expects "
                             f"{self.config.image_size}")
        for start in range(0, len(images), batch_size):
            yield self.backend.asarray(images[start:start + batch_size])

    def encode(self, images):
        """(mu, log_var) of each image, as NumPy arrays."""
        mus, log_vars = [], []
        for batch in self._batches(images):
            mu, log_var = self.encoder.forward(batch)
            mus.append(self.backend.to_numpy(mu))
            log_vars.append(self.backend.to_numpy(log_var))
        return np.concatenate(mus), np.concatenate(log_vars)

    def decode(self, z, logits=False, batch_size=1000):
        """Pixel probabilities (or their logits) for latent codes z, as a NumPy array."""
        z = np.asarray(z).reshape(-1, self.config.latent_dim)
        chunks = [self.backend.to_numpy(self.decoder.forward(
                      self.backend.asarray(z[i:i + batch_size]), logits=logits))
                  for i in range(0, len(z), batch_size)]
        return np.concatenate(chunks) if chunks else np.empty((0, self.config.image_size))

    def reconstruct(self, images, logits=False):
        """Decoded posterior means (or their logits): the model's reconstruction of each image."""
        mu, _ = self.encode(images)
        return self.decode(mu, logits=logits)

    def sample(self, n, seed=None):
        """`n` images decoded from samples of `self.prior`: N(0, I) until a mixture is fitted
        (`fastvae.prior.fit_prior`)."""
        return self.decode(self.prior.sample(n, np.random.default_rng(seed)))

    def discriminate(self, images):
        """The discriminator's probability that each image is real."""
        if self.discriminator is None:
            raise ValueError("a plain VAE has no discriminator")
        return np.concatenate([self.backend.to_numpy(self.discriminator.forward(batch))
                               for batch in self._batches(images)]).reshape(-1)
