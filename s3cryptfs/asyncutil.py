"""Running blocking calls from trio where a stop must not wait for them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")

# trio >= 0.23 names it abandon_on_cancel; 0.22 (what Debian 12 era images ship) cancellable.
_PARAMS = inspect.signature(trio.to_thread.run_sync).parameters
_ABANDON = "abandon_on_cancel" if "abandon_on_cancel" in _PARAMS else "cancellable"


async def run_abandonable(
    fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter | None = None
) -> T:
    """trio.to_thread.run_sync, but a cancelled caller returns at once and leaves the thread
    to finish on its own: for S3 and KMS calls that may hang until their timeout, whose result
    nobody needs once the mount is stopping (what they were for is redone by the next mount)."""
    kwargs: dict[str, Any] = {_ABANDON: True}
    if limiter is not None:
        kwargs["limiter"] = limiter
    result: T = await trio.to_thread.run_sync(fn, *args, **kwargs)
    return result
