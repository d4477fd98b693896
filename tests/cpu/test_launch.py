"""The memoised launcher: which calls reach Triton's own launch, and what the compiled kernel receives.

Stubs stand in for a CUDA kernel (the logic is host-side); tests/gpu runs the real kernels through it.
"""

import types

import torch

from vllm_flexprefill.kernels.launch import Launcher


class StubCompiled:
    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("compiled", grid, args))


class StubKernel:
    """A JIT function's surface: ``fn`` (its signature) and ``kernel[grid](...)``, which returns the compiled kernel."""

    def __init__(self, fn=None):
        def scalar_args(x, n, scale, BLOCK, FLAG=False):
            pass

        self.fn = fn or scalar_args
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("triton", grid, args, kwargs))
            return StubCompiled(self.calls)

        return run


class CudaLike:
    """A first argument that says it lives on a CUDA device (the launcher only reads ``device``)."""

    device = types.SimpleNamespace(type="cuda", index=0)


def test_second_call_with_the_same_key_goes_to_the_compiled_kernel_with_constexprs_in_order():
    kernel = StubKernel()
    launch = Launcher(kernel)
    x = CudaLike()
    launch[(4, 2)](x, 40, 0.5, BLOCK=64, num_warps=4)
    launch[(7,)](x, 24, 0.25, BLOCK=64, num_warps=4)  # 24: like 40, not a multiple of 16, not 1
    assert kernel.calls[0] == ("triton", (4, 2), (x, 40, 0.5), {"BLOCK": 64, "num_warps": 4})
    # the constexprs follow the runtime arguments in the kernel's order, defaults filled in
    assert kernel.calls[1] == ("compiled", (7, 1, 1), (x, 24, 0.25, 64, False))
    assert len(kernel.calls) == 2


def test_what_triton_specialises_on_selects_a_new_variant():
    kernel = StubKernel()
    launch = Launcher(kernel)
    x = CudaLike()
    launch[(1,)](x, 40, 0.5, BLOCK=64)
    for n in (32, 1, 2 ** 31, 40):  # multiple of 16, one, past 32 bits: each a variant of its own
        launch[(1,)](x, n, 0.5, BLOCK=64)
    launch[(1,)](x, 40, 0.5, BLOCK=128)  # another constexpr
    launch[(1,)](x, 40, 0.5, BLOCK=64, FLAG=True)
    assert [c[0] for c in kernel.calls] == ["triton"] * 4 + ["compiled"] + ["triton"] * 2


def test_tensor_dtype_and_alignment_select_variants():
    def tensor_args(x, y, n, BLOCK):
        pass

    kernel = StubKernel(tensor_args)
    launch = Launcher(kernel)
    base = torch.zeros(64, dtype=torch.float32)
    # base[1:] starts 4 bytes in: not 16-byte aligned; base[4:] starts 16 bytes in: aligned like base
    for y in (base[:8], base[1:9], base[4:12], base.double()[:8]):
        launch[(1,)](CudaLike(), y, 3, BLOCK=64)
    assert [c[0] for c in kernel.calls] == ["triton", "triton", "compiled", "triton"]


def test_cpu_tensors_always_take_tritons_launch():
    kernel = StubKernel()
    launch = Launcher(kernel)
    x = torch.zeros(4)
    launch[(1,)](x, 40, 0.5, BLOCK=64)
    launch[(1,)](x, 40, 0.5, BLOCK=64)
    assert [c[0] for c in kernel.calls] == ["triton", "triton"]


def test_inlined_key_equals_the_per_argument_key():
    from vllm_flexprefill.kernels.launch import arg_key, args_key

    base = torch.zeros(64)
    args = (base, base[1:], base.bfloat16(), 1, 16, 17, 0, -16, 2 ** 31, -(2 ** 31) - 1, 2.5, True, False, None,
            torch.nn.Parameter(torch.zeros(4)))
    assert args_key(args) == tuple(map(arg_key, args))


class StubDirect(StubCompiled):
    """A compiled kernel with its own launcher, laid out as Triton's runner calls it."""

    function, packed_metadata = "function", "metadata"

    def __init__(self, calls, refuse=False):
        super().__init__(calls)
        self.refuse = refuse

    def run(self, *args):
        if self.refuse:
            raise TypeError("launcher takes other arguments")
        self.calls.append(("direct", args))


class StubDirectKernel(StubKernel):
    def __init__(self, refuse=False):
        super().__init__()
        self.refuse = refuse

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("triton", grid, args, kwargs))
            return StubDirect(self.calls, self.refuse)

        return run


def test_memoised_kernel_goes_to_its_own_launcher_with_the_runners_arguments():
    kernel = StubDirectKernel()
    launch = Launcher(kernel)
    launch.stream = lambda index: 1000 + index
    x = CudaLike()
    launch[(4, 2)](x, 40, 0.5, BLOCK=64)
    launch[(7,)](x, 24, 0.25, BLOCK=64)
    # grid to 3 dims, the current stream, function, metadata, no launch metadata or hooks, then the arguments
    assert kernel.calls[1] == ("direct", (7, 1, 1, 1000, "function", "metadata", None, None, None, x, 24, 0.25, 64,
                                          False))
    assert len(kernel.calls) == 2


def test_launch_hooks_send_launches_through_tritons_runner(monkeypatch):
    from triton import knobs

    kernel = StubDirectKernel()
    launch = Launcher(kernel)
    launch.stream = lambda index: 0
    x = CudaLike()
    launch[(1,)](x, 40, 0.5, BLOCK=64)
    hook = knobs.runtime.launch_enter_hook
    if hasattr(hook, "add"):  # a chain of hooks (newer Tritons): one hook in it
        monkeypatch.setattr(hook, "calls", [print])
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", print)
    launch[(1,)](x, 40, 0.5, BLOCK=64)
    assert [c[0] for c in kernel.calls] == ["triton", "compiled"]


def test_a_launcher_that_refuses_the_arguments_leaves_the_runner_for_good():
    kernel = StubDirectKernel(refuse=True)
    launch = Launcher(kernel)
    launch.stream = lambda index: 0
    x = CudaLike()
    for _ in range(3):
        launch[(1,)](x, 40, 0.5, BLOCK=64)
    assert [c[0] for c in kernel.calls] == ["triton", "compiled", "compiled"]
    (entry,) = launch.compiled.values()
    assert entry[2] is None, "the direct launch is dropped after its first refusal"


def test_one_launcher_per_kernel_until_the_cache_is_cleared():
    from vllm_flexprefill.kernels.launch import launcher

    a, b = StubKernel(), StubKernel()
    first = launcher(a)
    assert launcher(a) is first and first.kernel is a
    assert launcher(b) is not first and launcher(b).kernel is b
    launcher.cache_clear()
    assert launcher(a) is not first and launcher(a).kernel is a
