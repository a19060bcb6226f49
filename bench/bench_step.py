"""The full VAE-GAN training step per backend, and the references measured beside it.

Groups are `step:b{batch}:{dtype}`, so numpy, numba, cupy, the matrix-product bounds and
PyTorch print side by side; extra_info carries kind, label, backend, device, batch, dtype,
precision and the step's matrix-product FLOPs, which is what `fastvae bench` pairs them by.

- test_step: `TrainState.step` (forward, all three gradients, three Adam updates), in each
  precision the backend computes;
- test_step_serial_kernels: numba's step with its element-wise kernels serial, to show what
  the shared thread pool's `prange` kernels gain inside the real step;
- test_graph_step: the same step recorded once as a CUDA graph and replayed (cupy; GPU only);
- test_products: only the step's matrix products (traced from a real step by
  `fastvae.bench.step_products`) into preallocated outputs: through NumPy's BLAS (cuBLAS on
  the GPU, replayed as one CUDA graph), oneMKL fp32 and oneMKL bf16: the lower bounds;
- test_peak_matmul: a large square product, the machine's peak product rate;
- test_torch_autograd_step: PyTorch as users write it (nn.Linear, autograd, fused Adam), in
  fp32 and under bf16 autocast; test_torch_step: the same passes as fastvae's hand-written
  backward in torch ops (only where torch imports; never a dependency).
"""
import dataclasses
import math

import numpy as np
import pytest

from fastvae import kernels
from fastvae.backend import Backend
from fastvae.bench import step_flops, step_products
from fastvae.bench.report import PRODUCT_PATHS
from fastvae.config import Config
from fastvae.model import VAEGAN
from fastvae.state import TrainState

PEAK_SIZE = {"cpu": 1024, "gpu": 4096}


def step_config(batch, dtype, precision="fp32"):
    """The configuration every step benchmark uses: the defaults at this batch and dtype."""
    return Config(batch_size=batch, dtype=dtype, precision=precision)


def step_label(backend, precision, serial=False):
    return backend + (" bf16" if precision == "bf16" else "") + (" serial" if serial else "")


def check_precision(backend, dtype, precision):
    """Skip a precision this backend cannot compute here (with the reason it gives)."""
    if precision == "bf16" and dtype != "float32":
        pytest.skip("bf16 products mix into float32 training only")
    if precision == "bf16":
        try:
            Backend(backend, dtype, precision=precision)
        except Exception as error:  # noqa: BLE001 - the message is the skip reason
            pytest.skip(str(error))


def step_group(batch, dtype):
    return f"step:b{batch}:{dtype}"


def device_xp(device):
    if device == "gpu":
        return pytest.importorskip("cupy")
    return np


def time_step(timed, backend, batch, dtype, precision, serial=False):
    config = step_config(batch, dtype, precision)
    model = VAEGAN(config, backend)
    state = TrainState(model)
    images = np.random.default_rng(0).random((batch, config.image_size))
    x = model.backend.asarray(images)
    losses = timed(lambda: state.step(x), group=step_group(batch, dtype),
                   xp=model.backend.xp, kind="step", backend=backend,
                   label=step_label(backend, precision, serial), precision=precision,
                   device=model.backend.device, batch=batch, dtype=dtype,
                   flops=step_flops(config, batch), warmup=2)
    assert {"encoder", "decoder", "discriminator"} <= set(losses)
    assert all(math.isfinite(float(value)) for value in losses.values())


def test_step(timed, backend, batch, dtype, precision):
    if backend == "numpy" and precision == "bf16":
        pytest.skip("numpy's bf16 is the definition the kernels are tested against, not fast")
    check_precision(backend, dtype, precision)
    time_step(timed, backend, batch, dtype, precision)


def test_step_serial_kernels(timed, backend, batch, dtype, precision, monkeypatch):
    if backend != "numba":
        pytest.skip("only numba has serial and parallel kernels")
    ops = kernels.load("numba")
    if not ops.PARALLEL:
        pytest.skip("numba's kernels are serial here already (no oneMKL thread pool)")
    check_precision("numba", dtype, precision)
    monkeypatch.setattr(ops, "PARALLEL", False)
    time_step(timed, "numba", batch, dtype, precision, serial=True)


