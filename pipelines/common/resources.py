"""Resource flags every job reads the same way: a size or an autoscaling range, a GPU type.

One rule each, used by the embed job's actors, the server's replicas and Ray Train's
workers, so their messages and limits agree.
"""

from __future__ import annotations

from bge_core.errors import InputError


def parse_count_range(value: str | int, flag: str) -> tuple[int, int]:
    """(min, max) from ``"N"`` (a fixed size: min = max) or ``"MIN,MAX"`` (autoscaling).

    Raises:
        InputError: anything else, naming `flag`.
    """
    try:
        sizes = [int(part.strip()) for part in str(value).split(",")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1 or sizes[0] > sizes[-1]:
        raise InputError(f"{flag} must be 'N' or 'MIN,MAX' with 1 <= MIN <= MAX, "
                         f"got {value!r}")
    return sizes[0], sizes[-1]


def check_accelerator(accelerator_type: str | None, gpus: float, *, type_flag: str,
                      gpu_flag: str) -> None:
    """A GPU type (Ray's ``accelerator_type:<type>`` node resource) only selects among GPUs.

    Raises:
        InputError: a type given with no GPU asked for, naming both flags.
    """
    if accelerator_type and gpus <= 0:
        raise InputError(f"{type_flag} needs {gpu_flag}: {accelerator_type!r} selects a "
                         f"GPU type, and no GPU was asked for")
