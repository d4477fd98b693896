"""Triton launches at a small host cost: the compiled kernel memoised on what selects it.

``kernel[grid](*args)`` binds every argument, builds Triton's specialisation key and looks
it up on each call: about 50 us of host time per launch at the SmolLM2 shape (H200,
Triton 3.6), eight launches per sparse layer call, more than the estimation's device time.
``Launcher`` keys its own cache on the few facts Triton specialises on (tensor dtype and
16-byte alignment, integer 1 / multiple of 16 / 32-bit range, the constexprs and launch
options) and calls the compiled kernel directly. A key it has not seen goes through
``kernel[grid]`` once, which compiles or finds the variant; the key is at least as fine
as Triton's, so a memoised kernel is the one Triton would have chosen. The interpreter
(CPU tensors) always takes Triton's path.
"""

from __future__ import annotations

import functools
import inspect

import torch


def arg_key(a) -> object:
    """What Triton may specialise on for one runtime argument."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool) or not isinstance(a, int):
        return type(a)
    return a == 1, a % 16 == 0, -(2 ** 31) <= a < 2 ** 31


def args_key(args: tuple) -> tuple:
    """``arg_key`` of every argument, inlined (a launch's host time is mostly this key)."""
    return tuple([(a.dtype, a.data_ptr() & 15 == 0) if type(a) is torch.Tensor
                  else (a == 1, a & 15 == 0, -2147483648 <= a < 2147483648) if type(a) is int
                  else arg_key(a) for a in args])


class Launcher:
    """``Launcher(kernel)[grid](*runtime_args, **constexprs_and_options)``, as ``kernel[grid]``.

    Runtime arguments come positionally, in the kernel's order; constexprs (those without
    defaults) and launch options (num_warps, num_stages) by name.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        params = inspect.signature(kernel.fn).parameters
        self.names = list(params)
        self.defaults = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
        # key -> (compiled kernel, the names of the arguments after the positional ones)
        self.compiled: dict[tuple, tuple] = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: tuple, args: tuple, kwargs: dict) -> None:
        first = args[0]
        if first.device.type != "cuda":
            self.kernel[grid](*args, **kwargs)
            return
        key = (first.device.index, tuple(kwargs.items()), args_key(args))
        hit = self.compiled.get(key)
        if hit is None:
            compiled = self.kernel[grid](*args, **kwargs)
            self.compiled[key] = compiled, self.names[len(args):]
            return
        compiled, rest = hit
        tail = [kwargs[n] if n in kwargs else self.defaults[n] for n in rest]
        compiled[(*grid, 1, 1)[:3]](*args, *tail)


@functools.cache
def launcher(kernel) -> Launcher:
    """The one ``Launcher`` of a Triton kernel."""
    return Launcher(kernel)
