"""``DirectLaunch``: the first call through Triton's JIT, later ones straight to the compiled kernel's launcher with
the constexprs appended in parameter order; back to the JIT for good where that launcher refuses the arguments.
Checked with stand-ins for the kernel, its compiled form and Triton's runtime, so it runs without Triton (the real
launch runs in ``test_packed_kernels.py`` on a GPU)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest

from model_compress.rpq.kernels.launch import direct_launch
from model_compress.rpq.kernels.launch.direct_launch import DirectLaunch


class Param(SimpleNamespace):
    pass


class FakeKernel:
    """A JIT function with parameters x, n, BLOCK (constexpr), FLAG (constexpr, default 7)."""

    def __init__(self, refuse: bool = False) -> None:
        self.params = [Param(name="x", is_constexpr=False, default=inspect.Parameter.empty),
                       Param(name="n", is_constexpr=False, default=inspect.Parameter.empty),
                       Param(name="BLOCK", is_constexpr=True, default=inspect.Parameter.empty),
                       Param(name="FLAG", is_constexpr=True, default=7)]
        self.jit_calls: list[tuple] = []
        self.direct_calls: list[tuple] = []
        refuse_now = refuse

        def run(*args):
            if refuse_now:
                raise TypeError("function takes 12 arguments")
            self.direct_calls.append(args)

        self.compiled = SimpleNamespace(run=run, function=1234, packed_metadata=(4, 1, 0))

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            return self.compiled

        return launch


@pytest.fixture
def fake_driver(monkeypatch):
    """No launch hooks, device 0, stream 99."""
    monkeypatch.setattr(direct_launch, "_triton_runtime", lambda: ((None, None), lambda: 0, lambda device: 99))


def test_a_launch_hook_keeps_the_jit(monkeypatch):
    monkeypatch.setattr(direct_launch, "_triton_runtime", lambda: ((print, None), lambda: 0, lambda device: 99))
    kernel = FakeKernel()
    launch = DirectLaunch(kernel, (1,), BLOCK=8)
    launch("a", 1)
    launch("b", 1)
    assert len(kernel.jit_calls) == 2 and not launch.direct


def test_the_first_call_goes_through_the_jit_and_later_ones_to_the_launcher(fake_driver):
    kernel = FakeKernel()
    launch = DirectLaunch(kernel, (3, 2), BLOCK=64, num_warps=4)
    launch("a", 5)
    assert kernel.jit_calls == [((3, 2), ("a", 5), {"BLOCK": 64, "num_warps": 4})] and launch.direct
    launch("b", 5)
    launch("c", 5)
    assert len(kernel.jit_calls) == 1
    assert kernel.direct_calls == [(3, 2, 1, 99, 1234, (4, 1, 0), None, None, None, x, 5, 64, 7) for x in ("b", "c")]


def test_a_launcher_that_refuses_the_arguments_sends_every_later_call_through_the_jit(fake_driver):
    kernel = FakeKernel(refuse=True)
    launch = DirectLaunch(kernel, (1,), BLOCK=16)
    for x in ("a", "b", "c"):
        launch(x, 1)
    assert [call[1] for call in kernel.jit_calls] == [("a", 1), ("b", 1), ("c", 1)] and not launch.direct


def test_constexprs_before_runtime_arguments_or_missing_ones_keep_the_jit(fake_driver):
    kernel = FakeKernel()
    launch = DirectLaunch(kernel, (1,))  # BLOCK has no default and is not given
    launch("a", 1)
    launch("b", 1)
    assert len(kernel.jit_calls) == 2 and kernel.direct_calls == [] and not launch.direct


def test_a_launcher_that_needs_no_scratch_is_called_at_its_c_entry_point_with_its_launch_flags(fake_driver):
    """Triton's Python launcher only allocates scratch buffers and passes two flags on: where the kernel needs no
    scratch, later calls go to its C entry point directly, with the flags the wrapper would have passed."""
    kernel = FakeKernel()
    calls = []
    wrapper = SimpleNamespace(launch=lambda *args: calls.append(args), global_scratch_size=0, profile_scratch_size=0,
                              launch_cooperative_grid=False, launch_pdl=True)
    kernel.compiled = SimpleNamespace(run=wrapper, function=1234, packed_metadata=(4, 1, 0))
    launch = DirectLaunch(kernel, (3,), BLOCK=64)
    launch("a", 5)
    launch("b", 5)
    assert calls == [(3, 1, 1, 99, 1234, False, True, None, None, (4, 1, 0), None, None, None, "b", 5, 64, 7)]
    needs_scratch = SimpleNamespace(launch=lambda *args: calls.append(("bare",)), global_scratch_size=128, profile_scratch_size=0,
                                    launch_cooperative_grid=False, launch_pdl=False)
    assert direct_launch._bare_launcher(needs_scratch) is None
    assert direct_launch._bare_launcher(lambda *args: None) is None
