"""Static scales for an int8 KV cache (optimize/kv_int8.py), from the reference model's own keys and
values: the largest magnitude each head and channel takes over calibration text that fills the
model's positions, with a margin, / 127. A value beyond its channel's range is clamped, so the text
should be like what the model will serve (``--kv-calibration FILE``: one text per line)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..optimize.kv_int8 import scale_name
from .errors import ExportError
from .model import CPMModel

# built-in calibration text: news, encyclopedic, conversational, numbers and punctuation
CALIBRATION_TEXT = [
    "清华大学是中国著名的高等学府，位于北京市海淀区，前身是清华学堂，始建于1911年。",
    "今天天气很好，我们一起去公园散步吧。你觉得下午三点怎么样？",
    "人工智能技术正在改变我们的生活和工作方式，从语音识别到自动驾驶，应用越来越广泛。",
    "股市今天大幅上涨，沪深两市成交额突破一万亿元，科技板块领涨。",
    "春节期间，很多人回家与家人团聚，吃年夜饭、看春晚、放鞭炮。",
    "据新华社报道，国家统计局公布的数据显示，上半年国内生产总值同比增长5.5%。",
    "《红楼梦》是中国古典四大名著之一，作者曹雪芹，全书共一百二十回。",
    "他说：“我们必须坚持创新驱动发展战略，加快建设科技强国。”",
    "这家餐厅的菜很好吃，价格也不贵，服务员态度热情，下次还会再来。",
    "第一步，打开电脑；第二步，登录系统；第三步，输入密码并确认。",
]
MARGIN = 1.25  # headroom over the largest value seen: text unlike the calibration's reaches further


def calibration_rows(tokenizer, n_positions: int, vocab_size: int, lines: list[str] | None = None,
                     seed: int = 0) -> list[list[int]]:
    """Two rows of ``n_positions`` tokens: the calibration text repeated, and random ids (which reach
    activations text may not)."""
    ids = [t for line in (lines or CALIBRATION_TEXT) for t in tokenizer.encode(line) if t < vocab_size]
    if not ids:
        raise ExportError("the KV calibration text encodes to no tokens")
    text = (ids * (n_positions // len(ids) + 1))[:n_positions]
    noise = np.random.default_rng(seed).integers(0, vocab_size, n_positions).tolist()
    return [text, noise]


def read_calibration(path: Path) -> list[str]:
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"cannot read the KV calibration text {path}: {e}") from None
    if not lines:
        raise ExportError(f"the KV calibration text {path} has no lines")
    return lines


@torch.no_grad()
def kv_scales(model: CPMModel, rows: list[list[int]], margin: float | None = None) -> dict[str, np.ndarray]:
    """``kv_scale.{layer}.{key|value}`` -> float32 [heads * head_dim] (head-major, as the kernel reads
    them); ``margin`` over the largest value seen (default MARGIN)."""
    margin = MARGIN if margin is None else margin
    peak: dict[str, torch.Tensor] = {}
    for row in rows:
        _, presents = model(torch.tensor([row], dtype=torch.long))
        for layer, (k, v) in enumerate(presents):  # each [1, heads, T, head_dim]
            for kind, x in (("key", k), ("value", v)):
                name = scale_name(layer, kind)
                m = x.abs().amax(dim=(0, 2))  # [heads, head_dim]
                peak[name] = m if name not in peak else torch.maximum(peak[name], m)
    tiny = np.float32(np.finfo(np.float32).tiny)
    return {name: np.maximum(m.reshape(-1).float().numpy() * margin / 127.0, tiny).astype(np.float32)
            for name, m in peak.items()}
