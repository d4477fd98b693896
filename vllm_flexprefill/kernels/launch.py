"""Triton launches at a small host cost: the compiled kernel memoised on what selects it.

``kernel[grid](*args)`` binds every argument, builds Triton's specialisation key and looks
it up on each call: with these kernels' dozens of arguments, and five launches per sparse
layer call, more host time than the estimation's device time.
``Launcher`` keys its own cache on the few facts Triton specialises on (tensor dtype and
16-byte alignment, integer 1 / multiple of 16 / 32-bit range, the constexprs and launch
options) and calls the compiled kernel directly. A key it has not seen goes through
``kernel[grid]`` once, which compiles or finds the variant; the key is at least as fine
as Triton's, so a memoised kernel is the one Triton would have chosen. A memoised kernel
is launched through its own launcher (``CompiledKernel.run``) with the arguments Triton's
runner gives it, which skips the runner's device, stream and hook lookups (``direct``);
where a Triton lays these out otherwise, or launch hooks are set, the runner launches it.
The interpreter (CPU tensors) always takes Triton's path.

Ledger: what this module uses beyond Triton's and torch's public API, for which versions,
and the test that catches a break (like ``backend/compat.py`` for vLLM).

- ``CompiledKernel.run / function / packed_metadata`` and ``triton.knobs.runtime``'s launch
  hooks: the compiled kernel's own launcher, called as Triton's runner calls it. Triton
  3.3-3.6; where they are missing or take other arguments, ``direct`` returns None or the
  launch falls back to the runner. tests/cpu/test_launch.py (stand-ins for each form), the
  GPU tier (every kernel test launches through it).
- ``torch._C._cuda_getCurrentRawStream``: the current stream's raw handle, which the runner
  reads the same way. torch 2.4-2.13. The GPU tier.
"""

from __future__ import annotations

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


def direct(compiled):
    """``go(grid3, stream, args) -> bool``: launches ``compiled`` through its own launcher as
    Triton's runner does (no launch metadata, no hooks), False where hooks are set (the runner
    builds their metadata); None where this Triton's compiled kernels lack that launcher."""
    try:
        from triton import knobs

        run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
        runtime = knobs.runtime
    except (ImportError, AttributeError):
        return None

    def go(grid: tuple, stream: int, args: tuple) -> bool:
        if not (idle(runtime.launch_enter_hook) and idle(runtime.launch_exit_hook)):
            return False
        run(grid[0], grid[1], grid[2], stream, function, metadata, None, None, None, *args)
        return True

    return go


def idle(hook) -> bool:
    """Whether a launch hook is unset: None, or a chain of no hooks (newer Tritons' ``HookChain``)."""
    return hook is None or getattr(hook, "calls", None) == []


def current_stream(device_index: int) -> int:
    """The raw handle of the device's current CUDA stream (what Triton's runner launches on)."""
    return torch._C._cuda_getCurrentRawStream(device_index)


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
        # key -> (compiled kernel, the names of the arguments after the positional ones, its direct launch)
        self.compiled: dict[tuple, tuple] = {}
        self.stream = current_stream

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: tuple, args: tuple, kwargs: dict) -> None:
        first = args[0]
        if first.device.type != "cuda":
            self.kernel[grid](*args, **kwargs)
            return
        index = first.device.index
        key = (index, tuple(kwargs.items()), args_key(args))
        hit = self.compiled.get(key)
        if hit is None:
            compiled = self.kernel[grid](*args, **kwargs)
            self.compiled[key] = compiled, self.names[len(args):], direct(compiled)
            return
        compiled, rest, go = hit
        grid3 = (*grid, 1, 1)[:3]
        full = (*args, *[kwargs[n] if n in kwargs else self.defaults[n] for n in rest])
        if go is not None:
            try:
                if go(grid3, self.stream(index), full):
                    return
            except TypeError:
                # this Triton's launcher takes other arguments (raised before any launch): its runner from now on
                self.compiled[key] = compiled, rest, None
        compiled[grid3](*full)


# kernel id -> its Launcher; keyed by id because hashing a JITFunction hashes its source's
# key on every launch
_launchers: dict[int, Launcher] = {}


def launcher(kernel) -> Launcher:
    """The one ``Launcher`` of a Triton kernel (``launcher.cache_clear()`` forgets them all)."""
    hit = _launchers.get(id(kernel))
    if hit is None or hit.kernel is not kernel:
        hit = _launchers[id(kernel)] = Launcher(kernel)
    return hit


launcher.cache_clear = _launchers.clear
