"""Fixed-shape decode steps over a ``SlotCache``, replayed as CUDA graphs on CUDA.

A graph replays the same kernels on the same addresses, so everything a decode step reads or writes is a
buffer that stays in place and keeps its shape: the running rows are padded to a bucket size (1, 2, 4,
8, 16, 32, 48, 64, 96, 128, ...), the step attends over the cache's whole capacity within each row's
window of columns (``decode_attention.py``: as a mask, or flash-attention's KV-cache kernel), the new keys
and values are written at a column held in a tensor (``SlotCache.write_at``), and the rows' tokens,
positions, counts, history and penalty ids are the cache's slot buffers (the ids one per column, so the
penalty gathers a fixed (rows, capacity) block). One step is the whole of it:
the language model, the logits, the repetition penalty, the token choice and the rows' new state; the
host then reads which rows finished, once. Padded rows attend to their own new column only and work on
free slots, whose state the next admission overwrites.

The step runs eagerly everywhere (the reference, and what CPU tests check token for token); on CUDA each
(bucket, capacity) is captured once as a CUDA graph, on the cache's device, after a warm-up on a side
stream. The first replay of each graph at a later step is checked against the eager step on the same
inputs (hidden states within ``REPLAY_TOLERANCE``, the same tokens); if a capture fails or a replay
disagrees, a ``GraphFallbackWarning`` says so and the step stays eager. Running out of memory while
capturing is not a failure of the graph: it reaches the stream, which retries with fewer rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from .batches import advance, choose_next, penalized_scores
from .decode_attention import DecodeWindow, install_flash_dispatch, loaded_with_flash, prepared_mask
from .decode_config import DecodeConfig, TokenChoice
from .kv_cache import SlotCache, bucket_for
from .transformers_internals import attention_implementation

REPLAY_TOLERANCE = 1e-4
"""Largest mean of |replayed - eager| / (1 + |eager|) over the hidden states (in float32) accepted when a
graph's first replay is checked. A replay runs the eager step's kernels on the same inputs, so it agrees
to the bit, or to the odd bf16 rounding step (a mean of about 2e-6 for one in a thousand values); a row
that attends to one column too few in an 800-token prompt moves its states by 7e-4 to 2.4e-3 on average
(``tests/test_static_step.py``)."""


class GraphFallbackWarning(RuntimeWarning):
    """A CUDA graph could not be captured or replayed faithfully; decoding goes on with eager steps."""


class CudaGraphs:
    """Captures CUDA graphs of a step on ``device``, whatever device is current when it runs: warm-ups and
    captures on one side stream of that device (not transformers' or torch's default capture stream,
    which belongs to whichever device made it first), graphs in one memory pool made there. The capture is
    thread-local: other threads (input workers pinning memory) go on while this one captures."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        with torch.cuda.device(device):
            self._side = torch.cuda.Stream(device)
            self._pool: Any = torch.cuda.graph_pool_handle()

    def capture(self, run: Callable[[], None], restore: Callable[[], None]) -> Callable[[], None]:
        """A graph of ``run`` (warmed up twice, ``restore`` undoing each warm-up's writes); returns its replay."""
        with torch.cuda.device(self.device):
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                for _ in range(2):
                    run()
                    restore()
            torch.cuda.current_stream(self.device).wait_stream(self._side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=self._side, capture_error_mode="thread_local"):
                run()  # recorded, not run
        return graph.replay  # type: ignore[no-any-return]


