"""A Triton kernel whose launch shape is fixed, launched after its first call straight through its compiled launcher.

``kernel[grid](*args)`` binds and specialises every argument, hashes a cache key, checks the kernel's globals and
reads Triton's knobs on each call: on the hosts measured, 25-47 us of host time per launch where a cuBLAS call costs
12-14 us (benchmarks/RESULTS.md). In eager decoding the GPU waits on that. A layer's launch repeats the same
specialisation call after call: its weights, shapes and tiles do not change, only the activation and output
buffers do, and those come from PyTorch's allocator with the same alignment. So the first call goes through the
JIT (compiling if needed) and hands back the compiled kernel; later calls pass the arguments in the kernel's
parameter order, constexprs included, to the compiled kernel's launcher, as the JIT itself does.

The caller promises that every later call's arguments specialise as the first call's did: the same dtypes, the same
integer values, pointers aligned alike (``plans.input_signature`` puts the activation's alignment in the key). Where
the direct path does not apply (the CPU interpreter, launch hooks set by a profiler, a Triton whose compiled kernel
is shaped otherwise), every call goes through the JIT.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


class DirectLaunch:
    """``kernel[grid](*args, **constants)`` for one grid and one set of constexprs and launch options."""

    __slots__ = ("_kernel", "_grid", "_constants", "_launch", "_tried", "direct")

    def __init__(self, kernel: Any, grid: tuple[int, ...], **constants: Any) -> None:
        self._kernel = kernel
        self._grid = grid
        self._constants = constants  # constexpr parameters and launch options (num_warps, num_stages)
        self._launch: Callable[..., None] | None = None
        self._tried = False  # whether a direct launch has run once
        self.direct = False  # whether calls after the first skip the JIT

    def __call__(self, *args: Any) -> None:
        launch = self._launch
        if launch is not None and self._tried:
            launch(*args)
            return
        if launch is None:
            compiled = self._kernel[self._grid](*args, **self._constants)
            direct = compiled_launcher(self._kernel, compiled, self._grid, len(args), self._constants)
            self.direct = direct is not None
            self._launch = direct if direct is not None else self._through_jit
            return
        self._tried = True
        try:  # a launcher that parses its arguments otherwise refuses them before launching anything
            launch(*args)
        except (TypeError, ValueError, SystemError):
            self.direct, self._launch = False, self._through_jit
            self._through_jit(*args)

    def _through_jit(self, *args: Any) -> None:
        self._kernel[self._grid](*args, **self._constants)


def _triton_runtime() -> tuple[tuple[Any, Any], Callable[[], int], Callable[[int], int]]:
    """Triton's launch hooks (enter, exit) and its driver's current device and stream, as the JIT reads them."""
    from triton import knobs
    from triton.runtime.driver import driver

    active = driver.active
    return (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook), active.get_current_device, active.get_current_stream


def _hooked(hook: Any) -> bool:
    """Whether a Triton launch hook is set (a HookChain with calls in Triton 3.5+, a callable before)."""
    return hook is not None and (not hasattr(hook, "calls") or bool(hook.calls))


def compiled_launcher(kernel: Any, compiled: Any, grid: tuple[int, ...], positional: int,
                      constants: dict[str, Any]) -> Callable[..., None] | None:
    """A launch of ``compiled`` (what ``kernel[grid](...)`` returned) taking the ``positional`` runtime arguments, the
    constexprs bound after them; None where that would not launch what the JIT launches."""
    try:
        hooks, current_device, current_stream = _triton_runtime()
        if any(_hooked(hook) for hook in hooks):
            return None
        params = kernel.params
        if len(params) < positional or any(param.is_constexpr for param in params[:positional]):
            return None  # the runtime arguments must come first, as in every kernel of this package
        tail = tuple(constants[param.name] if param.name in constants else param.default for param in params[positional:])
        if any(value is inspect.Parameter.empty for value in tail):
            return None
        run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
    except (AttributeError, ImportError, KeyError, RuntimeError, TypeError):  # RuntimeError: no GPU driver
        return None
    if function is None:
        return None
    grid_x, grid_y, grid_z = (*grid, 1, 1)[:3]
    device = current_device()  # the plan's tensors live on the device its first call ran on
    bare = _bare_launcher(run)
    if bare is not None:
        c_launch, cooperative, pdl = bare

        def launch_bare(*args: Any) -> None:
            c_launch(grid_x, grid_y, grid_z, current_stream(device), function, cooperative, pdl, None, None, metadata, None,
                     None, None, *args, *tail)

        return launch_bare

    def launch(*args: Any) -> None:
        run(grid_x, grid_y, grid_z, current_stream(device), function, metadata, None, None, None, *args, *tail)

    return launch


def _bare_launcher(run: Any) -> tuple[Callable[..., None], Any, Any] | None:
    """The compiled launcher's C entry point with its two launch flags, where the Python wrapper around it would only
    pass them on: a kernel that needs no global or profiling scratch buffer (the wrapper allocates those per call).
    None where the launcher is shaped otherwise (another Triton version), and the wrapper is called instead."""
    try:
        if run.global_scratch_size or run.profile_scratch_size:
            return None
        return run.launch, run.launch_cooperative_grid, run.launch_pdl
    except AttributeError:
        return None
