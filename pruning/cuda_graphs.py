"""CUDA graphs of one scale's transformer forward, captured on first use and replayed after.

At batch 1 on an H100 the eager loop is bound by the host: every scale of Infinity-2B costs about
65 ms of Python and kernel launches (32 blocks, ~30 kernels each) whatever its token count, so
pruning the last scales saves little wall time (issue 3's profile: GPU busy 525 ms unpruned vs
291 ms pruned, wall 1.09 s vs 0.99 s). A graph replays a scale's kernels with one launch.

What a graph is keyed on (everything that fixes shapes, pointers or Python-int offsets): scale
index, rows, tokens per row, the cache's per-row lengths, text length and whether a text mask
exists, dtype. Replays read fixed input buffers (x, RoPE, the text state) and a persistent KV
cache, so the runner owns those: ``kv_cache`` hands out views of one buffer set, emptied for
every batch; ``text_slot`` copies a batch's text state into fixed buffers once per state object.
Only uniform scales whose cache is in 'slice' mode are captured (the unpruned scales, and with
``pruned_shapes`` pruned scales where every row keeps the same count, e.g. batch 1); the rest run
eagerly, as do all scales on CPU, where ``capture=False`` runs the same bookkeeping without
graphs (what the CPU tests check against the plain loop).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from model_loader.kv_cache import KVCache, ScaleLayout
from model_loader.layers import SelfAttnContext
from model_loader.model import InfinityModel
from model_loader.transformer import TextState, head_cond

logger = logging.getLogger(__name__)


@dataclass
class _Graph:
    x: torch.Tensor
    rope: torch.Tensor
    out: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


@dataclass
class GraphStats:
    captured: int = 0
    replayed: int = 0
    eager: int = 0
    failed: list[str] = field(default_factory=list)


class ScaleGraphs:
    """Per-model store of captured scale forwards; pass it to ``pruning.loop.generate(graphs=...)``.

    Not thread-safe: one generation at a time (the worker owns the GPU).
    """

    def __init__(self, model: InfinityModel, capture: bool | None = None, max_graphs: int = 256,
                 pruned_shapes: bool = False, text_bucket: int = 1) -> None:
        """``pruned_shapes``: also capture scales where rows keep a subset of tokens. Off by
        default: LHEP's keep count depends on the image, so every request would capture new
        graphs; benchmarks with a forced keep fraction turn it on.

        ``text_bucket``: round text lengths up to a multiple of this, so prompts of different
        lengths share graphs (a service sees every length; 1 = exact lengths, no mask added).
        A padded text attends through a key mask, which selects another attention kernel than
        the eager unmasked one: results then agree to rounding, not bit for bit."""
        self.model = model
        self.pruned_shapes = pruned_shapes
        self.text_bucket = text_bucket
        self.capture = model.device.type == "cuda" if capture is None else capture
        self.max_graphs = max_graphs
        self.stats = GraphStats()
        self._graphs: dict[tuple, _Graph] = {}
        self._storage: KVCache | None = None
        self._views: dict[tuple[int, int], KVCache] = {}
        self._text: dict[tuple, TextState] = {}
        self._text_src: dict[tuple, TextState] = {}  # the object last copied (held: ids get reused)
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._broken = False

    # ------------------------------------------------------------------ fixed buffers

    def kv_cache(self, n_rows: int, capacity: int, dtype: torch.dtype) -> KVCache:
        """An emptied cache for (rows, capacity): a view of one buffer set sized for the largest
        batch seen so far (an 8B cache row at 1024 px is ~7 GB: one per batch shape would not fit).
        Growing it reallocates, which drops every captured graph (their pointers die with it)."""
        cfg = self.model.transformer.cfg
        big = self._storage
        if big is None or big.n_rows < n_rows or big.capacity < capacity or big.k[0].dtype != dtype:
            rows = max(n_rows, big.n_rows if big is not None else 0)
            cap = max(capacity, big.capacity if big is not None else 0)
            self._storage = None
            self._graphs.clear()
            self._views.clear()
            big = self._storage = KVCache(depth=cfg.depth, n_rows=rows, num_heads=cfg.num_heads,
                                          head_dim=cfg.head_dim, capacity=cap, dtype=dtype, device=self.model.device)
        cache = self._views.get((n_rows, capacity))
        if cache is None:
            cache = KVCache(depth=cfg.depth, n_rows=n_rows, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                            capacity=capacity, dtype=dtype, device=self.model.device, storage=big)
            self._views[(n_rows, capacity)] = cache
        cache.reset()
        return cache

    def _text_key(self, state: TextState) -> tuple:
        """(rows, text slots, no mask needed): the text length rounded up to ``text_bucket``."""
        k0 = state.ca_kv[0][0]
        n, tt = k0.shape[0], k0.shape[2]
        tb = tt if self.text_bucket <= 1 else -(-tt // self.text_bucket) * self.text_bucket
        return (n, tb, state.text_mask is None and tb == tt)

    def text_slot(self, state: TextState) -> tuple[tuple, TextState]:
        """Fixed buffers holding ``state`` (copied when a different state object comes in). With a
        ``text_bucket``, keys and values sit in the first Tt of Tb slots and the mask hides the rest
        (the graph then serves every text length of the bucket)."""
        key = self._text_key(state)
        n, tb, unmasked = key
        tt = state.ca_kv[0][0].shape[2]
        slot = self._text.get(key)
        if slot is None:
            def padded(t: torch.Tensor) -> torch.Tensor:
                return t.new_zeros(*t.shape[:2], tb, t.shape[3])
            slot = TextState(torch.empty_like(state.sos_ND), torch.empty_like(state.gss_N16C),
                             [(padded(k), padded(v)) for k, v in state.ca_kv],
                             None if unmasked else torch.zeros(n, 1, 1, tb, dtype=torch.bool,
                                                               device=state.sos_ND.device),
                             list(state.text_lens))
            self._text[key] = slot
        if self._text_src.get(key) is not state:
            slot.sos_ND.copy_(state.sos_ND)
            slot.gss_N16C.copy_(state.gss_N16C)
            for (dk, dv), (sk, sv) in zip(slot.ca_kv, state.ca_kv, strict=True):
                dk[:, :, :tt].copy_(sk)  # slots past tt keep old finite values; the mask hides them
                dv[:, :, :tt].copy_(sv)
            if slot.text_mask is not None:
                slot.text_mask.zero_()
                if state.text_mask is None:
                    slot.text_mask[..., :tt] = True
                else:
                    slot.text_mask[..., :tt].copy_(state.text_mask)
            slot.text_lens[:] = state.text_lens
        self._text_src[key] = state
        return key, slot

    # ------------------------------------------------------------------ running a scale

    @staticmethod
    def graphable(layout: ScaleLayout, cache: KVCache) -> bool:
        return layout.dense and layout.uniform and cache.uniform and layout.total > 0

    def logits(self, x: torch.Tensor, scale_idx: int, state: TextState, layout: ScaleLayout,
               rope: torch.Tensor, cache: KVCache, pruned: bool = False) -> torch.Tensor:
        """Head logits (N, L, V) of one scale, replayed from a graph when one fits; the cache
        advances exactly as ``forward_scale`` advances it. ``pruned``: rows keep a token subset."""
        tf = self.model.transformer
        if self._broken or not self.graphable(layout, cache) or (pruned and not self.pruned_shapes):
            self.stats.eager += 1
            h = tf.forward_scale(x, scale_idx, state, layout, rope, cache)
            return tf.logits(h, head_cond(layout, state.sos_ND))
        text_key, slot = self.text_slot(state)
        key = (scale_idx, layout.n_rows, layout.lens[0], cache.lens, cache.capacity, text_key, x.dtype, rope.shape)
        g = self._graphs.get(key)
        cache.begin_scale(layout)
        try:
            if g is None:
                if len(self._graphs) >= self.max_graphs:  # shapes are bounded; this only guards memory
                    self._graphs.clear()
                g = _Graph(x.clone(), rope.clone())
                self._capture(g, scale_idx, slot, layout, cache)
                self._graphs[key] = g
            else:
                g.x.copy_(x)
                g.rope.copy_(rope)
                self._replay(g, scale_idx, slot, layout, cache)
        finally:
            cache.end_scale()
        return g.out

    def _fn(self, g: _Graph, scale_idx: int, slot: TextState, layout: ScaleLayout, cache: KVCache):
        tf = self.model.transformer
        h = tf.run_blocks(g.x, scale_idx, slot, SelfAttnContext(layout, g.rope, cache))
        return tf.logits(h, head_cond(layout, slot.sos_ND))

    def _replay(self, g: _Graph, scale_idx, slot, layout, cache) -> None:
        if g.graph is None:  # CPU, or a capture that failed: same buffers, run eagerly
            g.out = self._fn(g, scale_idx, slot, layout, cache)
            self.stats.eager += 1
        else:
            g.graph.replay()
            self.stats.replayed += 1

    def _capture(self, g: _Graph, scale_idx, slot, layout, cache) -> None:
        if not self.capture:
            self._replay(g, scale_idx, slot, layout, cache)
            return
        # warm-up on a side stream (lazy inits, algorithm choice), then capture; the warm-up's
        # output is this call's result, and its cache writes are what a replay writes again
        side = torch.cuda.Stream(device=g.x.device)
        side.wait_stream(torch.cuda.current_stream(g.x.device))
        with torch.cuda.stream(side):
            g.out = self._fn(g, scale_idx, slot, layout, cache)
        torch.cuda.current_stream(g.x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                                enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False):
                with torch.cuda.graph(graph, pool=self._pool):
                    out = self._fn(g, scale_idx, slot, layout, cache)
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot be captured: stay eager
            self._broken = True
            self.stats.failed.append(f"scale {scale_idx}: {type(exc).__name__}: {exc}"[:300])
            logger.warning("CUDA graph capture failed at scale %d, running eagerly: %s", scale_idx, exc)
            self.stats.eager += 1
            return
        graph.replay()  # capture records without running: produce this call's output from the graph
        g.graph, g.out = graph, out
        self.stats.captured += 1
