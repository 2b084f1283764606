"""Where a converted module's flex_attention calls are routed: the name ``flex_attention`` is rebound, while any
converted module runs, to a router that hands each call to the converted module running on this thread (the real
function otherwise).  Rebound: the flex_attention module's attribute and every name bound to it, or to a
torch.compile of it, in loaded modules, and the closure cells of the model's methods that hold it."""

from __future__ import annotations

import sys
import threading
import types
import warnings

from torch import nn


class Router:
    """Sends flex_attention calls to the converted module running on this thread; the real function otherwise.

    The function is replaced where user code can reach it (the flex_attention module's attribute and every name
    bound to it, or to a torch.compile of it, in loaded modules) while any converted module runs."""

    def __init__(self):
        self.local = threading.local()
        self.lock = threading.Lock()
        self.active = 0
        self.saved: list = []
        self.saved_cells: list = []
        self.scanned = -1
        self.bindings: list = []

    def push(self, calls) -> None:
        stack = self.local.__dict__.setdefault("stack", [])
        stack.append(calls)
        with self.lock:
            if self.active == 0:
                self._patch(calls.code_modules, calls.code_cells)
            self.active += 1

    def pop(self, calls) -> None:
        stack = self.local.__dict__.get("stack", [])
        if stack and stack[-1] is calls:
            stack.pop()
        with self.lock:
            self.active -= 1
            if self.active == 0:
                self._restore()

    def route(self, *args, **kwargs):
        stack = self.local.__dict__.get("stack")
        if not stack:
            return _original()(*args, **kwargs)
        return stack[-1].call(*args, **kwargs)

    def _patch(self, code_modules, cells) -> None:
        original = _original()
        if len(sys.modules) != self.scanned:  # every loaded module, again when more were loaded
            self.scanned = len(sys.modules)
            with warnings.catch_warnings():  # reading some modules' attributes warns of deprecations
                warnings.simplefilter("ignore")
                self.bindings = _bindings(original, sys.modules.values())
        # the model's own modules every time: their names may have been bound after the last full scan
        own = _bindings(original, [sys.modules[name] for name in code_modules if name in sys.modules])
        bindings = {(id(space), name): (space, name) for space, name in self.bindings + own}
        self.saved = [(space, name, space[name]) for space, name in bindings.values() if name in space]
        for space, name, _ in self.saved:
            space[name] = self.route
        # and the model's methods that captured it from an enclosing function
        self.saved_cells = [(cell, cell.cell_contents) for cell in cells if _is_flex(cell.cell_contents, original)]
        for cell, _ in self.saved_cells:
            cell.cell_contents = self.route

    def _restore(self) -> None:
        for space, name, value in self.saved:
            space[name] = value
        for cell, value in self.saved_cells:
            cell.cell_contents = value
        self.saved, self.saved_cells = [], []


def _bindings(original, modules) -> list:
    """(namespace, name) of every name of ``modules`` bound to ``original`` or to a torch.compile of it."""
    found = []
    for module in list(modules):
        space = getattr(module, "__dict__", None)
        if isinstance(space, dict):
            found += [(space, name) for name, value in list(space.items()) if _is_flex(value, original)]
    return found


def _is_flex(value, original) -> bool:
    return value is original or _compiled_from(value) is original


def closure_cells(classes) -> list:
    """The closure cells of the methods of ``classes`` (torch's own excluded): where a model defined in a function
    holds flex_attention."""
    cells = []
    for cls in classes:
        for klass in cls.__mro__:
            if klass.__module__.startswith("torch."):
                continue
            for fn in vars(klass).values():
                cells += [c for c in getattr(fn, "__closure__", None) or () if _cell_filled(c)]
    return cells


def mentions_flex(module: nn.Module) -> bool:
    """Whether a method of the module's classes (torch's own excluded) names ``flex_attention``."""

    def names(code):
        yield from code.co_names + code.co_freevars
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                yield from names(const)

    for cls in {type(m) for m in module.modules()}:
        for klass in cls.__mro__:
            if klass.__module__.startswith("torch."):
                continue
            for fn in vars(klass).values():
                code = getattr(fn, "__code__", None)
                if code is not None and "flex_attention" in set(names(code)):
                    return True
    return False


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def _compiled_from(value):
    """The function a torch.compile wrapper compiles (plain functions only: getattr on arbitrary module-level
    objects can run their code)."""
    return value.__dict__.get("_torchdynamo_orig_callable") if isinstance(value, types.FunctionType) else None


def _original():
    import torch.nn.attention.flex_attention as fa

    return _ORIGINAL.setdefault("fn", fa.flex_attention)


_ORIGINAL: dict = {}
ROUTER = Router()