def test_graph_step(timed, device, batch, dtype):
    if device != "gpu":
        pytest.skip("a CUDA graph step needs the cupy backend")
    config = step_config(batch, dtype)
    model = VAEGAN(config, "cupy")
    state = TrainState(model).capture_graph(batch)
    x = model.backend.asarray(np.random.default_rng(0).random((batch, config.image_size)))
    losses = timed(lambda: state.step(x), group=step_group(batch, dtype),
                   xp=model.backend.xp, kind="step", backend="cupy graph", device="gpu",
                   batch=batch, dtype=dtype, flops=step_flops(config, batch), warmup=2)
    assert all(math.isfinite(float(value)) for value in losses.values())


def make_operands(products, xp, dtype, seed=0):
    """(a, b, out) per product, laid out as the step lays them out (transposes are views)."""
    rng = np.random.default_rng(seed)
    operands = []
    for p in products:
        a = rng.standard_normal((p.k, p.m) if p.transpose_a else (p.m, p.k), dtype=dtype)
        b = rng.standard_normal((p.n, p.k) if p.transpose_b else (p.k, p.n), dtype=dtype)
        a, b = xp.asarray(a), xp.asarray(b)
        operands.append((a.T if p.transpose_a else a, b.T if p.transpose_b else b,
                         xp.empty((p.m, p.n), dtype=dtype)))
    return operands




def onemkl_products(products, bf16, seed=0):
    """A function computing every product through the numba backend's oneMKL call, on stored
    (C-contiguous) operands with transpose flags, in the backend's own (huge-page) memory, as
    the backend calls it; and a check."""
    ops = kernels.load("numba")
    rng = np.random.default_rng(seed)

    def stored(shape):
        values = rng.standard_normal(shape, dtype=np.float32)
        if bf16:
            return ops.to_bf16(values, ops.empty(shape, np.uint16))
        array = ops.empty(shape, np.float32)
        array[...] = values
        return array

    operands = []
    for p in products:
        a = stored((p.k, p.m) if p.transpose_a else (p.m, p.k))
        b = stored((p.n, p.k) if p.transpose_b else (p.k, p.n))
        operands.append((a, p.transpose_a, b, p.transpose_b, ops.empty((p.m, p.n), np.float32)))

    def all_products():
        for a, transpose_a, b, transpose_b, out in operands:
            ops.matmul(a, b, out, transpose_a, transpose_b)
        return operands[-1]

    def check():
        from fastvae.kernels.numpy_ref import from_bf16
        a, transpose_a, b, transpose_b, out = operands[-1]
        a, b = (from_bf16(a), from_bf16(b)) if bf16 else (a, b)
        want = (a.T if transpose_a else a) @ (b.T if transpose_b else b)
        np.testing.assert_allclose(out, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())

    return all_products, check


def test_products(timed, device, batch, dtype, product_path):
    xp = device_xp(device)
    precision = "bf16" if product_path == "onemkl-bf16" else "fp32"
    config = step_config(batch, dtype)
    products = step_products(config, batch)
    info = dict(group=step_group(batch, dtype), kind="products", device=device, batch=batch,
                dtype=dtype, precision=precision, flops=sum(p.flops for p in products),
                products=len(products))
    if product_path != "blas":
        if device != "cpu" or dtype != "float32":
            pytest.skip("oneMKL products: float32 on the CPU")
        if "numba" not in kernels.available() or kernels.load("numba").MKL is None:
            pytest.skip("oneMKL is not installed (pip install 'fastvae-numpy[mkl]')")
        if precision == "bf16":
            check_precision("numba", dtype, precision)
        run, check = onemkl_products(products, precision == "bf16")
        timed(run, xp=np, backend="numba", label=PRODUCT_PATHS[product_path], **info)
        check()
        return
    operands = make_operands(products, xp, dtype)
    matmul = np.matmul
    if device == "gpu":
        from fastvae.kernels import cupy_gpu
        matmul = cupy_gpu.matmul  # the cupy backend's cuBLAS calls

    def all_products():
        for a, b, out in operands:
            matmul(a, b, out)
        return operands[-1][2]

    run = all_products
    if device == "gpu":
        all_products()  # cuBLAS set-up before recording
        graph = cupy_gpu.capture_graph(all_products)
        run = lambda: (graph.launch(), graph.result)[1]  # noqa: E731

    label = "products cuBLAS" if device == "gpu" else PRODUCT_PATHS["blas"]
    out = timed(run, xp=xp, backend=xp.__name__, label=label, **info)
    a, b, _ = operands[-1]
    expected = np.asarray(a.get() if hasattr(a, "get") else a) @ np.asarray(
        b.get() if hasattr(b, "get") else b)
    np.testing.assert_allclose(np.asarray(out.get() if hasattr(out, "get") else out), expected,
                               rtol=1e-3, atol=1e-3)


