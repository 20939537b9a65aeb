"""Binding a cache to a model with diffusers' hook registry: ``enable_cache`` / ``disable_cache``.

Hooks (``diffusers.hooks.ModelHook`` with ``new_forward``, registered by name in each module's
``HookRegistry``; no model code is patched):

* a **step hook** on the transformer: tracks step / CFG branch / new trajectories, and for ``level="model"``
  policies takes the whole decision;
* for ``level="blocks"`` policies, **block hooks**: block 0 records the head input when ``head_blocks > 0``; the
  *entry* block (index ``head_blocks``) probes, decides and, on a skip, returns the reused stack output; the blocks
  after it pass their input through while skipping; the *exit* (last) block records the stack's input/output on a
  computed step;
* for ``level="partial"`` policies (ProfilingDiT), a **partial block hook** on every block: block 0 decides; on a
  skipped step the blocks of a cached span pass their input through, and the span's last block adds the span's
  recorded residual, while every other block computes; on a computed step each span's input and output are
  recorded;
* for policies with ``scheduler_hook`` (ERTACache), the **scheduler's** ``step`` is wrapped: an instance attribute
  that calls the class method, then hands ``(sample, prev_sample)`` to the policy. ``disable_cache`` deletes the
  attribute, so ``scheduler.step`` is the class method again.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.utils import BaseOutput

from .blocks import arg_index, find_blocks, get_arg, slice_batch
from .config import CacheConfig
from .policies.base import CachePolicy, ProbeInput
from .registry import get_policy, policies
from .session import CacheSession
from .stats import CallStats

STEP_HOOK = "infercache_diffusion_step"
BLOCK_HOOK = "infercache_diffusion_block"
SESSION_ATTR = "_infercache_diffusion_cache"
SCHEDULER_ATTR = "_infercache_diffusion_scheduler"


class StepHook(ModelHook):
    """On the transformer: one frame per call; the model-level decision for ``level="model"`` policies."""

    _is_stateful = True

    def __init__(self, session: CacheSession) -> None:
        super().__init__()
        self.session = session
        self._x_index, self._t_index = 0, 1

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._x_index = arg_index(module, "hidden_states", 0)
        self._t_index = arg_index(module, "timestep", 1)
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        s = self.session
        x = get_arg(args, kwargs, "hidden_states", self._x_index)
        frame = s.begin(x, get_arg(args, kwargs, "timestep", self._t_index))
        s.frame = frame
        try:
            call = lambda: self.fn_ref.original_forward(*args, **kwargs)  # noqa: E731
            if s.policy.level == "model":
                return s.run_model_level(frame, x, call, kwargs.get("return_dict", True))
            output = call()
            s.after_model_call(frame, x, output)
            return output
        finally:
            s.frame = None

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.session.reset()
        return module


class BlockHook(ModelHook):
    """On one block of the stack; ``role`` is ``head-input``, ``entry``, ``pass`` or ``exit`` (entry may also exit)."""

    def __init__(self, session: CacheSession, role: str, is_exit: bool = False) -> None:
        super().__init__()
        self.session = session
        self.role = role
        self.is_exit = is_exit or role == "exit"
        self._x_index = 0

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._x_index = arg_index(module, "hidden_states", 0)
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        s, frame = self.session, self.session.frame
        original = self.fn_ref.original_forward
        if frame is None:  # called outside a hooked transformer call
            return original(*args, **kwargs)
        h = get_arg(args, kwargs, "hidden_states", self._x_index)
        if self.role == "head-input":
            frame.head_input = h
            return original(*args, **kwargs)
        if self.role == "entry":
            skip = s.decide(
                frame,
                lambda sl: ProbeInput(
                    x=slice_batch(h, sl, frame.batch),
                    head_input=slice_batch(frame.head_input, sl, frame.batch),
                    block=module,
                    args=slice_batch(args, sl, frame.batch),
                    kwargs=slice_batch(kwargs, sl, frame.batch),
                    transformer=s.transformer,
                ),
            )
            if skip:
                return s.reuse_all(frame, h)
            frame.stack_input = h
            out = _check_tensor(original(*args, **kwargs), module)
            if self.is_exit:
                s.record_all(frame, h, out)
            return out
        if frame.skipping:
            return h
        out = original(*args, **kwargs)
        if self.is_exit and frame.stack_input is not None:
            s.record_all(frame, frame.stack_input, _check_tensor(out, module))
        return out


class PartialBlockHook(ModelHook):
    """On block ``index`` of the stack for ``level="partial"`` policies (per-span reuse, ProfilingDiT)."""

    def __init__(self, session: CacheSession, index: int, span: tuple[int, bool, bool] | None) -> None:
        super().__init__()
        self.session = session
        self.index = index
        self.span = span  # (span index, is the span's first block, is its last block) or None (always computed)
        self._x_index = 0

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._x_index = arg_index(module, "hidden_states", 0)
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        s, frame = self.session, self.session.frame
        original = self.fn_ref.original_forward
        if frame is None:
            return original(*args, **kwargs)
        h = get_arg(args, kwargs, "hidden_states", self._x_index)
        if not frame.decided:
            s.decide(
                frame,
                lambda sl: ProbeInput(
                    x=slice_batch(h, sl, frame.batch),
                    block=module,
                    args=slice_batch(args, sl, frame.batch),
                    kwargs=slice_batch(kwargs, sl, frame.batch),
                    transformer=s.transformer,
                ),
            )
        if self.span is None:
            return original(*args, **kwargs)
        span, first, last = self.span
        if frame.skipping:
            return s.reuse_span_all(frame, span, h) if last else h
        if first:
            frame.span_inputs[span] = h
        out = original(*args, **kwargs)
        if last:
            s.record_span_all(frame, span, frame.span_inputs.pop(span), _check_tensor(out, module))
        return out


def _check_tensor(out: Any, module: torch.nn.Module) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise NotImplementedError(
            f"{type(module).__name__} returns a {type(out).__name__}; infercache's block-level caches support "
            "single-stream blocks that return the hidden states as a tensor (DiT, PixArt, Wan). "
            "Use the model-level policy 'easycache' for this model."
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
def _resolve(pipe_or_transformer: Any) -> tuple[torch.nn.Module, Any]:
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return pipe_or_transformer, None
    transformer = getattr(pipe_or_transformer, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer, getattr(pipe_or_transformer, "scheduler", None)
    raise TypeError(
        "expected a diffusers pipeline with a `transformer` or a torch.nn.Module, "
        f"got {type(pipe_or_transformer).__name__}"
    )


def make_policy(policy: str | CacheConfig | CachePolicy, config: dict[str, Any]) -> CachePolicy:
    """Build a policy from a name plus keyword options, or from a config object (or pass a policy through)."""
    if isinstance(policy, CachePolicy):
        if config:
            raise TypeError("pass either a policy object or keyword options, not both")
        return policy
    if isinstance(policy, CacheConfig):
        if config:
            raise TypeError("pass either a config object or keyword options, not both")
        for name in policies():
            cls = get_policy(name)
            if type(policy) is cls.config_class:
                return cls(policy)
        raise ValueError(f"no registered policy uses {type(policy).__name__}")
    if not isinstance(policy, str):
        raise TypeError(
            f"policy must be a name ({', '.join(policies())}) or a config object, got {type(policy).__name__}"
        )
    cls = get_policy(policy)
    valid = cls.config_class.field_names()
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(unknown)} for policy {policy!r}; valid options: {', '.join(valid)}"
        )
    return cls(cls.config_class(**config))


def _register(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def _unregister(module: torch.nn.Module, name: str) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or name not in registry.hooks:
        return
    registry.remove_hook(name, recurse=False)
    if not registry.hooks:
        # The registry leaves `forward` as an instance attribute; drop it so the class method is used again.
        fwd = module.__dict__.get("forward")
        if fwd is not None and getattr(fwd, "__func__", None) is type(module).forward:
            del module.__dict__["forward"]
        del module._diffusers_hook


def _rebuild_step_output(out: Any, prev: torch.Tensor) -> Any:
    if isinstance(out, tuple):
        return (prev, *out[1:])
    if isinstance(out, BaseOutput):
        return type(out)(**{**out, "prev_sample": prev})
    if isinstance(out, torch.Tensor):
        return prev
    raise TypeError(f"cannot adjust a scheduler output of type {type(out).__name__}")


def _prev_sample(out: Any) -> torch.Tensor:
    if isinstance(out, tuple):
        return out[0]
    if isinstance(out, torch.Tensor):
        return out
    prev = getattr(out, "prev_sample", None)
    if not isinstance(prev, torch.Tensor):
        raise TypeError(f"cannot find prev_sample in a scheduler output of type {type(out).__name__}")
    return prev


def wrap_scheduler(scheduler: Any, session: CacheSession) -> None:
    """Make ``scheduler.step`` call the class method, then let the session's policy adjust ``prev_sample``."""
    if scheduler is None:
        raise ValueError(
            f"{session.policy.name} adjusts the scheduler step: pass scheduler=... to enable_cache (or a pipeline)"
        )
    if hasattr(scheduler, SCHEDULER_ATTR) or "step" in vars(scheduler):
        raise RuntimeError("this scheduler's step is already wrapped (another cache uses it); disable that first")
    original = type(scheduler).step

    def step(*args: Any, **kwargs: Any) -> Any:
        out = original(scheduler, *args, **kwargs)
        sample = kwargs["sample"] if "sample" in kwargs else args[2]
        prev = _prev_sample(out)
        new = session.scheduler_step(sample, prev)
        return out if new is prev else _rebuild_step_output(out, new)

    step.__wrapped__ = original  # type: ignore[attr-defined]
    scheduler.step = step
    setattr(scheduler, SCHEDULER_ATTR, session)


