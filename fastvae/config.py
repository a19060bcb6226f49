"""The one configuration dataclass: every hyper-parameter of the model and of training.

A copy is saved with every checkpoint; the CLI builds a flag for each field.
"""
import dataclasses
import inspect
import json
import math
import numbers
import re
from dataclasses import dataclass, field

from fastvae.backend import ACTIVATIONS
from fastvae.errors import ConfigError
from fastvae.prior import PRIORS
from fastvae.schedule import SCHEDULES

RECONSTRUCTIONS = ("pixel", "feature")
MODES = ("vaegan", "vae")
OPTIMIZERS = ("adam", "sgd")
LENGTHS = {"betas_encoder": 2, "betas_decoder": 2, "betas_discriminator": 2}  # exact lengths


@dataclass
class Config:
    # --- model ---
    image_size: int = 784                     # pixels per image (28 x 28 for MNIST)
    latent_dim: int = 32                      # size of z, and of the mu and log-variance heads
                                              # (32 with the mixture prior: docs/evaluation.md)
    encoder_widths: tuple = (512, 256)        # hidden layers of the encoder, before the two heads
    decoder_widths: tuple = (256, 512)        # hidden layers of the decoder (sigmoid output)
    discriminator_widths: tuple = (512, 128)  # hidden layers of the discriminator (1 logit out)
    activation: str = "relu"                  # hidden activation of encoder and decoder
    discriminator_activation: str = "relu"    # hidden activation of the discriminator
    init: str = "he"                          # weight initialisation: he | glorot
    mode: str = "vaegan"                      # vaegan, or vae (no discriminator) for comparison
    prior: str = "mixture"                    # what decoded samples are drawn from: normal
                                              # (N(0, I)), or mixture: a Gaussian mixture fitted
                                              # after training to the posterior means of
                                              # prior_images training images (fastvae.prior)
    prior_components: int = 50                # components of the mixture prior
    prior_images: int = 20000                 # training images the mixture is fitted to
    reconstruction: str = "pixel"             # pixel (BCE) or feature (Larsen's learned similarity)
    feature_layer: int = -1                   # discriminator hidden layer for feature similarity
    gamma: float = 1.0                        # weight of reconstruction vs adversarial in the
                                              # decoder (docs/method.md: the paper's is 2x)
    kl_weight: float = 0.25                   # weight of the KL in the encoder's loss (beta;
                                              # 0.25 with the mixture prior reconstructs best:
                                              # docs/evaluation.md)
    real_label: float = 1.0                   # the discriminator's target for real images; below
                                              # 1: one-sided label smoothing (Salimans et al.
                                              # 2016: 0.9), the decoder's target stays 1
    # --- optimisation ---
    optimizer: str = "adam"                   # adam | sgd, one per network
    lr_encoder: float = 2e-3                  # learning rate of the encoder's optimizer (2e-3
                                              # samples best: docs/evaluation.md)
    lr_decoder: float = 2e-3                  # learning rate of the decoder's optimizer
    lr_discriminator: float = 5e-4            # learning rate of the discriminator's optimizer
    betas_encoder: tuple = (0.5, 0.999)       # Adam betas; for SGD the first is the momentum
    betas_decoder: tuple = (0.5, 0.999)       # the same, for the decoder
    betas_discriminator: tuple = (0.5, 0.999)  # the same, for the discriminator
    lr_schedule: str = "cosine"               # constant | cosine | linear: each epoch trains at
                                              # a fraction of lr_*, from 1 at the first epoch
                                              # to lr_final at the last (the trainer sets it)
    lr_final: float = 0.05                    # the schedule's last-epoch fraction of lr_*
    clip_grad_norm: float = 0.0               # clip each network's gradient to this L2 norm; 0: off
    gating: bool = False                      # Larsen's equilibrium gating: the discriminator skips
                                              # its update while its real or fake BCE is below
                                              # equilibrium - margin, the decoder while either
                                              # is above equilibrium + margin (never both)
    equilibrium: float = 0.68                 # the gating's equilibrium BCE (about -log 0.5)
    margin: float = 0.4                       # the gating's margin (the authors' code: 0.4)
    # --- training ---
    epochs: int = 12                          # passes over the training set (12 sample and
                                              # reconstruct as well as 20 in 60 % of the time:
                                              # docs/evaluation.md)
    batch_size: int = 128                     # images per training step
    seed: int = 0                             # seeds the weights, the noise and the data order
    dtype: str = "float32"                    # float32 | float64
    precision: str = "fp32"                   # matrix products: fp32, or bf16 (bf16 inputs,
                                              # fp32 accumulation; weights, Adam state and
                                              # losses stay fp32); bf16: numba with oneMKL
    backend: str = ""                         # numpy | numba | cupy; "": the default backend
                                              # (set_backend, FASTVAE_BACKEND, else numpy)
    device_noise: bool = True                 # cupy: draw noise on the GPU (fast; a resumed run
                                              # is not bit-exact); False: the host stream of the
                                              # CPU backends, so runs match them exactly
    cuda_graph: bool = True                   # cupy with device noise: replay each training
                                              # step as one recorded CUDA graph (fast); False:
                                              # launch every kernel from Python
    dataset: str = "mnist"                    # mnist | fashion-mnist
    train_limit: int = 0                      # use only the first N training images (0: all)
    test_limit: int = 0                       # use only the first N test images (0: all)
    extras: dict = field(default_factory=dict)  # free-form notes saved with the run

    def __post_init__(self):
        for setting in dataclasses.fields(self):
            setattr(self, setting.name, _typed(setting, getattr(self, setting.name)))
        self.validate()

    def validate(self):
        """Raise ConfigError naming the first setting that cannot work (its `field` too)."""
        widths = self.encoder_widths + self.decoder_widths + self.discriminator_widths
        bad_width = next((name for name in ("encoder_widths", "decoder_widths",
                                            "discriminator_widths")
                          if any(w < 1 for w in getattr(self, name))), None)
        bad_lr = next((name for name in ("lr_encoder", "lr_decoder", "lr_discriminator")
                       if not getattr(self, name) > 0), None)
        bad_betas = next((name for name in ("betas_encoder", "betas_decoder",
                                            "betas_discriminator")
                          if not all(0 <= b < 1 for b in getattr(self, name))), None)
        checks = [
            (self.image_size >= 1, "image_size", "`image_size` must be at least 1"),
            (self.latent_dim >= 1, "latent_dim", "`latent_dim` must be at least 1"),
            (all(w >= 1 for w in widths), bad_width, "layer widths must be at least 1"),
            (len(self.encoder_widths) >= 1, "encoder_widths",
             "the encoder needs at least one hidden layer"),
            (len(self.discriminator_widths) >= 1, "discriminator_widths",
             "the discriminator needs a hidden layer"),
            (self.activation in ACTIVATIONS, "activation",
             f"unknown activation {self.activation!r}: use {', '.join(ACTIVATIONS)}"),
            (self.discriminator_activation in ACTIVATIONS, "discriminator_activation",
             f"unknown activation {self.discriminator_activation!r}: use "
             f"{', '.join(ACTIVATIONS)}"),
            (self.init in ("he", "glorot"), "init", f"unknown init {self.init!r}: use he or glorot"),
            (self.mode in MODES, "mode", f"unknown mode {self.mode!r}: use vaegan or vae"),
            (self.prior in PRIORS, "prior",
             f"unknown prior {self.prior!r}: use {', '.join(PRIORS)}"),
            (self.prior_components >= 1, "prior_components",
             "`prior_components` must be at least 1"),
            (self.prior_images >= 1, "prior_images", "`prior_images` must be at least 1"),
            (self.reconstruction in RECONSTRUCTIONS, "reconstruction",
             f"unknown reconstruction {self.reconstruction!r}: use pixel or feature"),
            (self.mode == "vaegan" or self.reconstruction == "pixel", "reconstruction",
             "feature reconstruction needs the discriminator: use `mode` vaegan"),
            (-len(self.discriminator_widths) <= self.feature_layer < len(self.discriminator_widths),
             "feature_layer",
             f"`feature_layer` {self.feature_layer} is not a discriminator hidden layer"),
            (self.gamma >= 0, "gamma", "`gamma` must be non-negative"),
            (self.kl_weight > 0, "kl_weight", "`kl_weight` must be positive"),
            (0.5 < self.real_label <= 1, "real_label",
             "`real_label` must lie in (0.5, 1]: the discriminator's target for real images"),
            (self.optimizer in OPTIMIZERS, "optimizer",
             f"unknown optimizer {self.optimizer!r}: use adam or sgd"),
            (bad_lr is None, bad_lr, f"learning rates must be positive (`{bad_lr}`)"),
            (bad_betas is None, bad_betas, f"betas must lie in [0, 1) (`{bad_betas}`)"),
            (self.lr_schedule in SCHEDULES, "lr_schedule",
             f"unknown lr_schedule {self.lr_schedule!r}: use {', '.join(SCHEDULES)}"),
            (0 < self.lr_final <= 1, "lr_final",
             "`lr_final` must lie in (0, 1]: the last epoch's fraction of the learning rates"),
            (self.clip_grad_norm >= 0, "clip_grad_norm",
             "`clip_grad_norm` must be non-negative (0 turns it off)"),
            (self.equilibrium > 0, "equilibrium", "`equilibrium` must be positive"),
            (self.margin >= 0, "margin", "`margin` must be non-negative"),
            (self.epochs >= 0, "epochs", "`epochs` must be non-negative"),
            (self.seed >= 0, "seed", f"`seed` must be non-negative, got {self.seed}"),
            (self.batch_size >= 1, "batch_size", "`batch_size` must be at least 1"),
            (self.dtype in ("float32", "float64"), "dtype", f"unknown dtype {self.dtype!r}"),
            (self.precision in ("fp32", "bf16"), "precision",
             f"unknown precision {self.precision!r}: use fp32 or bf16"),
            (self.precision == "fp32" or self.dtype == "float32", "precision",
             "`precision` bf16 needs `dtype` float32"),
            (self.train_limit >= 0, "train_limit", "`train_limit` must be non-negative"),
            (self.test_limit >= 0, "test_limit", "`test_limit` must be non-negative"),
            (self.test_limit != 1, "test_limit", "`test_limit` must be 0 (all) or at least 2: "
                                                 "the pictures interpolate between pairs of "
                                                 "test images"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise ConfigError(message, name)

    def parameter_count(self):
        """How many weights and biases the three networks hold (for memory and disk checks)."""
        def linears(sizes):
            return sum(n_in * n_out + n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))
        encoder = linears((self.image_size,) + self.encoder_widths)
        encoder += 2 * linears((self.encoder_widths[-1], self.latent_dim))
        decoder = linears((self.latent_dim,) + self.decoder_widths + (self.image_size,))
        discriminator = (linears((self.image_size,) + self.discriminator_widths + (1,))
                         if self.mode == "vaegan" else 0)
        return encoder + decoder + discriminator

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values):
        """A Config from a mapping; an unknown key is an error, not silently ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}", unknown[0])
        return cls(**values)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _typed(setting, value):
    """`value` as the type of Config field `setting`; ConfigError naming the field otherwise."""
    name, kind = setting.name, setting.type
    if kind is tuple:
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
            raise ConfigError(f"`{name}` must be a list, got {value!r}", name)
        element = type(setting.default[0])
        values = tuple(_scalar(name, element, item, " entries") for item in value)
        if name in LENGTHS and len(values) != LENGTHS[name]:
            raise ConfigError(f"`{name}` takes exactly {LENGTHS[name]} values, got "
                              f"{len(values)}", name)
        return values
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table of notes, got {value!r}", name)
        try:
            json.dumps(value)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{name} must hold only strings, numbers, booleans, lists and "
                              f"tables (it is saved as JSON): {error}", name) from error
        return value
    return _scalar(name, kind, value)


def _scalar(name, kind, value, part=""):
    """`value` as a bool, int, float or str; ints refuse fractions, floats refuse nan and inf.
    `part` says which part of setting `name` it is (" entries" of a list)."""
    what = f"`{name}`{part}"
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{what} must be true or false, got {value!r}", name)
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{what} must be a string, got {value!r}", name)
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{what} must be a whole number, got {value!r}", name)
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{what} must be a number, got {value!r}", name)
    if not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r}", name)
    return float(value)


def field_comments():
    """The comment beside each field in the source above, for --help (continuation lines too)."""
    comments, name = {}, None
    for line in inspect.getsource(Config).splitlines():
        match = re.match(r"\s{4}(\w+): .*?#\s*(.*)$", line)
        if match:
            name, comments[match[1]] = match[1], match[2]
        elif name and re.match(r"\s{5,}#\s*(.*)$", line):
            comments[name] += " " + re.match(r"\s{5,}#\s*(.*)$", line)[1]
        else:
            name = None
    return comments
