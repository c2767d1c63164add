"""The decode graph under inductor without Dynamo: a compiled call that checks only what can change.

torch.compile guards every call with ~1,200 checks over the decode graph's ~500 inputs (a
TENSOR_MATCH per weight, module-attribute type checks) and runs Dynamo's and AOTAutograd's Python
wrappers around inductor's code: measured on SmolLM2 int8, ~1.7 ms of a ~10 ms step. But the
engine fixes most of those inputs: only the first `n_varying` (token ids, mask, positions, KV
cache, thresholds) change between calls; the weights are the engine's own tensors, updated in place
by re-selection. So the graph is compiled once per call signature with
torch._inductor.standalone_compile (the same inductor code torch.compile would run) over fake
inputs whose growing dims (the cache and mask lengths) are symbolic, and a call checks:

- the signature of the varying inputs: dtype, static sizes, strides of the all-static ones;
- the symbolic-shape guards inductor's code assumed (mask length <= cache capacity, a capacity
  that differs from the mask length, strides of the dynamic tensors), as one expression compiled
  from the ShapeEnv that traced them.

Inductor generates the variant's wrapper in C++ (`cpp_wrapper`): the default Python wrapper runs
~50 Python statements per layer every step (buffer views, size asserts, each kernel and custom op
called through Python); the C++ one calls them directly. SmolLM2 int8 dense, one process, the two
wrappers alternated per round, median step 11.77 -> 7.99 ms (1.47x; another run 1.62x;
docs/BENCHMARKS.md), the same logits bit for bit. The price is compile time (SmolLM2: ~70 s instead of ~30 s, once per variant).

A call whose signature is new compiles a new variant; one that fails every variant's guards for
its signature compiles another with its own sizes as hints (Dynamo recompiles in the same cases).
Past `max_variants` a warning names the cause and calls run the graph eagerly (correct, slower).
"""

from __future__ import annotations

import copy
import re
import warnings

import torch
from torch import fx


class DirectCompiled:
    """Callable: gm(*args) compiled by inductor, without per-call guards on the fixed inputs.

    gm: a GraphModule this object may own and mutate (pass a private copy).
    n_varying: how many leading inputs change between calls; the rest must be the same tensors
        (or same-shaped tensors updated in place) on every call.
    dynamic: input index -> the dims compiled as symbolic (e.g. the KV cache's length).
    cpp_wrapper: inductor's C++ wrapper (module docstring); False keeps its Python wrapper; None
        takes `cpp_wrapper_default` (True; the test suite sets it False for quicker compiles)."""

    cpp_wrapper_default = True

    def __init__(self, gm: fx.GraphModule, n_varying: int, dynamic: dict[int, tuple[int, ...]],
                 max_variants: int = 8, cpp_wrapper: bool | None = None):
        if max_variants < 1:
            raise ValueError(f"`max_variants` must be >= 1, got {max_variants}")
        self.gm = gm
        self.n_varying = n_varying
        self.dynamic = {i: frozenset(dims) for i, dims in dynamic.items()}
        self.max_variants = max_variants
        self.cpp_wrapper = self.cpp_wrapper_default if cpp_wrapper is None else cpp_wrapper
        self.variants: dict[tuple, list] = {}  # signature -> [(guard code or None, compiled)]
        self.compiles = 0
        self._eager = False

    def signature(self, args, sizes, strides) -> tuple:
        """The varying inputs' dtypes, static sizes and (all-static tensors) strides, from their
        size() and stride() tuples `sizes` / `strides`."""
        sig = []
        for i, a in enumerate(args[:self.n_varying]):
            dims = self.dynamic.get(i)
            if dims is None:  # a size-1 dim's stride addresses nothing (inductor's asserts skip it too)
                sig.append((a.dtype, sizes[i], tuple(st if k != 1 else 0 for k, st in zip(sizes[i], strides[i]))))
            else:  # strides of a tensor with a symbolic dim are checked by the shape guards
                sig.append((a.dtype, tuple(-1 if d in dims else k for d, k in enumerate(sizes[i]))))
        sig.append(len(args))
        return tuple(sig)

    def __call__(self, *args):
        if self._eager:
            return self.gm(*args)
        # each varying input's size() and stride() read once: the signature and the shape guards
        # (rewritten by _fast_guards to index these lists) use them: what a call adds to the
        # compiled code, SmolLM2 (65 varying inputs), 189 -> 104 us with each guard term calling
        # size() / stride() itself before
        n = self.n_varying
        sizes = [a.size() for a in args[:n]]
        strides = [a.stride() for a in args[:n]]
        sig = self.signature(args, sizes, strides)
        variants = self.variants.setdefault(sig, [])
        scope = {"S": sizes, "T": strides}
        for code, fn in variants:
            if code is not None and "L" in code.co_names and "L" not in scope:  # a guard _fast_guards kept as is
                scope["L"] = {f"t{i}": a for i, a in enumerate(args[:n])}
            if code is None or eval(code, _GUARD_GLOBALS, scope):
                return fn(*args)
        if self.compiles >= self.max_variants:
            warnings.warn(f"the decode graph was compiled for {self.compiles} call signatures (batch size, step "
                          "width, threshold shapes); running it eagerly from now on. Keep those fixed per engine "
                          "to stay compiled.", RuntimeWarning, stacklevel=3)
            self._eager = True
            return self.gm(*args)
        code, fn = self._compile(args)
        variants.append((code, fn))
        return fn(*args)

    def _compile(self, args):
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
        fakes = []
        for i, a in enumerate(args):
            dims = self.dynamic.get(i, frozenset())
            ctx = StatelessSymbolicContext(
                dynamic_sizes=[DimDynamic.DYNAMIC if d in dims else DimDynamic.STATIC for d in range(a.dim())])
            fakes.append(fake_mode.from_tensor(a, symbolic_context=ctx))
        # a fresh GraphModule per variant (standalone_compile takes ownership of the one it gets);
        # its attributes (the weights) are shared with self.gm, not copied
        gm = fx.GraphModule(self.gm, copy.deepcopy(self.gm.graph))
        # inductor's cpp_wrapper path takes its example inputs from the placeholders' meta["val"]
        # when any is set; the passes add placeholders without one (a None input breaks tracing),
        # so none is kept and the fakes above are used for every input
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                node.meta.pop("val", None)
        with torch.no_grad(), torch._inductor.config.patch(cpp_wrapper=self.cpp_wrapper):
            fn = torch._inductor.standalone_compile(gm, fakes, dynamic_shapes="from_example_inputs",
                                                    fake_mode=fake_mode, donate_graph_module=True)
        code = fake_mode.shape_env.produce_guards_expression(fakes[:self.n_varying])
        self.compiles += 1
        return (None if code is None else compile(_fast_guards(code), "<clada decode guards>", "eval")), fn


_SIZE = re.compile(r"L\['t(\d+)'\]\.size\(\)")
_STRIDE = re.compile(r"L\['t(\d+)'\]\.stride\(\)")


def _fast_guards(code: str) -> str:
    """The ShapeEnv's guard expression over L['t<i>'].size() / .stride() rewritten to index the
    lists S / T that __call__ reads once per call. A guard that reads anything else of an input (a
    storage offset, the tensor itself) stays as it was, evaluated over L."""
    fast = _STRIDE.sub(r"T[\1]", _SIZE.sub(r"S[\1]", code))
    return code if "L[" in fast else fast


def _guard_globals() -> dict:
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    return dict(SYMPY_INTERP)


_GUARD_GLOBALS = _guard_globals()