class StaticDecodeStep:
    """One decode step of fixed shape over a ``SlotCache``; see the module. It belongs to one cache (the
    cache holds it, ``SlotCache.step``) and to one decode configuration and token choice."""

    def __init__(self, model: Any, cache: SlotCache, config: DecodeConfig, choice: TokenChoice) -> None:
        self.model, self.language_model = model, model.model.language_model
        self.config, self.choice = config, choice
        device, slots = cache.mask.device, cache.slots
        self.flash = loaded_with_flash(self.language_model)
        if self.flash:
            install_flash_dispatch(attention_implementation(self.language_model.config))
        self.hidden = torch.zeros((slots, int(model.config.text_config.hidden_size)), dtype=cache.keys.dtype,
                                  device=device)  # fmt: skip
        self.done = torch.zeros(slots, dtype=torch.bool, device=device)
        self.holds = torch.ones(slots, dtype=torch.bool, device=device) if config.generation.top_p_check else None
        self.graphs: CudaGraphs | None = CudaGraphs(device) if device.type == "cuda" else None
        self._captured: dict[tuple[int, int, int], Callable[[], None]] = {}
        self._verified: set[tuple[int, int, int]] = set()

    def serves(self, config: DecodeConfig, choice: TokenChoice) -> bool:
        """Whether this step decodes as ``config`` and ``choice`` ask (a reused cache may hold another's)."""
        return self.config == config and self.choice is choice

    def __call__(self, cache: SlotCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Feed each running row its next token; the rows' hidden states, which finished, and (when the
        settings ask) whether top-p kept each one's best token alone."""
        rows = cache.rows
        bucket = bucket_for(rows, cache.slots)
        cache.reserve(1)
        end = cache.end
        cache.mask[rows:bucket] = 0
        cache.mask[:bucket, end] = 1  # padded rows see only their own new column: finite, then dropped
        cache.write_at.fill_(end)
        if self.graphs is not None:
            self._replay(cache, bucket)
        else:
            self._run(cache, bucket)
        cache.mask[rows:bucket, end] = 0
        cache.advance(1)
        return self.hidden[:rows], self.done[:rows], None if self.holds is None else self.holds[:rows]

    def _run(self, cache: SlotCache, bucket: int) -> None:
        """The step itself, eagerly (what a graph records)."""
        window = DecodeWindow.from_mask(cache.mask[:bucket], cache.write_at)
        flash = {"decode_window": window} if self.flash else {}
        ids = None if cache.token_ids is None else cache.token_ids[:bucket]
        if ids is not None:  # the fed token joins the ids the penalty applies to, at its column
            ids.index_copy_(1, cache.write_at, cache.tokens[:bucket, None])
        cache.static_rows = bucket
        try:
            outputs = self.language_model(
                input_ids=cache.tokens[:bucket, None],
                attention_mask=prepared_mask(window.mask, self.language_model),
                position_ids=cache.positions[:, :bucket, None],
                past_key_values=cache,
                use_cache=True,
                **flash,
            )
        finally:
            cache.static_rows = None
        hidden = outputs.last_hidden_state[:, -1]

        def scores(states: torch.Tensor, row_ids: torch.Tensor | None) -> torch.Tensor:
            return penalized_scores(self.model, states, row_ids, self.config)

        done, chosen, holds = choose_next(scores, hidden, cache.tokens[:bucket], cache.counts[:bucket],
                                          cache.output_rows[:bucket], ids, self.config, self.choice)  # fmt: skip
        self.hidden[:bucket].copy_(hidden)
        self.done[:bucket].copy_(done)
        if self.holds is not None and holds is not None:
            self.holds[:bucket].copy_(holds)
        advance(chosen, done, cache.tokens[:bucket], cache.counts[:bucket], cache.positions[:, :bucket],
                cache.history[:bucket])  # fmt: skip

    def _replay(self, cache: SlotCache, bucket: int) -> None:
        key = (bucket, cache.capacity, cache.keys.data_ptr())  # a grown cache needs new graphs
        if self._captured and next(iter(self._captured))[2] != key[2]:
            self._captured.clear()  # graphs of buffers the cache has replaced
            self._verified.clear()
        if key not in self._captured:
            state = _State(cache, bucket, self)
            try:
                self._captured[key] = self.graphs.capture(lambda: self._run(cache, bucket), state.restore)  # type: ignore[union-attr]
            except torch.OutOfMemoryError:
                raise  # the stream retries with fewer rows; graphs stay on
            except RuntimeError as error:
                state.restore()  # a warm-up may have stopped halfway
                self._fall_back(f"CUDA graph capture failed ({error})")
            self._run(cache, bucket)  # this step runs eagerly; the graph's first replay is checked later
            return
        if key in self._verified:
            self._captured[key]()
            return
        self._check_first_replay(cache, bucket, key)

    def _check_first_replay(self, cache: SlotCache, bucket: int, key: tuple[int, int, int]) -> None:
        """Run the step eagerly and by the graph from the same state; keep the graph if they agree."""
        before = _State(cache, bucket, self)
        self._run(cache, bucket)
        eager = _State(cache, bucket, self)
        before.restore()
        self._captured[key]()
        replayed = _State(cache, bucket, self)
        difference = eager.hidden_difference(replayed)
        if difference <= REPLAY_TOLERANCE and eager.same_choices(replayed):
            self._verified.add(key)
            return
        before.restore()
        self._run(cache, bucket)  # again, eagerly (a replay reading wrong columns also wrote wrong keys there)
        what = f"hidden states by {difference:.3g}" if difference > REPLAY_TOLERANCE else "its chosen tokens"
        self._fall_back(f"a CUDA graph replay differs from the eager step ({what})")

    def _fall_back(self, reason: str) -> None:
        warnings.warn(f"{reason}; decoding eagerly", GraphFallbackWarning, stacklevel=5)
        self.graphs = None
        self._captured.clear()


class _State:
    """A copy of what a step writes in the first ``bucket`` slots, and of its outputs, to compare or put back.
    (Keys, values and the fed ids are written at the step's column, the same by every run from one state.)"""

    def __init__(self, cache: SlotCache, bucket: int, step: StaticDecodeStep) -> None:
        self.cache, self.bucket, self.step = cache, bucket, step
        self.tokens, self.counts = cache.tokens[:bucket].clone(), cache.counts[:bucket].clone()
        self.history, self.positions = cache.history[:bucket].clone(), cache.positions[:, :bucket].clone()
        self.hidden, self.done = step.hidden[:bucket].clone(), step.done[:bucket].clone()

    def restore(self) -> None:
        cache, bucket = self.cache, self.bucket
        cache.tokens[:bucket], cache.counts[:bucket], cache.history[:bucket] = self.tokens, self.counts, self.history
        cache.positions[:, :bucket] = self.positions
        self.step.hidden[:bucket], self.step.done[:bucket] = self.hidden, self.done

    def hidden_difference(self, other: _State) -> float:
        """Mean |other - self| / (1 + |self|) of the hidden states, in float32."""
        mine, theirs = self.hidden.float(), other.hidden.float()
        return float(((theirs - mine).abs() / (1 + mine.abs())).mean())

    def same_choices(self, other: _State) -> bool:
        """The same tokens, counts, history, positions and finished rows."""
        pairs = ((self.tokens, other.tokens), (self.counts, other.counts), (self.history, other.history),
                 (self.positions, other.positions), (self.done, other.done))  # fmt: skip
        return all(torch.equal(mine, theirs) for mine, theirs in pairs)