def test_peak_matmul(timed, device, dtype):
    xp = device_xp(device)
    n = PEAK_SIZE[device]
    rng = np.random.default_rng(1)
    a = xp.asarray(rng.standard_normal((n, n)), dtype=dtype)
    b = xp.asarray(rng.standard_normal((n, n)), dtype=dtype)
    out = xp.empty((n, n), dtype=dtype)
    timed(lambda: xp.matmul(a, b, out=out), group=f"peak:{dtype}", xp=xp, kind="peak",
          backend=xp.__name__, device=device, batch=None, dtype=dtype, flops=2 * n ** 3,
          case=f"{n}x{n}x{n}")
    assert bool(xp.isfinite(out[0, 0]))


# ----- PyTorch eager: the same step, the same passes -----

class TorchLinear:
    """y = activation(x @ weight + bias) with the backward of fastvae.layers.Linear."""

    def __init__(self, torch, weight, bias, grad_weight, grad_bias, activation):
        self.torch, self.activation = torch, activation
        self.weight, self.bias = weight, bias
        self.grad_weight, self.grad_bias = grad_weight, grad_bias
        self.x = self.y = None
        self.buffers = {}

    def buffer(self, name, shape, like):
        key = (name, tuple(shape))
        if key not in self.buffers:
            self.buffers[key] = like.new_empty(shape)
        return self.buffers[key]

    def forward(self, x):
        torch = self.torch
        out = self.buffer("out", (x.shape[0], self.weight.shape[1]), x)
        torch.addmm(self.bias, x, self.weight, out=out)
        if self.activation == "relu":
            out.clamp_(min=0)
        elif self.activation == "leaky_relu":
            torch.nn.functional.leaky_relu_(out, 0.2)
        elif self.activation == "sigmoid":
            out.sigmoid_()
        elif self.activation == "tanh":
            out.tanh_()
        self.x, self.y = x, out
        return out

    def backward(self, grad, rows=None, param_grads=True, input_grad=True):
        torch = self.torch
        x, y = (self.x, self.y) if rows is None else (self.x[rows], self.y[rows])
        pre = self.buffer("scratch", grad.shape, grad)
        if self.activation == "relu":
            torch.mul(grad, y > 0, out=pre)
        elif self.activation == "leaky_relu":
            torch.where(y > 0, grad, 0.2 * grad, out=pre)
        elif self.activation == "sigmoid":
            torch.mul(grad, y * (1 - y), out=pre)
        elif self.activation == "tanh":
            torch.mul(grad, 1 - y * y, out=pre)
        else:
            pre.copy_(grad)
        if param_grads:
            torch.mm(x.t(), pre, out=self.grad_weight)
            torch.sum(pre, 0, out=self.grad_bias)
        if not input_grad:
            return None
        grad_in = self.buffer("grad_in", x.shape, x)
        return torch.mm(pre, self.weight.t(), out=grad_in)


