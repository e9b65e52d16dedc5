"""How every op is registered and called: a torch custom op for torch.compile, autograd in C++ or
a light autograd.Function for eager mode.

The custom op (torch.library.custom_op, with its fake kernel and autograd) is what torch.compile,
export, opcheck and any torch dispatch mode (FakeTensorMode, FlopCounterMode) see. Its dispatch
costs tens of microseconds a call on the host, more than a small kernel, so eager calls skip it:
the native backends (cpu, cuda) go into their extension's op with autograd in C++
(csrc/common/autograd.h), the others into the same implementation as the custom op's through an
autograd.Function made of its setup_context and backward (quack takes this route too).

Each public function reads:
    if custom.traced():  return OP.op(*args, requested)
    name = backends.select(...)
    if name in native.EXTENSIONS: return <the extension's autograd op>(*args)
    return OP.eager(*args, name)
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


class Op(NamedTuple):
    op: Callable  # torch.ops.fastforget.<name>: for tracing and dispatch modes
    eager: Callable  # the same implementation with its autograd, without the custom op's dispatch


def register(name: str, impl: Callable, fake: Callable, *, setup_context: Optional[Callable] = None,
             backward: Optional[Callable] = None, mutates_args=()) -> Op:
    """Registers impl as torch.ops.fastforget.<name> (schema from its annotations) with its fake
    kernel and, given backward, its autograd; returns the op and its eager form."""
    op = torch.library.custom_op(f"fastforget::{name}", impl, mutates_args=mutates_args)
    op.register_fake(fake)
    eager = impl
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)

        def forward(ctx, *args):  # ctx-style: with a setup_context of its own, apply binds args by inspect (~20 us)
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        eager = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                        "backward": staticmethod(backward)}).apply
    return Op(getattr(torch.ops.fastforget, name).default, eager)


def traced() -> bool:
    """Whether this runs under torch.compile's (or export's) tracing or a torch dispatch mode."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