def unwrap_scheduler(scheduler: Any) -> None:
    if scheduler is None or not hasattr(scheduler, SCHEDULER_ATTR):
        return
    vars(scheduler).pop("step", None)
    delattr(scheduler, SCHEDULER_ATTR)


def _invalidate(module: torch.nn.Module) -> None:
    # diffusers >= 0.42 caches child registries (diffusers#14037); older versions have no such cache.
    registry = getattr(module, "_diffusers_hook", None)
    invalidate = getattr(registry, "invalidate_child_registries_cache", None)
    if invalidate is not None:
        invalidate()


def enable_cache(
    pipe_or_transformer: Any,
    policy: str | CacheConfig | CachePolicy,
    *,
    scheduler: Any = None,
    **config: Any,
) -> CacheSession:
    """Enable a step-level cache on a diffusers pipeline (its ``transformer``) or on a transformer module.

    ``policy`` is a registered name (see :func:`policies`) with its options as keywords, or a config object
    (e.g. ``EasyCacheConfig(threshold=0.1)``). ``scheduler`` (taken from the pipeline when given one) lets the
    cache read the number of inference steps; policies that adjust the sampler step (``ertacache``) wrap its
    ``step`` method until ``disable_cache``. Returns the :class:`CacheSession`
    (``session.stats`` / ``cache_stats(model)`` describe the last calls).
    """
    transformer, pipe_scheduler = _resolve(pipe_or_transformer)
    if hasattr(transformer, SESSION_ATTR):
        raise RuntimeError(
            f"a cache ({getattr(transformer, SESSION_ATTR).policy.name}) is already enabled on this model; "
            "call disable_cache first"
        )
    if getattr(transformer, "is_cache_enabled", False):
        raise RuntimeError("a diffusers cache is enabled on this model; call transformer.disable_cache() first")
    pol = make_policy(policy, config)
    blocks = None
    if pol.level in ("blocks", "partial"):
        _, blocks = find_blocks(transformer, pol.config.blocks)
        if len(blocks) <= pol.head_blocks:
            raise ValueError(
                f"{pol.name} computes {pol.head_blocks} head block(s) but the model has only {len(blocks)}"
            )
    pol.setup(transformer, blocks)
    session = CacheSession(transformer, pol, blocks, scheduler if scheduler is not None else pipe_scheduler)
    if pol.scheduler_hook:
        wrap_scheduler(session.scheduler, session)
    _register(transformer, StepHook(session), STEP_HOOK)
    if pol.level == "partial":
        where: dict[int, tuple[int, bool, bool]] = {}
        for j, (first, last) in enumerate(pol.spans):
            for b in range(first, last + 1):
                where[b] = (j, b == first, b == last)
        for i, block in enumerate(blocks):
            _register(block, PartialBlockHook(session, i, where.get(i)), BLOCK_HOOK)
    elif blocks is not None:
        k, last = pol.head_blocks, len(blocks) - 1
        if k > 0:
            _register(blocks[0], BlockHook(session, "head-input"), BLOCK_HOOK)
        _register(blocks[k], BlockHook(session, "entry", is_exit=k == last), BLOCK_HOOK)
        for i in range(k + 1, last + 1):
            _register(blocks[i], BlockHook(session, "exit" if i == last else "pass"), BLOCK_HOOK)
    setattr(transformer, SESSION_ATTR, session)
    _invalidate(transformer)
    return session