class TorchStep:
    """`VAEGAN.compute_gradients` + `TrainState`'s updates (vaegan mode, pixel reconstruction) in
    PyTorch eager ops, with the model's stacked batches, passes and flat Adam updates.

    Built from a fastvae model so that it starts from the same weights (for checking)."""

    def __init__(self, model, device="cpu"):
        import torch

        config = model.config
        if config.mode != "vaegan" or config.reconstruction != "pixel":
            raise ValueError("the PyTorch reference covers mode vaegan, pixel reconstruction")
        self.torch, self.config = torch, config
        self.dtype = getattr(torch, model.backend.dtype.name)
        self.device = device
        self.params, self.grads, self.optimizers, networks = {}, {}, {}, {}
        linears = {"encoder": model.encoder.linears(), "decoder": model.decoder.linears(),
                   "discriminator": model.discriminator.linears()}
        for name, layers in linears.items():
            params = torch.tensor(model.backend.to_numpy(model.params[name]), dtype=self.dtype,
                                  device=device)
            grads = torch.zeros_like(params)
            made, offset = [], 0
            for layer in layers:
                n_in, n_out = layer.weight.shape
                views = []
                for flat in (params, grads):
                    views.append(flat[offset:offset + n_in * n_out].view(n_in, n_out))
                    views.append(flat[offset + n_in * n_out:offset + n_in * n_out + n_out])
                offset += n_in * n_out + n_out
                made.append(TorchLinear(torch, views[0], views[1], views[2], views[3],
                                        layer.activation))
            networks[name] = made
            self.params[name], self.grads[name] = params, grads
            params.grad = grads
            lr, betas = getattr(config, "lr_" + name), getattr(config, "betas_" + name)
            self.optimizers[name] = torch.optim.Adam([params], lr=lr, betas=betas, eps=1e-8)
        self.encoder_body = networks["encoder"][:-2]
        self.mu_head, self.log_var_head = networks["encoder"][-2:]
        self.decoder, self.discriminator = networks["decoder"], networks["discriminator"]
        self.buffers = {}

    def buffer(self, name, shape):
        key = (name, tuple(shape))
        if key not in self.buffers:
            self.buffers[key] = self.torch.empty(shape, dtype=self.dtype, device=self.device)
        return self.buffers[key]

    @staticmethod
    def forward(layers, x):
        for layer in layers:
            x = layer.forward(x)
        return x

    @staticmethod
    def backward(layers, grad, rows=None, param_grads=True, input_grad=True):
        for index in range(len(layers) - 1, -1, -1):
            grad = layers[index].backward(grad, rows, param_grads, input_grad or index > 0)
        return grad

    def bce(self, logits, target, scale, grad_out):
        """scale x sum BCE-with-logits; the gradient into grad_out; a 0-d tensor (no sync)."""
        torch = self.torch
        loss = (logits.clamp(min=0) - logits * target + torch.log1p(torch.exp(-logits.abs())))
        torch.mul(torch.sigmoid(logits) - target, scale, out=grad_out)
        return loss.sum() * scale

    def compute_gradients(self, x, eps=None, prior_z=None):
        torch = self.torch
        batch, latent, gamma = x.shape[0], self.config.latent_dim, self.config.gamma
        real, recon, prior = slice(0, batch), slice(batch, 2 * batch), slice(2 * batch, None)
        fake = slice(batch, None)
        hidden = self.forward(self.encoder_body, x)
        mu, log_var = self.mu_head.forward(hidden), self.log_var_head.forward(hidden)
        noise = self.buffer("eps", (batch, latent))
        if eps is None:
            noise.normal_()
        else:
            noise.copy_(eps)
        z = self.buffer("z", (2 * batch, latent))
        std = torch.exp(0.5 * log_var)
        torch.addcmul(mu, std, noise, out=z[:batch])
        if prior_z is None:
            z[batch:].normal_()
        else:
            z[batch:].copy_(prior_z)
        kl = -0.5 * torch.sum(1 + log_var - mu * mu - std * std) / batch
        logits = self.forward(self.decoder, z)
        images = self.buffer("d_in", (3 * batch, x.shape[1]))
        images[real] = x
        torch.sigmoid(logits, out=images[fake])
        d_logits = self.forward(self.discriminator, images)

        grad_d = self.buffer("grad_d", d_logits.shape)
        d_loss = (self.bce(d_logits[real], 1.0, 1.0 / batch, grad_d[real])
                  + self.bce(d_logits[recon], 0.0, 0.5 / batch, grad_d[recon])
                  + self.bce(d_logits[prior], 0.0, 0.5 / batch, grad_d[prior]))
        self.backward(self.discriminator, grad_d, input_grad=False)
        grad_g = self.buffer("grad_g", (2 * batch, 1))
        adversarial = (self.bce(d_logits[recon], 1.0, 0.5 / batch, grad_g[:batch])
                       + self.bce(d_logits[prior], 1.0, 0.5 / batch, grad_g[batch:]))
        grad_rec = self.buffer("grad_rec", x.shape)
        reconstruction = self.bce(logits[:batch], x, 1.0 / batch, grad_rec)
        grad_images = self.backward(self.discriminator, grad_g, rows=fake, param_grads=False)
        fake_images = images[fake]
        grad_dec = self.buffer("grad_dec", logits.shape)
        torch.mul(grad_images, fake_images * (1 - fake_images), out=grad_dec)
        grad_dec[:batch].add_(grad_rec, alpha=gamma)
        self.backward(self.decoder, grad_dec, input_grad=False)
        grad_z = self.backward(self.decoder, grad_rec, rows=real, param_grads=False)

        scale = self.config.kl_weight / batch  # the KL's weight in the encoder's loss
        grad_mu = torch.add(grad_z, mu, alpha=scale)
        grad_log_var = grad_z * noise * 0.5 * std + scale * 0.5 * (std * std - 1)
        grad_hidden = self.mu_head.backward(grad_mu)
        grad_hidden += self.log_var_head.backward(grad_log_var)
        self.backward(self.encoder_body, grad_hidden, input_grad=False)
        return {"reconstruction": reconstruction, "adversarial": adversarial, "kl": kl,
                "decoder": gamma * reconstruction + adversarial, "discriminator": d_loss,
                "encoder": self.config.kl_weight * kl + reconstruction}

    def train_step(self, x):
        with self.torch.no_grad():
            losses = self.compute_gradients(x)
            for optimizer in self.optimizers.values():
                optimizer.step()
        return losses


