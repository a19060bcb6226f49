"""Layers with hand-written forward and backward passes, and a sequential container.

Every layer computes through the kernels of the backend it was built with. A layer keeps what
its backward needs (Linear: its input and output; activations: their output) and owns the
arrays it returns: the next forward or backward call overwrites them, so steady-state training
allocates nothing. On a bf16 backend a Linear also keeps the bf16 copies its products read:
its weight's (written by the optimiser), its input's (the previous Linear's `output16`, or
rounded here) and its output's, for the next Linear.
"""
from collections import OrderedDict

import numpy as np

from fastvae.backend import ACTIVATIONS, resolve

INITS = ("he", "glorot")


class Buffers:
    """Arrays reused across calls, at most `per_name` shapes kept per name (the least
    recently used one is dropped), so inference over many batch sizes holds a bounded set."""

    def __init__(self, backend, per_name=4):
        self.backend, self.per_name = backend, per_name
        self._arrays = {}

    def get(self, name, shape):
        """The array for (name, shape): made on first use, then the same one each call."""
        shapes = self._arrays.setdefault(name, OrderedDict())
        shape = tuple(shape)
        array = shapes.get(shape)
        if array is None:
            make = self.backend.empty16 if name.endswith("16") else self.backend.empty
            array = shapes[shape] = make(shape)
            if len(shapes) > self.per_name:
                shapes.popitem(last=False)
        else:
            shapes.move_to_end(shape)
        return array

    def __len__(self):
        return sum(len(shapes) for shapes in self._arrays.values())


class Layer:
    """Base class: buffer reuse, and no parameters unless a subclass has them."""

    def __init__(self, backend=None):
        self.backend = resolve(backend)
        self._buffers = Buffers(self.backend)

    def buffer(self, name, shape):
        """An array owned by this layer for (name, shape), reused by later calls."""
        return self._buffers.get(name, shape)

    def parameters(self):
        """(name, array) pairs of the trainable arrays."""
        return []

    def gradients(self):
        """(name, array) pairs of the gradients, in the order of `parameters`."""
        return []


class Linear(Layer):
    """y = activation(x @ weight + bias), the activation fused into the same kernel pass."""

    def __init__(self, in_features, out_features, *, activation="identity", init="he",
                 rng=None, backend=None):
        super().__init__(backend)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear sizes must be positive, got {in_features} -> {out_features}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}: choose one of {', '.join(INITS)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: choose one of "
                             f"{', '.join(ACTIVATIONS)}")
        self.in_features, self.out_features = in_features, out_features
        self.activation = activation
        rng = rng if rng is not None else np.random.default_rng()
        if init == "he":
            weight = rng.standard_normal((in_features, out_features)) * np.sqrt(2.0 / in_features)
        else:
            limit = np.sqrt(6.0 / (in_features + out_features))
            weight = rng.uniform(-limit, limit, (in_features, out_features))
        self.weight = self.backend.asarray(weight)
        self.bias = self.backend.zeros(out_features)
        self.grad_weight = self.backend.zeros((in_features, out_features))
        self.grad_bias = self.backend.zeros(out_features)
        self._input = self._output = None
        self.weight16 = None  # bf16 copy of the weight, set by pack_bf16_weights
        self._input16 = self.output16 = None

    def __repr__(self):
        fused = "" if self.activation == "identity" else f", {self.activation}"
        return f"Linear({self.in_features}, {self.out_features}{fused})"

    def parameters(self):
        return [("weight", self.weight), ("bias", self.bias)]

    def gradients(self):
        return [("weight", self.grad_weight), ("bias", self.grad_bias)]

    def forward(self, x, x16=None):
        """activation(x @ weight + bias); `x16`: x's bf16 copy where the caller has one."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"{self!r} expects input (batch, {self.in_features}), got {x.shape}")
        out = self.buffer("out", (x.shape[0], self.out_features))
        if self.backend.bf16:
            if x16 is None:
                x16 = self.backend.ops.to_bf16(x, self.buffer("in16", x.shape))
            self.output16 = self.buffer("out16", out.shape)
            self.backend.ops.dense_forward(x, self.weight, self.bias, self.activation, out,
                                           x16=x16, weight16=self.weight16, out16=self.output16)
            self._input16 = x16
        else:
            self.backend.ops.dense_forward(x, self.weight, self.bias, self.activation, out)
        self._input, self._output = x, out
        return out

    def backward(self, grad_out, *, rows=None, input_grad=True, param_grads=True):
        """Gradient with respect to the input (None if not asked); parameter gradients stored.

        `rows` restricts the pass to a slice of the batch of the last forward call.
        """
        x, y = self._input, self._output
        if rows is not None:
            x, y = x[rows], y[rows]
        scratch = self.buffer("scratch", grad_out.shape)
        grad_in = self.buffer("grad_in", x.shape) if input_grad else None
        low = {}
        if self.backend.bf16:
            x16 = self._input16 if rows is None else self._input16[rows]
            low = {"x16": x16, "weight16": self.weight16,
                   "scratch16": self.buffer("scratch16", grad_out.shape)}
        self.backend.ops.dense_backward(
            grad_out, x, y, self.weight, self.activation,
            self.grad_weight if param_grads else None,
            self.grad_bias if param_grads else None,
            grad_in, scratch, **low,
        )
        return grad_in


class Activation(Layer):
    """An elementwise activation, differentiated through its output."""

    name = "identity"

    def __init__(self, backend=None):
        super().__init__(backend)
        self._output = None

    def __repr__(self):
        return type(self).__name__ + "()"

    def forward(self, x):
        out = self.buffer("out", x.shape)
        self._output = self.backend.ops.activation_forward(self.name, x, out)
        return out

    def backward(self, grad_out, *, rows=None, input_grad=True, param_grads=True):
        y = self._output if rows is None else self._output[rows]
        grad_in = self.buffer("grad_in", grad_out.shape)
        return self.backend.ops.activation_backward(self.name, y, grad_out, grad_in)


class ReLU(Activation):
    name = "relu"


class LeakyReLU(Activation):
    """max(x, slope x), with the kernel table's LEAKY_SLOPE (0.2)."""

    name = "leaky_relu"