def disable_cache(pipe_or_transformer: Any) -> bool:
    """Remove the cache and its hooks; the model's ``forward`` is the original again. False if none was enabled."""
    transformer, _ = _resolve(pipe_or_transformer)
    session: CacheSession | None = getattr(transformer, SESSION_ATTR, None)
    if session is None:
        return False
    session.reset()
    if session.policy.scheduler_hook:
        unwrap_scheduler(session.scheduler)
    if session.blocks is not None:
        for block in session.blocks:
            _unregister(block, BLOCK_HOOK)
    _unregister(transformer, STEP_HOOK)
    _invalidate(transformer)
    delattr(transformer, SESSION_ATTR)
    return True


def get_session(pipe_or_transformer: Any) -> CacheSession | None:
    """The enabled cache's session, or ``None``."""
    transformer, _ = _resolve(pipe_or_transformer)
    return getattr(transformer, SESSION_ATTR, None)


def begin_call(pipe_or_transformer: Any, num_inference_steps: int | None = None) -> None:
    """Tell the cache a new sampling call starts (resets its state); a no-op when no cache is enabled.

    Optional: a new call is also detected automatically (timestep going up, shape change, step count reached).
    Custom sampling loops should call it to pass ``num_inference_steps`` for the last-step guard.
    """
    session = get_session(pipe_or_transformer)
    if session is not None:
        session.begin_call(num_inference_steps)


def cache_stats(pipe_or_transformer: Any) -> list[CallStats]:
    """Stats of the recent calls (oldest first; the last entry is the latest call)."""
    session = get_session(pipe_or_transformer)
    if session is None:
        raise RuntimeError("no infercache diffusion cache is enabled on this model")
    return list(session.history)
