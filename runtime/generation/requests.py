"""The rules a generation request must meet, in one place for the generator, prompt files and the
server: token ids the model can decode, lengths that fit its positions, choices per prompt, and
sampling settings."""

from __future__ import annotations

from ..errors import CPMError
from .sampling import SamplingConfig

DEFAULT_NEW_TOKENS = 50


class GenerationError(CPMError, ValueError):
    """A request that cannot be served as asked (prompt too long, bad lengths, empty prompt)."""


def check_prompt_ids(ids: list, decodable: int) -> None:
    if not ids:
        raise GenerationError("a prompt encodes to no tokens")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < decodable for t in ids):
        raise GenerationError(f"prompt token ids must be in 0..{decodable - 1}")


def new_tokens(max_length: int | None, max_new_tokens: int | None, longest: int, positions: int,
               name: str = "max_new_tokens") -> int:
    """How many tokens to generate: from max_length (which counts the prompt) or ``name``."""
    if max_length is not None and max_new_tokens is not None:
        raise GenerationError(f"give max_length or {name}, not both")
    if max_length is not None:
        if max_length > positions:
            raise GenerationError(f"max_length {max_length} exceeds the model's {positions} positions")
        if max_length - longest < 1:
            raise GenerationError(f"max_length {max_length} leaves no room after a {longest}-token prompt "
                                  "(max_length counts the prompt)")
        return max_length - longest
    new = DEFAULT_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    if new < 1:
        raise GenerationError(f"{name} must be >= 1, got {new}")
    return new


TRUNCATION_HINT = "shorten the prompt or allow left truncation (truncate_prompt=True, --truncate-prompt)"


def fit_prompts(prompts: list[list[int]], new: int, positions: int, truncate: bool = False,
                owner: str = "the model's", hint: str = TRUNCATION_HINT) -> list[list[int]]:
    """Prompts whose tokens plus ``new`` fit ``positions`` (``owner`` says whose): cut from the left
    when ``truncate``, refused otherwise (``hint`` says what to do)."""
    longest = max(len(p) for p in prompts)
    if longest + new <= positions:
        return prompts
    if not truncate:
        raise GenerationError(
            f"prompt of {longest} tokens + {new} new tokens exceeds {owner} {positions} positions; {hint}")
    if new >= positions:
        raise GenerationError(f"{new} new tokens exceed {owner} {positions} positions")
    return [p[-(positions - new):] for p in prompts]


def check_choices(n, do_sample: bool, limit: int | None = None, name: str = "num_return_sequences") -> None:
    """Sequences per prompt: at least one, at most ``limit``; without a limit (one call of the
    generator) more than one only when sampling, as greedy would repeat one sequence. A server
    takes OpenAI's ``n`` as given."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise GenerationError(f"{name} must be a whole number >= 1, got {n!r}")
    if limit is not None and n > limit:
        raise GenerationError(f"n must be between 1 and {limit} (the server's batch), got {n}")
    if limit is None and not do_sample and n > 1:
        raise GenerationError("num_return_sequences > 1 needs do_sample (greedy would repeat one sequence)")


def sampling_config(sampling: dict, decodable: int) -> SamplingConfig:
    """A checked SamplingConfig from keywords (stop may be a string; logit_bias a dict)."""
    if "stop" in sampling:
        stop = sampling["stop"]
        sampling = dict(sampling, stop=(stop,) if isinstance(stop, str) else tuple(stop or ()))
    if isinstance(sampling.get("logit_bias"), dict):
        sampling = dict(sampling, logit_bias=tuple(sorted(sampling["logit_bias"].items())))
    try:
        cfg = SamplingConfig(**sampling)
    except (TypeError, ValueError) as e:
        raise GenerationError(str(e)) from None
    check_bias(cfg, decodable)
    return cfg


def check_bias(cfg: SamplingConfig, decodable: int) -> None:
    """What SamplingConfig cannot check alone: logit_bias ids against the model's vocabulary."""
    if any(t >= decodable for t, _ in cfg.logit_bias):
        raise GenerationError(f"logit_bias token ids must be in 0..{decodable - 1}")