def check_torch_step(config, device, batch, seed=0):
    """The PyTorch reference's gradients equal the model's for the same batch and noise.

    Checked in float64, whatever dtype is timed: the check is of the formulas, and two fp32
    roundings of a pre-activation near 0 take a ReLU kink differently (22 of 542,224 decoder
    gradients at batch 512)."""
    model = VAEGAN(dataclasses.replace(config, dtype="float64"), "numpy")
    step = TorchStep(model, device)
    torch = step.torch
    rng = np.random.default_rng(seed)
    images = rng.random((batch, model.config.image_size))
    eps = rng.standard_normal((batch, model.config.latent_dim))
    prior_z = rng.standard_normal((batch, model.config.latent_dim))
    model.compute_gradients(model.backend.asarray(images), eps, prior_z)

    def tensor(a):
        return torch.tensor(a, dtype=step.dtype, device=step.device)

    with torch.no_grad():
        step.compute_gradients(tensor(images), tensor(eps), tensor(prior_z))
    tolerance = 1e-8
    for name, grads in model.grads.items():
        ours = model.backend.to_numpy(grads)
        theirs = step.grads[name].cpu().numpy()
        scale = max(1.0, float(np.abs(ours).max()))
        np.testing.assert_allclose(theirs, ours, rtol=tolerance, atol=tolerance * scale,
                                   err_msg=f"{name} gradients differ from the model's")


def test_torch_step(timed, device, batch, dtype):
    torch = pytest.importorskip("torch")
    torch_device = "cuda" if device == "gpu" else "cpu"
    if torch_device == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device here")
    config = step_config(batch, dtype)
    model = VAEGAN(config, "numpy")
    step = TorchStep(model, torch_device)
    check_torch_step(config, torch_device, batch)

    images = np.random.default_rng(0).random((batch, config.image_size))
    x = torch.tensor(images, dtype=step.dtype, device=torch_device)
    sync = (lambda: torch.cuda.synchronize()) if torch_device == "cuda" else (lambda: None)

    def one_step():
        losses = step.train_step(x)
        sync()
        return losses

    losses = timed(one_step, group=step_group(batch, dtype), kind="torch", backend="torch",
                   label="torch hand-written", device=device, batch=batch, dtype=dtype,
                   flops=step_flops(config, batch), warmup=2, threads=torch.get_num_threads(),
                   version=torch.__version__)
    assert all(math.isfinite(float(value)) for value in losses.values())


def test_torch_autograd_step(timed, device, batch, dtype, precision):
    """PyTorch as users write it; bf16 precision means fp32 under torch.autocast(bfloat16)."""
    torch = pytest.importorskip("torch")
    if device != "cpu":
        pytest.skip("the autograd references run on the CPU")
    if dtype != "float32":
        pytest.skip("the autograd references are float32 (autocast mixes bf16 into float32)")
    from fastvae.benchsuite.torch_steps import AutogradStep, check_autograd_step

    config = step_config(batch, dtype)
    model = VAEGAN(config, "numpy")
    if precision == "fp32":
        check_autograd_step(model, AutogradStep(model), min(batch, 16))
        model = VAEGAN(config, "numpy")
    step = AutogradStep(model, autocast=precision == "bf16")
    x = torch.tensor(np.random.default_rng(0).random((batch, config.image_size)),
                     dtype=torch.float32)
    label = "torch autograd" + (" bf16-autocast" if precision == "bf16" else "")
    losses = timed(lambda: step.train_step(x), group=step_group(batch, dtype), kind="torch",
                   backend="torch", label=label, precision=precision, device=device,
                   batch=batch, dtype=dtype, flops=step_flops(config, batch), warmup=2,
                   threads=torch.get_num_threads(), version=torch.__version__)
    assert all(math.isfinite(float(value)) for value in losses.values())