class Sigmoid(Activation):
    name = "sigmoid"


class Tanh(Activation):
    name = "tanh"


ACTIVATION_LAYERS = {cls.name: cls for cls in (ReLU, LeakyReLU, Sigmoid, Tanh)}
assert set(ACTIVATION_LAYERS) | {"identity"} == set(ACTIVATIONS)


class NeuralNetwork:
    """A sequence of layers, run as they are given (activations fuse into a Linear when it is
    built: `Linear(..., activation="relu")`).

    A layer may be given a name (`add(layer, name)`): its output is a tap that `forward` keeps
    on request and `backward` can start from or inject a gradient into. A final Sigmoid stays
    a layer of its own so that `logits=True` can stop before it and hand the logits to a loss
    in the stable logits form.
    """

    def __init__(self, layers=(), backend=None):
        self.backend = resolve(backend)
        self.layers, self.names = [], []
        self.output16 = None  # the bf16 copy of the last output, on a bf16 backend
        for layer in layers:
            self.add(layer)

    def __repr__(self):
        return "NeuralNetwork(" + ", ".join(map(repr, self.layers)) + ")"

    def add(self, layer, name=None):
        """Append `layer`; `name` makes its output a tap."""
        if name is not None and name in self.names:
            raise ValueError(f"this network already has a layer named {name!r}")
        self.layers.append(layer)
        self.names.append(name)
        return self

    def index(self, name):
        """The position of the layer called `name`."""
        if name not in self.names:
            taps = [n for n in self.names if n is not None]
            raise KeyError(f"no layer named {name!r}: the taps are {', '.join(taps) or 'none'}")
        return self.names.index(name)

    def _run_layers(self, logits):
        if logits:
            if not isinstance(self.layers[-1], Sigmoid):
                raise ValueError("logits=True needs a network that ends with Sigmoid")
            return self.layers[:-1]
        return self.layers

    def forward(self, x, *, logits=False, keep=()):
        """The network's output, or the input of its final Sigmoid when `logits`.

        With `keep` (names of taps), returns (output, {name: that layer's output}); the kept
        arrays are the layers' own, overwritten by the next call.
        """
        wanted = {self.index(name): name for name in keep}
        kept = {}
        x16 = None  # the bf16 copy of x where the previous Linear wrote one
        for index, layer in enumerate(self._run_layers(logits)):
            x = layer.forward(x, x16) if isinstance(layer, Linear) else layer.forward(x)
            x16 = getattr(layer, "output16", None)
            if index in wanted:
                kept[wanted[index]] = x
        self.output16 = x16
        if len(kept) != len(wanted):
            raise ValueError("logits=True stops before the tapped final layer")
        return (x, kept) if keep else x

    def backward(self, grad, *, logits=False, rows=None, input_grad=True, param_grads=True,
                 start=None, inject=None):
        """Back-propagate `grad` (at the output, or at tap `start`'s output) to the input.

        `inject` maps a tap name to a gradient added at that layer's output; `input_grad`
        False skips the first layer's input gradient; `param_grads` False leaves parameter
        gradients alone (a pass that only carries a gradient through).
        """
        layers = self._run_layers(logits)
        start = len(layers) - 1 if start is None else self.index(start)
        inject = {self.index(name): value for name, value in (inject or {}).items()}
        for index in range(start, -1, -1):
            if index in inject:
                grad = grad + inject[index]
            grad = layers[index].backward(
                grad, rows=rows, input_grad=input_grad or index > 0, param_grads=param_grads
            )
        return grad

    def linears(self):
        return [layer for layer in self.layers if isinstance(layer, Linear)]


def pack_parameters(linears, backend):
    """Move the parameters and gradients of `linears` into two flat buffers and return them.

    Each layer keeps views into the buffers, so an optimizer updates a whole network in one
    kernel call.
    """
    sizes = [layer.weight.size + layer.bias.size for layer in linears]
    params = backend.empty(sum(sizes))
    grads = backend.zeros(sum(sizes))
    offset = 0
    for layer in linears:
        for name in ("weight", "bias"):
            value = getattr(layer, name)
            end = offset + value.size
            params[offset:end] = value.reshape(-1)
            setattr(layer, name, params[offset:end].reshape(value.shape))
            setattr(layer, "grad_" + name, grads[offset:end].reshape(value.shape))
            offset = end
    return params, grads


def pack_bf16_weights(linears, params, backend):
    """A flat bf16 copy of `params` (the buffer `pack_parameters` returned), each layer's
    `weight16` a view into it; None on an fp32 backend. The optimiser refreshes it each step."""
    if not backend.bf16:
        return None
    params16 = backend.empty16(params.shape)
    backend.ops.to_bf16(params, params16)
    offset = 0
    for layer in linears:
        size = layer.weight.size
        layer.weight16 = params16[offset:offset + size].reshape(layer.weight.shape)
        offset += size + layer.bias.size
    return params16
