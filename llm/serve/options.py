"""Typed options of a run: what the command line (:mod:`llm.cli`) hands to the library.

The command layer turns parsed arguments into these frozen values; library functions take them
and know nothing of argparse. Every field has the command line's default, so a library caller
writes only what it changes, e.g. ``RunOptions(kv_policy="concat")``.

Meshes and rank grids are ``(rows, cols)`` tuples (``None``: the shard set's or the default).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshrt.movers import DEFAULT_EMULATION

Grid = tuple  # (rows, cols)


@dataclass(frozen=True)
class MeshSpec:
    """The virtual meshes of both phases and the MPI rank grid.

    Attributes
    ----------
    decode, prefill : (int, int) or None
        Virtual mesh of each phase; ``None``: as converted (a shard set), else the default
        (prefill: the decode mesh).
    ranks : (int, int) or None
        MPI rank grid; ``None``: the squarest grid of the running rank count.
    """

    decode: Grid | None = None
    prefill: Grid | None = None
    ranks: Grid | None = None

    @classmethod
    def parse(
        cls, decode: str | None = None, prefill: str | None = None, ranks: str | None = None
    ) -> MeshSpec:
        """From ``"PYxPX"`` texts (``MeshError`` if one is malformed)."""
        from meshrt.mesh import parse_grid

        return cls(
            None if decode is None else parse_grid(decode, "decode mesh"),
            None if prefill is None else parse_grid(prefill, "prefill mesh"),
            None if ranks is None else parse_grid(ranks, "rank grid"),
        )


@dataclass(frozen=True)
class RunOptions:
    """How the model runs on the mesh and how the ledger prices it.

    Attributes
    ----------
    kv_policy : {"shift", "concat"}
    device : str
        PLMR device: ``wse2``, ``wse3`` or ``NAME:field=value,...``.
    allreduce : {"ktree", "pipeline", "ring"}
    groups : int or None
        K-tree first-level group count (``None``: about the square root of the line).
    emulation : {"aggregated", "exact"}
        The fabrics' mover (default :data:`meshrt.movers.DEFAULT_EMULATION`).
    """

    kv_policy: str = "shift"
    device: str = "wse2"
    allreduce: str = "ktree"
    groups: int | None = None
    emulation: str = DEFAULT_EMULATION

    def allreduce_spec(self):
        """The :class:`meshrt.collectives.AllreduceSpec` of ``allreduce`` and ``groups``."""
        from meshrt.collectives import AllreduceSpec

        return AllreduceSpec(self.allreduce, self.groups)

    def model_kwargs(self) -> dict:
        """Keyword arguments of ``MeshModel.from_shards`` / ``from_weights``."""
        return dict(
            kv_policy=self.kv_policy,
            device=self.device,
            allreduce=self.allreduce_spec(),
            emulation=self.emulation,
        )


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from and how it is placed.

    Attributes
    ----------
    path : str or None
        A shard set (from ``convert``) or an HF model directory.
    mesh : MeshSpec
    run : RunOptions
    verify : bool
        Check the shard files' sha256 (sizes are always checked).
    max_context : int or None
        HF directory: a shorter context than ``max_position_embeddings``.
    """

    path: str | None = None
    mesh: MeshSpec = field(default_factory=MeshSpec)
    run: RunOptions = field(default_factory=RunOptions)
    verify: bool = True
    max_context: int | None = None


@dataclass(frozen=True)
class SamplingOptions:
    """Token choice: greedy on the mesh when ``temperature`` is 0, else sampled on the host."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = 0

    def sampler(self):
        """The :class:`llm.text.sampling.Sampler` (``ValueError`` if a value is out of range)."""
        from ..text.sampling import Sampler

        return Sampler(self.temperature, self.top_k, self.top_p, self.seed)


@dataclass(frozen=True)
class StopOptions:
    """When generation stops besides the token limit.

    Attributes
    ----------
    stop : tuple of str
        Token ids or single-token texts (each item may hold several, comma-separated).
    ignore_eos : bool
        Do not stop at the model's end-of-sequence tokens.
    """

    stop: tuple = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class PromptSpec:
    """Where the prompt comes from: at most one of the sources is set.

    Attributes
    ----------
    text : str or None
        Prompt text (needs the model's tokenizer).
    file : str or None
        A file holding the prompt text.
    ids : str or None
        Token ids as text, ``"1,450,4996"``.
    chat : str or None
        A question, rendered as a user turn with the model's chat template.
    system : str or None
        With ``chat``: the system message.
    batch : str or None
        A JSON-lines file of requests (:mod:`llm.serve.batch`).
    """

    text: str | None = None
    file: str | None = None
    ids: str | None = None
    chat: str | None = None
    system: str | None = None
    batch: str | None = None

    @property
    def later(self) -> bool:
        """The prompts are known only once the model is loaded (``batch`` or ``chat``)."""
        return bool(self.batch) or self.chat is not None


@dataclass(frozen=True)
class GenerateOptions:
    """One ``generate`` request (or the defaults of every request of a batch)."""

    prompt: PromptSpec = field(default_factory=PromptSpec)
    max_new_tokens: int = 32
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stop: StopOptions = field(default_factory=StopOptions)
    kv_capacity: int | None = None


@dataclass(frozen=True)
class BatchOptions:
    """``generate --batch``: requests in, results appended to ``out``.

    ``max_batch`` requests decode together (continuous batching, :mod:`llm.serve.scheduler`;
    1: one after the other); ``kv_pool`` is the KV slots per core their caches share
    (``None``: ``max_batch`` caches).
    """

    requests: str
    out: str | None = None
    strict: bool = False
    #: Resume into ``out`` even if its results were made with other sampling settings.
    allow_sampling_change: bool = False
    max_batch: int = 1
    kv_pool: int | None = None


@dataclass(frozen=True)
class BenchOptions:
    """``bench``: what runs (a preset's random weights or a shard set) and how often.

    Attributes
    ----------
    preset : str
        Model shapes of the random weights.
    model : str or None
        A shard set instead of random weights.
    layers : int or None
        Run only the first N layers (the closed-form estimate still covers all).
    mesh : MeshSpec
        A shard set's own meshes; for random weights ``decode`` defaults to 8x8, ``prefill`` to
        the decode mesh.
    run : RunOptions
    prompt_len, new_tokens : int
    seed : int
        Seed of the random weights.
    dtype : str or None
        How random weights are held (``None``: the preset's dtype).
    repeat, warmup : int
        Timed runs (median reported) and untimed runs first.
    batch : int
        Requests decoded together (each its own prompt and KV cache).
    """

    preset: str = "llama-100m"
    model: str | None = None
    layers: int | None = None
    mesh: MeshSpec = field(default_factory=MeshSpec)
    run: RunOptions = field(default_factory=RunOptions)
    prompt_len: int = 16
    new_tokens: int = 16
    seed: int = 0
    dtype: str | None = None
    repeat: int = 3
    warmup: int = 1
    batch: int = 1
